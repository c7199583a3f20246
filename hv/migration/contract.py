"""What migration needs from a machine, as typing Protocols.

hv.vmm.Machine implements all of them; the tests' fakes implement
SourceMachine or DestinationMachine fully, so migration never probes a
machine for what it might have.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

from ..memory import GuestMemory


@runtime_checkable
class SourceMachine(Protocol):
    """The machine a migration moves away."""

    memory: GuestMemory
    #: hv.kvm.Vm, or None without KVM (then only the VMM's writes are logged)
    vm: object
    #: the virtio-balloon device (free page bitmap, hints), or None
    balloon: object
    status: str

    def pause(self, owner: str) -> None: ...

    def resume(self, owner: str) -> None: ...

    def enter_postmigrate(self) -> None: ...

    def save_state(self) -> dict: ...

    #: disk image locks: dropped before COMPLETE, taken back if the migration fails
    def lock_storage(self) -> None: ...

    def unlock_storage(self) -> None: ...

    def request_shutdown(self, reason: str) -> None: ...

    #: (guest physical start, length) ranges the guest never frees (its
    #: kernel image), sent while the guest builds its free page bitmap
    def resident_ranges(self) -> list[tuple[int, int]]: ...


@runtime_checkable
class KvmSourceMachine(SourceMachine, Protocol):
    """A source on KVM: what the KVM dirty logs use as well."""

    vcpus: list
    #: called on a vCPU's thread when its dirty ring is full
    dirty_ring_full_handler: Callable | None

    def set_dirty_logging(self, enabled: bool) -> None: ...

    def memory_slots(self) -> list[tuple[int, int, int]]: ...

    #: auto-converge: the vCPUs' throttle, percent (0: off)
    cpu_throttle_percentage: int

    def set_cpu_throttle(self, percent: int) -> None: ...

    #: dirty-limit: one vCPU's throttle, percent (0: off)
    def set_vcpu_throttle(self, index: int, percent: int) -> None: ...


@runtime_checkable
class DestinationMachine(Protocol):
    """The machine an incoming migration fills (status becomes "inmigrate"
    while it waits; "shutdown" ends the wait)."""

    memory: GuestMemory
    status: str

    def restore_state(self, state: dict) -> None: ...

    def start(self) -> None: ...
