"""Auto-converge: a tiny guest that dirties pages faster than the link
carries them never converges; with QEMU's auto-converge the source throttles
its vCPUs until it does, and takes the throttle off whatever the outcome."""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from loopback import migrate_over_loopback  # noqa: E402
from tinyguest import flat32  # noqa: E402

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")]

LOAD, COUNTER, DELAY_AT, WINDOW = 0x1000, 0x2000, 0x2004, 0x400000
WINDOW_PAGES = 4096             # 16 MiB, rewritten in a loop
MEM_MIB = 64


def paced_writer() -> bytes:
    """32-bit code: forever { spin [DELAY_AT] times; i++; write i into page
    i % 4096 of WINDOW; [COUNTER] = i }: its dirty rate follows its CPU time."""
    return (b"\xbe" + WINDOW.to_bytes(4, "little")          # mov esi, WINDOW
            + b"\x31\xc9"                                   # xor ecx, ecx
            + b"\x8b\x15" + DELAY_AT.to_bytes(4, "little")  # loop: mov edx, [DELAY_AT]
            + b"\x4a\x75\xfd"                               # spin: dec edx; jnz spin
            + b"\x41\x89\xc8"                               # inc ecx; mov eax, ecx
            + b"\x25\xff\x0f\x00\x00\xc1\xe0\x0c"           # and eax, 0xfff; shl eax, 12
            + b"\x89\x0c\x06"                               # mov [esi+eax], ecx
            + b"\x89\x0d" + COUNTER.to_bytes(4, "little")   # mov [COUNTER], ecx
            + b"\xeb\xe1")                                  # jmp loop


def rate(m, seconds=0.3) -> float:
    """Pages the guest writes per second now."""
    c0, t0 = m.memory.read_u32(COUNTER), time.monotonic()
    time.sleep(seconds)
    return (m.memory.read_u32(COUNTER) - c0) % (1 << 32) / (time.monotonic() - t0)


def start_writer(target_pages_s=40_000):
    """The paced writer running, its spin count tuned to about target_pages_s."""
    from hv.vmm import Machine, MachineConfig
    m = Machine(MachineConfig(mem_mib=MEM_MIB))
    m.memory.write(LOAD, paced_writer())
    m.memory.write_u32(DELAY_AT, 1000)
    flat32(m.vcpus[0])
    m.start()
    deadline = time.monotonic() + 30
    while m.memory.read_u32(COUNTER) < 100:
        assert time.monotonic() < deadline, "the tiny guest does not run"
        time.sleep(0.01)
    delay = 1000
    for _ in range(3):
        r = rate(m)
        delay = max(1, int(delay * r / target_pages_s))
        m.memory.write_u32(DELAY_AT, delay)
    return m


@pytest.fixture
def writer():
    made = []

    def make():
        from hv.vmm import Machine, MachineConfig
        src = start_writer()
        dst = Machine(MachineConfig(mem_mib=MEM_MIB))
        made.extend([src, dst])
        return src, dst
    yield make
    for m in made:
        m.close()


def link_for(src) -> float:
    """A link (MiB/s) that carries a quarter of what the guest dirties, and
    too little for its whole window to fit the downtime limit below."""
    pages_s = rate(src, 0.5)
    return min(pages_s / 4, WINDOW_PAGES * 2) * 4096 / (1 << 20)


def test_the_throttle_takes_cpu_time_from_the_guest(writer):
    src, _ = writer()
    full = rate(src, 0.5)
    src.set_cpu_throttle(90)            # the vCPU runs a tenth of the time
    throttled = rate(src, 0.5)
    src.set_cpu_throttle(0)
    again = rate(src, 0.5)
    assert src.cpu_throttle_percentage == 0
    assert throttled < full * 0.5, (full, throttled)
    assert again > throttled * 2, (throttled, again)


def test_a_guest_faster_than_the_link_does_not_converge_without_it(writer):
    src, dst = writer()
    q, res = migrate_over_loopback(src, dst, timeout=60, free_pages="off",
                                   max_bandwidth_mib=link_for(src), downtime_ms=200,
                                   downtime_strategy="cancel", max_rounds=6)
    assert q["status"] == "failed" and "did not converge" in q["error"], q
    assert src.status == "running" and rate(src) > 0


def test_auto_converge_throttles_until_it_converges_then_lets_go(writer):
    src, dst = writer()
    q, res = migrate_over_loopback(src, dst, timeout=120, free_pages="off", verify=True,
                                   max_bandwidth_mib=link_for(src), downtime_ms=200,
                                   downtime_strategy="cancel", max_rounds=40,
                                   auto_converge=True, cpu_throttle_initial=50,
                                   cpu_throttle_increment=20, max_cpu_throttle=99)
    print(f"\nthrottle {q['cpu_throttle_percentage']} %, rounds "
          f"{[r['pages'] for r in q['rounds']]}, downtime {q['downtime_ms']} ms")
    assert q["status"] == "completed", q
    assert res["rx"].verified
    assert q["cpu_throttle_percentage"] >= 50
    # the destination runs the guest unthrottled (the throttle is no state)
    assert dst.cpu_throttle_percentage == 0 and rate(dst) > 0


def test_a_failed_auto_converge_leaves_the_source_at_full_speed(writer):
    src, dst = writer()
    q, res = migrate_over_loopback(src, dst, timeout=60, free_pages="off",
                                   max_bandwidth_mib=link_for(src), downtime_ms=200,
                                   downtime_strategy="cancel", max_rounds=5,
                                   auto_converge=True, cpu_throttle_initial=30,
                                   cpu_throttle_increment=10, max_cpu_throttle=40)
    assert q["status"] == "failed", q
    assert q["cpu_throttle_percentage"] >= 30
    assert src.status == "running" and src.cpu_throttle_percentage == 0
    # nothing kicks the vCPU to sleep any more: the throttle's thread has ended
    src._throttle_thread.join(1.0)
    assert not src._throttle_thread.is_alive()
    assert rate(src) > 0
