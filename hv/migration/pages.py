"""numpy-facing wrappers over hv._pages, the native per-page loops.

Bitmaps are numpy uint64 arrays in KVM's layout (see hv.memory); range
tables are a pair of uint64 arrays (start pfn, page count). Guest memory is
passed as a GuestMemory (its host_addr and size) or, for tests, any object
with `host_addr` and `size`. No function here loops over pages in Python.
"""

from __future__ import annotations

import errno
import os

import numpy as np

from .._pages import ffi, lib
from ..memory import PAGE_SIZE, bitmap_words

# Cap on the number of ranges in one message table.
MAX_RUNS = 4096


def _u64p(a: np.ndarray):
    assert a.dtype == np.uint64 and a.flags["C_CONTIGUOUS"], "need contiguous uint64"
    return ffi.cast("uint64_t *", ffi.from_buffer(a))


def _mem(mem) -> "ffi.CData":
    return ffi.cast("uint8_t *", mem.host_addr)


def as_bitmap(words, npages: int) -> np.ndarray:
    """A private contiguous uint64 copy of a KVM-layout bitmap, trimmed to npages."""
    arr = np.ascontiguousarray(np.asarray(words, dtype="<u8"), dtype=np.uint64).copy()
    n = bitmap_words(npages)
    if len(arr) < n:
        arr = np.concatenate([arr, np.zeros(n - len(arr), dtype=np.uint64)])
    arr = arr[:n].copy()
    if len(arr):
        lib.hv_bitmap_trim(_u64p(arr), npages)
    return arr


def empty_bitmap(npages: int) -> np.ndarray:
    return np.zeros(bitmap_words(npages), dtype=np.uint64)


def full_bitmap(npages: int) -> np.ndarray:
    bm = np.full(bitmap_words(npages), ~np.uint64(0), dtype=np.uint64)
    if len(bm):
        lib.hv_bitmap_trim(_u64p(bm), npages)
    return bm


def andnot(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    """(a & ~b, number of bits set)."""
    out = np.empty_like(a)
    n = lib.hv_bitmap_andnot(_u64p(out), _u64p(a), _u64p(b), len(a))
    return out, int(n)


def or_into(out: np.ndarray, a: np.ndarray) -> int:
    """out |= a; returns the bits now set in out."""
    return int(lib.hv_bitmap_or(_u64p(out), _u64p(a), len(out)))


def count(bm: np.ndarray) -> int:
    return int(lib.hv_bitmap_count(_u64p(bm), len(bm)))


def set_range(bm: np.ndarray, start: int, n: int) -> None:
    lib.hv_bitmap_set_range(_u64p(bm), start, n)


def assign_ranges(bm: np.ndarray, starts: np.ndarray, counts: np.ndarray, value: int) -> None:
    """Set (value 1) or clear (0) the bits of every range of a range table."""
    if len(starts):
        lib.hv_bitmap_assign_ranges(_u64p(bm), _u64p(starts), _u64p(counts), len(starts),
                                    value)


def runs(bm: np.ndarray, npages: int, max_len: int = 0,
         max_runs: int = MAX_RUNS, pos: int = 0):
    """Yield (starts, counts) tables of at most max_runs runs each, covering
    every set bit of bm in order."""
    starts = np.empty(max_runs, dtype=np.uint64)
    counts = np.empty(max_runs, dtype=np.uint64)
    cpos = ffi.new("size_t *", pos)
    while cpos[0] < npages:
        n = lib.hv_bitmap_runs(_u64p(bm), npages, cpos, _u64p(starts), _u64p(counts),
                               max_runs, max_len)
        if n == 0:
            break
        yield starts[:n].copy(), counts[:n].copy()


def all_runs(bm: np.ndarray, npages: int, max_len: int = 0) -> tuple[np.ndarray, np.ndarray]:
    tables = list(runs(bm, npages, max_len))
    if not tables:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)
    return (np.concatenate([t[0] for t in tables]), np.concatenate([t[1] for t in tables]))


def classify(mem, bm: np.ndarray, npages: int,
             page_size: int = PAGE_SIZE) -> tuple[np.ndarray, np.ndarray, int]:
    """Split the pages set in bm into (data bitmap, zero bitmap, zero count)."""
    data = np.empty_like(bm)
    zero = np.empty_like(bm)
    nzero = lib.hv_classify_pages(_mem(mem), page_size, _u64p(bm), npages,
                                  _u64p(data), _u64p(zero))
    return data, zero, int(nzero)


def page_is_zero(mem, pfn: int, page_size: int = PAGE_SIZE) -> bool:
    return bool(lib.hv_page_is_zero(_mem(mem) + pfn * page_size, page_size))


def fill(mem, starts: np.ndarray, counts: np.ndarray, pattern: int = 0,
         discard: bool = True, page_size: int = PAGE_SIZE) -> None:
    r = lib.hv_fill_ranges(_mem(mem), mem.size, page_size, _u64p(starts), _u64p(counts),
                           len(starts), pattern & 0xFFFFFFFF, 1 if discard else 0)
    if r < 0:
        _raise(r, "filling pages")


def hashes(mem, starts: np.ndarray, counts: np.ndarray,
           page_size: int = PAGE_SIZE) -> np.ndarray:
    """A 64-bit hash per page of the ranges, in table order."""
    total = int(counts.sum()) if len(counts) else 0
    out = np.empty(total, dtype=np.uint64)
    if total:
        lib.hv_page_hashes(_mem(mem), page_size, _u64p(starts), _u64p(counts), len(starts),
                           _u64p(out))
    return out


def hash_bytes(data: bytes, page_size: int = PAGE_SIZE) -> int:
    buf = ffi.from_buffer(data)
    return int(lib.hv_hash_page(ffi.cast("uint8_t *", buf), page_size))


def range_pfns(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Every page frame number of a range table, in table order (int64)."""
    counts = np.asarray(counts, dtype=np.int64)
    if not len(counts):
        return np.zeros(0, dtype=np.int64)
    firsts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return np.repeat(np.asarray(starts, dtype=np.int64) - firsts, counts) + \
        np.arange(int(counts.sum()), dtype=np.int64)


#: hash_bytes of a page of zeros (a ZERO range's pages)
ZERO_PAGE_HASH = hash_bytes(bytes(PAGE_SIZE))


def fill_page_hash(pattern: int) -> int:
    """hash_bytes of a page that repeats the u32 pattern (a FILL range's pages)."""
    return hash_bytes((pattern & 0xFFFFFFFF).to_bytes(4, "little") * (PAGE_SIZE // 4))


def ranges_valid(starts: np.ndarray, counts: np.ndarray, npages: int) -> bool:
    if not len(starts):
        return True
    return bool(lib.hv_ranges_valid(_u64p(starts), _u64p(counts), len(starts), npages))


class Rate:
    """Token bucket for max_bandwidth (bytes per second, 0 = unlimited),
    shared by every send on one connection."""

    def __init__(self, bytes_per_sec: int = 0):
        self.c = ffi.new("struct hv_rate *")
        self.c.bytes_per_sec = int(bytes_per_sec)

    @property
    def slept_s(self) -> float:
        return self.c.slept_ns / 1e9


def _timeout_ms(timeout) -> int:
    return -1 if timeout is None else max(0, int(timeout * 1000))


def _raise(r: int, what: str, done: int = 0, total: int = 0):
    e = -r
    if e == errno.EPIPE:
        raise ConnectionError(f"{what}: connection closed after {done} of {total} bytes")
    if e == errno.ECONNRESET:
        raise ConnectionError(f"{what}: connection reset after {done} of {total} bytes")
    if e == errno.ETIMEDOUT:
        raise TimeoutError(f"{what}: timed out after {done} of {total} bytes")
    if e == errno.ERANGE:
        raise ValueError(f"{what}: page range outside guest memory")
    raise OSError(e, f"{what}: {os.strerror(e)}")


def send_all(fd: int, data, rate: Rate | None = None, timeout=None) -> None:
    buf = ffi.from_buffer(data)
    r = lib.hv_send_all(fd, ffi.cast("uint8_t *", buf), len(buf),
                        rate.c if rate else ffi.NULL, _timeout_ms(timeout))
    if r < 0:
        _raise(r, "sending", 0, len(buf))


def send_pages(fd: int, mem, starts: np.ndarray, counts: np.ndarray,
               rate: Rate | None = None, timeout=None, page_size: int = PAGE_SIZE) -> int:
    """Send the ranges' pages from guest memory; returns bytes sent."""
    sent = ffi.new("uint64_t *", 0)
    r = lib.hv_send_pages(fd, _mem(mem), mem.size, page_size, _u64p(starts), _u64p(counts),
                          len(starts), rate.c if rate else ffi.NULL, sent,
                          _timeout_ms(timeout))
    if r < 0:
        _raise(r, "sending pages", sent[0], int(counts.sum()) * page_size)
    return int(sent[0])


def recv_all(fd: int, n: int, timeout=None) -> bytes:
    buf = bytearray(n)
    if n:
        got = ffi.new("uint64_t *", 0)
        r = lib.hv_recv_all(fd, ffi.cast("uint8_t *", ffi.from_buffer(buf)), n, got,
                            _timeout_ms(timeout))
        if r < 0:
            _raise(r, "receiving", got[0], n)
    return bytes(buf)


def recv_pages(fd: int, mem, starts: np.ndarray, counts: np.ndarray, timeout=None,
               page_size: int = PAGE_SIZE) -> int:
    """Receive the ranges' pages straight into guest memory; returns bytes."""
    got = ffi.new("uint64_t *", 0)
    r = lib.hv_recv_pages(fd, _mem(mem), mem.size, page_size, _u64p(starts), _u64p(counts),
                          len(starts), got, _timeout_ms(timeout))
    if r < 0:
        _raise(r, "receiving pages", got[0], int(counts.sum()) * page_size)
    return int(got[0])


def zstd_bound(nbytes: int) -> int:
    """The longest zstd frame hv makes of nbytes of pages."""
    return int(lib.hv_zstd_bound(nbytes))


class Zstd:
    """The zstd context of one connection (libzstd through hv._pages): a
    batch of pages compressed from guest memory into one frame, a frame
    decompressed straight into guest memory. Contexts are reused: each
    connection's thread has its own."""

    def __init__(self, level: int = 1):
        z = lib.hv_zstd_new(int(level))
        if z == ffi.NULL:
            raise ValueError(f"zstd refused compression level {level}")
        self._z = ffi.gc(z, lib.hv_zstd_free)
        self._out = bytearray()

    def compress(self, mem, starts: np.ndarray, counts: np.ndarray,
                 page_size: int = PAGE_SIZE) -> bytes:
        """The ranges' pages as one zstd frame."""
        cap = zstd_bound(int(counts.sum()) * page_size)
        if len(self._out) < cap:
            self._out = bytearray(cap)
        r = lib.hv_zstd_compress_ranges(self._z, _mem(mem), mem.size, page_size,
                                        _u64p(starts), _u64p(counts), len(starts),
                                        ffi.cast("uint8_t *", ffi.from_buffer(self._out)),
                                        cap)
        if r < 0:
            _raise(int(r), "compressing pages")
        return bytes(memoryview(self._out)[:r])

    def decompress_into(self, mem, starts: np.ndarray, counts: np.ndarray, frame,
                        page_size: int = PAGE_SIZE) -> None:
        """Fill the ranges from one frame; ValueError unless the frame is valid
        and holds exactly their pages."""
        buf = ffi.from_buffer(frame)
        r = lib.hv_zstd_decompress_ranges(self._z, _mem(mem), mem.size, page_size,
                                          _u64p(starts), _u64p(counts), len(starts),
                                          ffi.cast("uint8_t *", buf), len(buf))
        if r == -errno.EBADMSG:
            raise ValueError("not a zstd frame of exactly the pages its table names")
        if r < 0:
            _raise(r, "decompressing pages")
