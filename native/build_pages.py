"""cffi builder for hv._pages: the per-page loops of live migration
(bitmap arithmetic, run scans, zero-page detection, page hashes, sending and
receiving guest pages straight between guest memory and a socket, zstd
compression of page batches with Debian's libzstd; the postcopy
destination's userfaultfd page server, native/postcopy.h).

Out-of-line API mode: the declarations are read from the headers
(HEADERS), so they are the single source of the interface."""

import os
import re

from cffi import FFI

here = os.path.dirname(os.path.abspath(__file__))


HEADERS = ("pages.h", "postcopy.h")
_CONSTANT = re.compile(r"#define\s+(HV_\w+)\s+\d+\s*$")


def _declarations() -> str:
    """The headers without their preprocessor lines, but with their numeric
    constants (taken from the C compiler: `#define NAME ...`)."""
    out = []
    for name in HEADERS:
        with open(os.path.join(here, name)) as f:
            for line in f:
                m = _CONSTANT.match(line.strip())
                if m:
                    out.append(f"#define {m.group(1)} ...\n")
                elif not line.lstrip().startswith("#"):
                    out.append(line)
    return "".join(out)


ffibuilder = FFI()
ffibuilder.cdef(_declarations())
ffibuilder.set_source(
    "hv._pages",
    '#include "pages.h"\n#include "postcopy.h"',
    sources=[os.path.relpath(os.path.join(here, src))
             for src in ("pages.c", "compress.c", "postcopy.c")],
    libraries=["zstd"],
    include_dirs=[here],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
