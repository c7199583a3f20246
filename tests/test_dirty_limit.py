"""Dirty-limit: with dirty rings, the vCPU that dirties memory fast is
throttled on its own to its limit while an idle vCPU runs free; the
throttle is lifted when the migration ends."""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from loopback import migrate_over_loopback  # noqa: E402
from tinyguest import flat32  # noqa: E402

from hv.migration.dirty_limit import throttle_for  # noqa: E402
from hv.migration.protocol import MigrationError  # noqa: E402

LOAD, COUNTER, WINDOW, IDLE_AT = 0x1000, 0x2000, 0x100000, 0x1800
RING = 64 * 1024


def test_the_throttle_keeps_the_running_rate_at_the_limit():
    assert throttle_for(0.0, 1.0) == 0
    assert throttle_for(1.0, 1.0) == 0             # at the limit: runs free
    assert throttle_for(4.0, 1.0) == 75            # runs a quarter of the time
    assert throttle_for(10_000.0, 1.0) == 99       # never past the machine's maximum
    assert throttle_for(3.0, 2.0) == 34


def writer_and_idle_guest():
    """vCPU 0 rewrites 1024 pages in a loop (counter at COUNTER); vCPU 1 halts
    with interrupts off: it dirties nothing."""
    from hv._kvm import lib
    from hv.vmm import Machine, MachineConfig
    m = Machine(MachineConfig(mem_mib=32, cpus=2, dirty_ring_bytes=RING))
    m.memory.write(LOAD, b"\xbe" + WINDOW.to_bytes(4, "little") + bytes.fromhex(
        "31c9" "41" "89c8" "25ff030000" "c1e00c" "890c06" "890d")
        + COUNTER.to_bytes(4, "little") + b"\xeb\xea")
    m.memory.write(IDLE_AT, b"\xfa\xf4\xeb\xfd")          # cli; hlt; jmp hlt
    flat32(m.vcpus[0])
    flat32(m.vcpus[1], rip=IDLE_AT, rsp=0x7000)
    m.vcpus[1].set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
    m.start()
    deadline = time.monotonic() + 30
    while m.memory.read_u32(COUNTER) < 1000:
        assert time.monotonic() < deadline, "the tiny guest does not run"
        time.sleep(0.01)
    return m


def writes_per_s(m, seconds=0.4) -> float:
    c0, t0 = m.memory.read_u32(COUNTER), time.monotonic()
    time.sleep(seconds)
    return (m.memory.read_u32(COUNTER) - c0) % (1 << 32) / (time.monotonic() - t0)


@pytest.fixture
def guests():
    made = []
    yield made
    for m in made:
        m.close()



@pytest.mark.kvm
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")
def test_only_the_dirtying_vcpu_is_throttled(guests):
    from hv.migration.dirty_limit import DirtyLimit
    from hv.migration.dirty_log import RingDirtyLog
    m = writer_and_idle_guest()
    guests.append(m)
    free = writes_per_s(m)
    log = RingDirtyLog(m)
    log.start()
    limit = DirtyLimit(m, log, limit_mb_s=1).start()
    try:
        time.sleep(1.5)
        info = limit.info()
        throttled = writes_per_s(m)
    finally:
        limit.stop()
        log.stop()
    v0, v1 = info["vcpus"]
    assert v0["throttle-percentage"] > 50 and v0["dirty-rate-mb-s"] > 0
    assert v1["throttle-percentage"] == 0 and v1["highest-throttle-percentage"] == 0
    assert throttled < free / 2, (free, throttled)
    assert m.vcpu_throttle_percentages == [0, 0]
    assert writes_per_s(m) > throttled


@pytest.mark.kvm
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")
def test_migration_with_dirty_limit_throttles_the_writer_and_lifts_it_after(guests):
    from hv.vmm import Machine, MachineConfig
    src = writer_and_idle_guest()
    dst = Machine(MachineConfig(mem_mib=32, cpus=2, dirty_ring_bytes=RING))
    guests.extend([src, dst])
    # a link slower than the writer: every round re-dirties much of what it sent
    q, res = migrate_over_loopback(src, dst, timeout=60, free_pages="off", dirty_log="ring",
                                   dirty_limit=True, vcpu_dirty_limit=1,
                                   max_bandwidth_mib=4, downtime_ms=300, max_rounds=12,
                                   downtime_strategy="force", shutdown_source=False)
    assert q["status"] == "completed", q
    v0, v1 = q["dirty_limit"]["vcpus"]
    assert v0["highest-throttle-percentage"] > 0
    assert v1["highest-throttle-percentage"] == 0
    assert src.vcpu_throttle_percentages == [0, 0]
    assert dst.vcpu_throttle_percentages == [0, 0]


def test_dirty_limit_needs_rings_and_excludes_auto_converge():
    from hv.migration.sender import Migration, MigrationParams
    from types import SimpleNamespace
    from hv.memory import GuestMemory
    m = SimpleNamespace(memory=GuestMemory(1 << 20), vm=None, balloon=None)
    with pytest.raises(MigrationError, match="--dirty-ring"):
        Migration(m, MigrationParams(uri="tcp:127.0.0.1:1", dirty_log="vmm", dirty_limit=True))
    with pytest.raises(MigrationError, match="auto-converge"):
        Migration(m, MigrationParams(uri="tcp:127.0.0.1:1", dirty_log="vmm", dirty_limit=True,
                                     auto_converge=True))
