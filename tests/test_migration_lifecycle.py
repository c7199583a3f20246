"""The run-state rules a migration lives by, on the tiny writer guest of
test_migration_kvm (no Linux image needed):

- a migration's pause has an owner: cont during the final phase is refused,
  and a user's stop survives the migration's own resume;
- once the destination runs the guest, the source never runs it again
  (postmigrate: cont refused, the vCPUs stay out of KVM_RUN);
- COMPLETE sent and no answer: the source stays paused (it cannot know
  whether the destination runs the guest);
- a pause that times out is rolled back;
- while paused, devices are quiesced and no VMM write reaches guest RAM;
- the downtime limit: a guest that cannot converge is cancelled (the source
  keeps running) or, when the user says so, paused anyway with a warning;
- dirty rings: the default dirty log of a ring guest is its ring, the
  bitmap is refused before anything changes, and a ring KVM overfilled is
  recovered and reported.
"""

import re
import socket
import threading
import time

import numpy as np
import pytest

from hv.devices import Device
from hv.errors import GuestMemoryError
from hv.vmm import MachineError, PAUSE_MIGRATION, PAUSE_USER
from hv.migration.protocol import Command, ack
from hv.migration.transport import SocketStream, listen
from hv.migration.sender import Migration, MigrationParams
from hv.migration.protocol import MigrationError

from loopback import migrate_over_loopback
from test_migration_kvm import MEM_MIB, counter, machines  # noqa: F401 (fixture)

pytestmark = pytest.mark.kvm


def runs(m, seconds=0.3) -> bool:
    """Whether the tiny guest's counter moves."""
    c0 = counter(m)
    time.sleep(seconds)
    return counter(m) != c0


def test_cont_during_the_final_phase_is_refused(machines):
    src, dst = machines("src"), machines("dst")
    seen = {}

    def on_paused(m):
        with pytest.raises(MachineError, match="migration holds the guest paused"):
            m.commands["cont"]({})
        seen["holders"] = m.pause_holders
        seen["status"] = m.status
        seen["counter"] = counter(m)
        time.sleep(0.05)
        seen["still"] = counter(m) == seen["counter"]
    q, res = migrate_over_loopback(src, dst, free_pages="off", verify=True, downtime_ms=1000,
                                   on_paused=on_paused)
    assert q["status"] == "completed", q
    assert res["rx"].verified
    assert seen["holders"] == {PAUSE_MIGRATION} and seen["status"] == "paused"
    assert seen["still"], "the source ran during the final phase"


def test_source_never_runs_after_completion(machines):
    src, dst = machines("src"), machines("dst")
    q, res = migrate_over_loopback(src, dst, free_pages="off", downtime_ms=1000,
                                   shutdown_source=False)
    assert q["status"] == "completed", q
    assert src.status == "postmigrate"
    for cmd in ("cont", "cont"):
        with pytest.raises(MachineError, match="postmigrate"):
            src.commands[cmd]({})
    with pytest.raises(MachineError, match="postmigrate"):
        src.resume(PAUSE_MIGRATION)
    src.commands["stop"]({})          # harmless
    assert src.status == "postmigrate"
    assert not runs(src) and runs(dst)


def test_user_stop_survives_a_failed_migration(machines):
    src = machines("src")
    src.commands["stop"]({})
    mig = Migration(src, MigrationParams(uri="tcp:127.0.0.1:1", free_pages="off", timeout_s=2))
    mig.run()
    assert mig.query()["status"] == "failed"
    assert src.status == "paused" and src.pause_holders == {PAUSE_USER}
    assert not runs(src)
    src.commands["cont"]({})
    assert runs(src)


def test_user_stop_during_the_migration_survives_its_rollback(machines):
    """The migration pauses, finds the rest does not fit and resumes: a
    user's stop taken meanwhile keeps the guest paused."""
    src, dst = machines("src"), machines("dst")

    def on_paused(m):
        m.commands["stop"]({})
        time.sleep(0.3)     # makes the paused estimate miss the limit: rolled back
    q, _ = migrate_over_loopback(src, dst, free_pages="off", downtime_ms=200, max_rounds=2,
                                 downtime_strategy="cancel", on_paused=on_paused)
    assert q["pause_rollbacks"] >= 1, q
    assert src.status in ("paused", "shutdown")
    if q["status"] != "completed":
        assert src.pause_holders == {PAUSE_USER} and not runs(src)


def test_no_answer_to_complete_leaves_the_source_paused(machines):
    """The destination takes everything, then vanishes without RUNNING or
    ERROR: it may be running the guest, so the source must not."""
    src = machines("src")
    lst = listen("tcp:127.0.0.1:0")
    port = lst.getsockname()[1]

    def silent_destination():
        c, _ = lst.accept()
        st = SocketStream(c, timeout=10)
        st.recv()                         # HELLO
        st.send(ack(Command.HELLO))
        while True:
            msg = st.recv(src.memory.npages, mem=None)
            if getattr(msg, "command", None) == Command.COMPLETE:
                break
        c.shutdown(socket.SHUT_RDWR)
        c.close()
        lst.close()
    t = threading.Thread(target=silent_destination, daemon=True)
    t.start()
    mig = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", free_pages="off",
                                         downtime_ms=1000, timeout_s=5))
    mig.run()
    t.join(10)
    q = mig.query()
    assert q["status"] == "failed" and "stays paused" in q["error"], q
    assert src.status == "paused" and src.pause_holders == {PAUSE_USER}
    assert not runs(src)


def test_pause_that_times_out_is_rolled_back(machines, monkeypatch):
    src = machines("src")
    monkeypatch.setattr(src, "_all_parked", lambda: False)
    with pytest.raises(MachineError, match="did not stop"):
        src.pause(PAUSE_MIGRATION, timeout=0.2)
    monkeypatch.undo()
    assert src.pause_holders == frozenset() and src.status == "running"
    assert runs(src)
    src.pause()
    assert src.status == "paused"


class WritingDevice(Device):
    """A device with a thread of its own that writes guest RAM (like a
    network device's receive path) and counts what it could not write."""

    name = "writer"

    def __init__(self, memory):
        self.memory = memory
        self.quiesced_at = None
        self.refused = 0
        self.written = 0
        self._stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while not self._stop.wait(0.001):
            try:
                self.memory.write(0x600000, self.written.to_bytes(8, "little"))
                self.written += 1
            except GuestMemoryError:
                self.refused += 1

    def quiesce(self):
        self.quiesced_at = time.monotonic()

    def close(self):
        self._stop.set()


def test_devices_quiesce_and_guest_ram_freezes_while_paused(machines):
    src, dst = machines("src"), machines("dst")
    dev = WritingDevice(src.memory)
    src.pio.register(0x500, 1, dev)
    twin = Device()
    twin.name = "writer"
    dst.pio.register(0x500, 1, twin)
    saved = {}

    def on_paused(m):
        saved["quiesced"] = dev.quiesced_at is not None
        saved["written"] = dev.written
        time.sleep(0.05)
        saved["after"] = dev.written
    try:
        q, res = migrate_over_loopback(src, dst, free_pages="off", verify=True,
                                       downtime_ms=1000, on_paused=on_paused)
    finally:
        dev.close()
    assert q["status"] == "completed", q
    assert res["rx"].verified
    assert saved["quiesced"]
    assert saved["after"] == saved["written"], "a device wrote guest RAM while paused"
    assert dev.refused > 0
    # what it wrote before the pause arrived
    assert dst.memory.read_u64(0x600000) == saved["written"] - 1


def test_guest_that_cannot_converge_is_cancelled_and_keeps_running(machines):
    src, dst = machines("src"), machines("dst")
    # 1024 pages rewritten all the time; 2 MiB/s carries 150 of them in 300 ms
    q, res = migrate_over_loopback(src, dst, free_pages="off", downtime_ms=300,
                                   max_bandwidth_mib=2, max_rounds=1, timeout=60)
    assert q["status"] == "failed", q
    assert "did not converge" in q["error"] and "keeps running" in q["error"]
    assert src.status == "running" and runs(src)
    assert "error" in res


def test_forced_pause_says_it_went_over_the_limit(machines):
    src, dst = machines("src"), machines("dst")
    q, res = migrate_over_loopback(src, dst, free_pages="off", downtime_ms=300,
                                   max_bandwidth_mib=8, max_rounds=1, verify=True,
                                   downtime_strategy="force", timeout=60)
    assert q["status"] == "completed", q
    assert res["rx"].verified
    assert "paused anyway" in q["warning"]
    assert q["downtime_exceeded"] == (q["downtime_ms"] > 300)
    assert set(q["downtime_parts"]) == {"pause", "save", "final_sync", "final_send",
                                        "verify", "complete"}


def test_the_paused_guests_last_pages_go_without_max_bandwidth(machines):
    """max_bandwidth shares the link with a running guest; once it is
    paused, each byte held back is downtime (QEMU lifts its limit there too)."""
    src, dst = machines("src"), machines("dst")
    q, res = migrate_over_loopback(src, dst, free_pages="off", max_bandwidth_mib=8,
                                   max_rounds=1, downtime_strategy="force", timeout=60)
    assert q["status"] == "completed", q
    *live, final = q["rounds"]
    assert final.get("final") and final["bytes"] >= 1 << 20, q["rounds"]
    mib_s = lambda r: r["bytes"] / (1 << 20) / (r["ms"] / 1000)     # noqa: E731
    assert all(mib_s(r) < 8 * 1.5 for r in live if r["bytes"] >= 1 << 20), q["rounds"]
    assert mib_s(final) > 8 * 4, q["rounds"]
    assert q["downtime_ms"] < final["bytes"] / (8 << 20) * 1000, q


def test_converging_migration_keeps_its_downtime_limit(machines):
    src, dst = machines("src"), machines("dst")
    q, _ = migrate_over_loopback(src, dst, free_pages="off", downtime_ms=100)
    assert q["status"] == "completed", q
    assert q["downtime_ms"] <= 100 or q["warning"], q


def test_ring_guest_migrates_with_the_default_dirty_log(machines):
    src = machines("src", dirty_ring_bytes=64 * 1024)
    dst = machines("dst", dirty_ring_bytes=64 * 1024)
    q, res = migrate_over_loopback(src, dst, free_pages="off", verify=True, downtime_ms=1000)
    assert q["status"] == "completed", q
    assert q["dirty_log"] == "ring"
    assert res["rx"].verified


def test_ring_guest_refuses_the_bitmap_before_anything_changes(machines):
    src = machines("src", dirty_ring_bytes=64 * 1024)
    with pytest.raises(MigrationError, match="dirty ring"):
        Migration(src, MigrationParams(uri="tcp:127.0.0.1:1", dirty_log="bitmap"))
    assert not src.dirty_logging and runs(src)


class KvmRingModel:
    """KVM's dirty ring as virt/kvm/dirty_ring.c keeps it: push at
    dirty_index, soft-full at dirty_index - reset_index (u32) >= the soft
    limit, and a reset that walks on while entries are marked harvested,
    with no bound at dirty_index. push() can overfill, as the nested KVM
    hv runs on does for writes its instruction emulator makes."""

    def __init__(self, n=64, reserved=8):
        from hv._kvm import lib
        from hv.kvm import DIRTY_GFN_DTYPE, Vcpu
        self.lib = lib
        self.n, self.soft_limit = n, n - reserved
        self.ring = np.zeros(n, dtype=DIRTY_GFN_DTYPE)
        self.dirty_index = self.reset_index = 0
        self.vcpu = Vcpu.__new__(Vcpu)
        self.vcpu.dirty_ring = self.ring
        self.vcpu._ring_taken = 0
        self.vcpu._empty_full_since = None
        self.vcpu._stuck_reset_pos = None

    def used(self):
        return (self.dirty_index - self.reset_index) % 2**32

    def full(self):
        return self.used() >= self.soft_limit

    def push(self, offset):
        e = self.ring[self.dirty_index % self.n]
        e["slot"], e["offset"] = 0, offset
        e["flags"] = self.lib.KVM_DIRTY_GFN_F_DIRTY
        self.dirty_index += 1

    def reset(self):
        count = 0
        while self.ring["flags"][self.reset_index % self.n] & self.lib.KVM_DIRTY_GFN_F_RESET:
            self.ring["flags"][self.reset_index % self.n] = 0
            self.reset_index += 1
            count += 1
        return count

    def run_until_full(self, offsets):
        """The vCPU runs: pushes until the ring is soft-full, then exits."""
        for o in offsets:
            if self.full():
                return
            self.push(o)

    def drain(self):
        return self.vcpu.drain_full_dirty_ring(self.reset)


def test_a_full_ring_is_drained_without_passing_kvms_push_index():
    m = KvmRingModel()
    m.run_until_full(range(1000, 2000))
    assert m.full()
    slots, offsets, lost = m.drain()
    assert list(offsets) == list(range(1000, 1000 + m.soft_limit)) and not lost
    # Marking the never-pushed entries harvested too would walk reset_index
    # past dirty_index: used() underflows and the vCPU exits full for good.
    assert m.used() == 0 and not m.full()
    for round_ in range(5):         # and so on, round after round
        m.run_until_full(range(round_ * 100, round_ * 100 + 100))
        assert len(m.drain()[1]) == m.soft_limit and m.used() == 0


def test_an_overfilled_ring_reports_loss_and_recovers():
    m = KvmRingModel(n=64, reserved=8)
    for o in range(64 + 60):         # wrapped: 60 entries overwritten
        m.push(o)
    slots, offsets, lost = m.drain()
    assert lost and len(offsets) == 64
    # reset took one lap; the 60 overwritten entries are gone, yet counted
    assert m.full() and not (m.ring["flags"] & m.lib.KVM_DIRTY_GFN_F_DIRTY).any()
    exits = 0
    while m.full():
        exits += 1
        assert exits < 50, "the vCPU exits DIRTY_RING_FULL forever"
        slots, offsets, lost = m.drain()
        assert len(offsets) == 0
        assert 0 <= m.used() < 2**31, "reset_index ran past dirty_index"
        if exits > 1:
            assert lost
    # runs again, and its pushes are harvested as usual
    m.run_until_full(range(500, 600))
    slots, offsets, lost = m.drain()
    assert set(offsets) >= set(range(500, 500 + 10)) and not m.full()


def test_an_empty_full_exit_that_raced_a_harvester_steps_nothing():
    m = KvmRingModel()
    m.run_until_full(range(100))
    # a harvester took the ring and reset it after KVM decided to exit
    m.vcpu.harvest_dirty_ring_arrays()
    m.reset()
    assert len(m.drain()[1]) == 0 and m.used() == 0
    # the vCPU ran on, the harvester took its pushes again before the exit
    m.run_until_full(range(100, 200))
    m.vcpu.harvest_dirty_ring_arrays()
    m.reset()
    slots, offsets, lost = m.drain()
    assert len(offsets) == 0 and not lost
    assert m.used() == 0, "an entry never pushed was stepped over"


def test_verify_hashes_only_the_final_round_while_paused(machines, monkeypatch):
    """Hashing for verify happens while the guest runs; inside the pause only
    the pages of the final round are hashed (on either side)."""
    from hv.migration import pages
    src, dst = machines("src"), machines("dst")
    hashed_paused = []
    real = pages.hashes

    def counting(mem, starts, counts, *a):
        out = real(mem, starts, counts, *a)
        if src.status == "paused" and mem is src.memory:
            hashed_paused.append(len(out))
        return out
    monkeypatch.setattr(pages, "hashes", counting)
    q, res = migrate_over_loopback(src, dst, free_pages="off", verify=True, downtime_ms=1000)
    assert q["status"] == "completed", q
    assert res["rx"].verified and q["verify_ms"] > 0
    final = q["rounds"][-1]
    assert final.get("final")
    assert sum(hashed_paused) <= final["pages"], (hashed_paused, final)
    assert res["rx"].stats["verified_pages"] > 4 * final["pages"]


def test_close_keeps_memory_mapped_under_a_live_vcpu_thread(machines, monkeypatch):
    src = machines("src")
    thread = src._threads[0]
    monkeypatch.setattr(src, "stop", lambda timeout=10.0: None)   # a vCPU that will not end
    src.close()
    assert thread.is_alive() and runs(src)      # its memory is still there
    monkeypatch.undo()
    src.stop()


def _bad_queue(state):
    """The state with the balloon's first queue ready at an address past RAM."""
    t = state["devices"]["virtio-mmio.0"]
    t["status"] |= 0xF              # DRIVER_OK: the queues are in use
    q = dict(size=64, ready=True, desc=(MEM_MIB << 20) + 0x1000, avail=0x2000, used=0x3000,
             last_avail_idx=0, used_idx=0, signalled_used=0, signalled_valid=False,
             event_idx=False, indirect=False)
    t["queues"] = [q, dict(q, ready=False)]     # inflate and deflate
    return state


@pytest.mark.parametrize("mutate,why", [
    (_bad_queue, "queue 0: descriptor table .* is outside guest RAM"),
    (lambda s: {**s, "devices": {k: v for k, v in s["devices"].items()
                                 if k != "serial0"}}, "serial0"),
    (lambda s: {**s, "devices": {**s["devices"], "serial0": {
        **s["devices"]["serial0"], "divisor": 1 << 20}}}, "divisor"),
])
def test_bad_state_is_refused_and_nothing_resumes(machines, mutate, why):
    src = machines("src", balloon=True)
    dst = machines("dst", balloon=True)

    def hostile_restore(state):
        dst.restore_state(mutate(state))
    q, res = migrate_over_loopback(src, dst, hostile_restore, free_pages="off",
                                   downtime_ms=1000)
    assert q["status"] == "failed", q
    assert "restoring the machine state failed" in q["error"]
    assert re.search(why, q["error"]), q["error"]
    assert not dst.started and dst.status != "running"
    assert src.status == "running" and runs(src)
