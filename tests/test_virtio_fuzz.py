"""Property tests: malformed virtqueues never make hv touch memory outside the
guest, never crash the VMM, and either yield well-formed chains or a
VirtioError / NEEDS_RESET."""

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv.devices.virtio import mmio as r
from hv.devices.virtio.balloon import Balloon
from hv.devices.virtio.driver_model import FakeIrqLine, MmioDriver
from hv.devices.virtio.queue import VIRTIO_F_INDIRECT_DESC, Virtqueue, VirtioError
from hv.memory import GuestMemory

MEM = 64 * 1024
SIZE = 8


class CheckedMemory(GuestMemory):
    """GuestMemory that records every access and fails the test on any outside RAM."""

    def __init__(self, size):
        super().__init__(size)
        self.violations = []

    def check(self, gpa, length):
        if not self.contains(gpa, length):
            self.violations.append((gpa, length))
        super().check(gpa, length)

    def discard(self, gpa, length):
        if not self.contains(gpa, length) or gpa % 4096 or length % 4096:
            self.violations.append(("discard", gpa, length))
        super().discard(gpa, length)


addr_st = st.one_of(st.integers(0, MEM + 4096), st.integers(0, 2**64 - 1),
                    st.sampled_from([0, MEM - 16, MEM - 1, MEM, 0x8000]))
len_st = st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1), st.sampled_from([16, 32, 4096]))
flags_st = st.integers(0, 7)
desc_st = st.tuples(addr_st, len_st, flags_st, st.integers(0, 12))


def _write_table(mem, base, descs):
    for i, (a, n, f, nx) in enumerate(descs):
        mem.write(base + 16 * i, struct.pack("<QIHH", a, n, f, nx))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descs=st.lists(desc_st, min_size=SIZE, max_size=SIZE),
       indirect=st.lists(desc_st, min_size=0, max_size=6),
       heads=st.lists(st.integers(0, 12), min_size=1, max_size=4),
       avail_idx=st.integers(0, 0xFFFF),
       feat_indirect=st.booleans())
def test_queue_parser_total(descs, indirect, heads, avail_idx, feat_indirect):
    mem = CheckedMemory(MEM)
    q = Virtqueue(mem, 0, SIZE)
    q.desc, q.avail, q.used = 0x1000, 0x2000, 0x3000
    q.set_features((1 << VIRTIO_F_INDIRECT_DESC) if feat_indirect else 0)
    q.validate()
    q.ready = True
    _write_table(mem, 0x1000, descs)
    _write_table(mem, 0x8000, indirect)
    for i, h in enumerate(heads):
        mem.write_u16(0x2004 + 2 * i, h)
    mem.write_u16(0x2002, avail_idx)
    for _ in range(len(heads) + 1):
        try:
            chain = q.pop()
        except VirtioError as e:
            assert str(e)
            break
        if chain is None:
            break
        total = chain.readable + chain.writable
        assert 1 <= len(total) <= SIZE
        for d in total:
            assert mem.contains(d.addr, d.length)
        # Readable strictly before writable.
        assert all(not d.write for d in chain.readable)
        assert all(d.write for d in chain.writable)
        chain.read_all(mem, limit=256)
        chain.write_all(mem, b"\xaa" * 64)
        q.add_used(chain.head, 0)
    assert mem.violations == []


def _balloon(mem):
    irq = FakeIrqLine()
    b = Balloon(mem)
    t = r.VirtioMmioTransport(b, mem, irq, "balloon")
    drv = MmioDriver(t, mem, heap_base=0x4000, heap_end=0x8000)
    assert drv.negotiate(b.features() & ~(1 << VIRTIO_F_INDIRECT_DESC))
    n = len(b.queue_sizes(drv.features))
    drv.setup_queues(n, 8)
    drv.driver_ok()
    return b, t, drv


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queue=st.integers(0, 5),
       descs=st.lists(st.tuples(addr_st, len_st, st.sampled_from([0, 1, 2, 3, 4]),
                                st.integers(0, 9)), min_size=1, max_size=4),
       payload=st.binary(min_size=0, max_size=96),
       bitmap_request=st.booleans())
def test_balloon_survives_malformed_buffers(queue, descs, payload, bitmap_request):
    mem = CheckedMemory(MEM)
    b, t, drv = _balloon(mem)
    if bitmap_request:
        # A request in flight, as if the host asked (without waiting for it).
        with b.lock:
            b._bitmap_seq += 1
            b.bitmap_cmd_id = b._bitmap_seq
            import numpy as np
            b._bm = {"cmd_id": b.bitmap_cmd_id, "bits": np.zeros(b.npages, bool),
                     "covered": 0, "chunks": 0, "guest_pfns": 0, "done": False,
                     "error": None, "start": 0.0, "end": None}
        payload = struct.pack("<IIQQ", b.bitmap_cmd_id, 1, 0, 16) + payload
    q = drv.queues[queue]
    mem.write(0x9000, payload)
    # Descriptors pointing at the payload page or anywhere else.
    table = [((0x9000 if a % 3 == 0 else a), n, f, nx) for a, n, f, nx in descs]
    _write_table(mem, q.desc, table)
    q.publish(0)
    q.kick()
    assert mem.violations == []
    if t.broken:
        assert t.needs_reset_reason and not t.needs_reset_reason.startswith("internal error")
        if bitmap_request:
            assert b._bm["done"]
    # The VMM side keeps working either way.
    b.save()
    t.save()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(
    [r.STATUS, r.QUEUE_SEL, r.QUEUE_NUM, r.QUEUE_READY, r.QUEUE_NOTIFY, r.QUEUE_DESC_LOW,
     r.QUEUE_DESC_HIGH, r.QUEUE_DRIVER_LOW, r.QUEUE_DEVICE_LOW, r.DRIVER_FEATURES,
     r.DRIVER_FEATURES_SEL, r.DEVICE_FEATURES_SEL, r.INTERRUPT_ACK, r.CONFIG,
     r.CONFIG + 4, r.CONFIG + 12, r.CONFIG + 16, r.CONFIG + 18, 0x300, 0x0FE]),
    st.one_of(st.integers(0, 16), st.integers(0, 2**32 - 1),
              st.sampled_from([0xF, 0x8, MEM - 8, 0x1000]))), max_size=40))
def test_random_register_writes(ops):
    """Any sequence of register writes leaves the VMM running and in bounds."""
    mem = CheckedMemory(MEM)
    irq = FakeIrqLine()
    b = Balloon(mem)
    t = r.VirtioMmioTransport(b, mem, irq, "balloon")
    for off, val in ops:
        t.write(off, struct.pack("<I", val))
        t.read(off, 4)
        t.read(r.CONFIG, 20)
    assert mem.violations == []
    assert irq.level == (t.interrupt_status != 0)
    from hv.migration.state_codec import decode_state, encode_state
    state = decode_state(encode_state(t.save()))
    t2 = r.VirtioMmioTransport(Balloon(mem), mem, FakeIrqLine(), "balloon")
    t2.restore(state)
    assert t2.save()["status"] == t.save()["status"]
