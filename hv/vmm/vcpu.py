"""What a vCPU thread does with its vCPU besides running it: the exits it
handles (port and MMIO I/O to the buses, shutdown events, a full dirty ring,
failures), the LAPIC set-up at creation, what it tells the guest when it
parks, and the diagnostics that name a failure (registers, the code at rip
through the guest's page tables). The thread itself, its states and the
pause protocol are in hv.vmm.machine.

Only the thread that owns a vCPU calls these with it (KVM wants a vCPU's
ioctls from its own thread); other threads go through Machine.on_vcpu().
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from .. import boot as bootmod
from .. import kvm as K
from .._kvm import lib
from ..memory import GuestMemory

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger("hv.vmm")

# LAPIC registers (offsets in the KVM_GET_LAPIC page)
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_EXTINT = 0x7
APIC_MODE_NMI = 0x4

#: exits after which KVM completes the access on the next KVM_RUN
IO_EXITS = (K.IoOut, K.IoIn, K.MmioWrite, K.MmioRead)


def _fit(data: bytes, size: int) -> bytes:
    """A device's read answer cut or padded (with 0xff) to the access size."""
    if len(data) == size:
        return data
    return bytes(data[:size]).ljust(size, b"\xff")


def handle_exit(machine: "Machine", vcpu: K.Vcpu, ex: K.VcpuExit) -> None:
    """Act on one KVM_RUN exit, on the vCPU's own thread."""
    kind = type(ex)
    pio, mmio = machine.pio, machine.mmio
    if kind is K.IoOut:
        port, size = ex.port, ex.size
        machine.io_counts[port] += 1
        if ex.count == 1:
            pio.write(port, ex.data)
        else:
            for i in range(ex.count):
                pio.write(port, ex.data[i * size:(i + 1) * size])
    elif kind is K.IoIn:
        port, size = ex.port, ex.size
        machine.io_counts[port] += 1
        if ex.count == 1:
            ex.buf[:] = _fit(pio.read(port, size), size)
        else:
            ex.buf[:] = b"".join(_fit(pio.read(port, size), size)
                                 for _ in range(ex.count))
    elif kind is K.MmioWrite:
        mmio.write(ex.addr, ex.data)
    elif kind is K.MmioRead:
        ex.buf[:] = _fit(mmio.read(ex.addr, ex.size), ex.size)
    elif kind is K.Intr:
        vcpu.set_immediate_exit(False)
    elif kind is K.Hlt:
        # only without an in-kernel LAPIC; nothing will wake the vCPU
        machine.request_shutdown("halt")
    elif kind is K.Shutdown:
        machine.request_shutdown("reboot")        # triple fault
    elif kind is K.SystemEvent:
        machine.request_shutdown("reboot" if ex.type == lib.KVM_SYSTEM_EVENT_RESET
                                 else "poweroff")
    elif kind is K.DirtyRingFull:
        handler = machine.dirty_ring_full_handler
        if handler is not None:
            handler(vcpu)
        else:       # no migration wants the pages: empty the ring
            vcpu.drain_full_dirty_ring(machine.vm.reset_dirty_rings)
    elif kind is K.InternalError:
        machine.error = describe_failure(machine.memory, vcpu, ex)
        log.error("%s", machine.error)
        machine.request_shutdown("internal-error")
    elif kind is K.FailEntry:
        machine.error = (f"KVM_EXIT_FAIL_ENTRY: hardware entry failure reason "
                         f"{ex.reason:#x} on CPU {ex.cpu}\n" + describe_regs(machine.memory, vcpu))
        log.error("%s", machine.error)
        machine.request_shutdown("internal-error")
    else:
        log.warning("unhandled vCPU exit %r", ex)


def set_lint(vcpu: K.Vcpu) -> None:
    """LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a BIOS leaves them."""
    lapic = bytearray(vcpu.get_lapic())
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        v = struct.unpack_from("<I", lapic, reg)[0]
        v = (v & ~0x700) | (mode << 8)
        struct.pack_into("<I", lapic, reg, v)
    vcpu.set_lapic(bytes(lapic))


def on_parked(vcpu: K.Vcpu) -> None:
    """A vCPU thread has parked its vCPU: tell the guest's kvmclock it was
    paused (no soft-lockup warnings after a long pause)."""
    try:
        vcpu.kvmclock_ctrl()
    except K.KvmError:
        pass    # the guest has not enabled kvmclock yet


def gva_to_gpa(memory: GuestMemory, vcpu: K.Vcpu, gva: int,
               sregs: dict | None = None) -> int | None:
    """Walk the guest's page tables (4-level, long mode) or return gva when
    paging is off."""
    s = sregs or vcpu.get_sregs()
    if not s["cr0"] & bootmod.X86_CR0_PG:
        return gva & 0xffffffff
    if not s["efer"] & bootmod.EFER_LMA:
        return None
    table = s["cr3"] & 0x000ffffffffff000
    for level, shift in enumerate((39, 30, 21, 12)):
        idx = (gva >> shift) & 0x1ff
        if not memory.contains(table + idx * 8, 8):
            return None
        entry = memory.read_u64(table + idx * 8)
        if not entry & 1:
            return None
        addr = entry & 0x000ffffffffff000
        if shift in (30, 21) and entry & 0x80:
            mask = (1 << shift) - 1
            return (addr & ~mask) | (gva & mask)
        table = addr
    return table | (gva & 0xfff)


def describe_regs(memory: GuestMemory, vcpu: K.Vcpu) -> str:
    try:
        r = vcpu.get_regs()
        s = vcpu.get_sregs()
    except K.KvmError as e:
        return f"(registers unavailable: {e})"
    lines = ["  " + " ".join(f"{n}={r[n]:#x}" for n in names) for names in (
        ("rip", "rflags", "rsp", "rbp"), ("rax", "rbx", "rcx", "rdx", "rsi", "rdi"),
        ("r8", "r9", "r10", "r11"), ("r12", "r13", "r14", "r15"))]
    lines.append(f"  cr0={s['cr0']:#x} cr2={s['cr2']:#x} cr3={s['cr3']:#x} "
                 f"cr4={s['cr4']:#x} efer={s['efer']:#x} cs={s['cs']['selector']:#x} "
                 f"(l={s['cs']['l']} db={s['cs']['db']} dpl={s['cs']['dpl']})")
    rip = s["cs"]["base"] + r["rip"] if not s["efer"] & bootmod.EFER_LMA else r["rip"]
    gpa = gva_to_gpa(memory, vcpu, rip, s)
    if gpa is not None and memory.contains(gpa, 16):
        lines.append(f"  code at rip (gpa {gpa:#x}): {memory.read(gpa, 16).hex(' ')}")
    return "\n".join(lines)


def describe_failure(memory: GuestMemory, vcpu: K.Vcpu, ex: K.InternalError) -> str:
    what = {1: "emulation failure", 2: "simultaneous exception",
            3: "delivery event"}.get(ex.suberror, "internal error")
    head = (f"KVM_EXIT_INTERNAL_ERROR suberror {ex.suberror} ({what}); "
            f"data {[hex(d) for d in ex.data]}")
    hint = ""
    if ex.suberror == 1:
        hint = ("\n  the instruction at rip could not be emulated: hide the CPU feature "
                "that makes the guest use it (hv.cpu) or avoid it in the guest kernel")
    return head + "\n" + describe_regs(memory, vcpu) + hint
