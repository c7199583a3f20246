"""Postcopy live migration: the guest moves to the destination before all of
its memory has, and the pages it touches there are fetched on demand.

QEMU's capability `postcopy-ram` and command `migrate-start-postcopy`: the
precopy rounds run as usual; at the switch (asked for, after
`postcopy_after_rounds` dirty rounds, or when the rounds run out) the
source pauses and sends, instead of its last dirty pages, the set of pages
the destination does not hold valid (POSTCOPY), the machine state and
COMPLETE (wire format in hv.migration.protocol). The destination

1. registers all of guest RAM with userfaultfd (MISSING mode);
2. drops (MADV_DONTNEED) the pages to fetch: the ones the source dirtied
   since it sent them, and any it never sent, so they fault from now on;
3. counts every page that arrived as free (FREE) or zero (ZERO) and was not
   dirtied since as placed, without touching it: such a page is never
   requested. Its first touch faults (it is not mapped) and the page
   server maps the zero page there itself (UFFDIO_ZEROPAGE), as for a
   placed page the balloon discarded; the pause does not wait for
   thousands of scattered ranges to be mapped;
4. starts the page server (native/postcopy.c, hv_postcopy_serve: no Python
   per page, no GIL) and only then restores the machine state and resumes
   the guest, answering RUNNING. From here on any touch of a missing page,
   by a vCPU or by a thread of the VMM, waits in the kernel; the server
   reads the fault, sends REQUEST for the page over the same connection
   (the return path) and places it with UFFDIO_COPY when it arrives.

The source, meanwhile (PostcopySource), answers each REQUEST ahead of its
background stream, which then continues from the page after the one that
faulted (the guest's next touches are often near), and pushes every page
still to fetch in small batches so that a request never waits behind much.
When all is sent it sends (VERIFY and) COMPLETE; the destination, with every
page placed, unregisters its RAM and answers DONE with its fault figures.
Only then does the source let the guest's memory go.

Failure: before RUNNING the destination has not run the guest, and the
source resumes it as after any failed precopy. After RUNNING it cannot: the
guest ran on the destination and its memory moved on there (QEMU documents
the same: "if the migration fails after postcopy has started, neither side
can resume the guest by itself"). The source stays in postmigrate and
keeps the guest's memory; the destination pauses its guest (hold
"postcopy", QMP status postcopy-paused) instead of running it with pages
missing, and keeps the uffd open, so a thread that touched a missing page
waits instead of reading zeros.

Postcopy needs plain TCP (the page server reads the socket itself) and a
destination that can open a userfaultfd with kernel faults (root, or
vm.unprivileged_userfaultfd=1).
"""

from __future__ import annotations

import collections
import errno
import os
import select
import threading
import time

import numpy as np

from .._pages import ffi, lib
from ..memory import PAGE_SIZE
from . import pages
from .protocol import (DONE, VERSION, Command, Control, MigrationError, PeerError, ProtocolError,
                       Ranges, parse_header)


class PostcopyFailed(MigrationError):
    """The migration failed after the guest resumed on the destination."""


_u64p = pages._u64p


def _check(r: int, what: str) -> int:
    if r < 0:
        raise MigrationError(f"{what}: {os.strerror(-r)}")
    return r


def done_message(st, requests: int | None = None) -> Control:
    """DONE with the destination's fault figures (hv_postcopy_stats);
    requests, when given, is the count the destination reports itself, read
    once, so that both ends say the same number."""
    return Control(Command.DONE, DONE.pack(st.requests if requests is None else requests,
                                           st.latency_sum_ns, st.latency_max_ns,
                                           st.latency_count))


def parse_done(msg: Control) -> dict:
    requests, lat_sum, lat_max, lat_n = DONE.unpack(msg.payload)
    return {"requests": requests, "latency_mean_ms": round(lat_sum / lat_n / 1e6, 3)
            if lat_n else 0.0, "latency_max_ms": round(lat_max / 1e6, 3)}


# ------------------------------------------------------------- destination

class Holdings:
    """What the destination holds of each page, as the precopy stream said:
    data (MEMORY, FILL) or zero (ZERO, FREE), the later message winning.
    Every connection of the migration notes into the same bitmaps; the
    connections carry disjoint blocks of 512 pages (8 words), so their
    updates never share a word."""

    def __init__(self, memory):
        self.memory = memory
        self.npages = memory.npages
        self.data = pages.empty_bitmap(self.npages)
        self.zero = pages.empty_bitmap(self.npages)

    def note(self, command: Command, starts: np.ndarray, counts: np.ndarray) -> None:
        if not len(starts):
            return
        is_data = command in (Command.MEMORY, Command.FILL)
        pages.assign_ranges(self.data, starts, counts, 1 if is_data else 0)
        pages.assign_ranges(self.zero, starts, counts, 0 if is_data else 1)


def drop_pages(memory, bm: np.ndarray) -> None:
    """Drop the pages set in bm (MADV_DONTNEED): unregistered they read as
    zero, registered with userfaultfd they fault."""
    base = ffi.cast("uint8_t *", memory.host_addr)
    for s, c in pages.runs(bm, memory.npages):
        _check(lib.hv_discard_ranges(base, PAGE_SIZE, _u64p(s), _u64p(c), len(s)),
               "postcopy: dropping the pages to fetch")


class PageServer:
    """The destination's side after the switch: guest RAM under userfaultfd
    and the C loop that serves its faults (hv_postcopy_serve).

        server = PageServer(memory, sock_fd, holdings, page_hashes, timeout_s)
        server.switch(fetch_sets, dropped)  # register, drop, count zero pages
        server.start()          # serve on a thread (the guest may fault now)
        ...restore, resume, server.write(RUNNING)...
        header = server.wait()  # the first message that is not pages
        header = server.serve() # (again, on the caller's thread)
        server.finish()         # every page placed: unregister, close
    """

    def __init__(self, memory, sock_fd: int, holdings: Holdings, hashes: np.ndarray | None,
                 timeout_s: float | None):
        self.memory = memory
        self.npages = memory.npages
        self.holdings = holdings
        self.placed = pages.empty_bitmap(self.npages)
        self.requested = pages.empty_bitmap(self.npages)
        self.req_ns = np.zeros(self.npages, dtype=np.uint64)
        self.hashes = hashes
        self.ram = memory.ram_bitmap()
        fd = lib.hv_uffd_open()
        if fd < 0:
            raise MigrationError(f"postcopy: cannot open a userfaultfd ({os.strerror(-fd)}); "
                                 f"the destination needs root or "
                                 f"vm.unprivileged_userfaultfd=1")
        self.uffd = fd
        self._stop_r, self._stop_w = os.pipe()
        pc = self.pc = ffi.new("struct hv_postcopy *")
        pc.uffd, pc.sock, pc.stop_fd = fd, sock_fd, self._stop_r
        pc.timeout_ms = -1 if timeout_s is None else max(1, int(timeout_s * 1000))
        pc.mem = ffi.cast("uint8_t *", memory.host_addr)
        pc.page_size = PAGE_SIZE
        pc.version = VERSION
        pc.npages = self.npages
        regions = memory.ram_pfn_regions()
        if len(regions) > 1:
            pc.hole_first = regions[0][0] + regions[0][1]
            pc.hole_end = regions[1][0]
        pc.placed = _u64p(self.placed)
        pc.requested = _u64p(self.requested)
        pc.req_ns = _u64p(self.req_ns)
        pc.hashes = _u64p(hashes) if hashes is not None else ffi.NULL
        _check(lib.hv_postcopy_init(pc), "postcopy: setting up the page server")
        self.registered = False
        self.switch_ms: dict = {}
        self._thread: threading.Thread | None = None
        self._result: tuple | None = None
        self._closed = False

    # -- the switch --------------------------------------------------------
    def switch(self, fetch_sets: list, dropped: np.ndarray | None = None) -> int:
        """Register RAM, drop the pages to fetch (fetch_sets: the POSTCOPY
        messages' (starts, counts); dropped: those dropped already), count
        the free and zero ones as placed (mapped on their first touch).
        Returns the number of pages missing now."""
        t0 = time.monotonic()
        mem, h = self.memory, self.holdings
        fetch = pages.empty_bitmap(self.npages)
        for starts, counts in fetch_sets:
            pages.assign_ranges(fetch, starts, counts, 1)
        # anything the stream never said is fetched too
        held = h.data | h.zero
        unheld, _ = pages.andnot(self.ram, held)
        pages.or_into(fetch, unheld)
        zero, _ = pages.andnot(h.zero, fetch)
        valid, _ = pages.andnot(h.data, fetch)
        for gpa, size in mem.regions:
            _check(lib.hv_uffd_register(self.uffd, self.pc.mem + gpa, size),
                   "postcopy: registering guest RAM with userfaultfd")
        self.registered = True
        t1 = time.monotonic()
        drop, _ = pages.andnot(fetch, dropped) if dropped is not None else (fetch, None)
        drop_pages(mem, drop)
        t2 = time.monotonic()
        # zero: never written since they were zero (or free), so not mapped
        # here (the stream's ZERO dropped any stale page)
        self.zero_known = pages.count(zero)
        pages.or_into(self.placed, zero)
        pages.or_into(self.placed, valid)
        self.pc.missing = pages.count(fetch)
        self.fetch_pages = int(self.pc.missing)
        t3 = time.monotonic()
        self.switch_ms = {"register": round((t1 - t0) * 1000, 3),
                          "drop": round((t2 - t1) * 1000, 3),
                          "count": round((t3 - t2) * 1000, 3)}
        return self.fetch_pages

    # -- serving -------------------------------------------------------------
    @property
    def serving(self) -> bool:
        """A serve() that start() began has not been waited for."""
        return self._thread is not None

    @property
    def missing(self) -> int:
        return int(self.pc.missing)

    def serve(self):
        """Serve faults until a message that is not pages arrives: its Header.
        Raises MigrationError when the connection fails or the stream is bad."""
        r = lib.hv_postcopy_serve(self.pc)
        if r == 0:
            return parse_header(bytes(ffi.buffer(self.pc.header)))
        if r == -errno.EPROTO:
            raise ProtocolError(f"postcopy: {ffi.string(self.pc.error).decode()}")
        if r == -errno.ECONNRESET:
            raise MigrationError("postcopy: the connection to the source was lost")
        if r == -errno.ETIMEDOUT:
            raise MigrationError("postcopy: the source sent nothing within the timeout")
        if r == -errno.ECANCELED:
            raise MigrationError("postcopy: stopped")
        raise MigrationError(f"postcopy: serving page faults failed: {os.strerror(-r)}")

    def start(self) -> None:
        """serve() on a thread: faults are served while this thread restores
        the machine state and resumes the guest."""
        def work():
            try:
                self._result = (self.serve(), None)
            except BaseException as e:
                self._result = (None, e)
        self._thread = threading.Thread(target=work, name="hv-postcopy-serve", daemon=True)
        self._thread.start()

    def wait(self):
        """The result of the serve() that start() began."""
        self._thread.join()
        self._thread = None
        header, err = self._result
        if err is not None:
            raise err
        return header

    def stop(self) -> None:
        """End a serve() in progress (it raises MigrationError)."""
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def write(self, data: bytes) -> None:
        """Write on the connection under the server's write lock."""
        buf = ffi.from_buffer(data)
        r = lib.hv_postcopy_write(self.pc, ffi.cast("uint8_t *", buf), len(buf))
        if r < 0:
            raise MigrationError(f"postcopy: connection lost while sending: {os.strerror(-r)}")

    def stats(self) -> dict:
        st = self.pc.st
        n = st.latency_count
        return {"faults": int(st.faults), "requests": int(st.requests),
                "request_messages": int(st.request_msgs), "pages_placed": int(st.placed),
                "zero_placed": int(st.zero_placed), "duplicates": int(st.duplicates),
                "refaults": int(st.refaults), "bytes": int(st.bytes_in),
                "missing": self.missing,
                "latency_mean_ms": round(st.latency_sum_ns / n / 1e6, 3) if n else 0.0,
                "latency_max_ms": round(st.latency_max_ns / 1e6, 3)}

    def requested_bitmap(self) -> np.ndarray:
        """Every page the guest asked the source for (a copy)."""
        return self.requested.copy()

    def finish(self) -> None:
        """Every page is in place: guest RAM is plain memory again (a page
        the guest drops from now on reads as zero), the uffd closes."""
        if self.missing:
            raise ProtocolError(f"postcopy: the source said it sent everything, but "
                                f"{self.missing} pages are still missing")
        if self.registered:
            for gpa, size in self.memory.regions:
                _check(lib.hv_uffd_unregister(self.uffd, self.pc.mem + gpa, size),
                       "postcopy: unregistering guest RAM")
            self.registered = False
        self.close()

    def close(self) -> None:
        """Release the server. With pages still missing the uffd stays open
        (closing it would let a waiting thread read zeros); it closes with
        the process."""
        if self._closed:
            return
        self._closed = True
        lib.hv_postcopy_free(self.pc)
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        if not self.registered:
            os.close(self.uffd)


# ------------------------------------------------------------------ source

#: background batches are about this long on the link (ms), within the bounds below
BATCH_MS = 1.0
MIN_BATCH_PAGES, MAX_BATCH_PAGES = 8, 256


def batch_pages(bytes_per_sec: float) -> int:
    """Pages per background batch: a request waits behind one batch at most."""
    if not bytes_per_sec:
        return MAX_BATCH_PAGES
    n = int(bytes_per_sec * BATCH_MS / 1000 / PAGE_SIZE)
    return max(MIN_BATCH_PAGES, min(MAX_BATCH_PAGES, n))


def next_pages(bm: np.ndarray, npages: int, pos: int, limit: int) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """Ranges of at most `limit` pages set in bm, from pos on (wrapping to 0)."""
    starts = np.empty(limit, dtype=np.uint64)
    counts = np.empty(limit, dtype=np.uint64)
    for at in (pos, 0):
        cpos = ffi.new("size_t *", at)
        n = lib.hv_bitmap_runs(_u64p(bm), npages, cpos, _u64p(starts), _u64p(counts),
                               limit, limit)
        if n:
            s, c = starts[:n], counts[:n]
            ends = np.cumsum(c)
            k = int(np.searchsorted(ends, limit, side="left")) + 1
            s, c = s[:k].copy(), c[:k].copy()
            over = int(c.sum()) - limit
            if over > 0:
                c[-1] -= np.uint64(over)
            return s, c
    return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)


def split_zero(memory, starts: np.ndarray, counts: np.ndarray):
    """((zero starts, counts), (data starts, counts)) of the ranges' pages."""
    room = max(1, int(counts.sum()))
    zs, zc = np.empty(room, dtype=np.uint64), np.empty(room, dtype=np.uint64)
    ds, dc = np.empty(room, dtype=np.uint64), np.empty(room, dtype=np.uint64)
    nz, nd = ffi.new("size_t *"), ffi.new("size_t *")
    r = lib.hv_split_zero_runs(ffi.cast("uint8_t *", memory.host_addr), PAGE_SIZE,
                               _u64p(starts), _u64p(counts), len(starts), _u64p(zs), _u64p(zc),
                               nz, _u64p(ds), _u64p(dc), nd, room)
    _check(int(r), "splitting zero pages")
    return (zs[:nz[0]], zc[:nz[0]]), (ds[:nd[0]], dc[:nd[0]])


class PostcopySource:
    """The source after the switch: pushes the pages to fetch, answering the
    destination's REQUESTs first, until all are sent and DONE comes back.

    migration: the hv.migration.sender.Migration (its memory, statistics,
    hashes and cancel); stream: connection 0; fetch: bitmap of the pages the
    destination is to get."""

    def __init__(self, migration, stream, fetch: np.ndarray):
        self.m = migration
        self.stream = stream
        self.memory = migration.memory
        self.npages = migration.npages
        self.remaining = fetch.copy()
        self.left = pages.count(fetch)
        self.requested = pages.empty_bitmap(self.npages)
        self.batch = batch_pages(migration.p.max_postcopy_bandwidth_mib * (1 << 20))
        self.running = threading.Event()    # RUNNING arrived
        self.running_at: float | None = None
        self.done: dict | None = None
        self.error: BaseException | None = None
        self._wake = threading.Event()
        self._requests: collections.deque = collections.deque()
        self._finished = threading.Event()  # DONE, ERROR or a failure
        self._stop = threading.Event()
        self.service_ms: list[float] = []
        #: on_running(monotonic time RUNNING came), on the migration's thread
        self.on_running = None
        self._running_seen = False
        self._reader = threading.Thread(target=self._read, name="hv-postcopy-rx", daemon=True)

    # -- the return path -------------------------------------------------------
    def _read(self) -> None:
        st = self.stream
        try:
            while not self._stop.is_set():
                # wait for a message without a read timeout: a guest that
                # does not fault says nothing for as long as it likes
                ready, _, _ = select.select([st.sock], [], [], 0.2)
                if not ready:
                    continue
                msg = st.recv(self.npages)
                cmd = getattr(msg, "command", None)
                if cmd == Command.REQUEST:
                    self._requests.append((time.monotonic(), msg.starts, msg.counts))
                    self._wake.set()
                elif cmd == Command.RUNNING:
                    self.running_at = time.monotonic()
                    self.running.set()
                    self._wake.set()
                elif cmd == Command.DONE:
                    self.done = parse_done(msg)
                    break
                elif cmd == Command.ERROR:
                    raise PeerError(f"the destination failed: {msg.text}")
                else:
                    raise ProtocolError(f"postcopy: unexpected {cmd!r} from the destination")
        except BaseException as e:
            self.error = e
        finally:
            self._finished.set()
            self._wake.set()

    def _raise(self) -> None:
        if self.running.is_set() and not self._running_seen:
            self._running_seen = True
            if self.on_running is not None:
                self.on_running(self.running_at)
        if self.error is not None:
            raise self.error

    # -- sending -----------------------------------------------------------------
    def _send(self, starts: np.ndarray, counts: np.ndarray, requested: bool) -> None:
        """Send the ranges' pages (zero pages as ZERO) and count them."""
        m = self.m
        (zs, zc), (ds, dc) = split_zero(self.memory, starts, counts)
        n = 0
        if len(zs):
            n += self.stream.send(Ranges(Command.ZERO, zs, zc))
            m._record_hashes(zs, zc, pages.ZERO_PAGE_HASH)
        if len(ds):
            n += self.stream.send(Ranges(Command.MEMORY, ds, dc), self.memory)
            m._record_hashes(ds, dc)
        pages.assign_ranges(self.remaining, starts, counts, 0)
        npg = int(counts.sum())
        self.left -= npg
        with m._lock:
            s = m.s
            s.bytes_sent += n
            s.postcopy_bytes += n
            s.pages_sent += int(dc.sum()) if len(dc) else 0
            s.remaining_pages = self.left
            if requested:
                s.postcopy_pages_requested += npg
            else:
                s.postcopy_pages_pushed += npg

    def _serve_requests(self) -> int | None:
        """Send what was asked and not sent yet; the page after the last one
        asked (where the background goes on), or None when nothing was asked."""
        if not self._requests:
            return None
        asked = pages.empty_bitmap(self.npages)
        arrived = []
        while self._requests:
            t, s, c = self._requests.popleft()
            arrived.append(t)
            pages.assign_ranges(asked, s, c, 1)
        pages.or_into(self.requested, asked)
        todo = asked & self.remaining
        nxt = None
        for s, c in pages.runs(todo, self.npages, max_len=self.batch):
            self._send(s, c, requested=True)
            nxt = int(s[-1] + c[-1])
        now = time.monotonic()
        waits = [(now - t) * 1000 for t in arrived]
        self.service_ms.extend(waits)
        with self.m._lock:
            s = self.m.s
            s.postcopy_requests += len(arrived)
            s.postcopy_service_ms_max = round(max([s.postcopy_service_ms_max or 0.0] + waits),
                                              3)
            s.postcopy_service_ms_mean = round(sum(self.service_ms) / len(self.service_ms), 3)
        return nxt

    def run(self, timeout_s: float) -> dict:
        """Push everything, answer requests first; then VERIFY (from the
        migration, when asked), COMPLETE, and wait for DONE. Returns DONE's
        figures; raises when anything fails."""
        self._reader.start()
        try:
            pos = 0
            while self.left > 0:
                self._raise()
                nxt = self._serve_requests()
                if nxt is not None:
                    pos = nxt
                    continue
                s, c = next_pages(self.remaining, self.npages, pos, self.batch)
                if not len(s):
                    break
                self._send(s, c, requested=False)
                pos = int(s[-1] + c[-1])
                self._wake.clear()
            self._raise()
            # the guest may still be resuming: RUNNING before COMPLETE
            deadline = time.monotonic() + timeout_s
            while not self.running.is_set():
                self._raise()
                if self._finished.is_set() or time.monotonic() > deadline:
                    raise MigrationError("the destination did not answer RUNNING")
                self._wake.wait(0.1)
                self._wake.clear()
                self._serve_requests()
            self.m._send_postcopy_verify()
            self.stream.send(Control(Command.COMPLETE))
            if not self._finished.wait(timeout_s):
                raise MigrationError(f"postcopy: the destination did not confirm it has "
                                     f"every page within {timeout_s:g} s")
            self._raise()
            if self.done is None:
                raise MigrationError("postcopy: the destination hung up before DONE")
            return self.done
        finally:
            self._stop.set()
