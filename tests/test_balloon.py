"""virtio-balloon driven as Linux 6.1's virtio_balloon (+ hv's bitmap patch) lays
out its messages in guest memory. No /dev/kvm needed."""

import struct
import threading
import time

import numpy as np
import pytest

from hv.devices.virtio import mmio as r
from hv.devices.virtio.balloon import Balloon
from hv.devices.virtio.balloon_defs import (
    BITMAP_F_LAST, BITMAP_HDR, CFG_ACTUAL, CFG_FREE_PAGE_BITMAP_CMD_ID,
    CFG_FREE_PAGE_HINT_CMD_ID, CFG_NUM_PAGES, CFG_POISON_VAL, F_DEFLATE_ON_OOM,
    F_FREE_PAGE_BITMAP, F_FREE_PAGE_HINT, F_MUST_TELL_HOST, F_PAGE_POISON, F_REPORTING,
    F_STATS_VQ, BalloonError, BalloonTimeout)
from hv.devices.virtio.device import VIRTIO_F_VERSION_1
from hv.devices.virtio.driver_model import FakeIrqLine, MmioDriver
from hv.memory import PAGE_SIZE, GuestMemory, pack_bitmap, unpack_bitmap

MiB = 1 << 20
LINUX_61 = [F_MUST_TELL_HOST, F_STATS_VQ, F_DEFLATE_ON_OOM, F_FREE_PAGE_HINT,
            F_PAGE_POISON, F_REPORTING]


class LinuxBalloon:
    """The driver side: probe, then the messages virtio_balloon.c sends."""

    def __init__(self, mem_mib=32, bitmap_patch=True, poisoning=False, offer=None, **kw):
        self.mem = GuestMemory(mem_mib * MiB)
        self.irq = FakeIrqLine()
        self.dev = Balloon(self.mem, **kw)
        self.t = r.VirtioMmioTransport(self.dev, self.mem, self.irq, "balloon")
        # Driver data lives in the top 2 MiB.
        self.drv = MmioDriver(self.t, self.mem, heap_base=self.mem.size - 2 * MiB)
        bits = LINUX_61 + ([F_FREE_PAGE_BITMAP] if bitmap_patch else [])
        wanted = 1 << VIRTIO_F_VERSION_1
        for b in bits:
            wanted |= 1 << b
        if not poisoning:
            wanted &= ~(1 << F_PAGE_POISON)          # virtballoon_validate()
        assert self.drv.negotiate(wanted)
        f = self.drv.features
        self.roles = ["inflate", "deflate"] + [
            name for bit, name in ((F_STATS_VQ, "stats"), (F_FREE_PAGE_HINT, "free_page"),
                                   (F_REPORTING, "reporting"), (F_FREE_PAGE_BITMAP, "bitmap"))
            if f >> bit & 1]
        qs = self.drv.setup_queues(len(self.roles), 64)
        self.q = dict(zip(self.roles, qs))
        if "stats" in self.q:
            self.stats_buf = self.drv.heap.alloc(10 * 10)
            self.write_stats({4: 100 * MiB, 5: 128 * MiB})
            self.q["stats"].add(out=[(self.stats_buf, 100)])
            self.q["stats"].kick()                   # before DRIVER_OK, as init_vqs does
        if poisoning:
            self.drv.config_write(CFG_POISON_VAL, 0xAAAAAAAA)
        self.drv.driver_ok()

    def write_stats(self, values):
        data = b"".join(struct.pack("<HQ", tag, values.get(tag, 0)) for tag in range(10))
        self.mem.write(self.stats_buf, data)

    def tell_host(self, role, pfns):
        buf = self.drv.heap.alloc(4 * len(pfns), 4)
        self.mem.write(buf, np.asarray(pfns, dtype="<u4").tobytes())
        self.q[role].add(out=[(buf, 4 * len(pfns))])
        self.q[role].kick()
        assert self.q[role].get_used(), "host did not ack"


def test_dense_queue_numbering_without_stats():
    lb = LinuxBalloon(stats=False)
    assert "stats" not in lb.roles
    assert lb.roles.index("free_page") == 2
    assert lb.dev.roles == lb.roles
    assert lb.dev.has_free_page_bitmap()


def test_stock_kernel_feature_set():
    lb = LinuxBalloon(bitmap_patch=False)
    assert lb.roles == ["inflate", "deflate", "stats", "free_page", "reporting"]
    assert not lb.dev.has_free_page_bitmap()
    with pytest.raises(BalloonError, match="0010-virtio-balloon-free-page-bitmap"):
        lb.dev.request_free_page_bitmap(100)


def test_inflate_discards_and_deflate():
    lb = LinuxBalloon()
    mem = lb.mem
    pfns = list(range(1024, 1024 + 2048))        # 8 MiB
    mem.fill(1024 * PAGE_SIZE, 2048 * PAGE_SIZE, 0x5A)
    before = mem.resident_bytes()
    lb.dev.commands()["balloon"]({"target_mib": 8})
    assert lb.drv.ack_interrupt() & r.INT_CONFIG
    assert lb.drv.config_read(CFG_NUM_PAGES) == 2048
    for i in range(0, len(pfns), 256):               # VIRTIO_BALLOON_ARRAY_PFNS_MAX
        lb.tell_host("inflate", pfns[i:i + 256])
    lb.drv.config_write(CFG_ACTUAL, 2048)
    assert mem.read(1024 * PAGE_SIZE, 16) == bytes(16)
    # Discarded pages changed without a guest write: they are VMM-dirty.
    assert unpack_bitmap(mem.take_dirty_bitmap(), mem.npages)[1024:1024 + 2048].all()
    assert before - mem.resident_bytes() >= 8 * MiB - 64 * 1024  # minus the PFN arrays
    assert unpack_bitmap(lb.dev.inflated_bitmap(), mem.npages).sum() == 2048
    q = lb.dev.commands()["query-balloon"]({})
    assert q["actual_mib"] == 8 and q["target_mib"] == 8
    lb.tell_host("deflate", pfns[:256])
    assert unpack_bitmap(lb.dev.inflated_bitmap(), mem.npages).sum() == 2048 - 256
    # A PFN outside guest RAM is ignored, not fatal.
    lb.tell_host("inflate", [mem.npages + 5])
    assert not lb.t.broken
    with pytest.raises(BalloonError):
        lb.dev.set_target(10_000)


def test_stats_on_request_from_another_thread():
    lb = LinuxBalloon()
    assert lb.dev.stats["free_memory"] == 100 * MiB
    result = {}
    th = threading.Thread(target=lambda: result.update(
        lb.dev.commands()["query-balloon"]({"refresh": True, "timeout_ms": 5000})))
    th.start()
    # The guest: stats_request() on the interrupt, then update_balloon_stats_func().
    deadline = time.time() + 5
    while not lb.irq.level and time.time() < deadline:
        time.sleep(0.005)
    assert lb.drv.ack_interrupt() & r.INT_VRING
    assert lb.q["stats"].get_used()
    lb.write_stats({4: 64 * MiB, 5: 128 * MiB, 6: 90 * MiB})
    lb.q["stats"].add(out=[(lb.stats_buf, 100)])
    lb.q["stats"].kick()
    th.join(5)
    assert result["stats"]["free_memory"] == 64 * MiB
    assert result["stats"]["available_memory"] == 90 * MiB


def test_free_page_hint_round():
    lb = LinuxBalloon()
    dev, drv, q = lb.dev, lb.drv, lb.q["free_page"]
    assert drv.config_read(CFG_FREE_PAGE_HINT_CMD_ID) == 0
    cmd = dev.free_page_hint_start()
    assert cmd >= 2
    assert drv.ack_interrupt() & r.INT_CONFIG
    assert drv.config_read(CFG_FREE_PAGE_HINT_CMD_ID) == cmd
    # send_cmd_id_start(), then 4 MiB blocks as in-buffers, then STOP.
    idbuf = drv.heap.alloc(4, 4)
    lb.mem.write_u32(idbuf, cmd)
    q.add(out=[(idbuf, 4)])
    q.kick()
    for block in (2, 5):
        q.add(inb=[(block * 4 * MiB, 4 * MiB)])
        q.kick()
    stop = drv.heap.alloc(4, 4)
    lb.mem.write_u32(stop, 0)
    q.add(out=[(stop, 4)])
    q.kick()
    assert len(q.get_used()) == 4
    assert dev.hint_status == "stop"
    hinted = unpack_bitmap(dev.hinted_bitmap(), lb.mem.npages)
    assert hinted.sum() == 2048
    assert hinted[2 * 1024:3 * 1024].all() and hinted[5 * 1024:6 * 1024].all()
    # Pages dirtied later are no longer hinted.
    dirty = np.zeros(lb.mem.npages, bool)
    dirty[2 * 1024] = True
    dev.clear_hinted(pack_bitmap(dirty))
    assert unpack_bitmap(dev.hinted_bitmap(), lb.mem.npages).sum() == 2047
    dev.free_page_hint_done()
    assert drv.config_read(CFG_FREE_PAGE_HINT_CMD_ID) == 1
    # Hints for an old command id are ignored.
    cmd2 = dev.free_page_hint_start()
    lb.mem.write_u32(idbuf, cmd)
    q.add(out=[(idbuf, 4)])
    q.add(inb=[(0, 4 * MiB)])
    q.kick()
    assert unpack_bitmap(dev.hinted_bitmap(), lb.mem.npages).sum() == 0
    assert cmd2 != cmd
    dev.free_page_hint_stop()
    assert drv.config_read(CFG_FREE_PAGE_HINT_CMD_ID) == 0


def test_free_page_reporting_discards():
    lb = LinuxBalloon()
    lb.mem.fill(4 * MiB, 4 * MiB, 0x77)
    q = lb.q["reporting"]
    q.add(inb=[(4 * MiB, 2 * MiB), (6 * MiB, 2 * MiB)])   # a scatterlist of 2 blocks
    q.kick()
    assert q.get_used()
    assert lb.mem.read(5 * MiB, 8) == bytes(8)
    assert lb.dev.reported_bytes == 4 * MiB


def test_page_poison():
    lb = LinuxBalloon(poisoning=True)
    assert lb.dev.poison_value() == 0xAAAAAAAA
    lb.mem.fill(4 * MiB, 2 * MiB, 0xAA)
    lb.q["reporting"].add(inb=[(4 * MiB, 2 * MiB)])
    lb.q["reporting"].kick()
    assert lb.q["reporting"].get_used()
    assert lb.mem.read(4 * MiB, 4) == b"\xaa" * 4   # poisoned pages are kept
    assert LinuxBalloon().dev.poison_value() is None


class BitmapGuest:
    """The guest half of hv's free page bitmap, as the patched driver does it."""

    def __init__(self, lb, free, chunk_pfns=32576):
        self.lb, self.free, self.chunk_pfns = lb, free, chunk_pfns
        self.done_id = 0
        self.bufs = [lb.drv.heap.alloc(PAGE_SIZE, PAGE_SIZE) for _ in range(4)]
        self.stop = False

    def serve_once(self, cmd_id=None, flags_last=True):
        lb = self.lb
        cmd = lb.drv.config_read(CFG_FREE_PAGE_BITMAP_CMD_ID) if cmd_id is None else cmd_id
        if not cmd or cmd == self.done_id:
            return False
        self.done_id = cmd
        n = len(self.free)
        q = lb.q["bitmap"]
        for k, start in enumerate(range(0, n, self.chunk_pfns)):
            nr = min(self.chunk_pfns, n - start)
            bits = np.zeros((nr + 63) // 64 * 64, bool)
            bits[:nr] = self.free[start:start + nr]
            words = pack_bitmap(bits)
            last = BITMAP_F_LAST if start + nr >= n and flags_last else 0
            buf = self.bufs[k % 4]
            lb.mem.write(buf, BITMAP_HDR.pack(cmd, last, start, nr) + words.tobytes())
            q.add(out=[(buf, BITMAP_HDR.size + 8 * len(words))])
            q.kick()
            q.get_used()
        return True

    def run(self):
        while not self.stop:
            if self.lb.irq.level:
                if self.lb.drv.ack_interrupt() & r.INT_CONFIG:
                    self.serve_once()
            time.sleep(0.001)


def _bitmap_round(lb, free, chunk_pfns=32576):
    g = BitmapGuest(lb, free, chunk_pfns)
    th = threading.Thread(target=g.run, daemon=True)
    th.start()
    try:
        return lb.dev.request_free_page_bitmap(5000)
    finally:
        g.stop = True
        th.join()


def test_free_page_bitmap_single_chunk():
    lb = LinuxBalloon(mem_mib=32)
    free = np.zeros(lb.mem.npages, bool)
    free[100:5000] = True
    free[7001] = True
    words, info = _bitmap_round(lb, free)
    assert words.dtype == np.dtype("<u8")
    assert (unpack_bitmap(words, lb.mem.npages) == free).all()
    assert info["free_pages"] == free.sum()
    assert info["total_pages"] == lb.mem.npages and info["chunks"] == 1
    assert info["elapsed_ms"] >= 0


def test_free_page_bitmap_many_chunks_and_command():
    lb = LinuxBalloon(mem_mib=64)
    rng = np.random.default_rng(1)
    free = rng.random(lb.mem.npages) < 0.3
    g = BitmapGuest(lb, free, chunk_pfns=1000)
    th = threading.Thread(target=g.run, daemon=True)
    th.start()
    try:
        out = lb.dev.commands()["request-free-page-bitmap"]({"timeout_ms": 5000})
        words, info = lb.dev.request_free_page_bitmap(5000)
    finally:
        g.stop = True
        th.join()
    assert out["free_pages"] == free.sum() and out["total_pages"] == lb.mem.npages
    assert info["chunks"] == (lb.mem.npages + 999) // 1000
    assert (unpack_bitmap(words, lb.mem.npages) == free).all()


def test_free_page_bitmap_timeout_and_stale_chunks():
    lb = LinuxBalloon()
    with pytest.raises(BalloonTimeout):
        lb.dev.request_free_page_bitmap(50)
    stale = lb.dev.bitmap_cmd_id
    free = np.ones(lb.mem.npages, bool)
    # A late answer for the timed-out id changes nothing and breaks nothing.
    BitmapGuest(lb, free).serve_once(cmd_id=stale)
    assert not lb.t.broken
    words, info = _bitmap_round(lb, free)
    assert info["cmd_id"] == stale + 1 and info["free_pages"] == lb.mem.npages


def test_free_page_bitmap_short_chunk_needs_reset():
    lb = LinuxBalloon()
    res = {}

    def ask():
        try:
            lb.dev.request_free_page_bitmap(5000)
        except BalloonError as e:
            res["err"] = str(e)
    th = threading.Thread(target=ask)
    th.start()
    while not lb.dev.bitmap_cmd_id:
        time.sleep(0.001)
    cmd = lb.drv.config_read(CFG_FREE_PAGE_BITMAP_CMD_ID)
    buf = lb.drv.heap.alloc(64)
    lb.mem.write(buf, BITMAP_HDR.pack(cmd, BITMAP_F_LAST, 0, 100_000))
    lb.q["bitmap"].add(out=[(buf, 64)])
    lb.q["bitmap"].kick()
    th.join(5)
    assert lb.t.broken and "carries only" in lb.t.needs_reset_reason
    assert "needs a reset" in res["err"]


def test_balloon_save_restore():
    lb = LinuxBalloon()
    lb.dev.set_target(4)
    lb.tell_host("inflate", list(range(2000, 2100)))
    lb.drv.config_write(CFG_ACTUAL, 100)
    cmd = lb.dev.free_page_hint_start()
    lb.mem.write_u32(lb.drv.heap.alloc(4, 4), cmd)
    state = lb.t.save()
    mem2 = lb.mem  # same RAM, as after a migration
    dev2 = Balloon(mem2)
    t2 = r.VirtioMmioTransport(dev2, mem2, FakeIrqLine(), "balloon")
    t2.restore(state)
    assert dev2.num_pages == 1024 and dev2.actual == 100
    assert dev2.roles == lb.dev.roles and dev2.active
    assert unpack_bitmap(dev2.inflated_bitmap(), mem2.npages)[2000:2100].all()
    assert dev2.stats_head == lb.dev.stats_head is not None
    assert dev2.hint_cmd_id == cmd and dev2.hint_status == "requested"
    assert dev2.free_page_hint_start() != cmd
    import json
    json.dumps(state, default=lambda b: b.hex())  # plain data


def test_reset_clears_queues_keeps_ids():
    lb = LinuxBalloon()
    with pytest.raises(BalloonTimeout):
        lb.dev.request_free_page_bitmap(10)
    first = lb.dev.bitmap_cmd_id
    lb.drv.write(r.STATUS, 0)
    assert not lb.dev.active
    lb2 = lb  # re-probe on the same device
    assert lb2.drv.negotiate(lb.drv.features)
    lb2.drv.setup_queues(len(lb.roles), 64)
    lb2.drv.driver_ok()
    with pytest.raises(BalloonTimeout):
        lb.dev.request_free_page_bitmap(10)
    assert lb.dev.bitmap_cmd_id == first + 1


def test_periodic_stats_polling():
    lb = LinuxBalloon(stats_interval_s=0.05)
    try:
        deadline = time.time() + 5
        while not lb.irq.level and time.time() < deadline:
            time.sleep(0.01)
        # The host gave the stats buffer back on its own: the guest refills it.
        assert lb.drv.ack_interrupt() & r.INT_VRING
        assert lb.q["stats"].get_used()
        lb.write_stats({4: 1 * MiB, 5: 2 * MiB})
        lb.q["stats"].add(out=[(lb.stats_buf, 100)])
        lb.q["stats"].kick()
        assert lb.dev.stats["free_memory"] == 1 * MiB
    finally:
        lb.dev.close()


def test_hint_wait():
    lb = LinuxBalloon()
    cmd = lb.dev.free_page_hint_start()
    assert not lb.dev.free_page_hint_wait(20)
    stop = lb.drv.heap.alloc(4, 4)
    lb.mem.write_u32(stop, cmd)
    lb.q["free_page"].add(out=[(stop, 4)])
    lb.q["free_page"].kick()
    lb.mem.write_u32(stop, 0)
    lb.q["free_page"].add(out=[(stop, 4)])
    lb.q["free_page"].kick()
    assert lb.dev.free_page_hint_wait(20)
    assert lb.dev.hint_rounds == 1


def test_free_page_bitmap_drop_cache_request():
    from hv.devices.virtio.balloon_defs import CFG_FREE_PAGE_BITMAP_DROP
    from hv.migration.protocol import MigrationError
    from hv.migration.sender import MigrationParams
    lb = LinuxBalloon()
    assert lb.drv.config_read(CFG_FREE_PAGE_BITMAP_DROP) == 0
    # the guest reads what to drop next to the command id, with the request
    for name, value in (("all", 3), ("pagecache", 1), ("none", 0)):
        with pytest.raises(BalloonTimeout):
            lb.dev.request_free_page_bitmap(20, drop_cache=name)
        assert lb.drv.config_read(CFG_FREE_PAGE_BITMAP_DROP) == value
    words, info = _bitmap_round(lb, np.ones(lb.mem.npages, bool))
    assert info["drop_cache"] == "none"
    with pytest.raises(BalloonError, match="drop_cache"):
        lb.dev.request_free_page_bitmap(20, drop_cache="slab")
    with pytest.raises(Exception, match="drop_cache"):
        lb.dev.commands()["request-free-page-bitmap"]({"drop_cache": "everything"})
    # it travels with the balloon's state and is checked there
    with pytest.raises(BalloonTimeout):
        lb.dev.request_free_page_bitmap(20, drop_cache="all")
    state = lb.dev.save()
    other = LinuxBalloon()
    other.dev.restore(state)
    assert other.dev.bitmap_drop == 3
    with pytest.raises(Exception, match="bitmap_drop"):
        other.dev.restore({**state, "bitmap_drop": 2})
    assert MigrationParams.from_args({"uri": "tcp:127.0.0.1:1", "drop_cache": "all"}
                                     ).drop_cache == "all"
    with pytest.raises(MigrationError, match="drop_cache"):
        MigrationParams.from_args({"uri": "tcp:127.0.0.1:1", "drop_cache": "slab"})
