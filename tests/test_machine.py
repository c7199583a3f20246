"""hv.vmm.Machine with the tiny PVH guests and with the shared Linux guest."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from conftest import Console
from hv import control
from hv.qmp_commands import PREFIX, serve
from hv import kvm as K
from hv.vmm import Machine, MachineConfig, MachineError
from hv.params import ParameterError

pytestmark = pytest.mark.kvm

GUESTS = os.path.join(os.path.dirname(__file__), "guests")
PVH = os.path.join(GUESTS, "pvh.elf")
PVH_IDLE = os.path.join(GUESTS, "pvh-idle.elf")


def tiny(kernel=PVH, mem_mib=16, **kw):
    console = Console()
    m = Machine(MachineConfig(mem_mib=mem_mib, kernel=kernel, **kw))
    m.console_listeners.append(console)
    return m, console


def plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return isinstance(value, (int, bytes, str, float, bool)) or value is None


def test_pvh_guest_runs_and_powers_off():
    m, console = tiny(append="hello=world")
    r = m.boot()
    assert r.protocol == "pvh"
    assert m.status == "prelaunch"
    m.start()
    assert m.wait(20) == "poweroff"
    assert m.status == "shutdown"
    text = console.text
    assert "pvh: magic ok" in text
    assert "hello=world" in text and "hv_poweroff=0xf4" in text
    assert "memmap: 3" in text
    assert m.exit_counts["IoOut"] > 10
    assert m.error is None
    m.close()


def test_memory_limits():
    from hv.vmm import max_mem_mib
    with pytest.raises(MachineError, match="out of range"):
        Machine(MachineConfig(mem_mib=4, kernel=PVH))
    with pytest.raises(MachineError, match="this host's RAM"):
        Machine(MachineConfig(mem_mib=max_mem_mib() + 1, kernel=PVH))


def test_ram_above_4g_has_two_slots_and_a_hole():
    """RAM past the 32-bit hole continues at 4 GiB, in a slot of its own; the
    hole is neither RAM in the e820 map nor reachable through GuestMemory."""
    from hv import mptable
    from hv.errors import GuestMemoryError
    with Machine(MachineConfig(mem_mib=4096, kernel=PVH)) as m:
        low = 0xd0000000
        assert m.memory_slots() == [(0, 0, low), (1, 1 << 32, (4096 << 20) - low)]
        assert mptable.e820_map(m.memory.regions)[-1] == (1 << 32, (4096 << 20) - low, 1)
        m.memory.write((1 << 32) + 123, b"high")
        assert m.memory.read((1 << 32) + 123, 4) == b"high"
        for gpa in (low, 0xfee00000, (1 << 32) - 4):
            with pytest.raises(GuestMemoryError, match="outside guest RAM"):
                m.memory.read(gpa, 8)
        bits = np.unpackbits(m.memory.ram_bitmap().view(np.uint8), bitorder="little")
        assert bits.sum() == 4096 << 8 and not bits[low >> 12:(1 << 32) >> 12].any()


def test_pause_resume_save_restore_idle_guest():
    m, console = tiny(PVH_IDLE)
    m.boot()
    m.start()
    console.wait_for("idle\n", 20)
    assert m.status == "running"
    m.pause()
    assert m.status == "paused"
    state = m.save_state()
    assert plain(state)
    assert set(state) >= {"vcpus", "irqchip", "pit", "clock", "devices"}
    v = state["vcpus"][0]
    assert set(v) >= {"regs", "sregs", "fpu", "msrs", "lapic", "events", "mp_state"}
    msrs = dict(v["msrs"])
    assert 0x10 in msrs                      # TSC
    assert "serial0" in state["devices"]

    # a second machine restored from that state and a copy of RAM
    m2, console2 = tiny(PVH_IDLE)
    m2.memory.view[:] = m.memory.view
    m2.restore_state(state)
    s2 = m2.save_state()
    assert s2["vcpus"][0]["regs"] == v["regs"]
    assert s2["vcpus"][0]["sregs"]["cr0"] == v["sregs"]["cr0"]
    assert s2["devices"]["serial0"] == state["devices"]["serial0"]
    m2.start()
    time.sleep(0.2)
    assert m2.status == "running"
    m2.stop()
    assert m2.wait(5) == "quit"
    m2.close()

    m.resume()
    assert m.status == "running"
    m.pause()
    m.resume()
    assert m.commands["query-status"]({}) == {"status": "running", "running": True}
    m.commands["stop"]({})
    assert m.commands["query-status"]({})["status"] == "paused"
    m.commands["cont"]({})
    assert m.status == "running"
    m.commands["quit"]({})
    assert m.wait(10) == "quit"
    with pytest.raises(MachineError):
        m.resume()
    m.close()


def test_save_requires_pause():
    m, console = tiny(PVH_IDLE)
    m.boot()
    m.start()
    console.wait_for("idle\n", 20)
    with pytest.raises(MachineError, match="pause"):
        m.save_state()
    m.stop()
    m.close()


def test_triple_fault_ends_the_run():
    m, console = tiny()
    r = m.boot()
    m.memory.write(r.entry, b"\x0f\x0b")     # ud2 with an empty IDT
    m.start()
    assert m.wait(20) == "reboot"
    m.close()


def test_balloon_and_virtio_window():
    m, console = tiny(balloon=True)
    if m.balloon is None:
        pytest.skip("virtio-balloon not available")
    assert "virtio_mmio.device=4K@0xd0000000:5" in m.kernel_cmdline()
    hit = m.mmio.find(0xd0000000)
    assert hit is not None and hit[1] == 0
    assert m.mmio.read(0xd0000000, 4) == b"virt"
    m.close()


def test_balloon_options_reach_the_device():
    from hv.devices.virtio.balloon_defs import F_FREE_PAGE_HINT, F_REPORTING, F_STATS_VQ
    m, console = tiny(balloon=True, balloon_options={"reporting": "off", "hint": False,
                                                     "stats_interval_s": "2.5"})
    try:
        if m.balloon is None:
            pytest.skip("virtio-balloon not available")
        f = m.balloon.features()
        assert not f >> F_REPORTING & 1 and not f >> F_FREE_PAGE_HINT & 1
        assert f >> F_STATS_VQ & 1
        assert m.balloon.stats_interval_s == 2.5
    finally:
        m.close()
    with pytest.raises(MachineError, match="unknown balloon option 'nope'.*reporting"):
        Machine(MachineConfig(mem_mib=16, kernel=PVH, balloon=True,
                              balloon_options={"nope": 1}))


def test_internal_error_report_names_registers():
    m, console = tiny()
    m.boot()
    v = m.vcpus[0]
    text = m.describe_failure(v, K.InternalError(1, [1, 2]))
    assert "rip=0x100000" in text and "emulation failure" in text
    assert "code at rip" in text
    m.close()


# -- the shared Linux guest -------------------------------------------------------

linux = pytest.mark.linux


def shell(guest, command: str, expect: str, timeout: float = 60) -> str:
    mark = guest.console.mark()
    guest.serial.enqueue(command.encode() + b"\n")
    return guest.console.wait_for(expect, timeout, mark)


@linux
def test_linux_boots_to_ready(linux_guest):
    assert linux_guest.status == "running"
    assert "hv-guest: ready" in linux_guest.console.text
    assert linux_guest.error is None


@linux
def test_linux_shell_answers(linux_guest):
    shell(linux_guest, "echo answer-$((6*7))", "answer-42")


@linux
def test_linux_pause_resume(linux_guest):
    linux_guest.pause()
    assert linux_guest.status == "paused"
    state = linux_guest.save_state()
    assert plain(state)
    mark = linux_guest.console.mark()
    linux_guest.serial.enqueue(b"echo after-$((2+3))\n")
    time.sleep(0.5)
    assert "after-5" not in linux_guest.console.text[mark:]
    linux_guest.resume()
    linux_guest.console.wait_for("after-5", 60, mark)


@linux
def test_linux_control_socket(linux_guest, tmp_path):
    path = str(tmp_path / "hv.sock")
    with serve(path, linux_guest), control.ControlClient(path) as c:
        assert c.execute("query-status") == {"status": "running", "running": True}
        assert c.execute("stop") == {}
        assert c.execute("query-status")["status"] == "paused"
        assert c.execute("cont") == {}
        assert c.execute("query-status")["status"] == "running"
        with pytest.raises(control.ControlError, match="no-such"):
            c.execute("no-such")
    shell(linux_guest, "echo still-$((1+1))", "still-2")


@linux
def test_linux_console_input_command(linux_guest, tmp_path):
    path = str(tmp_path / "hv.sock")
    mark = linux_guest.console.mark()
    with serve(path, linux_guest), control.ControlClient(path) as c:
        assert c.execute(PREFIX + "console-input",
                         data="echo typed-$((3*4))\n") == {"bytes": 20}
        linux_guest.console.wait_for("typed-12", 60, mark)
        with pytest.raises(control.ControlError, match="'data' is missing"):
            c.execute(PREFIX + "console-input")


@linux
def test_linux_state_restores_into_new_machine(linux_guest, linux_images):
    kernel, initrd = linux_images
    linux_guest.pause()
    try:
        state = linux_guest.save_state()
        console = Console()
        m2 = Machine(MachineConfig(mem_mib=64, kernel=kernel, initrd=initrd))
        m2.console_listeners.append(console)
        m2.memory.view[:] = linux_guest.memory.view
        m2.restore_state(state)
    finally:
        linux_guest.resume()
    try:
        m2.start()
        m2.serial.enqueue(b"echo restored-$((40+2))\n")
        console.wait_for("restored-42", 60)
        assert m2.error is None
    finally:
        m2.stop()
        m2.close()
    shell(linux_guest, "echo original-$((1+2))", "original-3")


def test_dirty_logging_and_ring():
    m, console = tiny(PVH, dirty_ring_bytes=64 * 1024)
    assert m.vcpus[0].dirty_ring is not None
    m.set_dirty_logging(True)
    m.boot()
    m.start()
    assert m.wait(20) == "poweroff"
    got = m.vcpus[0].harvest_dirty_ring()
    assert got and all(slot == 0 for slot, _ in got)
    m.vm.reset_dirty_rings()
    m.close()

    m, console = tiny(PVH)
    m.set_dirty_logging(True)
    m.boot()
    m.start()
    assert m.wait(20) == "poweroff"
    words = m.vm.get_dirty_log(0, m.memory.npages)
    assert words.any()
    m.set_dirty_logging(False)
    m.close()


def test_console_input_fills_the_uart_fifo():
    from hv.devices.uart import RX_CAPACITY
    m, console = tiny(PVH_IDLE)
    try:
        assert m.commands["console-input"]({"data": "ls\n"}) == {"bytes": 3}
        assert bytes(m.serial.rx) == b"ls\n"
        assert m.commands["console-input"]({"data": "\u00e9"}) == {"bytes": 2}  # UTF-8
        # nobody reads the FIFO: what fits is typed, then a clear error
        with pytest.raises(MachineError, match="has not read its console"):
            m.commands["console-input"]({"data": "x" * RX_CAPACITY, "timeout_s": 0.1})
        assert len(m.serial.rx) == RX_CAPACITY
        assert not m.serial.lsr & 0x02            # no overrun reported to the guest
        for bad in ({}, {"data": 5}, {"data": "a", "timeout_s": -1},
                    {"data": "a", "timeout_s": float("nan")}, {"data": "a", "timeout_s": True}):
            with pytest.raises(ParameterError, match="Parameter '(data|timeout_s)'"):
                m.commands["console-input"](bad)
        with pytest.raises(ParameterError, match="unknown argument 'nope'"):
            m.commands["console-input"]({"data": "a", "nope": 1})
    finally:
        m.close()


def test_stop_before_start_keeps_vcpus_paused():
    m, console = tiny(PVH_IDLE)
    m.boot()
    m.commands["stop"]({})
    assert m.status == "paused"
    m.start()
    time.sleep(0.3)
    assert m.status == "paused" and console.text == ""
    m.commands["cont"]({})
    console.wait_for("idle\n", 20)
    assert m.status == "running"
    m.stop()
    m.close()


def test_pause_completes_a_pending_port_read():
    """KVM finishes an IN only on the next KVM_RUN; pause() must get it done so
    that the saved state neither replays the read nor loses its value."""
    from hv.devices import Device
    from tinyguest import LOAD, flat32

    class Counter(Device):
        name = "counter"
        reads = 0

        def read(self, offset, size):
            self.reads += 1
            return self.reads.to_bytes(4, "little")[:size]

    # mov dx, 0x10; loop: in eax, dx; jmp loop
    code = bytes.fromhex("66ba1000" "ed" "ebfd")
    m = Machine(MachineConfig(mem_mib=16))
    dev = Counter()
    m.pio.register(0x10, 1, dev)
    m.memory.write(LOAD, code)
    flat32(m.vcpus[0])
    m.start()
    try:
        for _ in range(50):
            time.sleep(0.002)
            m.pause()
            regs = m.vcpus[0].get_regs()
            # The last value handed out is in EAX: the IN completed (RIP is at
            # the jmp, or back at the IN about to read again).
            assert regs["rax"] & 0xffffffff == dev.reads
            assert regs["rip"] in (LOAD + 4, LOAD + 5)
            m.resume()
        assert dev.reads > 50
    finally:
        m.stop()
        m.close()
