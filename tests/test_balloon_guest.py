"""virtio-balloon with the Linux guest under hv (needs /dev/kvm and the guest images
built with guest-images/patches/0010-virtio-balloon-free-page-bitmap.patch).

Two guests: one with hv's free page bitmap (reporting off so that freed
pages keep their content for the checks), one offering exactly what a stock
Linux 6.1 driver negotiates (hint, reporting); and a 256 MiB guest whose
bitmap arrives in several chunks.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from conftest import Console

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

MiB = 1 << 20
GOLDEN = 0x9E3779B97F4A7C15
GOLDEN_INV = pow(GOLDEN, -1, 1 << 64)


class Guest:
    """A booted guest with its shell on the console."""

    def __init__(self, images, mem_mib, **balloon_options):
        from hv.vmm import Machine, MachineConfig
        kernel, initrd = images
        self.console = Console()
        self.m = Machine(MachineConfig(mem_mib=mem_mib, kernel=kernel, initrd=initrd,
                                       balloon=True, balloon_options=balloon_options))
        self.m.console_listeners.append(self.console)
        self.balloon = self.m.balloon
        self.mem = self.m.memory
        self._n = 0
        self.m.boot()
        self.m.start()
        try:
            self.wait_console("hv-guest: ready", timeout=600)
        except Exception:
            self.close()
            raise

    def wait_console(self, needle: str, timeout: float, start: int = 0) -> str:
        """Console.wait_for that fails at once when the guest stops running."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.console.wait_for(needle, min(5.0, deadline - time.monotonic()),
                                             start)
            except TimeoutError:
                if self.m.status == "shutdown" or time.monotonic() >= deadline:
                    tail = self.console.text[-1500:]
                    raise TimeoutError(f"{needle!r} not seen (guest {self.m.status}); "
                                       f"console tail:\n{tail}") from None

    def run(self, cmd: str, timeout: float = 600) -> str:
        """Type cmd into the guest's shell; return what it printed."""
        self._n += 1
        tag = f"HVT{self._n}"
        start = self.console.mark()
        # The shell echoes what is typed; the quotes keep the echo from matching.
        line = f'{cmd}; echo "{tag[:2]}""{tag[2:]}=$?"\n'.encode()
        self.m.console_input(line, timeout)
        text = self.wait_console(f"{tag}=", timeout, start)
        return text[:text.rindex(f"{tag}=")]

    def meminfo(self) -> dict[str, int]:
        out = self.run("grep -E '^(MemTotal|MemFree):' /proc/meminfo")
        return {k: int(v) * 1024 for k, v in re.findall(r"(MemTotal|MemFree):\s+(\d+) kB", out)}

    def query(self) -> dict:
        return self.m.commands["query-balloon"]({})

    def wait_actual(self, pages: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.query()["actual_pages"] != pages:
            if time.monotonic() > deadline:
                raise TimeoutError(f"balloon actual {self.query()['actual_pages']} != {pages}")
            time.sleep(0.2)

    def hvmem_pages(self, mib: int) -> np.ndarray:
        """Guest page frames holding hvmem's fill pattern (page-aligned pieces of it)."""
        words = self.mem.array()[:self.mem.npages * 4096].view("<u8").reshape(-1, 512)
        with np.errstate(over="ignore"):
            idx = words[:, 0] * np.uint64(GOLDEN_INV)      # = word index + 1
            nxt = (idx + np.uint64(1)) * np.uint64(GOLDEN)
        w = idx.astype(np.int64) - 1
        ok = (idx >= 1) & (w % 512 == 0) & (w < mib * MiB // 8) & (words[:, 1] == nxt)
        return np.nonzero(ok)[0]

    def close(self):
        try:
            self.m.stop()
        finally:
            self.m.close()


@pytest.fixture(scope="module")
def bitmap_guest(linux_images):
    g = Guest(linux_images, 64, reporting=False)
    if not g.balloon.has_free_page_bitmap():
        g.close()
        pytest.skip("the guest kernel lacks the free page bitmap patch (0010); "
                    "rebuild with python -m hv.images build")
    yield g
    g.close()


@pytest.fixture(scope="module")
def stock_guest(linux_images):
    # Linux reports free memory only from a zone with more than
    # low watermark + PAGE_REPORTING_CAPACITY (32) 2 MiB blocks free: 64 MiB
    # plus, so this guest is bigger (mm/page_reporting.c).
    g = Guest(linux_images, 192, free_page_bitmap=False)
    yield g
    g.close()


def check_bitmap_after_fill_free(g, mib: int) -> dict:
    """hvmem fills and frees mib MiB; the bitmap then matches MemFree within
    5% and holds (nearly all) the pages hvmem freed. Returns the reply info."""
    from hv.memory import unpack_bitmap
    out = g.run(f"hvmem fill {mib} --free")
    assert f"filled {mib} MiB" in out
    freed = g.hvmem_pages(mib)
    assert len(freed) > mib * 256 * 3 // 4, f"only {len(freed)} hvmem pages found in guest RAM"
    before = g.meminfo()["MemFree"]
    words, info = g.balloon.request_free_page_bitmap(timeout_ms=300_000)
    after = g.meminfo()["MemFree"]
    free = unpack_bitmap(words, g.mem.npages)
    assert info["free_pages"] == free.sum()
    free_bytes = info["free_pages"] * 4096
    closest = min((before, after), key=lambda mf: abs(mf - free_bytes))
    print(f"{g.mem.size >> 20} MiB guest: bitmap {info}; MemFree before {before >> 10} KiB, "
          f"after {after >> 10} KiB")
    assert abs(free_bytes - closest) <= 0.05 * closest
    # The pages hvmem just freed are (nearly all) in the bitmap; a few sit on
    # the per-cpu lists or were reused by the shell.
    share = free[freed].mean()
    print(f"{share:.1%} of {len(freed)} pages hvmem freed are in the bitmap")
    assert share >= 0.9, f"only {share:.0%} of hvmem's freed pages are in the bitmap"
    # Pages the kernel itself uses are not: the MP table page, the kernel image.
    assert not free[:16].any()
    return info


def test_bitmap_matches_memfree_and_holds_freed_pages(bitmap_guest):
    check_bitmap_after_fill_free(bitmap_guest, 16)


def test_bitmap_command_and_timing(bitmap_guest):
    g = bitmap_guest
    res = g.m.commands["request-free-page-bitmap"]({"timeout_ms": 180_000})
    assert res["total_pages"] == g.mem.npages
    assert 0 < res["free_pages"] < res["total_pages"]
    print(f"64 MiB guest: bitmap in {res['elapsed_ms']} ms, {res['free_pages']} free")


def test_bitmap_with_dirty_log_covers_later_writes(bitmap_guest):
    """The migration invariant: with dirty logging on before the request, every
    page free in the bitmap whose content changes afterwards is in the dirty log
    (KVM's or the VMM's own)."""
    from hv.memory import unpack_bitmap
    g = bitmap_guest
    m = g.m
    m.set_dirty_logging(True)
    try:
        m.vm.get_dirty_log(0, g.mem.npages)           # start from a clean log
        g.mem.take_dirty_bitmap()
        words, info = g.balloon.request_free_page_bitmap(timeout_ms=180_000)
        snapshot = g.mem.array().copy()
        g.run("hvmem fill 24 --free")                  # allocates free pages, writes them
        changed_src = g.mem.array()
        npages = g.mem.npages
        changed = (snapshot.reshape(npages, 4096) != changed_src.reshape(npages, 4096)).any(1)
        dirty = (unpack_bitmap(m.vm.get_dirty_log(0, npages), npages)
                 | unpack_bitmap(g.mem.take_dirty_bitmap(), npages))
    finally:
        m.set_dirty_logging(False)
    free = unpack_bitmap(words, npages)
    skipped_but_changed = free & changed & ~dirty
    print(f"free {free.sum()}, changed {changed.sum()}, free and changed "
          f"{(free & changed).sum()}, of which not in the dirty log {skipped_but_changed.sum()}")
    assert (free & changed).sum() > 24 * 256 // 2      # hvmem did reuse free pages
    assert not skipped_but_changed.any()


def test_inflate_deflate(bitmap_guest):
    g = bitmap_guest
    mi = g.meminfo()
    # Make most free guest memory resident, so the balloon's pages are too.
    fill = max(16, int(mi["MemFree"] * 0.7) // MiB)
    g.run(f"hvmem fill {fill} --free")
    mf0 = g.meminfo()["MemFree"]
    rss0 = g.mem.resident_bytes()
    g.m.commands["balloon"]({"target_mib": 16})
    g.wait_actual(16 * 256)
    mf1 = g.meminfo()["MemFree"]
    rss1 = g.mem.resident_bytes()
    print(f"inflate 16 MiB: MemFree {mf0 >> 10} -> {mf1 >> 10} KiB, "
          f"resident {rss0 >> 20} -> {rss1 >> 20} MiB")
    assert mf0 - mf1 >= 14 * MiB
    assert rss0 - rss1 >= 8 * MiB
    q = g.query()
    assert q["actual_mib"] == 16 and q["inflated_pages"] == 16 * 256
    g.m.commands["balloon"]({"target_mib": 0})
    g.wait_actual(0)
    mf2 = g.meminfo()["MemFree"]
    assert mf2 >= mf0 - 2 * MiB
    assert g.query()["inflated_pages"] == 0
    g.run(f"hvmem fill {fill} --free")
    assert g.mem.resident_bytes() >= rss0 - 4 * MiB


def test_stats(bitmap_guest):
    q = bitmap_guest.m.commands["query-balloon"]({"refresh": True, "timeout_ms": 60_000})
    assert q["stats"].get("total_memory", 0) > 32 * MiB
    assert 0 < q["stats"]["free_memory"] <= q["stats"]["total_memory"]


def test_stock_features_hint(stock_guest):
    g = stock_guest
    q = g.query()
    assert "FREE_PAGE_HINT" in q["features"] and "REPORTING" in q["features"]
    assert "FREE_PAGE_BITMAP" not in q["features"]
    assert g.balloon.poison_value() is None
    mf0 = g.meminfo()["MemFree"]
    t0 = time.monotonic()
    cmd = g.balloon.free_page_hint_start()
    assert g.balloon.free_page_hint_wait(180_000), "guest did not finish hinting"
    ms = (time.monotonic() - t0) * 1000
    hinted = int(np.unpackbits(g.balloon.hinted_bitmap().view(np.uint8)).sum())
    print(f"hint round {cmd}: {hinted} pages hinted in {ms:.1f} ms")
    assert hinted >= 1024 and hinted % 1024 == 0   # whole 4 MiB blocks
    g.balloon.free_page_hint_done()
    time.sleep(2)
    assert g.meminfo()["MemFree"] >= mf0 - 4 * MiB   # blocks given back to the guest


def test_stock_features_reporting(stock_guest):
    g = stock_guest
    rss0 = g.mem.resident_bytes()
    reported0 = g.balloon.reported_bytes
    g.run("hvmem fill 96 --free")       # touches 96 MiB, then frees it
    deadline = time.monotonic() + 300   # the emulated guest reports slowly on a loaded host
    while g.balloon.reported_bytes - reported0 < 32 * MiB and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)
    rss1 = g.mem.resident_bytes()
    left = len(g.hvmem_pages(96))
    print(f"reported {(g.balloon.reported_bytes - reported0) >> 20} MiB; resident "
          f"{rss0 >> 20} -> {rss1 >> 20} MiB; {left} hvmem pages still hold data")
    assert g.balloon.reported_bytes - reported0 >= 32 * MiB
    # Without reporting the guest would keep ~96 MiB more resident.
    assert rss1 <= rss0 + 48 * MiB
    assert left < 96 * 256 // 2


def test_bitmap_in_several_chunks_256(linux_images):
    """A 256 MiB guest's bitmap does not fit one chunk buffer: the chunks,
    assembled by pfn, still match MemFree and hold hvmem's freed pages."""
    g = Guest(linux_images, 256, reporting=False)
    try:
        info = check_bitmap_after_fill_free(g, 32)
        assert info["chunks"] >= 2, info
        assert info["total_pages"] == g.mem.npages
    finally:
        g.close()


def test_balloon_after_save_restore(bitmap_guest, linux_images):
    """The balloon's state moves with the machine: a restored copy answers
    bitmap and stats requests and keeps the balloon size."""
    from hv.vmm import Machine, MachineConfig
    from hv.migration.state_codec import decode_state, encode_state
    g = bitmap_guest
    g.m.commands["balloon"]({"target_mib": 4})
    g.wait_actual(4 * 256)
    g.m.pause()
    try:
        state = decode_state(encode_state(g.m.save_state()))
        kernel, initrd = linux_images
        m2 = Machine(MachineConfig(mem_mib=64, kernel=kernel, initrd=initrd, balloon=True,
                                   balloon_options={"reporting": False}))
        try:
            m2.memory.array()[:] = g.mem.array()
            m2.restore_state(state)
            m2.start()
            assert m2.commands["query-balloon"]({})["actual_pages"] == 4 * 256
            words, info = m2.balloon.request_free_page_bitmap(timeout_ms=120_000)
            assert 0 < info["free_pages"] < m2.memory.npages
            q = m2.commands["query-balloon"]({"refresh": True, "timeout_ms": 60_000})
            assert q["stats"]["total_memory"] > 0
            m2.commands["balloon"]({"target_mib": 0})
            deadline = time.monotonic() + 120
            while m2.commands["query-balloon"]({})["actual_pages"] and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
            assert m2.commands["query-balloon"]({})["actual_pages"] == 0
        finally:
            m2.stop()
            m2.close()
    finally:
        g.m.resume()
    g.m.commands["balloon"]({"target_mib": 0})
    g.wait_actual(0)
