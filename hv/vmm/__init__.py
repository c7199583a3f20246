"""The VMM core: a machine assembled from KVM, guest memory and devices.

    config.py    MachineConfig, the guest physical layout, the command line
    runstate.py  run states, pause owners, MachineError
    machine.py   Machine: assembly, the vCPU threads, pause/resume, commands
    vcpu.py      what a vCPU thread does with its exits; failure diagnostics
    state.py     save/restore of everything but RAM

Imports point one way: hv.cli and hv.migration use hv.vmm, which uses
hv.devices, which use hv.memory and hv.kvm.
"""

from .config import (DIRTY_RING_MIN_BYTES, MIB, MIN_MEM_MIB, VIRTIO_MMIO_BASE,
                     MachineConfig, base_cmdline, check_dirty_ring_size, max_mem_mib)
from .machine import Machine
from .runstate import (PAUSE_MIGRATION, PAUSE_POSTCOPY, PAUSE_USER, STATUS_INMIGRATE, STATUS_PAUSED,
                       STATUS_POSTMIGRATE, STATUS_PRELAUNCH, STATUS_RUNNING,
                       STATUS_SHUTDOWN, MachineError)

__all__ = ["DIRTY_RING_MIN_BYTES", "MIB", "MIN_MEM_MIB", "VIRTIO_MMIO_BASE", "MachineConfig",
           "base_cmdline", "check_dirty_ring_size", "max_mem_mib", "Machine",
           "PAUSE_MIGRATION", "PAUSE_POSTCOPY", "PAUSE_USER", "STATUS_INMIGRATE", "STATUS_PAUSED",
           "STATUS_POSTMIGRATE", "STATUS_PRELAUNCH", "STATUS_RUNNING", "STATUS_SHUTDOWN",
           "MachineError"]
