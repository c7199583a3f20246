"""Guest RAM: one anonymous host mapping seen by the guest at GPA 0.

RAM lies below the 32-bit hole (up to LOW_RAM_END, where the MMIO windows,
IOAPIC, LAPIC and KVM's TSS begin) and, for larger guests, the rest from
4 GiB up. One host mapping spans all of it, so that a guest physical address
is also the offset into the mapping, everywhere in hv (bitmaps, page
ranges on the wire, the native page loops); the hole in between is mapped
PROT_NONE and costs nothing. hv.vmm registers each RAM region with KVM
as a memory slot (regions). Every access from Python is bounds-checked and
fails with GuestMemoryError instead of touching host memory outside guest
RAM, the hole included.

KVM's dirty log sees only writes made by the guest. Writes the VMM makes
(virtio used rings, device-written buffers) go through write()/mark_dirty(),
which record them in a dirty bitmap of the VMM's own; migration ORs it into
KVM's log (take_dirty_bitmap()). While the machine is paused the memory is
frozen: a VMM write then fails (GuestMemoryError) instead of landing after
a migration's last dirty harvest, where it would be lost.

Bitmaps use KVM's layout everywhere in hv: little-endian uint64 words, bit
(p % 64) of word (p // 64) stands for page frame p.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading

import numpy as np

from .errors import GuestMemoryError

PAGE_SHIFT = 12
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
PAGE_SIZE = 1 << PAGE_SHIFT
#: RAM below 4 GiB ends here at most; the 32-bit hole above it holds the
#: virtio-mmio windows (hv.vmm.VIRTIO_MMIO_BASE), IOAPIC, LAPIC, TSS
LOW_RAM_END = 0xd0000000
HIGH_RAM_START = 1 << 32


def ram_layout(ram_bytes: int) -> list[tuple[int, int]]:
    """(guest physical address, size) of each RAM region of a guest with
    ram_bytes of RAM: below the 32-bit hole, and the rest from 4 GiB."""
    if ram_bytes <= LOW_RAM_END:
        return [(0, ram_bytes)]
    return [(0, LOW_RAM_END), (HIGH_RAM_START, ram_bytes - LOW_RAM_END)]


def bitmap_words(npages: int) -> int:
    """Number of uint64 words in a bitmap covering npages pages."""
    return (npages + 63) // 64


class GuestMemory:
    """Guest physical memory [0, size) backed by an anonymous mapping."""

    def __init__(self, size: int):
        """size bytes of RAM, laid out as ram_layout(size) says. self.size
        and self.npages then cover every guest physical page up to the end
        of RAM (the hole included: its bits in a bitmap stay clear)."""
        if size <= 0 or size % PAGE_SIZE:
            raise GuestMemoryError(
                f"guest memory size {size} is not a positive multiple of {PAGE_SIZE}")
        self.ram_size = size
        self.regions = ram_layout(size)
        self.size = self.regions[-1][0] + self.regions[-1][1]
        self.npages = self.size // PAGE_SIZE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self._map = mmap.mmap(-1, self.size, flags=flags,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self.host_addr = ctypes.addressof(self._anchor)
        self.view = memoryview(self._map)
        self._low_end = self.regions[0][1]
        for (a, n), (b, _) in zip(self.regions, self.regions[1:]):
            # the hole: any touch faults instead of reading or writing host memory
            if _libc.mprotect(ctypes.c_void_p(self.host_addr + a + n),
                              ctypes.c_size_t(b - a - n), 0) != 0:
                raise GuestMemoryError(f"mprotect of the 32-bit hole failed: "
                                       f"{os.strerror(ctypes.get_errno())}")
        self._dirty = np.zeros(self.npages, dtype=bool)
        self._dirty_lock = threading.Lock()
        self.frozen = False

    def map_file(self, fd: int, offset: int) -> None:
        """Back every RAM region with the file's bytes from offset + its
        guest physical address, copy-on-write (MAP_PRIVATE | MAP_FIXED over
        this mapping): reads come from the file's page cache, writes stay
        here. Before the guest first runs (KVM maps pages lazily)."""
        if offset % PAGE_SIZE:
            raise GuestMemoryError(f"file offset {offset} is not page-aligned")
        for gpa, n in self.regions:
            p = _libc.mmap(ctypes.c_void_p(self.host_addr + gpa), ctypes.c_size_t(n),
                           mmap.PROT_READ | mmap.PROT_WRITE,
                           mmap.MAP_PRIVATE | _MAP_FIXED, fd, ctypes.c_long(offset + gpa))
            if p != self.host_addr + gpa:
                raise GuestMemoryError(f"mapping the snapshot at {gpa:#x} failed: "
                                       f"{os.strerror(ctypes.get_errno())}")

    # -- freezing -------------------------------------------------------
    def freeze(self) -> None:
        """Refuse VMM writes from now on (the machine pauses: nothing may
        change guest RAM behind a migration's last dirty harvest)."""
        with self._dirty_lock:
            self.frozen = True

    def thaw(self) -> None:
        with self._dirty_lock:
            self.frozen = False

    def _check_writable(self) -> None:
        if self.frozen:
            raise GuestMemoryError("guest memory is frozen while the machine is paused: a "
                                   "device wrote guest RAM after it was quiesced")

    # -- bounds ---------------------------------------------------------
    def check(self, gpa: int, length: int) -> None:
        """Raise GuestMemoryError unless [gpa, gpa+length) lies in guest RAM."""
        if not self.contains(gpa, length):
            where = ", ".join(f"[{a:#x}, {a + n:#x})" for a, n in self.regions)
            raise GuestMemoryError(
                f"guest access [{gpa:#x}, {gpa + length:#x}) is outside guest RAM {where}")

    def contains(self, gpa: int, length: int) -> bool:
        if gpa < 0 or length < 0:
            return False
        if gpa + length <= self._low_end:
            return True
        return any(a <= gpa and gpa + length <= a + n for a, n in self.regions[1:])

    def ram_pfn_regions(self) -> list[tuple[int, int]]:
        """(first pfn, pages) of each RAM region."""
        return [(a // PAGE_SIZE, n // PAGE_SIZE) for a, n in self.regions]

    def ram_bitmap(self) -> np.ndarray:
        """Every RAM page set (KVM layout, npages bits; the hole clear)."""
        bits = np.zeros(self.npages, dtype=bool)
        for first, n in self.ram_pfn_regions():
            bits[first:first + n] = True
        return pack_bitmap(bits)

    # -- byte access ----------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        self.check(gpa, length)
        return bytes(self.view[gpa:gpa + length])

    def write(self, gpa: int, data) -> None:
        """Copy data into guest RAM and record the pages as VMM-dirty."""
        length = len(data)
        self.check(gpa, length)
        self._check_writable()
        self.view[gpa:gpa + length] = data
        self.mark_dirty(gpa, length)

    def slice(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM. Writers must call mark_dirty()."""
        self.check(gpa, length)
        return self.view[gpa:gpa + length]

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.check(gpa, length)
        self._check_writable()
        ctypes.memset(self.host_addr + gpa, byte, length)
        self.mark_dirty(gpa, length)

    def read_u8(self, gpa: int) -> int:
        self.check(gpa, 1)
        return self.view[gpa]

    def read_u16(self, gpa: int) -> int:
        self.check(gpa, 2)
        return struct.unpack_from("<H", self.view, gpa)[0]

    def read_u32(self, gpa: int) -> int:
        self.check(gpa, 4)
        return struct.unpack_from("<I", self.view, gpa)[0]

    def read_u64(self, gpa: int) -> int:
        self.check(gpa, 8)
        return struct.unpack_from("<Q", self.view, gpa)[0]

    def write_u8(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<B", value))

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value))

    def array(self) -> np.ndarray:
        """All of guest RAM as a writable uint8 array (no dirty tracking)."""
        return np.frombuffer(self._map, dtype=np.uint8)

    # -- the VMM's own dirty log -----------------------------------------
    def mark_dirty(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        first = gpa >> PAGE_SHIFT
        last = (gpa + length - 1) >> PAGE_SHIFT
        with self._dirty_lock:
            self._check_writable()
            self._dirty[first:last + 1] = True

    def take_dirty_bitmap(self) -> np.ndarray:
        """Return the pages the VMM wrote since the last call (uint64 words) and clear."""
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, np.zeros(self.npages, dtype=bool)
        return pack_bitmap(dirty)

    # -- giving memory back to the host -----------------------------------
    def discard(self, gpa: int, length: int) -> None:
        """Drop the host pages behind [gpa, gpa+length); they read as zero afterwards."""
        self.check(gpa, length)
        start = gpa & ~(PAGE_SIZE - 1)
        end = (gpa + length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def populate(self, stop: threading.Event | None = None, step: int = 2 << 20) -> bool:
        """Fault in the host pages behind all of guest RAM without changing
        their content (MADV_POPULATE_WRITE, Linux 5.14), step bytes at a time
        until done or stop is set. Safe while others write guest RAM. Returns
        False where the host kernel cannot do it."""
        for base, length in self.regions:
            for start in range(base, base + length, step):
                if stop is not None and stop.is_set():
                    return True
                try:
                    self._map.madvise(MADV_POPULATE_WRITE, start,
                                      min(step, base + length - start))
                except OSError:
                    return False
        return True

    def resident_bytes(self) -> int:
        """Host memory actually backing guest RAM now (mincore(2))."""
        total = 0
        for base, length in self.regions:
            vec = (ctypes.c_ubyte * (length // PAGE_SIZE))()
            if _libc.mincore(ctypes.c_void_p(self.host_addr + base), ctypes.c_size_t(length),
                             vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            total += int(np.frombuffer(vec, dtype=np.uint8).__and__(1).sum())
        return total * PAGE_SIZE


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_MAP_FIXED = 0x10


def pack_bitmap(bits: np.ndarray) -> np.ndarray:
    """Pack a bool-per-page array into KVM-layout uint64 words."""
    npages = len(bits)
    packed = np.packbits(bits, bitorder="little")
    padded = np.zeros(bitmap_words(npages) * 8, dtype=np.uint8)
    padded[:len(packed)] = packed
    return padded.view("<u8")


def unpack_bitmap(words: np.ndarray, npages: int) -> np.ndarray:
    """The inverse of pack_bitmap: a bool-per-page array of length npages."""
    raw = np.asarray(words, dtype="<u8").view(np.uint8)
    return np.unpackbits(raw, bitorder="little")[:npages].astype(bool)
