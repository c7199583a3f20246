"""hv._pages (through hv.migration.pages) against numpy reference computations."""

import os
import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import given, strategies as st

from hv.memory import PAGE_SIZE, GuestMemory, pack_bitmap, unpack_bitmap
from hv.migration import pages


def ref_runs(bits: np.ndarray, max_len: int = 0):
    out = []
    p, n = 0, len(bits)
    while p < n:
        if not bits[p]:
            p += 1
            continue
        e = p
        while e < n and bits[e] and (not max_len or e - p < max_len):
            e += 1
        out.append((p, e - p))
        p = e
    return out


bool_arrays = st.integers(1, 700).flatmap(
    lambda n: st.lists(st.booleans(), min_size=n, max_size=n).map(np.array))


@given(bool_arrays, bool_arrays)
def test_andnot_or_count(a_bits, b_bits):
    n = min(len(a_bits), len(b_bits))
    a, b = pack_bitmap(a_bits[:n]).copy(), pack_bitmap(b_bits[:n]).copy()
    out, cnt = pages.andnot(a, b)
    ref = a_bits[:n] & ~b_bits[:n]
    assert (unpack_bitmap(out, n) == ref).all()
    assert cnt == ref.sum() == pages.count(out)
    acc = a.copy()
    assert pages.or_into(acc, b) == (a_bits[:n] | b_bits[:n]).sum()


@given(bool_arrays, st.sampled_from([0, 1, 3, 64, 100]), st.integers(1, 5))
def test_runs_match_reference(bits, max_len, max_runs):
    n = len(bits)
    bm = pages.as_bitmap(pack_bitmap(bits), n)
    got = []
    for s, c in pages.runs(bm, n, max_len=max_len, max_runs=max_runs):
        got += list(zip(s.tolist(), c.tolist()))
    assert got == ref_runs(bits, max_len)


def test_runs_ignore_bits_past_npages():
    bm = np.array([~np.uint64(0)], dtype=np.uint64)
    s, c = pages.all_runs(pages.as_bitmap(bm, 10), 10)
    assert s.tolist() == [0] and c.tolist() == [10]


def test_set_range_and_full_bitmap():
    for n, start, cnt in [(200, 0, 200), (200, 3, 130), (64, 63, 1), (1000, 70, 500)]:
        bm = pages.empty_bitmap(n)
        pages.set_range(bm, start, cnt)
        ref = np.zeros(n, dtype=bool)
        ref[start:start + cnt] = True
        assert (unpack_bitmap(bm, n) == ref).all()
    assert pages.count(pages.full_bitmap(130)) == 130


@pytest.fixture
def mem():
    m = GuestMemory(64 * PAGE_SIZE)
    a = m.array()
    rng = np.random.default_rng(1)
    for pfn in (1, 5, 6, 7, 40, 63):
        a[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    a[9 * PAGE_SIZE + PAGE_SIZE - 1] = 1   # only the last byte set
    a[10 * PAGE_SIZE] = 1                  # only the first byte set
    return m


def ref_zero(m, pfn):
    return not m.array()[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE].any()


def test_classify_matches_reference(mem):
    n = mem.npages
    for bits in (np.ones(n, dtype=bool), np.arange(n) % 3 == 0):
        data, zero, nzero = pages.classify(mem, pages.as_bitmap(pack_bitmap(bits), n), n)
        refz = np.array([bits[p] and ref_zero(mem, p) for p in range(n)])
        refd = np.array([bits[p] and not ref_zero(mem, p) for p in range(n)])
        assert (unpack_bitmap(zero, n) == refz).all()
        assert (unpack_bitmap(data, n) == refd).all()
        assert nzero == refz.sum()
    assert not pages.page_is_zero(mem, 9) and not pages.page_is_zero(mem, 10)
    assert pages.page_is_zero(mem, 11)


def test_hashes_per_page(mem):
    s = np.array([0, 5], dtype=np.uint64)
    c = np.array([2, 3], dtype=np.uint64)
    h = pages.hashes(mem, s, c)
    assert len(h) == 5
    for i, pfn in enumerate([0, 1, 5, 6, 7]):
        assert int(h[i]) == pages.hash_bytes(mem.read(pfn * PAGE_SIZE, PAGE_SIZE))
    assert h[0] != h[1] and len(set(h.tolist())) == 5
    # one bit flips the hash
    page = bytearray(mem.read(PAGE_SIZE, PAGE_SIZE))
    page[100] ^= 4
    assert pages.hash_bytes(bytes(page)) != int(h[1])


def test_fill_pattern_and_discard(mem):
    s = np.array([5, 40], dtype=np.uint64)
    c = np.array([2, 1], dtype=np.uint64)
    pages.fill(mem, s, c, pattern=0xAAAAAAAA)
    a = mem.array()
    assert (a[5 * PAGE_SIZE:7 * PAGE_SIZE] == 0xAA).all()
    assert (a[40 * PAGE_SIZE:41 * PAGE_SIZE] == 0xAA).all()
    pages.fill(mem, s, c, pattern=0x12345678, discard=False)
    assert (a[5 * PAGE_SIZE:7 * PAGE_SIZE].view("<u4") == 0x12345678).all()
    assert a[7 * PAGE_SIZE:8 * PAGE_SIZE].any()      # page 7 untouched
    pages.fill(mem, s, c, pattern=0, discard=True)
    assert not a[5 * PAGE_SIZE:7 * PAGE_SIZE].any() and not a[40 * PAGE_SIZE:41 * PAGE_SIZE].any()
    with pytest.raises(ValueError):
        pages.fill(mem, np.array([63], dtype=np.uint64), np.array([2], dtype=np.uint64))


def test_ranges_valid():
    u = lambda *v: np.array(v, dtype=np.uint64)
    assert pages.ranges_valid(u(0, 10), u(10, 54), 64)
    assert not pages.ranges_valid(u(60), u(5), 64)
    assert not pages.ranges_valid(u(3), u(0), 64)
    assert not pages.ranges_valid(u(2**64 - 1), u(2), 64)


def test_send_and_receive_pages_over_socketpair(mem):
    dst = GuestMemory(mem.size)
    a, b = socket.socketpair()
    s = np.array([0, 5, 40, 63], dtype=np.uint64)
    c = np.array([2, 3, 1, 1], dtype=np.uint64)
    got = {}

    def rx():
        got["n"] = pages.recv_pages(b.fileno(), dst, s, c, timeout=10)

    t = threading.Thread(target=rx)
    t.start()
    sent = pages.send_pages(a.fileno(), mem, s, c, timeout=10)
    t.join()
    assert sent == got["n"] == 7 * PAGE_SIZE
    for pfn in (0, 1, 5, 6, 7, 40, 63):
        assert dst.read(pfn * PAGE_SIZE, PAGE_SIZE) == mem.read(pfn * PAGE_SIZE, PAGE_SIZE)
    assert not dst.array()[2 * PAGE_SIZE:5 * PAGE_SIZE].any()


def test_large_send_with_partial_writes_nonblocking():
    src = GuestMemory(4096 * PAGE_SIZE)
    src.array()[:] = np.random.default_rng(2).integers(0, 256, src.size, dtype=np.uint8)
    dst = GuestMemory(src.size)
    a, b = socket.socketpair()
    a.settimeout(10)      # non-blocking fds: the C side polls on EAGAIN
    b.settimeout(10)
    bits = np.random.default_rng(3).random(src.npages) < 0.7
    s, c = pages.all_runs(pages.as_bitmap(pack_bitmap(bits), src.npages), src.npages)
    t = threading.Thread(target=pages.recv_pages, args=(b.fileno(), dst, s, c, 10))
    t.start()
    pages.send_pages(a.fileno(), src, s, c, timeout=10)
    t.join()
    sa, da = src.array(), dst.array()
    for st_, ct in zip(s.tolist(), c.tolist()):
        lo, hi = st_ * PAGE_SIZE, (st_ + ct) * PAGE_SIZE
        assert (sa[lo:hi] == da[lo:hi]).all()


def test_recv_reports_early_close_and_timeout():
    dst = GuestMemory(8 * PAGE_SIZE)
    a, b = socket.socketpair()
    a.sendall(b"x" * 100)
    a.close()
    with pytest.raises(ConnectionError, match="closed after 100 of 8192"):
        pages.recv_pages(b.fileno(), dst, np.array([0], dtype=np.uint64),
                         np.array([2], dtype=np.uint64), timeout=5)
    a, b = socket.socketpair()
    b.setblocking(False)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        pages.recv_all(b.fileno(), 10, timeout=0.2)
    assert time.monotonic() - t0 < 2


def test_send_to_closed_peer_fails_cleanly(mem):
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(OSError):
        pages.send_pages(a.fileno(), mem, np.array([0], dtype=np.uint64),
                         np.array([64], dtype=np.uint64), timeout=5)


def test_rate_limit():
    src = GuestMemory(256 * PAGE_SIZE)   # 1 MiB
    a, b = socket.socketpair()
    rate = pages.Rate(4 * 1024 * 1024)   # 4 MiB/s -> ~0.25 s
    done = threading.Event()

    def drain():
        n = 0
        while n < src.size:
            n += len(b.recv(1 << 20))
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    t0 = time.monotonic()
    pages.send_pages(a.fileno(), src, np.array([0], dtype=np.uint64),
                     np.array([256], dtype=np.uint64), rate=rate, timeout=5)
    dt = time.monotonic() - t0
    assert done.wait(5)
    assert 0.15 < dt < 1.5


def test_send_all_and_recv_all():
    a, b = socket.socketpair()
    data = os.urandom(300000)
    t = threading.Thread(target=pages.send_all, args=(a.fileno(), data))
    t.start()
    assert pages.recv_all(b.fileno(), len(data), timeout=5) == data
    t.join()
