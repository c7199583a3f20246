"""virtio-mmio transport and split virtqueue, driven as Linux drives them (no /dev/kvm)."""

import struct

import pytest

from hv.devices.virtio import mmio as r
from hv.devices.virtio.device import VIRTIO_F_VERSION_1, VirtioDevice
from hv.devices.virtio.driver_model import FakeIrqLine, MmioDriver
from hv.devices.virtio.queue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                     VIRTQ_DESC_F_WRITE, VIRTIO_F_EVENT_IDX,
                                     VIRTIO_F_INDIRECT_DESC, Virtqueue, VirtioError)
from hv.memory import GuestMemory

V1 = 1 << VIRTIO_F_VERSION_1


class Echo(VirtioDevice):
    """Copies each chain's readable bytes into its writable buffers."""

    device_id = 42
    name = "echo"

    def __init__(self, nqueues=2, extra_features=0):
        super().__init__()
        self.nqueues = nqueues
        self.extra = extra_features
        self.cfg = bytearray(b"config!!")
        self.activations = 0
        self.resets = 0

    def features(self):
        return super().features() | self.extra | 1 << VIRTIO_F_INDIRECT_DESC

    def queue_sizes(self, features):
        return [16] * self.nqueues

    def read_config(self, offset, size):
        return bytes(self.cfg[offset:offset + size]).ljust(size, b"\0")

    def write_config(self, offset, data):
        self.cfg[offset:offset + len(data)] = data

    def activate(self, features, queues):
        super().activate(features, queues)
        self.activations += 1

    def reset(self):
        super().reset()
        self.resets += 1

    def process(self, i):
        q = self.queues[i]
        used = False
        while (chain := q.pop()) is not None:
            data = chain.read_all(q.memory)
            n = chain.write_all(q.memory, data[::-1])
            q.add_used(chain.head, n)
            used = True
        if used:
            self.signal_used(i)


def make(nqueues=2, mem=1 << 20, extra=0):
    memory = GuestMemory(mem)
    irq = FakeIrqLine()
    dev = Echo(nqueues, extra)
    t = r.VirtioMmioTransport(dev, memory, irq, "echo0")
    return memory, irq, dev, t, MmioDriver(t, memory)


def test_identity_registers():
    _, _, _, t, drv = make()
    assert drv.read(r.MAGIC_VALUE) == 0x74726976
    assert t.read(0, 4) == b"virt"
    assert drv.read(r.VERSION_REG) == 2
    assert drv.read(r.DEVICE_ID) == 42
    assert drv.device_features() & V1
    assert drv.read(r.SHM_LEN_LOW) == 0xFFFFFFFF and drv.read(r.SHM_LEN_HIGH) == 0xFFFFFFFF


def test_features_need_version_1():
    _, _, _, _, drv = make()
    assert not drv.negotiate(1 << VIRTIO_F_INDIRECT_DESC)  # legacy driver refused
    assert drv.negotiate(V1 | 1 << VIRTIO_F_INDIRECT_DESC)
    assert drv.features == V1 | 1 << VIRTIO_F_INDIRECT_DESC


def test_unoffered_feature_refused():
    _, _, _, t, drv = make()
    drv.write(r.STATUS, 3)
    drv.write(r.DRIVER_FEATURES_SEL, 1)
    drv.write(r.DRIVER_FEATURES, 1 | 1 << 5)  # VERSION_1 and an unoffered bit 37
    drv.write(r.DRIVER_FEATURES_SEL, 0)
    drv.write(r.STATUS, 3 | r.STATUS_FEATURES_OK)
    assert not drv.status() & r.STATUS_FEATURES_OK


def test_queue_setup_and_echo_with_interrupt():
    mem, irq, dev, t, drv = make()
    assert drv.negotiate(V1)
    drv.write(r.QUEUE_SEL, 2)
    assert drv.read(r.QUEUE_NUM_MAX) == 0  # no third queue
    q0, q1 = drv.setup_queues(2, 8)
    drv.driver_ok()
    assert dev.activations == 1 and dev.active
    src = drv.heap.alloc(5)
    dst = drv.heap.alloc(5)
    mem.write(src, b"hello")
    mem.take_dirty_bitmap()
    q1.add(out=[(src, 5)], inb=[(dst, 5)])
    q1.kick()
    assert mem.read(dst, 5) == b"olleh"
    assert q1.get_used() == [(0, 5)]
    # Device writes are in the VMM's dirty log (buffer and used ring).
    from hv.memory import unpack_bitmap
    dirty = unpack_bitmap(mem.take_dirty_bitmap(), mem.npages)
    assert dirty[dst >> 12] and dirty[q1.used >> 12]
    assert irq.level is True and drv.read(r.INTERRUPT_STATUS) == r.INT_VRING
    assert drv.ack_interrupt() == r.INT_VRING
    assert irq.level is False
    assert irq.history == [True, False]


def test_config_space_and_generation():
    _, irq, dev, t, drv = make()
    assert drv.negotiate(V1)
    drv.setup_queues(2)
    drv.driver_ok()
    assert t.read(r.CONFIG, 8) == b"config!!"
    assert drv.config_read(0, 2) == int.from_bytes(b"co", "little")
    gen = drv.read(r.CONFIG_GENERATION)
    t.config_changed()
    assert drv.read(r.CONFIG_GENERATION) == gen + 1
    assert irq.level and drv.read(r.INTERRUPT_STATUS) == r.INT_CONFIG
    drv.ack_interrupt()
    assert not irq.level


def test_reset_on_status_zero():
    _, irq, dev, t, drv = make()
    assert drv.negotiate(V1)
    drv.setup_queues(2)
    drv.driver_ok()
    t.config_changed()
    drv.write(r.STATUS, 0)
    assert drv.status() == 0 and dev.resets >= 1 and not dev.active
    assert not irq.level
    drv.write(r.QUEUE_SEL, 0)
    assert drv.read(r.QUEUE_READY) == 0


def test_bad_descriptor_sets_needs_reset_and_keeps_running():
    mem, irq, dev, t, drv = make()
    assert drv.negotiate(V1)
    q0, _ = drv.setup_queues(2, 8)
    drv.driver_ok()
    # A chain that loops: 0 -> 1 -> 0.
    mem.write(q0.desc, struct.pack("<QIHH", 0x1000, 4, VIRTQ_DESC_F_NEXT, 1))
    mem.write(q0.desc + 16, struct.pack("<QIHH", 0x2000, 4, VIRTQ_DESC_F_NEXT, 0))
    q0.publish(0)
    q0.kick()
    assert drv.status() & r.STATUS_NEEDS_RESET
    assert "loops" in t.needs_reset_reason or "longer" in t.needs_reset_reason
    assert drv.read(r.INTERRUPT_STATUS) & r.INT_CONFIG
    q0.kick()  # ignored while broken
    # The driver resets and starts again; everything works.
    assert drv.negotiate(V1)
    assert not drv.status() & r.STATUS_NEEDS_RESET
    drv.setup_queues(2, 8)
    drv.driver_ok()
    a = drv.heap.alloc(3)
    mem.write(a, b"abc")
    b = drv.heap.alloc(3)
    drv.queues[0].add([(a, 3)], [(b, 3)])
    drv.queues[0].kick()
    assert mem.read(b, 3) == b"cba"


def test_ring_outside_memory_needs_reset():
    mem, irq, dev, t, drv = make()
    assert drv.negotiate(V1)
    drv.write(r.QUEUE_SEL, 0)
    drv.write(r.QUEUE_NUM, 8)
    drv.write(r.QUEUE_DESC_LOW, mem.size - 16)
    drv.write(r.QUEUE_READY, 1)
    assert drv.read(r.QUEUE_READY) == 0
    assert drv.status() & r.STATUS_NEEDS_RESET


def test_transport_save_restore_mid_operation():
    mem, irq, dev, t, drv = make()
    assert drv.negotiate(V1)
    q0, _ = drv.setup_queues(2, 8)
    drv.driver_ok()
    a, b = drv.heap.alloc(2), drv.heap.alloc(2)
    mem.write(a, b"xy")
    q0.add([(a, 2)], [(b, 2)])
    q0.kick()
    state = t.save()
    # A new transport over the same memory, as on a migration destination.
    irq2 = FakeIrqLine()
    dev2 = Echo()
    t2 = r.VirtioMmioTransport(dev2, mem, irq2, "echo0")
    t2.restore(state)
    assert irq2.level  # the pending interrupt is re-raised
    drv.t = t2
    assert drv.status() & r.STATUS_DRIVER_OK
    assert dev2.active
    q0.add([(a, 2)], [(b, 2)])
    q0.kick()
    assert [u[1] for u in q0.get_used()] == [2, 2]
    assert t2.save()["queues"][0]["last_avail_idx"] == 2


def _queue(mem, size=8, features=0):
    q = Virtqueue(mem, 0, size)
    q.size = size
    q.desc, q.avail, q.used = 0x1000, 0x2000, 0x3000
    q.set_features(features)
    q.validate()
    q.ready = True
    return q


def test_indirect_descriptors():
    mem = GuestMemory(1 << 16)
    q = _queue(mem, features=1 << VIRTIO_F_INDIRECT_DESC)
    mem.write(0x4000, struct.pack("<QIHH", 0x5000, 10, VIRTQ_DESC_F_NEXT, 1)
              + struct.pack("<QIHH", 0x6000, 20, VIRTQ_DESC_F_WRITE, 0))
    mem.write(0x1000, struct.pack("<QIHH", 0x4000, 32, VIRTQ_DESC_F_INDIRECT, 0))
    mem.write_u16(0x2004, 0)
    mem.write_u16(0x2002, 1)
    chain = q.pop()
    assert [(d.addr, d.length) for d in chain.readable] == [(0x5000, 10)]
    assert [(d.addr, d.length) for d in chain.writable] == [(0x6000, 20)]
    # Without the feature negotiated, the same chain is refused.
    q2 = _queue(mem)
    with pytest.raises(VirtioError, match="INDIRECT"):
        q2.pop()


def test_direction_order_enforced():
    mem = GuestMemory(1 << 16)
    q = _queue(mem)
    mem.write(0x1000, struct.pack("<QIHH", 0x5000, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
              + struct.pack("<QIHH", 0x6000, 8, 0, 0))
    mem.write_u16(0x2002, 1)
    with pytest.raises(VirtioError, match="readable descriptor 1 after"):
        q.pop()


def test_event_idx_suppression():
    mem = GuestMemory(1 << 16)
    q = _queue(mem, features=1 << VIRTIO_F_EVENT_IDX)
    mem.write(0x1000, struct.pack("<QIHH", 0x5000, 8, 0, 0))
    for i in range(3):
        mem.write_u16(0x2004 + 2 * i, 0)
    mem.write_u16(0x2002, 3)
    mem.write_u16(0x2004 + 2 * 8, 1)  # used_event: interrupt after used idx passes 1
    assert q.pop() is not None
    q.add_used(0, 0)
    assert q.needs_interrupt()        # first one always
    q.pop()
    q.add_used(0, 0)                  # used idx 2 > event 1 + 1? crosses 1 -> yes
    assert q.needs_interrupt()
    q.pop()
    q.add_used(0, 0)                  # used idx 3, event still 1: no
    assert not q.needs_interrupt()
    assert mem.read_u16(0x3004 + 8 * 8) == 3  # avail_event follows last_avail_idx


def test_event_between_read_and_ack_gets_a_new_edge():
    _, irq, dev, t, drv = make()
    assert drv.negotiate(V1)
    drv.setup_queues(2)
    drv.driver_ok()
    t.signal_used(0)
    status = drv.read(r.INTERRUPT_STATUS)          # vm_interrupt() reads ...
    t.config_changed()                              # ... a config change arrives ...
    drv.write(r.INTERRUPT_ACK, status)              # ... it acks what it read
    assert irq.history == [True, False, True]       # a fresh rising edge
    assert drv.read(r.INTERRUPT_STATUS) == r.INT_CONFIG
    drv.ack_interrupt()
    assert irq.history[-1] is False
