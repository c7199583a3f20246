"""hv.migration.protocol and the receiver's state machine, without KVM:
every message round-trips through an in-memory buffer; the receiver refuses
garbage, truncation, a wrong version and out-of-order commands, and never
resumes anything half-restored."""

import io
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hv.memory import PAGE_SIZE, GuestMemory
from hv.migration import protocol as P
from hv.migration import state_codec as C
from hv.migration.receiver import Receiver, State, TRANSITIONS

NPAGES = 64


def roundtrip(msg, mem=None, npages=NPAGES):
    s = P.BufferStream(io.BytesIO())
    n = s.send(msg, mem)
    assert n == len(s.f.getvalue())
    s.f.seek(0)
    out = s.recv(npages)
    assert s.f.read() == b""
    return out


def test_header_layout():
    h = P.Header(P.Command.MEMORY, 1234).pack()
    assert len(h) == P.HEADER_SIZE == 24
    assert h[:4] == b"HVMG"
    assert struct.unpack_from("<HHIIQ", h, 4) == (P.VERSION, 2, 0, 0, 1234)


def test_hello_roundtrip():
    m = P.Hello(4096, 256 << 20, P.FEATURES, channels=4, channel=2, session=77)
    assert roundtrip(m) == m


@pytest.mark.parametrize("cmd", [P.Command.COMPLETE, P.Command.RUNNING])
def test_empty_controls_roundtrip(cmd):
    assert roundtrip(P.Control(cmd)) == P.Control(cmd)


def test_error_cancel_ack_roundtrip():
    assert roundtrip(P.error("disk on fire ✓")).text == "disk on fire ✓"
    assert roundtrip(P.cancel("user")).text == "user"
    assert roundtrip(P.ack(P.Command.HELLO)).acked == P.Command.HELLO


def test_ranges_roundtrip():
    z = P.Ranges(P.Command.ZERO, [0, 10], [5, 1])
    assert roundtrip(z) == z
    f = P.Ranges(P.Command.FILL, [3], [2], pattern=0xAAAAAAAA)
    assert roundtrip(f) == f
    data = bytes(range(256)) * (3 * PAGE_SIZE // 256)
    m = P.Ranges(P.Command.MEMORY, [1, 60], [2, 1], data=data)
    assert roundtrip(m) == m
    v = P.Ranges(P.Command.VERIFY, [0], [3], hashes=np.array([1, 2, 2**64 - 1], dtype=np.uint64))
    assert roundtrip(v) == v


def test_memory_from_and_into_guest_memory():
    src = GuestMemory(NPAGES * PAGE_SIZE)
    src.array()[:] = np.random.default_rng(0).integers(0, 256, src.size, dtype=np.uint8)
    dst = GuestMemory(src.size)
    s = P.BufferStream()
    s.send(P.Ranges(P.Command.MEMORY, [0, 40], [3, 24]), mem=src)
    s.f.seek(0)
    msg = s.recv(NPAGES, mem=dst)
    assert msg.data is None
    a, b = src.array(), dst.array()
    assert (a[:3 * PAGE_SIZE] == b[:3 * PAGE_SIZE]).all()
    assert (a[40 * PAGE_SIZE:] == b[40 * PAGE_SIZE:]).all()
    assert not b[3 * PAGE_SIZE:40 * PAGE_SIZE].any()


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-2**130, 2**130) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda kids: st.lists(kids, max_size=4) | st.tuples(kids, kids)
    | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), kids, max_size=4),
    max_leaves=20)


@given(plain)
def test_state_roundtrip_property(obj):
    assert C.decode_state(C.encode_state(obj)) == obj
    assert roundtrip(C.state_message(obj)).payload == C.encode_state(obj)


def test_state_arrays_and_refusals():
    st_ = {"regs": {"rip": 0xFFFFFFFF81000000, "rflags": 2}, "lapic": b"\x00" * 1024,
           "arr": np.arange(6, dtype=np.uint32).reshape(2, 3), "n": np.int64(5)}
    back = C.decode_state(C.encode_state(st_))
    assert back["regs"] == st_["regs"] and back["lapic"] == st_["lapic"] and back["n"] == 5
    assert (back["arr"] == st_["arr"]).all() and back["arr"].dtype == np.uint32
    with pytest.raises(TypeError):
        C.encode_state({"f": object()})
    good = C.encode_state(st_)
    def framed(body):
        import zlib
        return C.STATE_MAGIC + struct.pack("<I", zlib.crc32(body)) + body
    flipped = bytearray(good)
    flipped[-1] ^= 1
    for bad in (b"pickle", good[:-3], good + b"x", bytes(flipped), framed(b"Z"),
                framed(b"l\xff\xff\xff\xff"), framed(b"i\xff\xff\x00\x00"),
                framed(b"a" + C.encode_state("O")[12:] + C.encode_state([1])[12:]
                       + C.encode_state(b"12345678")[12:])):
        with pytest.raises(P.ProtocolError):
            C.decode_state(bad)


# -------------------------------------------------------------- receiver

class FakeMachine:
    def __init__(self):
        self.memory = GuestMemory(NPAGES * PAGE_SIZE)
        self.restored = None
        self.resumed = False

    def restore_state(self, s):
        self.restored = s

    def resume(self):
        assert self.restored is not None
        self.resumed = True


def stream_of(*msgs, src=None):
    s = P.BufferStream()
    for m in msgs:
        s.send(m, src)
    return P.BufferStream(io.BytesIO(s.f.getvalue()), out=io.BytesIO())


def good_messages(src):
    from hv.migration import pages
    allp = np.array([0], dtype=np.uint64), np.array([NPAGES], dtype=np.uint64)
    return [P.Hello(PAGE_SIZE, src.size),
            P.Ranges(P.Command.ZERO, [0], [NPAGES]),
            P.Ranges(P.Command.MEMORY, [1, 5], [2, 10]),
            P.Ranges(P.Command.FILL, [30], [4], pattern=0x5A5A5A5A),
            C.state_message({"cpu": {"rip": 1}}),
            P.Ranges(P.Command.VERIFY, *allp, hashes=pages.hashes(src, *allp)),
            P.Control(P.Command.COMPLETE)]


def make_src():
    src = GuestMemory(NPAGES * PAGE_SIZE)
    a = src.array()
    a[PAGE_SIZE:3 * PAGE_SIZE] = 7
    a[5 * PAGE_SIZE:15 * PAGE_SIZE] = np.random.default_rng(5).integers(
        0, 256, 10 * PAGE_SIZE, dtype=np.uint8)
    a[30 * PAGE_SIZE:34 * PAGE_SIZE] = 0x5A
    return src


def run_receiver(stream, m=None, **kw):
    m = m or FakeMachine()
    rx = Receiver(m.memory, m.restore_state, m.resume, **kw)
    return m, rx, rx.run(stream)


def test_receiver_full_sequence():
    src = make_src()
    s = stream_of(*good_messages(src), src=src)
    # The receiver writes ACK/RUNNING into the same buffer after what it read:
    m, rx, stats = run_receiver(s)
    assert rx.state == State.COMPLETE and m.resumed and rx.verified
    assert m.restored == {"cpu": {"rip": 1}}
    assert (m.memory.array() == src.array()).all()
    assert stats["pages"] == 12 and stats["zero_pages"] == NPAGES and stats["fill_pages"] == 4


def test_transition_table_documented():
    assert (State.MEMORY, P.Command.STATE) in TRANSITIONS
    assert all(s != State.COMPLETE for s, _ in TRANSITIONS)


def refuse(stream, match):
    m = FakeMachine()
    rx = Receiver(m.memory, m.restore_state, m.resume)
    with pytest.raises(P.MigrationError, match=match):
        rx.run(stream)
    assert rx.state == State.FAILED
    assert not m.resumed and m.restored is None
    return rx


def test_refuses_out_of_order():
    src = make_src()
    msgs = good_messages(src)
    refuse(stream_of(msgs[1], src=src), "unexpected ZERO in state WAIT_HELLO; expected HELLO")
    refuse(stream_of(msgs[0], msgs[6], src=src), "unexpected COMPLETE in state MEMORY")
    refuse(stream_of(msgs[0], msgs[4], msgs[2], src=src), "unexpected MEMORY in state STATE")
    refuse(stream_of(msgs[0], msgs[0], src=src), "unexpected HELLO")
    refuse(stream_of(msgs[0], P.Control(P.Command.RUNNING), src=src), "unexpected RUNNING")


def test_refuses_wrong_version_magic_and_size():
    src = make_src()
    raw = stream_of(*good_messages(src), src=src).f.getvalue()
    bad = bytearray(raw)
    bad[4] = P.VERSION + 1
    refuse(P.BufferStream(io.BytesIO(bytes(bad)), out=io.BytesIO()),
           f"unsupported protocol version {P.VERSION + 1}")
    bad = bytearray(raw)
    bad[0:4] = b"QEVM"
    refuse(P.BufferStream(io.BytesIO(bytes(bad)), out=io.BytesIO()), "not an hv migration stream")
    refuse(stream_of(P.Hello(PAGE_SIZE, 2 * src.size)), "same --mem")
    refuse(stream_of(P.Hello(8192, src.size)), "page size")


def test_refuses_truncation_everywhere():
    src = make_src()
    raw = stream_of(*good_messages(src), src=src).f.getvalue()
    # Cut the stream at many points: never resumed, always a clear error.
    for cut in list(range(0, 200, 7)) + list(range(200, len(raw) - 1, 997)) + [len(raw) - 1]:
        refuse(P.BufferStream(io.BytesIO(raw[:cut]), out=io.BytesIO()), "stream ended|truncated")


def test_refuses_ranges_outside_memory_and_bad_tables():
    h = P.Hello(PAGE_SIZE, NPAGES * PAGE_SIZE)
    refuse(stream_of(h, P.Ranges(P.Command.ZERO, [NPAGES - 1], [2])), "outside guest memory")
    refuse(stream_of(h, P.Ranges(P.Command.ZERO, [2**63], [2**63])), "outside guest memory")
    refuse(stream_of(h, P.Ranges(P.Command.ZERO, [1], [0])), "empty range")
    s = P.BufferStream()
    s.send(h)
    s.write(P.Header(P.Command.ZERO, 8).pack() + struct.pack("<II", 0, 0))
    refuse(P.BufferStream(io.BytesIO(s.f.getvalue()), out=io.BytesIO()), "range table of 0 entries")
    s = P.BufferStream()
    s.send(h)
    # MEMORY whose length does not match its table
    s.write(P.Header(P.Command.MEMORY, 8 + 16 + 5).pack() + struct.pack("<IIQQ", 1, 0, 0, 1))
    s.write(b"x" * 5)
    refuse(P.BufferStream(io.BytesIO(s.f.getvalue()), out=io.BytesIO()), "does not match")
    s = P.BufferStream()
    s.send(h)
    s.write(P.Header(P.Command.STATE, 1 << 40).pack())
    refuse(P.BufferStream(io.BytesIO(s.f.getvalue()), out=io.BytesIO()), "exceeds")


def test_refuses_bad_state_and_verify_mismatch():
    src = make_src()
    msgs = good_messages(src)
    bad_state = P.Control(P.Command.STATE, b"\x80\x04pickle")
    refuse(stream_of(msgs[0], bad_state, src=src), "not an hv machine state")
    wrong = P.Ranges(P.Command.VERIFY, [0], [NPAGES], hashes=np.zeros(NPAGES, dtype=np.uint64))
    refuse(stream_of(*msgs[:5], wrong, msgs[6], src=src), "pages differ")


def test_cancel_and_peer_error():
    src = make_src()
    msgs = good_messages(src)
    refuse(stream_of(msgs[0], msgs[1], P.cancel("operator"), src=src),
           "cancelled the migration: operator")
    refuse(stream_of(msgs[0], P.error("oops"), src=src), "source failed: oops")


def test_restore_failure_does_not_resume():
    src = make_src()

    class Broken(FakeMachine):
        def restore_state(self, s):
            raise ValueError("bad vcpu state")

    m = Broken()
    rx = Receiver(m.memory, m.restore_state, m.resume)
    with pytest.raises(P.MigrationError, match="bad vcpu state"):
        rx.run(stream_of(*good_messages(src), src=src))
    assert not m.resumed


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_refused(data):
    m = FakeMachine()
    rx = Receiver(m.memory, m.restore_state, m.resume)
    with pytest.raises(P.MigrationError):
        rx.run(P.BufferStream(io.BytesIO(data), out=io.BytesIO()))
    assert not m.resumed


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_mutated_streams_never_resume_wrongly(data):
    src = make_src()
    raw = bytearray(stream_of(*good_messages(src), src=src).f.getvalue())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    m = FakeMachine()
    rx = Receiver(m.memory, m.restore_state, m.resume)
    try:
        rx.run(P.BufferStream(io.BytesIO(bytes(raw)), out=io.BytesIO()))
    except P.MigrationError:
        assert not m.resumed
        return
    # A flip inside page data is caught by VERIFY; anything that passes must
    # have restored exactly the source's memory and state.
    assert m.resumed and (m.memory.array() == src.array()).all()
    assert m.restored == {"cpu": {"rip": 1}}


# ------------------------------------------------------- FREE and prefault

def free_stream(mem_size, starts, counts, channel=0, channels=1):
    msgs = [P.Hello(PAGE_SIZE, mem_size, channels=channels, channel=channel),
            P.Ranges(P.Command.FREE, starts, counts)]
    if channel == 0:
        msgs.append(C.state_message({"cpu": {"rip": 1}}))
    return stream_of(*msgs, P.Control(P.Command.COMPLETE))


def test_free_ranges_give_prefaulted_memory_back():
    """The destination prefaults all of guest RAM while it waits; the pages
    the source skipped as free arrive as FREE ranges and cost it nothing."""
    from hv.migration.receiver import Prefault
    mem = GuestMemory(16 << 20)
    npg = mem.npages
    pf = Prefault(mem).start()
    pf.thread.join()
    if mem.resident_bytes() != mem.size:
        pytest.skip("the host kernel cannot prefault (MADV_POPULATE_WRITE)")
    mem.array()[:] = 0xEE           # whatever the prefaulted pages hold
    rx = Receiver(mem, lambda s: None, prefault=pf)
    stats = rx.run(free_stream(mem.size, [0, npg // 2], [npg // 4, npg // 2]))
    assert stats["free_pages"] == 3 * npg // 4 and stats["zero_pages"] == 0
    assert mem.resident_bytes() <= npg // 4 * PAGE_SIZE
    a = mem.array()
    assert not a[:npg // 4 * PAGE_SIZE].any() and not a[npg // 2 * PAGE_SIZE:].any()
    assert (a[npg // 4 * PAGE_SIZE:npg // 2 * PAGE_SIZE] == 0xEE).all()
    # A secondary connection takes FREE ranges as well.
    pf = Prefault(mem).start()
    pf.thread.join()
    sub = Receiver(mem, secondary=True, prefault=pf)
    assert sub.run(free_stream(mem.size, [0], [npg], channel=1, channels=2))["free_pages"] == npg
    assert mem.resident_bytes() == 0


class SlowlyPrefaulted(GuestMemory):
    """populate() in small steps with a pause between them, so that it is
    still running when the first pages arrive."""

    def populate(self, stop=None, step=64 << 10):
        import time
        from hv.memory import MADV_POPULATE_WRITE
        for start in range(0, self.size, step):
            if stop is not None and stop.is_set():
                return True
            try:
                self._map.madvise(MADV_POPULATE_WRITE, start, step)
            except OSError:
                return False
            time.sleep(0.002)
        return True


def test_prefault_stops_before_pages_are_discarded():
    from hv.migration.receiver import Prefault
    mem = SlowlyPrefaulted(16 << 20)
    pf = Prefault(mem).start()
    rx = Receiver(mem, lambda s: None, prefault=pf)
    rx.run(free_stream(mem.size, [0], [mem.npages]))
    pf.thread.join(5)               # had it gone on, it would fault everything back in
    assert not pf.thread.is_alive()
    assert mem.resident_bytes() == 0


# ----------------------------------------- hostile tables, lengths and STATE
#
# Whatever the wire says, the receiver refuses with MigrationError before it
# allocates or reads for it: it never holds more than about guest RAM plus a
# few MiB, never writes outside the memory HELLO announced, and says why.

GUARD = 16                      # pages after the announced memory: a canary
SMALL = 16 << 20                # what the receiver may hold beyond guest RAM


class GuardedMemory:
    """The first NPAGES pages of a bigger mapping, as the receiver's guest
    memory; the GUARD pages after them must never change."""

    def __init__(self, npages=NPAGES):
        self.backing = GuestMemory((npages + GUARD) * PAGE_SIZE)
        self.npages, self.size = npages, npages * PAGE_SIZE
        self.host_addr = self.backing.host_addr
        self.view = self.backing.view[:self.size]
        self.backing.array()[self.size:] = 0xC5

    def array(self):
        return self.backing.array()[:self.size]

    def guard_intact(self) -> bool:
        return bool((self.backing.array()[self.size:] == 0xC5).all())

    def ram_pfn_regions(self):
        return [(0, self.npages)]

    def populate(self, stop):
        pass


class ReadLimitStream(P.BufferStream):
    """Records the largest single read: a socket stream allocates that much
    before the bytes arrive."""

    largest = 0

    def read(self, n):
        self.largest = max(self.largest, n)
        return super().read(n)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def hostile_run(raw: bytes, mem=None, after_state=False):
    """Feed HELLO (and a STATE, so that VERIFY is expected) + raw through
    Receiver.step; return (error, rx, stream, tracemalloc peak)."""
    import tracemalloc
    mem = mem or GuardedMemory()
    hello = P.BufferStream()
    hello.send(P.Hello(PAGE_SIZE, mem.size))
    if after_state:
        hello.send(C.state_message({"cpu": {"rip": 1}}))
    s = ReadLimitStream(io.BytesIO(hello.f.getvalue() + raw), out=io.BytesIO())
    rx = Receiver(mem, lambda st_: None, lambda: None)
    rss0 = rss_bytes()
    tracemalloc.start()
    try:
        with pytest.raises(P.MigrationError) as e:
            while rx.state != State.COMPLETE:
                rx.step(s)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    bound = mem.size + SMALL
    assert peak < bound and rss_bytes() - rss0 < bound
    assert s.largest <= bound, f"read of {s.largest} bytes asked for"
    assert mem.guard_intact()
    assert str(e.value)
    return e.value, rx, s, peak


def table(cmd, starts, counts, pattern=0, length=None, body=b""):
    t = struct.pack("<II", len(starts), pattern)
    t += b"".join(struct.pack("<QQ", s_, c_) for s_, c_ in zip(starts, counts))
    n = len(t) + len(body) if length is None else length
    return P.Header(cmd, n).pack() + t + body


def framed_state(body: bytes) -> bytes:
    import zlib
    return C.STATE_MAGIC + struct.pack("<I", zlib.crc32(body)) + body


def test_overlapping_and_unsorted_ranges_are_refused():
    # 8192 overlapping full-memory VERIFY ranges: once 4.5 GiB, now refused at once.
    n = 8192
    mem = GuardedMemory(1 << 15)
    e, *_ = hostile_run(P.Header(P.Command.VERIFY, 8 + 16 * n + 8 * n * mem.npages).pack(),
                        mem, after_state=True)
    assert "exceeds" in str(e)
    raw = (P.Header(P.Command.VERIFY, 8 + 16 * n + 8 * mem.npages).pack()
           + struct.pack("<II", n, 0) + struct.pack("<QQ", 0, mem.npages) * n)
    e, *_ = hostile_run(raw, mem, after_state=True)
    assert "range 1 (pfn 0 + 32768 pages) overlaps or comes before range 0" in str(e)
    e, *_ = hostile_run(table(P.Command.ZERO, [10, 2], [1, 1]))
    assert "must be sorted" in str(e) and "range 1 (pfn 2 + 1 pages)" in str(e)
    e, *_ = hostile_run(table(P.Command.FREE, [0, 3], [4, 1]))
    assert "range 1 (pfn 3 + 1 pages) overlaps" in str(e)
    # touching ranges are fine
    s = stream_of(P.Hello(PAGE_SIZE, NPAGES * PAGE_SIZE),
                  P.Ranges(P.Command.ZERO, [0, 4, 5], [4, 1, 59]))
    rx = Receiver(FakeMachine().memory)
    rx.step(s)
    assert rx.step(s) == State.MEMORY and rx.stats["zero_pages"] == NPAGES


def test_a_million_ranges_are_refused_quickly():
    """One ZERO message of 2^20 full-memory ranges kept the receiver busy for
    21 s; a table can never hold more ranges than the guest has pages, and
    overlap is found in one pass."""
    import time
    mem = GuardedMemory(1 << 20)            # 4 GiB, never touched
    n = 1 << 20
    raw = (P.Header(P.Command.ZERO, 8 + 16 * n).pack() + struct.pack("<II", n, 0)
           + np.tile(np.array([0, mem.npages], dtype="<u8"), n).tobytes())
    t0 = time.monotonic()
    e, *_ = hostile_run(raw, mem)
    # one pass takes well under a second on an idle machine; 15 s leaves room
    # for a loaded one and still fails the 21 s of a per-range check
    assert time.monotonic() - t0 < 15 and "overlaps" in str(e)
    # no more ranges than pages
    e, *_ = hostile_run(P.Header(P.Command.ZERO, 8 + 16 * (NPAGES + 1)).pack()
                        + struct.pack("<II", NPAGES + 1, 0))
    assert "exceeds" in str(e)
    e, *_ = hostile_run(P.Header(P.Command.MEMORY, 8 + 16 * (NPAGES + 1)).pack()
                        + struct.pack("<II", NPAGES + 1, 0))
    assert f"range table of {NPAGES + 1} entries (expected 1..{NPAGES})" in str(e)


@pytest.mark.parametrize("cmd", [P.Command.MEMORY, P.Command.VERIFY, P.Command.ZERO,
                                 P.Command.FILL, P.Command.FREE])
def test_lengths_beyond_guest_memory_are_refused_before_reading(cmd):
    # 1 GiB of hashes, a 512 GiB table, 2^64-1: refused from the header alone.
    for length in (1 << 30, 512 << 30, 2**64 - 1, 8 + 16 * NPAGES + 8 * NPAGES
                   + NPAGES * PAGE_SIZE + 1):
        e, rx, s, _ = hostile_run(P.Header(cmd, length).pack() + struct.pack("<II", 1, 0),
                                  after_state=cmd == P.Command.VERIFY)
        assert "exceeds" in str(e) and "pages of guest memory can need" in str(e)
        assert s.largest <= 8 + 16 * NPAGES + PAGE_SIZE * NPAGES
    e, *_ = hostile_run(table(cmd, [0], [512 << 18]), after_state=cmd == P.Command.VERIFY)
    assert "outside guest memory" in str(e)


def test_state_sizes_and_counts_are_bounded():
    # 60 million None: 852 MiB once; the payload alone is far beyond any machine state.
    e, *_ = hostile_run(P.Header(P.Command.STATE, 60_000_000 + 20).pack())
    assert "STATE: payload of 60000020 bytes exceeds" in str(e)
    # as many values as fit in the limit: refused by the element budget
    nones = framed_state(b"l" + struct.pack("<I", 3 << 20) + b"N" * (3 << 20))
    e, _, _, peak = hostile_run(P.Header(P.Command.STATE, len(nones)).pack() + nones)
    assert "values; a machine state has far fewer" in str(e)
    assert peak < 32 << 20
    # a count that promises more items than bytes remain
    for body in (b"l\xff\xff\xff\xffN", b"d" + struct.pack("<I", 3) + b"NNNNN",
                 b"t" + struct.pack("<I", 1 << 30)):
        raw = framed_state(body)
        e, *_ = hostile_run(P.Header(P.Command.STATE, len(raw)).pack() + raw)
        assert "does not fit in the" in str(e)
    # an array whose shape product is astronomic
    arr = framed_state(b"a" + C.encode_state("<u1")[12:]
                       + C.encode_state([2**8000] * 64)[12:] + C.encode_state(b"")[12:])
    e, *_ = hostile_run(P.Header(P.Command.STATE, len(arr)).pack() + arr)
    assert "malformed array" in str(e)


def test_every_failure_has_a_reason():
    """An exception without a message (MemoryError()) still says what happened."""
    class NoMemory(FakeMachine):
        def restore_state(self, s):
            raise MemoryError()
    src = make_src()
    m = NoMemory()
    rx = Receiver(m.memory, m.restore_state, m.resume)
    with pytest.raises(P.MigrationError, match="MemoryError"):
        rx.run(stream_of(*good_messages(src), src=src))

    class Flaky(P.BufferStream):
        def read_pages(self, mem, starts, counts):
            raise MemoryError()
    raw = stream_of(*good_messages(src), src=src).f.getvalue()
    rx = Receiver(FakeMachine().memory)
    out = io.BytesIO()
    with pytest.raises(P.MigrationError, match="migration failed on the destination: "
                                               "MemoryError"):
        rx.run(Flaky(io.BytesIO(raw), out=out))
    assert b"destination failed: MemoryError" in out.getvalue()


interesting = st.sampled_from([0, 1, 2, NPAGES - 1, NPAGES, NPAGES + 1, 2**32 - 1, 2**32,
                               48 << 20, 2**52, 2**63, 2**64 - 1])
u64 = st.integers(0, 2**64 - 1) | interesting
u32 = st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, NPAGES, NPAGES + 1, 1 << 20,
                                                  2**32 - 1])
range_cmd = st.sampled_from([P.Command.MEMORY, P.Command.ZERO, P.Command.FILL,
                             P.Command.FREE, P.Command.VERIFY])


@st.composite
def hostile_range_message(draw):
    cmd = draw(range_cmd)
    n = draw(st.integers(0, 6))
    starts = draw(st.lists(u64 | st.integers(0, NPAGES), min_size=n, max_size=n))
    counts = draw(st.lists(u64 | st.integers(0, NPAGES), min_size=n, max_size=n))
    head_n = draw(st.just(n) | u32)
    body_len = {P.Command.MEMORY: PAGE_SIZE, P.Command.VERIFY: 8}.get(cmd, 0) * sum(
        c for c in counts if c < 2**20)
    length = draw(st.just(8 + 16 * n + body_len) | u64)
    pattern = draw(st.just(0) | u32)
    t = struct.pack("<II", head_n, pattern)
    t += b"".join(struct.pack("<QQ", s_, c_) for s_, c_ in zip(starts, counts))
    body = draw(st.binary(max_size=64)) + b"\x5a" * min(body_len, NPAGES * PAGE_SIZE)
    return P.Header(cmd, length).pack() + t + body


@st.composite
def hostile_state(draw):
    parts = draw(st.lists(
        st.sampled_from([b"N", b"T", b"F", b"l", b"t", b"d", b"a", b"i", b"s", b"b", b"f",
                         b"Z"]).flatmap(
            lambda tag: st.just(tag) if tag in (b"N", b"T", b"F", b"Z") else
            st.tuples(st.just(tag), u32.map(lambda v: struct.pack("<I", v)),
                      st.binary(max_size=12)).map(b"".join)),
        max_size=12))
    body = b"".join(parts)
    raw = framed_state(body) if draw(st.booleans()) else C.STATE_MAGIC + body
    length = draw(st.just(len(raw)) | u64 | st.integers(0, P.MAX_STATE))
    return P.Header(P.Command.STATE, length).pack() + raw


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(hostile_range_message() | hostile_state(), min_size=1, max_size=4),
       st.booleans())
def test_hostile_messages_property(msgs, after_state):
    hostile_run(b"".join(msgs), after_state=after_state)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_mutated_tables_property(data):
    """Valid messages with a few bytes of their table or length overwritten."""
    src = make_src()
    raw = bytearray(stream_of(*good_messages(src)[1:5], src=src).f.getvalue())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 8))
        raw[i:i + 8] = struct.pack("<Q", data.draw(u64))
    mem = GuardedMemory()
    hello = P.BufferStream()
    hello.send(P.Hello(PAGE_SIZE, mem.size))
    s = ReadLimitStream(io.BytesIO(hello.f.getvalue() + bytes(raw)), out=io.BytesIO())
    rx = Receiver(mem, lambda st_: None, lambda: None)
    try:
        while rx.state != State.COMPLETE:
            rx.step(s)
    except P.MigrationError as e:
        assert str(e)
    assert s.largest <= mem.size + SMALL and mem.guard_intact()


# ------------------------------------------------------------ compressed pages

def zstd_frame(src, starts, counts):
    from hv.migration import pages
    return pages.Zstd(3).compress(src, np.array(starts, dtype=np.uint64),
                                  np.array(counts, dtype=np.uint64))


def test_memory_zstd_decompresses_into_guest_memory_and_the_receiver_completes():
    src = make_src()
    frame = zstd_frame(src, [1, 5], [2, 10])
    assert len(frame) < 11 * PAGE_SIZE      # 2 pages of 7s shrink to nothing, 10 random do not
    msgs = good_messages(src)
    msgs[2] = P.Ranges(P.Command.MEMORY_ZSTD, [1, 5], [2, 10], data=frame)
    m, rx, stats = run_receiver(stream_of(*msgs, src=src))
    assert rx.state == State.COMPLETE and m.resumed and rx.verified
    assert (m.memory.array() == src.array()).all()
    assert stats["pages"] == 12
    # without guest memory the frame is kept as it came
    assert roundtrip(msgs[2]) == msgs[2]


def test_corrupt_compressed_batches_are_refused_and_nothing_resumes():
    src = make_src()
    frame = zstd_frame(src, [1, 5], [2, 10])
    flipped = bytearray(frame)
    flipped[len(frame) // 2] ^= 0xFF
    other = zstd_frame(src, [1], [2])               # a valid frame of fewer pages
    cases = {"flipped byte": bytes(flipped), "truncated": frame[:-3],
             "trailing bytes": frame + b"\0" * 8, "fewer pages than its table": other,
             "not zstd": b"\x07" * 64}
    for what, body in cases.items():
        msgs = good_messages(src)
        msgs[2] = P.Ranges(P.Command.MEMORY_ZSTD, [1, 5], [2, 10], data=body)
        m = FakeMachine()
        rx = Receiver(m.memory, m.restore_state, m.resume)
        with pytest.raises(P.ProtocolError, match="MEMORY_ZSTD") as e:
            rx.run(stream_of(*msgs, src=src))
        assert rx.state == State.FAILED and not m.resumed, what
        assert "corrupt compressed batch" in str(e.value), (what, str(e.value))


def test_compressed_frame_lengths_are_bounded_before_reading():
    from hv.migration import pages
    bound = pages.zstd_bound(2 * PAGE_SIZE)
    head = struct.pack("<II", 1, 0) + struct.pack("<QQ", 4, 2)
    e, *_ = hostile_run(P.Header(P.Command.MEMORY_ZSTD, len(head) + bound + 1).pack() + head)
    assert f"a frame of {bound + 1} bytes for 2 pages" in str(e)
    e, *_ = hostile_run(P.Header(P.Command.MEMORY_ZSTD, len(head)).pack() + head)
    assert "a frame of 0 bytes" in str(e)
    e, *_ = hostile_run(P.Header(P.Command.MEMORY_ZSTD, 1 << 40).pack() + head)
    assert "exceeds" in str(e)
