"""Sender <-> receiver over loopback TCP between two fake machines (no KVM):
a writer thread plays the guest (writes through GuestMemory, so the VMM dirty
log sees them), a fake balloon reports free pages. Checks memory identical
after migration, free pages skipped (and poison recreated), failure and
cancel paths resume the source, and a second migration then succeeds."""

import socket
import threading
import time

import numpy as np
import pytest

from hv.memory import PAGE_SIZE, GuestMemory, pack_bitmap
from hv.migration.commands import install
from hv.migration.protocol import MigrationError
from hv.migration.receiver import receive
from hv.migration.transport import listen
from hv.migration.sender import Migration, MigrationParams

MEM = 32 << 20
NPAGES = MEM // PAGE_SIZE
FREE = slice(NPAGES // 2, NPAGES - 100)       # what the balloon calls free


class FakeBalloon:
    def __init__(self, poison=None):
        self.poison = poison
        self.calls = 0

    def request_free_page_bitmap(self, timeout_ms, drop_cache="none"):
        self.calls += 1
        bits = np.zeros(NPAGES, dtype=bool)
        bits[FREE] = True
        return pack_bitmap(bits), {"free_pages": int(bits.sum())}

    def poison_value(self):
        return self.poison


class FakeSource:
    """Memory with data, zero and free pages; a writer thread while running."""

    def __init__(self, poison=None):
        self.memory = GuestMemory(MEM)
        a = self.memory.array()
        rng = np.random.default_rng(7)
        a[:8 << 20] = rng.integers(0, 256, 8 << 20, dtype=np.uint8)
        fs, fe = FREE.start * PAGE_SIZE, FREE.stop * PAGE_SIZE
        a[fs:fe] = 0xEE if poison is None else (poison & 0xFF)  # garbage in free pages
        a[-100 * PAGE_SIZE:] = 3
        self.balloon = FakeBalloon(poison)
        self.commands = {}
        self.vm = None
        self.status = "running"
        self.counter = 0
        self._run = threading.Event()
        self._run.set()
        self._stop = False
        self.shut = False
        self.writer = threading.Thread(target=self._write, daemon=True)
        self.writer.start()

    def _write(self):
        rng = np.random.default_rng(1)
        while not self._stop:
            self._run.wait()
            if self._stop:
                break
            pfn = int(rng.integers(0, NPAGES // 2))     # never into the free range
            self.counter += 1
            self.memory.write(pfn * PAGE_SIZE + 8 * (self.counter % 500),
                              self.counter.to_bytes(8, "little"))
            time.sleep(0.0002)

    def pause(self, owner="user"):
        self._run.clear()
        time.sleep(0.01)          # let an in-flight write land
        self.status = "paused"

    def resume(self, owner="user"):
        if self.status == "postmigrate":
            raise AssertionError("resumed a guest that migrated away")
        self.status = "running"
        self._run.set()

    def enter_postmigrate(self):
        self.status = "postmigrate"

    def lock_storage(self):
        pass

    def unlock_storage(self):
        pass

    def save_state(self):
        return {"counter": self.counter, "regs": {"rip": 0x1000}, "blob": b"\x01\x02"}

    def resident_ranges(self):
        return [(0, 4 << 20)]           # part of its data: sent while the bitmap comes

    def request_shutdown(self, reason):
        self.shut = True
        self._stop = True
        self._run.set()
        self.status = "shutdown"

    def close(self):
        self._stop = True
        self._run.set()


class FakeDest:
    def __init__(self):
        self.memory = GuestMemory(MEM)
        self.status = "prelaunch"
        self.state = None
        self.running = False

    def restore_state(self, s):
        self.state = s

    def start(self):
        self.running = True


def start_receiver(dest, **kw):
    lst = listen("tcp:127.0.0.1:0")
    port = lst.getsockname()[1]
    result = {}

    def run():
        try:
            result["rx"] = receive(dest.memory, lst, dest.restore_state, dest.start,
                                   timeout=10, **kw)
        except Exception as e:
            result["error"] = e
        finally:
            lst.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return port, t, result


def check_same(src, dst, poison=None):
    a, b = src.memory.array(), dst.memory.array()
    fs, fe = FREE.start * PAGE_SIZE, FREE.stop * PAGE_SIZE
    assert (a[:fs] == b[:fs]).all()
    assert (a[fe:] == b[fe:]).all()
    expect = 0 if not poison else poison & 0xFF
    assert (b[fs:fe] == expect).all()


@pytest.mark.parametrize("connections", [1, 3])
def test_migrate_with_free_bitmap(connections):
    src, dst = FakeSource(), FakeDest()
    port, t, res = start_receiver(dst)
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", free_pages="bitmap",
                                       dirty_log="vmm", verify=True, connections=connections,
                                       downtime_ms=50))
    m.run()
    t.join(10)
    q = m.query()
    assert q["status"] == "completed", q
    assert "error" not in res, res.get("error")
    assert dst.running and dst.state["counter"] == src.counter and src.shut
    check_same(src, dst)
    assert q["pages_skipped_free"] == FREE.stop - FREE.start
    assert q["pages_skipped_zero"] > 1000
    assert q["pages_sent"] >= (8 << 20) // PAGE_SIZE
    assert q["bytes_sent"] < (10 << 20) + q["rounds"][-1]["bytes"] * 2 + 2 * (4 << 20)
    assert q["downtime_ms"] > 0 and q["total_time_ms"] >= q["downtime_ms"]
    assert res["rx"].verified
    assert len(q["rounds"]) >= 2 and q["rounds"][-1].get("final")


def test_migrate_off_sends_free_pages_and_poison_fill():
    src, dst = FakeSource(), FakeDest()
    port, t, res = start_receiver(dst)
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", free_pages="off",
                                       dirty_log="vmm", verify=True))
    m.run()
    t.join(10)
    q = m.query()
    assert q["status"] == "completed" and q["pages_skipped_free"] == 0
    assert (src.memory.array() == dst.memory.array()).all()

    src2, dst2 = FakeSource(poison=0xAAAAAAAA), FakeDest()
    port, t, res = start_receiver(dst2)
    m = Migration(src2, MigrationParams(uri=f"tcp:127.0.0.1:{port}", dirty_log="vmm",
                                        verify=True))
    m.run()
    t.join(10)
    q = m.query()
    assert q["status"] == "completed", q
    assert q["pages_filled"] == FREE.stop - FREE.start
    check_same(src2, dst2, poison=0xAAAAAAAA)
    src.close()


class DroppingProxy:
    """Forwards to the receiver and cuts the connection after `limit` bytes."""

    def __init__(self, port, limit):
        self.lst = socket.create_server(("127.0.0.1", 0))
        self.port = self.lst.getsockname()[1]
        self.target, self.limit = port, limit
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        c, _ = self.lst.accept()
        u = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._pipe, args=(u, c, 1 << 60), daemon=True).start()
        self._pipe(c, u, self.limit)

    @staticmethod
    def _pipe(a, b, limit):
        n = 0
        try:
            while n < limit:
                d = a.recv(65536)
                if not d:
                    break
                b.sendall(d[:limit - n])
                n += len(d)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_connection_cut_leaves_source_running_then_second_migration_succeeds():
    src, dst = FakeSource(), FakeDest()
    port, t, res = start_receiver(dst)
    proxy = DroppingProxy(port, 3 << 20)
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{proxy.port}", dirty_log="vmm",
                                       timeout_s=5))
    m.run()
    t.join(10)
    q = m.query()
    assert q["status"] == "failed" and "connection" in q["error"], q
    assert isinstance(res.get("error"), MigrationError)
    assert not dst.running and dst.state is None
    assert src.status == "running" and not src.shut
    c0 = src.counter
    time.sleep(0.2)
    assert src.counter > c0          # the guest keeps running at the source

    dst2 = FakeDest()
    port, t, res = start_receiver(dst2)
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", dirty_log="vmm",
                                       verify=True))
    m.run()
    t.join(10)
    assert m.query()["status"] == "completed"
    check_same(src, dst2)


def test_cancel_through_commands_and_refused_destination():
    src, dst = FakeSource(), FakeDest()
    cmds = install(src)
    assert src.commands["query-migrate"]({}) == {"status": "none"}
    port, t, res = start_receiver(dst)
    src.commands["migrate"]({"uri": f"tcp:127.0.0.1:{port}", "dirty_log": "vmm",
                             "max_bandwidth_mib": 8})
    with pytest.raises(MigrationError, match="already running"):
        src.commands["migrate"]({"uri": f"tcp:127.0.0.1:{port}"})
    time.sleep(0.3)
    assert src.commands["query-migrate"]({})["status"] == "active"
    src.commands["migrate-cancel"]({})
    q = cmds.current.wait(10)
    assert q["status"] == "cancelled" and q["error"] == "migration cancelled"
    t.join(10)
    assert "cancelled" in str(res["error"]) and not dst.running
    assert src.status == "running"

    # A destination of another size refuses at HELLO: failed, source untouched.
    small = FakeDest()
    small.memory = GuestMemory(MEM // 2)
    port, t, res = start_receiver(small)
    src.commands["migrate"]({"uri": f"tcp:127.0.0.1:{port}", "dirty_log": "vmm"})
    q = cmds.current.wait(10)
    assert q["status"] == "failed" and "same --mem" in q["error"]
    with pytest.raises(MigrationError):
        src.commands["migrate"]({"uri": "tcp:127.0.0.1:1", "free_pages": "maybe"})
    src.commands["migrate"]({"uri": "tcp:127.0.0.1:1", "dirty_log": "vmm"})
    q = cmds.current.wait(10)
    assert q["status"] == "failed" and "cannot connect" in q["error"]
    src.close()


class FakeHintBalloon:
    """Free page hinting: the hints are in before the bulk pass reads them."""

    def __init__(self):
        self.events = []

    def free_page_hint_start(self):
        self.events.append("start")
        return 2

    def free_page_hint_wait(self, timeout_ms):
        return True

    def hinted_bitmap(self):
        bits = np.zeros(NPAGES, dtype=bool)
        bits[FREE] = True
        return pack_bitmap(bits)

    def free_page_hint_stop(self):
        self.events.append("stop")

    def free_page_hint_done(self):
        self.events.append("done")

    def poison_value(self):
        return None


def test_migrate_with_hints():
    src, dst = FakeSource(), FakeDest()
    src.balloon = FakeHintBalloon()
    port, t, res = start_receiver(dst)
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", free_pages="hint",
                                       dirty_log="vmm", verify=True, hint_wait_ms=100))
    m.run()
    t.join(10)
    q = m.query()
    assert q["status"] == "completed", q
    assert q["pages_skipped_free"] == FREE.stop - FREE.start
    assert src.balloon.events == ["start", "stop", "done"]
    check_same(src, dst)


def test_destination_restore_failure_resumes_source():
    src = FakeSource()

    class Broken(FakeDest):
        def restore_state(self, s):
            raise ValueError("no such device 'virtio-mmio.7'")
    dst = Broken()
    port, t, res = start_receiver(dst)
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", dirty_log="vmm"))
    m.run()
    t.join(10)
    q = m.query()
    assert q["status"] == "failed"
    assert "the destination failed" in q["error"] and "virtio-mmio.7" in q["error"]
    assert src.status == "running" and not src.shut and not dst.running
    assert q["downtime_ms"] is None
    src.close()


def test_second_source_is_refused_at_once_while_the_first_completes():
    src, dst = FakeSource(), FakeDest()
    port, t, res = start_receiver(dst)
    first = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", dirty_log="vmm",
                                           verify=True, max_bandwidth_mib=16)).start()
    deadline = time.monotonic() + 10
    while first.query()["status"] != "active":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    other = FakeSource()
    t0 = time.monotonic()
    second = Migration(other, MigrationParams(uri=f"tcp:127.0.0.1:{port}", dirty_log="vmm",
                                              timeout_s=20))
    second.run()
    q2 = second.query()
    assert time.monotonic() - t0 < 2 and not first.finished
    assert q2["status"] == "failed", q2
    assert q2["error"].startswith("the destination refused the migration: a migration "
                                  "(session 0x"), q2
    assert "is already being received; this destination accepts one source at a time" \
        in q2["error"]
    assert other.status == "running" and not other.shut
    q1 = first.wait(30)
    t.join(10)
    assert q1["status"] == "completed", q1
    assert "error" not in res, res.get("error")
    check_same(src, dst)
    other.close()


def test_silent_and_garbage_connections_do_not_stop_the_source():
    src, dst = FakeSource(), FakeDest()
    port, t, res = start_receiver(dst)
    silent = socket.create_connection(("127.0.0.1", port))
    garbage = socket.create_connection(("127.0.0.1", port))
    garbage.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64)
    time.sleep(0.2)                 # both are accepted before the real source
    t0 = time.monotonic()
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", dirty_log="vmm",
                                       verify=True, connections=2))
    m.run()
    t.join(10)
    q = m.query()
    assert q["status"] == "completed", q
    assert time.monotonic() - t0 < 4          # well within the 5 s handshake timeout
    assert "error" not in res, res.get("error")
    check_same(src, dst)
    assert garbage.recv(4096)[:4] == b"HVMG"  # told why (ERROR), then closed
    silent.settimeout(10)
    assert silent.recv(1) == b""              # dropped once its handshake time was up
    silent.close()
    garbage.close()


def test_fakes_implement_the_machine_contracts():
    from hv.migration.contract import DestinationMachine, SourceMachine
    src = FakeSource()
    try:
        assert isinstance(src, SourceMachine)
        assert isinstance(FakeDest(), DestinationMachine)
    finally:
        src.close()


class TextSource(FakeSource):
    """Its 8 MiB of data compress well (text-like repeats), as guest page
    cache and heap often do; the writer thread dirties them as before."""

    def __init__(self):
        super().__init__()
        words = np.frombuffer(b"hv migrates guests; " * 13, dtype=np.uint8)
        a = self.memory.array()
        a[:8 << 20] = np.resize(words, 8 << 20)


@pytest.mark.parametrize("mode", ["zstd", "auto"])
def test_migrate_compressed_verifies(mode):
    src, dst = TextSource(), FakeDest()
    port, t, res = start_receiver(dst)
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", free_pages="bitmap",
                                       dirty_log="vmm", verify=True, downtime_ms=50,
                                       compression=mode, connections=2))
    m.run()
    t.join(10)
    q = m.query()
    assert q["status"] == "completed", q
    assert "error" not in res, res.get("error")
    check_same(src, dst)
    assert res["rx"].verified
    c = q["compression"]
    assert c["mode"] == mode and c["compressor-mib-s"] > 0
    if mode == "zstd":
        # every batch went as a frame: the 8 MiB of text cost a fraction on the wire
        assert c["compressed-pages"] >= (8 << 20) // PAGE_SIZE
        assert c["ratio"] < 0.1
        assert q["bytes_sent"] < 2 << 20
    else:
        # auto compressed the first batch to measure the compressor; whether it
        # goes on compressing follows from the two rates
        assert c["ratio"] < 0.1
        pays = c["compressor-mib-s"] * (1 - c["ratio"])
        if c["link-mib-s"] and abs(c["link-mib-s"] - pays) > 0.05 * pays:
            assert c["active"] == (c["link-mib-s"] < pays)


def test_compression_parameters_are_checked():
    for bad, what in (({"compression": "zlib"}, "compression"),
                      ({"compression_level": 0}, "compression_level"),
                      ({"compression_level": 21}, "compression_level")):
        with pytest.raises(MigrationError, match=what):
            MigrationParams.from_args({"uri": "tcp:127.0.0.1:1", **bad})


def test_corrupt_compressed_batch_fails_the_migration_and_the_source_runs_on(monkeypatch):
    from hv.migration import pages
    real = pages.Zstd.compress

    def corrupt(self, *a, **kw):
        frame = bytearray(real(self, *a, **kw))
        frame[len(frame) // 2] ^= 0x40
        return bytes(frame)
    monkeypatch.setattr(pages.Zstd, "compress", corrupt)
    src, dst = TextSource(), FakeDest()
    port, t, res = start_receiver(dst)
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", free_pages="bitmap",
                                       dirty_log="vmm", compression="zstd"))
    m.run()
    t.join(10)
    q = m.query()
    assert q["status"] == "failed"
    assert "corrupt compressed batch" in q["error"], q["error"]
    assert "corrupt compressed batch" in str(res["error"])
    assert src.status == "running" and not dst.running
    src.close()


class SlowBalloon(FakeBalloon):
    """A guest that takes its time to build the bitmap (its kernel is slow)."""

    def request_free_page_bitmap(self, timeout_ms, drop_cache="none"):
        time.sleep(0.3)
        return super().request_free_page_bitmap(timeout_ms, drop_cache)


def test_the_kernel_image_goes_while_the_guest_builds_its_bitmap():
    src, dst = FakeSource(), FakeDest()
    src.balloon = SlowBalloon()
    src._run.clear()                    # the writer holds still: the pages are known
    time.sleep(0.05)
    a = src.memory.array().reshape(-1, PAGE_SIZE)
    data_pages = int((a.any(axis=1) & ~np.isin(np.arange(NPAGES), np.r_[FREE])).sum())
    port, t, res = start_receiver(dst)
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", free_pages="bitmap",
                                       dirty_log="vmm", verify=True, downtime_ms=50))
    m.run()
    t.join(10)
    q = m.query()
    assert q["status"] == "completed", q
    check_same(src, dst)
    assert res["rx"].verified
    # setup ended with the connection, not with the bitmap 0.3 s later, and
    # the resident range (4 MiB) went in the meantime, each page once
    assert q["setup_ms"] < 250
    assert q["pages_sent_before_bitmap"] == (4 << 20) // PAGE_SIZE
    assert q["pages_skipped_free"] == FREE.stop - FREE.start
    # and were not sent again by the bulk pass
    assert q["rounds"][0]["pages"] == data_pages


def test_compressed_pages_the_guest_writes_meanwhile_arrive_whole():
    """The writer hammers the batches while they are compressed (the kernel
    image range goes while the bitmap is slow): each frame still holds what
    its checksum says, and the migration verifies."""
    for _ in range(3):
        src, dst = TextSource(), FakeDest()
        src.balloon = SlowBalloon()
        port, t, res = start_receiver(dst)
        m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", free_pages="bitmap",
                                           dirty_log="vmm", verify=True, downtime_ms=50,
                                           compression="zstd"))
        m.run()
        t.join(10)
        q = m.query()
        src.close()
        assert q["status"] == "completed", q.get("error")
        assert res["rx"].verified and q["compression"]["compressed-pages"] > 0
        check_same(src, dst)
