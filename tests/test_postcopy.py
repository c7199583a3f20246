"""Postcopy (hv.migration.postcopy): the wire messages, the destination's
page server on a small hand-made memory with a fake source in a child
process, and tiny KVM guests migrated with postcopy over loopback: pages
requested and pushed, verified by hash; a lost connection pauses the
destination; a killed destination leaves the source holding the memory."""

from __future__ import annotations

import io
import os
import select
import signal
import socket
import sys
import threading

import numpy as np
import pytest

from hv.memory import PAGE_SIZE, GuestMemory
from hv.migration import pages
from hv.migration.postcopy import Holdings, PageServer, done_message, next_pages, parse_done
from hv.migration.protocol import (BufferStream, Command, Control, Header, MigrationError,
                                   ProtocolError, Ranges)
from hv.migration.transport import SocketStream

sys.path.insert(0, os.path.dirname(__file__))

NPAGES = 1024
HELD = (0, 512)         # MEMORY in precopy
ZERO = (512, 768)       # ZERO in precopy
DIRTY = (100, 200)      # held, dirtied since: to fetch
TOUCHED = 150           # the page a "device thread" reads during postcopy


def old(p: int) -> bytes:
    return bytes([p % 251 + 1]) * PAGE_SIZE


def new(p: int) -> bytes:
    return bytes([(p * 3) % 253 + 2]) * PAGE_SIZE


def rng(a, b):
    return np.array([a], dtype=np.uint64), np.array([b - a], dtype=np.uint64)


# ------------------------------------------------------------- messages

def test_postcopy_messages_round_trip():
    buf = io.BytesIO()
    st = BufferStream(buf)
    st.send(Ranges(Command.POSTCOPY, [], []))                 # nothing to fetch
    st.send(Ranges(Command.POSTCOPY, [3, 10], [2, 5]))
    st.send(Ranges(Command.REQUEST, [7], [1]))
    st.send(Control(Command.DONE, done_message(type("S", (), dict(
        requests=4, latency_sum_ns=8_000_000, latency_max_ns=5_000_000,
        latency_count=4))()).payload))
    buf.seek(0)
    empty = st.recv(64)
    assert empty.command == Command.POSTCOPY and empty.npages == 0
    assert st.recv(64) == Ranges(Command.POSTCOPY, [3, 10], [2, 5])
    assert st.recv(64) == Ranges(Command.REQUEST, [7], [1])
    done = parse_done(st.recv(64))
    assert done == {"requests": 4, "latency_mean_ms": 2.0, "latency_max_ms": 5.0}


def test_requests_outside_memory_and_short_done_are_refused():
    buf = io.BytesIO()
    st = BufferStream(buf)
    st.send(Ranges(Command.REQUEST, [60], [8]))
    buf.seek(0)
    with pytest.raises(ProtocolError, match="outside guest memory"):
        st.recv(64)
    buf = io.BytesIO(Header(Command.DONE, 8).pack() + bytes(8))
    with pytest.raises(ProtocolError, match="DONE"):
        BufferStream(buf).recv(64)
    # a REQUEST table may not be empty, a POSTCOPY one may
    buf = io.BytesIO(Header(Command.REQUEST, 8).pack() + bytes(8))
    with pytest.raises(ProtocolError, match="range table of 0"):
        BufferStream(buf).recv(64)


def test_background_batches_wrap_and_stop_at_the_limit():
    bm = pages.empty_bitmap(NPAGES)
    pages.set_range(bm, 10, 5)
    pages.set_range(bm, 900, 300 - 176)
    s, c = next_pages(bm, NPAGES, 950, 16)
    assert (s.tolist(), c.tolist()) == ([950], [16])
    s, c = next_pages(bm, NPAGES, 1020, 16)          # past the last: wraps to 0
    assert (s.tolist(), c.tolist()) == ([1020], [4])
    s, c = next_pages(pages.empty_bitmap(NPAGES), NPAGES, 0, 16)
    assert len(s) == 0


def test_a_postcopy_without_the_feature_is_refused():
    from hv.migration.protocol import FEATURE_POSTCOPY, FEATURES, Hello
    from hv.migration.receiver import Receiver
    mem = GuestMemory(NPAGES * PAGE_SIZE)
    buf = io.BytesIO()
    w = BufferStream(buf)
    w.send(Hello(PAGE_SIZE, mem.size, FEATURES & ~FEATURE_POSTCOPY))
    w.send(Ranges(Command.POSTCOPY, [1], [1]))
    buf.seek(0)
    rx = Receiver(mem)
    with pytest.raises(ProtocolError, match="did not announce postcopy"):
        rx.run(BufferStream(buf, out=io.BytesIO()))


@pytest.mark.parametrize("channels", [1, 2])
def test_the_first_postcopy_is_acknowledged_and_dropped_while_the_source_runs(channels):
    """Sent before the pause: its pages are dropped at once over one
    connection; with more, another connection may still carry older copies
    of them, so they wait for the switch. A second POSTCOPY (paused) adds
    pages and is not answered."""
    from hv.migration.protocol import FEATURES, Hello, cancel
    from hv.migration.receiver import Receiver
    mem = GuestMemory(NPAGES * PAGE_SIZE)
    a, b = socket.socketpair()
    src = SocketStream(a, timeout=10)
    rx = Receiver(mem)
    done = threading.Thread(target=lambda: pytest.raises(Exception, rx.run,
                                                         SocketStream(b, timeout=10)),
                            daemon=True)
    done.start()
    try:
        src.send(Hello(PAGE_SIZE, mem.size, FEATURES, channels, 0, 7))
        assert src.recv(NPAGES).acked == Command.HELLO
        src.send(Ranges(Command.MEMORY, [100], [100], data=bytes([7]) * 100 * PAGE_SIZE))
        src.send(Ranges(Command.POSTCOPY, [120], [10]))
        # a message header is waited for without a timeout: bound it here
        assert select.select([a], [], [], 10)[0], "the first POSTCOPY was not answered"
        assert src.recv(NPAGES).acked == Command.POSTCOPY
        dropped = mem.read(120 * PAGE_SIZE, 10 * PAGE_SIZE)
        assert dropped == (bytes(10 * PAGE_SIZE) if channels == 1
                           else bytes([7]) * 10 * PAGE_SIZE)
        assert mem.read(119 * PAGE_SIZE, PAGE_SIZE) == bytes([7]) * PAGE_SIZE
        src.send(Ranges(Command.POSTCOPY, [130], [5]))
        src.send(cancel("test over"))
        done.join(10)
        assert not done.is_alive()
        assert [c.tolist() for _, c in rx.fetch] == [[10], [5]]
        assert mem.read(130 * PAGE_SIZE, PAGE_SIZE) == bytes([7]) * PAGE_SIZE
    finally:
        for end in (a, b):      # wakes a receive still blocked in the kernel
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()


# ------------------------------------------------------- the page server

def fake_source(sock: socket.socket, fetch: np.ndarray) -> int:
    """The source's side, in a child process: answer REQUESTs, then push
    the rest, COMPLETE, and expect DONE. Exit status 0 when all went so."""
    st = SocketStream(sock, timeout=20)
    todo = set(pages.range_pfns(*pages.all_runs(fetch, NPAGES)).tolist())
    asked = []
    try:
        while TOUCHED in todo:
            msg = st.recv(NPAGES)
            if msg.command != Command.REQUEST:
                return 3
            for p in pages.range_pfns(msg.starts, msg.counts).tolist():
                asked.append(p)
                if p in todo:
                    st.send(Ranges(Command.MEMORY, [p], [1], data=new(p)))
                    todo.discard(p)
        # the rest in the background, 32 pages at a time, two of them zero
        rest = sorted(todo)
        for i in range(0, len(rest), 32):
            part = rest[i:i + 32]
            zero = [p for p in part if p in (800, 801)]
            data = [p for p in part if p not in zero]
            if zero:
                st.send(Ranges(Command.ZERO, [800], [2]))
            s, c = pages.all_runs(bitmap_of(data), NPAGES)
            st.send(Ranges(Command.MEMORY, s, c, data=b"".join(new(p) for p in data)))
        st.send(Control(Command.COMPLETE))
        done = st.recv(NPAGES)
        if done.command != Command.DONE or parse_done(done)["requests"] != 1:
            return 4
        return 0 if asked == [TOUCHED] else 5
    except Exception:
        return 6


def bitmap_of(pfns) -> np.ndarray:
    bm = pages.empty_bitmap(NPAGES)
    for p in pfns:
        pages.set_range(bm, p, 1)
    return bm


def test_page_server_fetches_what_a_gil_holding_thread_touches_and_places_the_rest():
    mem = GuestMemory(NPAGES * PAGE_SIZE)
    for p in range(NPAGES):             # stale content everywhere
        mem.view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = old(p)
    held = Holdings(mem)
    held.note(Command.MEMORY, *rng(*HELD))
    held.note(Command.ZERO, *rng(*ZERO))
    pages.fill(mem, *rng(*ZERO), 0, discard=True)
    fetch_s, fetch_c = rng(*DIRTY)
    # what is to come: the dirty pages and what the stream never mentioned
    fetch = bitmap_of(list(range(*DIRTY)) + list(range(768, NPAGES)))
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        os._exit(fake_source(b, fetch))
    b.close()
    try:
        hashes = np.zeros(NPAGES, dtype=np.uint64)
        server = PageServer(mem, a.fileno(), held, hashes, timeout_s=20)
        assert server.switch([(fetch_s, fetch_c)]) == len(range(*DIRTY)) + 256
        assert server.zero_known == ZERO[1] - ZERO[0]
        server.start()
        got = {}
        # memory.read holds the GIL while it faults: the server runs without it
        reader = threading.Thread(target=lambda: got.update(
            zero=mem.read(ZERO[0] * PAGE_SIZE, PAGE_SIZE),
            page=mem.read(TOUCHED * PAGE_SIZE, PAGE_SIZE)))
        reader.start()
        reader.join(20)
        # a zero page is mapped by the server itself on its first touch
        assert got.get("zero") == bytes(PAGE_SIZE)
        assert got.get("page") == new(TOUCHED)
        h = server.wait()
        assert h.command == Command.COMPLETE
        st = server.stats()
        assert server.missing == 0 and st["requests"] == 1 and st["zero_placed"] == 2
        assert st["refaults"] >= 1
        assert st["latency_max_ms"] > 0
        requested = server.requested_bitmap()
        SocketStream(a).send(done_message(server.pc.st))
        server.finish()
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        a.close()
    assert pages.count(requested) == 1 and pages.range_pfns(
        *pages.all_runs(requested, NPAGES)).tolist() == [TOUCHED]
    for p in list(range(0, DIRTY[0])) + list(range(DIRTY[1], HELD[1])):
        assert mem.read(p * PAGE_SIZE, PAGE_SIZE) == old(p), p    # kept, never fetched
    for p in range(*ZERO):
        assert not any(mem.read(p * PAGE_SIZE, PAGE_SIZE))
    for p in list(range(*DIRTY)) + list(range(768, NPAGES)):
        want = bytes(PAGE_SIZE) if p in (800, 801) else new(p)
        assert mem.read(p * PAGE_SIZE, PAGE_SIZE) == want, p
        assert hashes[p] == pages.hash_bytes(want)
    # plain memory again: a page dropped now reads as zero, nothing waits
    mem.discard(0, PAGE_SIZE)
    assert not any(mem.read(0, PAGE_SIZE))


def test_page_server_refuses_a_page_message_outside_memory():
    mem = GuestMemory(NPAGES * PAGE_SIZE)
    a, b = socket.socketpair()
    try:
        server = PageServer(mem, a.fileno(), Holdings(mem), None, timeout_s=5)
        server.switch([rng(0, 8)])
        SocketStream(b).send(Ranges(Command.ZERO, [NPAGES - 1], [4]))
        with pytest.raises(ProtocolError, match="outside guest memory"):
            server.serve()
        assert server.missing == NPAGES      # nothing was held: everything is to come
    finally:
        a.close()
        b.close()


def test_page_server_says_when_the_source_is_gone():
    mem = GuestMemory(NPAGES * PAGE_SIZE)
    a, b = socket.socketpair()
    try:
        server = PageServer(mem, a.fileno(), Holdings(mem), None, timeout_s=5)
        server.switch([rng(0, 8)])
        b.close()
        with pytest.raises(MigrationError, match="connection to the source was lost"):
            server.serve()
        with pytest.raises(ProtocolError, match=f"{NPAGES} pages are still missing"):
            server.finish()
    finally:
        a.close()
