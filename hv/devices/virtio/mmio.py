"""virtio-mmio, version 2 (virtio 1.x, 4.2.2): one 0x1000 window per device.

Registers are 32-bit little-endian; the device's configuration space starts
at 0x100. Linux finds the window through `virtio_mmio.device=4K@ADDR:IRQ`.

Interrupts: InterruptStatus bit 0 (used buffer) and bit 1 (configuration
change). The line follows InterruptStatus: it goes high when the status
becomes non-zero and low when the driver acknowledges everything. That is
right for both trigger modes the IOAPIC pin may be programmed with: an MP
table entry for an ISA-bus IRQ with "conforms to bus" polarity/trigger makes
the pin edge-triggered, active high, and each 0 -> non-zero transition is a
rising edge; Linux's vm_interrupt() acknowledges before it looks at the
rings, so an event arriving between its read and its ack is still seen. A
level-triggered pin (Linux requests the IRQ with IRQF_SHARED) gets exactly
the level the spec describes. When the driver acknowledges only part of the
status (an event came after its read), the line is dropped and raised again
so an edge-triggered pin sees the remaining event.

A malformed request from the driver sets DEVICE_NEEDS_RESET (status bit 64),
logs the reason and raises a configuration change interrupt; the queues are
ignored until the driver resets the device. The VMM and the guest keep
running.
"""

from __future__ import annotations

import logging
import struct
import threading

from ...errors import GuestMemoryError
from ...memory import GuestMemory
from .. import Device, DeviceStateError, IrqLine, checked_state
from .device import VIRTIO_F_VERSION_1, VirtioDevice
from .queue import MAX_QUEUE_SIZE, Virtqueue, VirtioError

log = logging.getLogger("hv.virtio")

MMIO_SIZE = 0x1000
MAGIC = 0x74726976  # "virt"
VERSION = 2

MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

INT_VRING = 1
INT_CONFIG = 2

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128

_QUEUE_ADDR_REGS = {
    QUEUE_DESC_LOW: ("desc", 0), QUEUE_DESC_HIGH: ("desc", 32),
    QUEUE_DRIVER_LOW: ("avail", 0), QUEUE_DRIVER_HIGH: ("avail", 32),
    QUEUE_DEVICE_LOW: ("used", 0), QUEUE_DEVICE_HIGH: ("used", 32),
}


class VirtioMmioTransport(Device):
    """A hv Device driving one VirtioDevice through the virtio-mmio registers."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, irq_line: IrqLine,
                 name: str | None = None):
        self.device = device
        self.memory = memory
        self.irq_line = irq_line
        self.name = name or f"virtio-mmio-{device.name}"
        self.lock = threading.RLock()
        self.needs_reset_reason: str | None = None
        self._line = False
        #: paused machine: interrupt lines keep their level until unquiesce()
        self.quiesced = False
        self._reset_state()
        device.attach(self)

    # -- state -----------------------------------------------------------------
    def _reset_state(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.queues: list[Virtqueue] = []
        self.needs_reset_reason = None

    def _queue_list(self) -> list[Virtqueue]:
        """The queues for the features the driver has written so far."""
        sizes = self.device.queue_sizes(self.driver_features)
        if len(self.queues) != len(sizes) or any(
                q.max_size != s for q, s in zip(self.queues, sizes)):
            self.queues = [Virtqueue(self.memory, i, min(s, MAX_QUEUE_SIZE))
                           for i, s in enumerate(sizes)]
        return self.queues

    def _selected(self) -> Virtqueue | None:
        queues = self._queue_list()
        return queues[self.queue_sel] if self.queue_sel < len(queues) else None

    # -- interrupts ---------------------------------------------------------------
    def _update_line(self) -> None:
        level = self.interrupt_status != 0
        if level != self._line and not self.quiesced:
            self._line = level
            self.irq_line.set_level(level)

    def signal_used(self, queue_index: int) -> None:
        with self.lock:
            if queue_index < len(self.queues) and not self.queues[queue_index].needs_interrupt():
                return
            self.interrupt_status |= INT_VRING
            self._update_line()

    def config_changed(self) -> None:
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            if self.status & STATUS_DRIVER_OK:
                self.interrupt_status |= INT_CONFIG
                self._update_line()

    def set_needs_reset(self, reason: str) -> None:
        with self.lock:
            if self.needs_reset_reason is None:
                log.warning("%s: device needs reset: %s", self.name, reason)
                self.needs_reset_reason = reason
            self.status |= STATUS_NEEDS_RESET
            self.config_changed()

    @property
    def broken(self) -> bool:
        return bool(self.status & STATUS_NEEDS_RESET)

    # -- register access ------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset >= CONFIG:
                try:
                    data = self.device.read_config(offset - CONFIG, size)
                except Exception as e:  # a device bug must not stop the vCPU
                    log.error("%s: config read at %#x: %s", self.name, offset, e)
                    data = bytes(size)
                return bytes(data[:size]).ljust(size, b"\0")
            if size != 4 or offset % 4:
                log.debug("%s: %d-byte register read at %#x", self.name, size, offset)
                return bytes(size)
            return struct.pack("<I", self._read_reg(offset) & 0xFFFFFFFF)

    def _read_reg(self, offset: int) -> int:
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID:
            return self.device.vendor_id
        if offset == DEVICE_FEATURES:
            feats = self.device.features() | (1 << VIRTIO_F_VERSION_1)
            return (feats >> (32 * self.device_features_sel)) if self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            q = self._selected()
            return q.max_size if q else 0
        if offset == QUEUE_NUM:
            q = self._selected()
            return q.size if q else 0
        if offset == QUEUE_READY:
            q = self._selected()
            return int(q.ready) if q else 0
        if offset in _QUEUE_ADDR_REGS:
            q = self._selected()
            if not q:
                return 0
            attr, shift = _QUEUE_ADDR_REGS[offset]
            return getattr(q, attr) >> shift
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF  # no shared memory regions
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return 0

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            if offset >= CONFIG:
                try:
                    self.device.write_config(offset - CONFIG, bytes(data))
                except Exception as e:
                    log.error("%s: config write at %#x: %s", self.name, offset, e)
                return
            if len(data) != 4 or offset % 4:
                log.debug("%s: %d-byte register write at %#x ignored", self.name,
                          len(data), offset)
                return
            self._write_reg(offset, struct.unpack("<I", data)[0])

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.status & STATUS_FEATURES_OK:
                log.debug("%s: driver features written after FEATURES_OK", self.name)
                return
            if self.driver_features_sel < 2:
                shift = 32 * self.driver_features_sel
                self.driver_features = ((self.driver_features & ~(0xFFFFFFFF << shift))
                                        | (value << shift))
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NUM:
            q = self._selected()
            if q and not q.ready:
                q.size = value
        elif offset == QUEUE_READY:
            self._queue_ready(value)
        elif offset in _QUEUE_ADDR_REGS:
            q = self._selected()
            if q and not q.ready:
                attr, shift = _QUEUE_ADDR_REGS[offset]
                old = getattr(q, attr)
                setattr(q, attr, (old & ~(0xFFFFFFFF << shift)) | (value << shift))
        elif offset == QUEUE_NOTIFY:
            self._notify(value & 0xFFFF)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
            if self.interrupt_status and self._line:
                # Something arrived after the driver read InterruptStatus: the
                # line never went low, so give an edge-triggered pin a new edge.
                self.irq_line.set_level(False)
                self.irq_line.set_level(True)
            self._update_line()
        elif offset == STATUS:
            self._write_status(value)
        elif offset == SHM_SEL:
            pass
        elif offset == QUEUE_RESET:
            pass  # VIRTIO_F_RING_RESET is not offered

    def _queue_ready(self, value: int) -> None:
        q = self._selected()
        if q is None:
            return
        if not value & 1:
            q.ready = False
            return
        if q.ready:
            return
        q.set_features(self.driver_features)
        try:
            q.validate()
        except VirtioError as e:
            self.set_needs_reset(str(e))
            return
        q.ready = True

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        keep = old & STATUS_NEEDS_RESET
        new = value & ~STATUS_NEEDS_RESET
        if new & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            offered = self.device.features() | (1 << VIRTIO_F_VERSION_1)
            if self.driver_features & ~offered:
                log.warning("%s: driver accepted features %#x that were not offered",
                            self.name, self.driver_features & ~offered)
                new &= ~STATUS_FEATURES_OK
            elif not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
                log.warning("%s: driver did not accept VIRTIO_F_VERSION_1", self.name)
                new &= ~STATUS_FEATURES_OK
        self.status = new | keep
        if new & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            if not new & STATUS_FEATURES_OK:
                self.set_needs_reset("DRIVER_OK without FEATURES_OK")
                return
            self._activate()

    def _activate(self) -> None:
        queues = self._queue_list()
        for q in queues:
            q.set_features(self.driver_features)
        try:
            self.device.activate(self.driver_features, queues)
            # Buffers the driver posted before DRIVER_OK (the balloon's stats
            # buffer) are picked up now.
        except VirtioError as e:
            self.set_needs_reset(str(e))
            return
        for i, q in enumerate(queues):
            if q.ready and not self.broken:
                self._process(i)

    def _notify(self, index: int) -> None:
        if self.broken or not self.status & STATUS_DRIVER_OK or not self.device.active:
            return
        if index >= len(self.queues) or not self.queues[index].ready:
            log.debug("%s: notify for queue %d which is not ready", self.name, index)
            return
        self._process(index)

    def _process(self, index: int) -> None:
        try:
            self.device.process(index)
        except (VirtioError, GuestMemoryError) as e:
            self.set_needs_reset(str(e))
        except Exception as e:  # a device bug: keep the VMM and the guest running
            log.exception("%s: queue %d", self.name, index)
            self.set_needs_reset(f"internal error: {type(e).__name__}: {e}")

    def reset(self) -> None:
        with self.lock:
            self.device.reset()
            self._reset_state()
            self._update_line()

    # -- Device ----------------------------------------------------------------------
    def save(self) -> dict:
        with self.lock:
            return {
                "status": self.status,
                "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel,
                "driver_features": self.driver_features,
                "queue_sel": self.queue_sel,
                "interrupt_status": self.interrupt_status,
                "config_generation": self.config_generation,
                "needs_reset_reason": self.needs_reset_reason,
                "queues": [q.save() for q in self.queues],
                "device": self.device.save(),
            }

    def restore(self, state: dict) -> None:
        """Take saved state (from the wire), every field checked first."""
        u32 = (0, 0xFFFFFFFF)
        fields = {"status": u32, "device_features_sel": u32, "driver_features_sel": u32,
                  "driver_features": (0, (1 << 64) - 1), "queue_sel": u32,
                  "interrupt_status": (0, INT_VRING | INT_CONFIG), "config_generation": u32}
        checked_state(self.name, {k: state.get(k) for k in fields} if isinstance(state, dict)
                      else state, fields)
        reason = state.get("needs_reset_reason")
        if reason is not None and not isinstance(reason, str):
            raise DeviceStateError(f"{self.name}: saved needs_reset_reason is not a string")
        if state["status"] & STATUS_FEATURES_OK and \
                state["driver_features"] & ~self.device.features():
            raise DeviceStateError(f"{self.name}: saved driver features "
                                   f"{state['driver_features']:#x} include some this device "
                                   f"does not offer ({self.device.features():#x})")
        if not isinstance(state.get("queues"), list):
            raise DeviceStateError(f"{self.name}: saved queues are not a list")
        with self.lock:
            self._reset_state()
            for k in fields:
                setattr(self, k, state[k])
            self.needs_reset_reason = reason
            queues = self._queue_list()
            # The saved list can be of another length (queues made for the
            # features written before the last ones); each saved queue is
            # checked on its own.
            try:
                for q, qs in zip(queues, state["queues"]):
                    q.restore(qs)
            except VirtioError as e:
                self._reset_state()
                raise DeviceStateError(f"{self.name}: {e}") from None
            if self.status & STATUS_DRIVER_OK and not self.broken:
                self.device.activate(self.driver_features, queues)
            self.device.restore(state["device"])
            self._line = False
            self._update_line()

    def commands(self):
        return self.device.commands()

    def quiesce(self) -> None:
        # Taking the lock waits for a device action of another thread to end.
        with self.lock:
            self.quiesced = True
            self.device.quiesce()

    def unquiesce(self) -> None:
        with self.lock:
            self.quiesced = False
            self.device.unquiesce()
            self._update_line()

    def lock_storage(self) -> None:
        self.device.lock_storage()

    def unlock_storage(self) -> None:
        self.device.unlock_storage()

    def close(self) -> None:
        self.device.close()
