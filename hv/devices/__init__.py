"""Device model shared by every emulated device.

A device answers accesses on one bus (port I/O or MMIO) through read()/write()
at an offset inside its window, keeps its state as plain data (save() returns
a dict of ints, bytes, strs, lists and dicts; restore() takes it back), and may
offer control commands (commands() maps a command name to a handler taking the
JSON arguments dict and returning the JSON "return" value).

Interrupts reach the guest through an IrqLine handed to the device by
hv.vmm; the device never talks to KVM itself.

quiesce() / unquiesce(): the machine calls quiesce() when it pauses, after
the vCPUs stopped and before a migration's last dirty harvest and the state
save, and unquiesce() before the vCPUs run again. In between, a device does
nothing from its own threads (timers, I/O threads, control commands) that
writes guest memory or changes an interrupt line; what it must still do
waits for unquiesce(). The saved state then is the state the guest left.

lock_storage() / unlock_storage(): see DeviceModel; shared storage changes
hands between two VMMs with them during a migration.
"""

from __future__ import annotations

from typing import Callable

from ..errors import HvError


class DeviceStateError(HvError):
    """A saved device state (from a migration stream) the device cannot take."""


def checked_state(what: str, state, fields: dict) -> dict:
    """state (from the wire) with exactly the fields of `fields`, each of its
    kind: bool, bytes, a frozenset of the values allowed, or (lo, hi) for an
    int in that range; raises
    DeviceStateError naming the first that is not."""
    if not isinstance(state, dict) or set(state) != set(fields):
        got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise DeviceStateError(f"{what}: saved state has {got}, expected {sorted(fields)}")
    for name, kind in fields.items():
        v = state[name]
        if kind is bool:
            ok = isinstance(v, bool)
        elif kind is bytes:
            ok = isinstance(v, bytes)
        elif isinstance(kind, frozenset):
            ok = isinstance(v, (str, int)) and v in kind
        else:
            lo, hi = kind
            ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        if not ok:
            raise DeviceStateError(f"{what}: saved {name} {v!r:.40} is not what the device "
                                   f"can hold")
    return state


class IrqLine:
    """A guest interrupt line (a GSI of the in-kernel irqchip)."""

    gsi: int

    def set_level(self, level: bool) -> None:
        raise NotImplementedError

    def pulse(self) -> None:
        """An edge: raise then lower the line."""
        self.set_level(True)
        self.set_level(False)


class DeviceModel:
    """What every device model has: saved state as plain data, control
    commands, and a close() for what it holds. Bus devices (Device) and virtio
    devices (hv.devices.virtio.device.VirtioDevice) both build on it."""

    def save(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass

    def commands(self) -> dict[str, Callable[[dict], object]]:
        return {}

    def quiesce(self) -> None:
        pass

    def unquiesce(self) -> None:
        pass

    def lock_storage(self) -> None:
        """Take what only one VMM may use (a disk image's lock): the machine
        calls it before its vCPUs first run, here or on a migration's
        destination. Raises HvError saying who holds it."""

    def unlock_storage(self) -> None:
        """Give it up: a migration source after its final pause, so that the
        destination can take it; lock_storage() again if the migration fails."""

    def close(self) -> None:
        pass


class Device(DeviceModel):
    """Base of every bus device: a name, a window of registers."""

    name = "device"

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        pass
