"""The machine's state but RAM, as plain data: what a migration carries in
its STATE message and a restore loads into a fresh machine. Device state is
saved before the irqchip, so an interrupt a device raised is in it; the
vCPUs' state is read and written by their own threads (Machine.on_vcpu).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .. import kvm as K
from .._kvm import lib
from .runstate import STATUS_PAUSED, STATUS_SHUTDOWN, MachineError

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger("hv.vmm")

STATE_VERSION = 1


def save_state(machine: "Machine") -> dict:
    """The whole machine state but RAM, as plain data (the vCPUs must be paused)."""
    if machine.started and machine.status not in (STATUS_PAUSED, STATUS_SHUTDOWN):
        raise MachineError("pause the machine before saving its state")
    devices = {d.name: d.save() for d in machine.devices()}
    return {
        "version": STATE_VERSION,
        "mem_size": machine.memory.size,
        "vcpus": machine.on_each_vcpu(lambda v: _save_vcpu(machine, v)),
        # after the devices: an interrupt a device raised is in it
        "irqchip": {
            "pic_master": machine.vm.get_irqchip(lib.KVM_IRQCHIP_PIC_MASTER),
            "pic_slave": machine.vm.get_irqchip(lib.KVM_IRQCHIP_PIC_SLAVE),
            "ioapic": machine.vm.get_irqchip(lib.KVM_IRQCHIP_IOAPIC),
        },
        "pit": machine.vm.get_pit2(),
        "clock": machine.vm.get_clock(),
        "devices": devices,
    }


def _save_vcpu(machine: "Machine", v: K.Vcpu) -> dict:
    vs = {
        "regs": v.get_regs(),
        "sregs": v.get_sregs(),
        "fpu": v.get_fpu(),
        "msrs": [[i, val] for i, val in v.get_msrs(machine.msr_indices).items()],
        "lapic": v.get_lapic(),
        "events": v.get_vcpu_events(),
        "mp_state": v.get_mp_state(),
        "debugregs": v.get_debugregs(),
    }
    if machine.has_xcrs:
        try:
            vs["xcrs"] = v.get_xcrs()
        except K.KvmError:
            pass
    return vs


def restore_state(machine: "Machine", state: dict) -> None:
    """Load save_state() output into this freshly created, not booted machine."""
    if state.get("version") != STATE_VERSION:
        raise MachineError(f"machine state version {state.get('version')} is not "
                           f"{STATE_VERSION}")
    if state["mem_size"] != machine.memory.size:
        raise MachineError(f"saved guest has {state['mem_size'] >> 20} MiB of RAM, this "
                           f"machine {machine.memory.size >> 20} MiB")
    if len(state["vcpus"]) != len(machine.vcpus):
        raise MachineError("vCPU count differs from the saved machine")
    machine.vm.set_pit2(state["pit"])
    machine.vm.set_clock(state["clock"]["clock"])
    for key in ("pic_master", "pic_slave", "ioapic"):
        machine.vm.set_irqchip(state["irqchip"][key])
    for v, vs in zip(machine.vcpus, state["vcpus"]):
        v.set_mp_state(vs["mp_state"])
        v.set_regs(vs["regs"])
        v.set_sregs(vs["sregs"])
        v.set_fpu(vs["fpu"])
        if "xcrs" in vs and machine.has_xcrs:
            v.set_xcrs(vs["xcrs"])
        v.set_debugregs(vs["debugregs"])
        v.set_lapic(vs["lapic"])
        msrs = {int(i): int(val) for i, val in vs["msrs"]}
        done = v.set_msrs(msrs)
        if done != len(msrs):
            bad = list(msrs)[done]
            log.warning("KVM_SET_MSRS stopped at MSR %#x; setting the rest one by one", bad)
            for i, val in msrs.items():
                if v.set_msrs({i: val}) != 1:
                    log.warning("MSR %#x not restored", i)
        v.set_vcpu_events(vs["events"])
    devices = {d.name: d for d in machine.devices()}
    for name, ds in state["devices"].items():
        d = devices.get(name)
        if d is None:
            raise MachineError(f"saved device {name!r} does not exist on this machine")
        d.restore(ds)
    missing = sorted(set(devices) - set(state["devices"]))
    if missing:
        raise MachineError(f"the saved machine has no {', '.join(missing)}: start the "
                           f"destination with the same devices as the source")
