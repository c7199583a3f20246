"""hv.memory: bounds, the VMM's dirty bitmap, discard and populate."""

import threading

import numpy as np
import pytest

from hv.errors import GuestMemoryError
from hv.memory import PAGE_SIZE, GuestMemory, pack_bitmap, unpack_bitmap


def test_access_outside_guest_ram_is_refused():
    g = GuestMemory(16 * PAGE_SIZE)
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):
        g.read(16 * PAGE_SIZE - 2, 4)
    with pytest.raises(GuestMemoryError):
        g.write(-1, b"x")
    with pytest.raises(GuestMemoryError):
        GuestMemory(PAGE_SIZE + 1)


def test_vmm_writes_are_in_the_dirty_bitmap_once():
    g = GuestMemory(256 * PAGE_SIZE)
    g.write(3 * PAGE_SIZE - 1, b"ab")          # straddles pages 2 and 3
    g.write_u32(200 * PAGE_SIZE, 7)
    bits = unpack_bitmap(g.take_dirty_bitmap(), g.npages)
    assert list(np.flatnonzero(bits)) == [2, 3, 200]
    assert not unpack_bitmap(g.take_dirty_bitmap(), g.npages).any()


def test_bitmap_layout_is_kvms():
    bits = np.zeros(130, dtype=bool)
    bits[[0, 63, 64, 129]] = True
    words = pack_bitmap(bits)
    assert list(words) == [1 | (1 << 63), 1, 2]
    assert (unpack_bitmap(words, 130) == bits).all()


def test_discard_gives_pages_back_and_they_read_zero():
    g = GuestMemory(64 * PAGE_SIZE)
    g.fill(0, 64 * PAGE_SIZE, 0xAB)
    assert g.resident_bytes() == 64 * PAGE_SIZE
    g.discard(8 * PAGE_SIZE, 16 * PAGE_SIZE)
    assert g.resident_bytes() == 48 * PAGE_SIZE
    assert g.read(8 * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert g.read(24 * PAGE_SIZE, 1) == b"\xab"


def test_populate_maps_everything_and_keeps_content():
    g = GuestMemory(1024 * PAGE_SIZE)
    g.write(5 * PAGE_SIZE, b"kept")
    assert g.resident_bytes() == PAGE_SIZE
    assert g.populate(step=64 * PAGE_SIZE)
    assert g.resident_bytes() == 1024 * PAGE_SIZE
    assert g.read(5 * PAGE_SIZE, 4) == b"kept"


def test_populate_stops_when_asked():
    g = GuestMemory(1024 * PAGE_SIZE)
    stop = threading.Event()
    stop.set()
    assert g.populate(stop)
    assert g.resident_bytes() == 0
