"""cffi builder for hv._pages: the per-page loops of live migration
(bitmap arithmetic, run scans, zero-page detection, page hashes, sending and
receiving guest pages straight between guest memory and a socket, zstd
compression of page batches with Debian's libzstd).

Out-of-line API mode: the declarations are read from native/pages.h, so the
header is the single source of the interface."""

import os

from cffi import FFI

here = os.path.dirname(os.path.abspath(__file__))


def _declarations() -> str:
    with open(os.path.join(here, "pages.h")) as f:
        return "".join(line for line in f if not line.lstrip().startswith("#"))


ffibuilder = FFI()
ffibuilder.cdef(_declarations())
ffibuilder.set_source(
    "hv._pages",
    '#include "pages.h"',
    sources=[os.path.relpath(os.path.join(here, name)) for name in ("pages.c", "compress.c")],
    libraries=["zstd"],
    include_dirs=[here],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
