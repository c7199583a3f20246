"""A model of Linux's virtio-mmio driver side, for tests without a guest.

It lays out split virtqueues in GuestMemory exactly as a driver would,
probes a VirtioMmioTransport through its registers (the order of
drivers/virtio/virtio_mmio.c and virtio.c) and posts buffers. Tests use it
to drive the transport and devices as Linux does.
"""

from __future__ import annotations

import struct

from ...memory import GuestMemory
from . import mmio as r
from .queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE


class FakeIrqLine:
    """An IrqLine that records its level changes."""

    gsi = 5

    def __init__(self):
        self.level = False
        self.history: list[bool] = []

    def set_level(self, level: bool) -> None:
        self.level = bool(level)
        self.history.append(self.level)

    def pulse(self) -> None:
        self.set_level(True)
        self.set_level(False)


class Allocator:
    """A bump allocator over a region of guest RAM."""

    def __init__(self, base: int, end: int):
        self.next = base
        self.end = end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError("driver model: out of guest memory")
        self.next = addr + size
        return addr


class DriverQueue:
    def __init__(self, drv: "MmioDriver", index: int, size: int):
        self.drv = drv
        self.mem = drv.mem
        self.index = index
        self.size = size
        self.desc = drv.heap.alloc(16 * size, 16)
        self.avail = drv.heap.alloc(6 + 2 * size, 2)
        self.used = drv.heap.alloc(6 + 8 * size, 4)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.chains: dict[int, list[int]] = {}

    def add(self, out: list[tuple[int, int]] = (), inb: list[tuple[int, int]] = ()) -> int:
        """Post a chain of device-readable then device-writable buffers; returns head."""
        bufs = [(a, n, 0) for a, n in out] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in inb]
        if len(bufs) > len(self.free):
            raise RuntimeError("driver model: queue full")
        ids = [self.free.pop(0) for _ in bufs]
        for k, ((addr, length, flags), i) in enumerate(zip(bufs, ids)):
            nxt = ids[k + 1] if k + 1 < len(ids) else 0
            if k + 1 < len(ids):
                flags |= VIRTQ_DESC_F_NEXT
            self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
        self.chains[ids[0]] = ids
        self.publish(ids[0])
        return ids[0]

    def publish(self, head: int) -> None:
        slot = self.avail_idx % self.size
        self.mem.write_u16(self.avail + 4 + 2 * slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def kick(self) -> None:
        self.drv.write(r.QUEUE_NOTIFY, self.index)

    def get_used(self) -> list[tuple[int, int]]:
        out = []
        idx = self.mem.read_u16(self.used + 2)
        while self.last_used != idx:
            slot = self.last_used % self.size
            head, length = struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8))
            out.append((head, length))
            self.free.extend(self.chains.pop(head, [head]))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class MmioDriver:
    """Probe and use a VirtioMmioTransport as Linux's virtio_mmio does."""

    def __init__(self, transport, memory: GuestMemory, heap_base: int | None = None,
                 heap_end: int | None = None):
        self.t = transport
        self.mem = memory
        if heap_base is None:
            heap_base = memory.size // 2
        self.heap = Allocator(heap_base, heap_end or memory.size)
        self.queues: list[DriverQueue] = []
        self.features = 0

    def read(self, off: int) -> int:
        return struct.unpack("<I", self.t.read(off, 4))[0]

    def write(self, off: int, val: int) -> None:
        self.t.write(off, struct.pack("<I", val & 0xFFFFFFFF))

    def device_features(self) -> int:
        self.write(r.DEVICE_FEATURES_SEL, 1)
        hi = self.read(r.DEVICE_FEATURES)
        self.write(r.DEVICE_FEATURES_SEL, 0)
        return hi << 32 | self.read(r.DEVICE_FEATURES)

    def config_read(self, offset: int, size: int = 4) -> int:
        return int.from_bytes(self.t.read(r.CONFIG + offset, size), "little")

    def config_write(self, offset: int, value: int, size: int = 4) -> None:
        self.t.write(r.CONFIG + offset, value.to_bytes(size, "little"))

    def negotiate(self, wanted: int) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns whether accepted."""
        assert self.read(r.MAGIC_VALUE) == r.MAGIC
        self.write(r.STATUS, 0)
        self.write(r.STATUS, r.STATUS_ACKNOWLEDGE)
        self.write(r.STATUS, r.STATUS_ACKNOWLEDGE | r.STATUS_DRIVER)
        self.features = self.device_features() & wanted
        self.write(r.DRIVER_FEATURES_SEL, 1)
        self.write(r.DRIVER_FEATURES, self.features >> 32)
        self.write(r.DRIVER_FEATURES_SEL, 0)
        self.write(r.DRIVER_FEATURES, self.features)
        self.write(r.STATUS, r.STATUS_ACKNOWLEDGE | r.STATUS_DRIVER | r.STATUS_FEATURES_OK)
        return bool(self.read(r.STATUS) & r.STATUS_FEATURES_OK)

    def setup_queues(self, nqueues: int, size: int = 64) -> list[DriverQueue]:
        self.queues = []
        for i in range(nqueues):
            self.write(r.QUEUE_SEL, i)
            assert self.read(r.QUEUE_READY) == 0
            num_max = self.read(r.QUEUE_NUM_MAX)
            assert num_max, f"queue {i} does not exist"
            q = DriverQueue(self, i, min(size, num_max))
            self.write(r.QUEUE_NUM, q.size)
            for lo, addr in ((r.QUEUE_DESC_LOW, q.desc), (r.QUEUE_DRIVER_LOW, q.avail),
                             (r.QUEUE_DEVICE_LOW, q.used)):
                self.write(lo, addr)
                self.write(lo + 4, addr >> 32)
            self.write(r.QUEUE_READY, 1)
            self.queues.append(q)
        return self.queues

    def driver_ok(self) -> None:
        self.write(r.STATUS, self.read(r.STATUS) | r.STATUS_DRIVER_OK)

    def status(self) -> int:
        return self.read(r.STATUS)

    def ack_interrupt(self) -> int:
        """What Linux's vm_interrupt does first: read and acknowledge the status."""
        status = self.read(r.INTERRUPT_STATUS)
        if status:
            self.write(r.INTERRUPT_ACK, status)
        return status
