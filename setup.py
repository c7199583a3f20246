"""Builds hv's native modules: every native/build_*.py defines a cffi
`ffibuilder` in out-of-line API mode (hv._kvm from <linux/kvm.h>, hv._pages
for the per-page migration loops)."""

import glob
import os

from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))
builders = sorted(glob.glob(os.path.join(here, "native", "build_*.py")))
setup(cffi_modules=[os.path.relpath(b, here) + ":ffibuilder" for b in builders])
