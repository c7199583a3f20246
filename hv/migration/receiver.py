"""The destination side of live migration.

`run-guest --incoming tcp:HOST:PORT` creates the Machine without booting it
and calls incoming(machine, uri): listen, accept, receive pages straight into
guest memory, restore the machine state, resume, answer RUNNING. The wire
protocol, the message sequence and the state diagram are in
hv.migration.protocol; Receiver below is the (state, command) machine.
Connections are accepted on a thread: a new one has HANDSHAKE_TIMEOUT to send
its HELLO, and once connection 0 of a source is admitted only that source's
other connections are; a second source is refused with ERROR at once. With
TLS credentials (receive(tls=...)), each connection must be TLS with a client
certificate of the CA; the first byte tells a plain source from a TLS one,
and the wrong kind is refused, logged, and does not end the wait.

Whatever goes wrong (malformed stream, wrong version, out-of-order command,
dropped connection, CANCEL, a page hash that does not match) raises
MigrationError with the reason, after sending ERROR to the source when the
connection still works; the guest is never resumed half-restored. In
postcopy (hv.migration.postcopy) the guest already runs when the pages
are still coming: a failure then pauses it (the pause callback) and raises
PostcopyFailed; the pages still missing stay missing, so nothing reads
them as zero.
"""

from __future__ import annotations

import enum
import socket
import sys
import threading
import time
from typing import Callable

import numpy as np

from ..memory import PAGE_SIZE
from . import pages
from .postcopy import Holdings, PageServer, PostcopyFailed, done_message, drop_pages
from .protocol import (
    DATA_COMMANDS, FEATURE_POSTCOPY, FEATURE_VERIFY, FEATURES, VERSION, Command, Control,
    Header, Hello, MigrationError, PeerError, ProtocolError, Ranges, Stream, ack, error, reason)
from .state_codec import decode_state
from ..vmm import PAUSE_POSTCOPY
from .transport import (TLS_HANDSHAKE_BYTE, SocketStream, TlsStream, format_uri, listen,
                        ssl_reason, tune_socket)


class State(enum.Enum):
    WAIT_HELLO = "wait-hello"
    MEMORY = "memory"
    STATE = "state"
    POSTCOPY = "postcopy"                   # the switch: fetch set and state
    POSTCOPY_ACTIVE = "postcopy-active"     # the guest runs; pages are served
    COMPLETE = "complete"
    FAILED = "failed"


# Every connection: HELLO, then pages.
_PAGE_TRANSITIONS = {
    (State.WAIT_HELLO, Command.HELLO): State.MEMORY,
    (State.MEMORY, Command.MEMORY): State.MEMORY,
    (State.MEMORY, Command.MEMORY_ZSTD): State.MEMORY,
    (State.MEMORY, Command.ZERO): State.MEMORY,
    (State.MEMORY, Command.FILL): State.MEMORY,
    (State.MEMORY, Command.FREE): State.MEMORY,
}

# The destination's (state, command) -> next state table, primary connection.
TRANSITIONS = {
    **_PAGE_TRANSITIONS,
    (State.MEMORY, Command.STATE): State.STATE,
    (State.STATE, Command.VERIFY): State.STATE,
    (State.STATE, Command.COMPLETE): State.COMPLETE,
    (State.MEMORY, Command.POSTCOPY): State.POSTCOPY,
    (State.POSTCOPY, Command.POSTCOPY): State.POSTCOPY,
    (State.POSTCOPY, Command.STATE): State.POSTCOPY,
    (State.POSTCOPY, Command.COMPLETE): State.POSTCOPY_ACTIVE,
    (State.POSTCOPY_ACTIVE, Command.VERIFY): State.POSTCOPY_ACTIVE,
    (State.POSTCOPY_ACTIVE, Command.COMPLETE): State.COMPLETE,
}

# Secondary connections (channel > 0) carry pages only.
SECONDARY_TRANSITIONS = {
    **_PAGE_TRANSITIONS,
    (State.MEMORY, Command.COMPLETE): State.COMPLETE,
}


def expected(table, state: State) -> list[str]:
    return [c.name for (s, c) in table if s == state]


class Receiver:
    """Receives one migration stream into `memory`.

    secondary: False for connection 0, True for the others, None to take it
    from the HELLO's channel. admit(receiver, hello), when given, may refuse
    a HELLO that passed the checks here by raising MigrationError (receive()
    uses it to bind connections to one session) before ACK is sent.

    restore(state_dict) and resume() are called, in that order, only after
    COMPLETE arrived with everything checked; RUNNING is sent after resume().
    In postcopy they are called at the switch, with the page server already
    serving faults; pause(), when given, holds the guest if the migration
    fails after that, and on_postcopy(receiver) is called once it runs.
    A Prefault still faulting in `memory` is stopped (and waited for) when
    the first message after HELLO arrives, so that it never faults a page
    back in after ZERO or FREE discarded it.
    """

    def __init__(self, memory, restore: Callable[[dict], None] | None = None,
                 resume: Callable[[], None] | None = None, *, secondary: bool | None = False,
                 require_verify: bool = False, log=None, prefault: "Prefault | None" = None,
                 admit: Callable[["Receiver", Hello], None] | None = None,
                 pause: Callable[[], None] | None = None,
                 on_postcopy: Callable[["Receiver"], None] | None = None):
        self.memory = memory
        self.npages = memory.size // PAGE_SIZE
        # ranges must lie in RAM: never in the hole between regions
        self.ram = memory.ram_pfn_regions()
        self.restore = restore
        self.resume = resume
        self.table = SECONDARY_TRANSITIONS if secondary else TRANSITIONS
        self.secondary = secondary
        self.require_verify = require_verify
        self.state = State.WAIT_HELLO
        self.hello: Hello | None = None
        self.machine_state = None
        self.verified: bool | None = None
        self.log = log or (lambda msg: None)
        self.prefault = prefault
        self.admit = admit
        # Secondary connections join through add_secondary() (receive()).
        self.secondaries: list["Receiver"] = []
        self._secondaries_changed = threading.Condition()
        self._secondaries_counted = False
        self.finished = threading.Event()       # run() returned or raised
        self.error: str | None = None
        self.stats = {"pages": 0, "zero_pages": 0, "fill_pages": 0, "free_pages": 0,
                      "bytes": 0, "messages": 0, "restore_ms": None}
        self.first_message_at = None
        self.completed_at = None
        #: with FEATURE_VERIFY: the hash of every page as it arrived, shared
        #: by all connections, so VERIFY compares tables instead of hashing
        #: guest memory while the guest is down
        self.page_hashes: np.ndarray | None = None
        #: FEATURE_POSTCOPY: what this destination holds (all connections)
        self.holdings: Holdings | None = None
        self.pause = pause
        self.on_postcopy = on_postcopy
        self.fetch: list[tuple[np.ndarray, np.ndarray]] = []    # the POSTCOPY tables
        self.dropped: np.ndarray | None = None      # the pages of the first, dropped
        self.server: PageServer | None = None       # after the switch
        self.resumed_at = None                      # postcopy: the guest runs

    # -- the state machine -----------------------------------------------
    def step(self, stream: Stream) -> State:
        """Read one message and act on it; returns the new state."""
        h = self._next_header(stream)
        if self.first_message_at is None:
            self.first_message_at = time.monotonic()
        self.stats["messages"] += 1
        if h.command in (Command.CANCEL, Command.ERROR):
            msg = stream.recv_body(h, self.npages)
            self.state = State.FAILED
            what = "cancelled the migration" if h.command == Command.CANCEL else "failed"
            raise PeerError(f"the source {what}: {msg.text or 'no reason given'}")
        nxt = self.table.get((self.state, h.command))
        if nxt is None:
            prev = self.state
            self.state = State.FAILED
            raise ProtocolError(
                f"unexpected {h.command.name} in state {prev.name}; expected "
                f"{' or '.join(expected(self.table, prev)) or 'nothing'}")
        if self.prefault is not None and self.state != State.WAIT_HELLO:
            self.prefault.stop()
        msg = stream.recv_body(h, self.npages,
                               mem=self.memory if h.command in DATA_COMMANDS else None,
                               ram=self.ram)
        handler = getattr(self, "_on_" + h.command.name.lower())
        handler(msg, stream)
        self.state = nxt
        return nxt

    def _next_header(self, stream: Stream) -> Header:
        """The next message's header: from the stream, or, once the guest
        runs in postcopy, from the page server, which places every page
        message before it."""
        if self.state != State.POSTCOPY_ACTIVE:
            return stream.recv_header()
        return self.server.wait() if self.server.serving else self.server.serve()

    def run(self, stream: Stream) -> dict:
        """Drive the state machine to COMPLETE. On any failure: ERROR to the
        peer (best effort), state FAILED, MigrationError raised (PostcopyFailed
        once the guest ran here: then it is paused)."""
        try:
            while self.state != State.COMPLETE:
                self.step(stream)
        except PeerError as e:
            self.state = State.FAILED
            self.error = str(e)
            self._postcopy_failed()
            raise
        except MigrationError as e:
            self.state = State.FAILED
            self.error = str(e)
            self._postcopy_failed(stream, str(e))
            raise
        except Exception as e:
            self.state = State.FAILED
            self.error = f"migration failed on the destination: {reason(e)}"
            self._postcopy_failed(stream, f"destination failed: {reason(e)}")
            raise MigrationError(self.error) from e
        finally:
            self.finished.set()
        return self.stats

    def _postcopy_failed(self, stream: Stream | None = None, message: str = "") -> None:
        """Tell the source (ERROR, when stream is given). After the switch:
        stop serving first; once the guest resumed here, hold it (its missing
        pages stay missing) and raise PostcopyFailed saying so."""
        if self.server is not None:
            self.server.stop()
        if stream is not None:
            self._send_error(stream, message)
        if self.server is None or self.resumed_at is None:
            return                      # never resumed: a plain failure
        what = self.error
        held = "the guest is paused (postcopy-paused)"
        if self.pause is not None:
            try:
                self.pause()
            except Exception as e:
                held = f"the guest could not be paused ({reason(e)})"
        else:
            held = "nothing pauses the guest here"
        missing = self.server.missing
        self.error = (f"postcopy failed after the guest resumed here: {what}; {held}, "
                      f"{missing} pages are still missing and stay so (a touch of one "
                      f"waits; the guest never reads one as zero)")
        raise PostcopyFailed(self.error)

    @staticmethod
    def _send_error(stream: Stream, message: str) -> None:
        try:
            stream.send(error(message))
        except Exception:
            pass

    # -- handlers ----------------------------------------------------------
    def _note(self, msg: Ranges) -> None:
        if self.holdings is not None:
            self.holdings.note(msg.command, msg.starts, msg.counts)

    def _on_hello(self, hello: Hello, stream: Stream) -> None:
        if hello.page_size != PAGE_SIZE:
            raise HelloRefused(f"HELLO: page size {hello.page_size}, this hv uses {PAGE_SIZE}")
        if hello.mem_size != self.memory.size:
            raise HelloRefused(
                f"HELLO: the source guest has {hello.mem_size >> 20} MiB of memory, this "
                f"destination {self.memory.size >> 20} MiB; start run-guest --incoming with "
                f"the same --mem")
        if hello.channels < 1 or hello.channel >= hello.channels:
            raise ProtocolError(f"HELLO: channel {hello.channel} of {hello.channels}")
        if self.secondary is None:
            self.secondary = hello.channel != 0
            self.table = SECONDARY_TRANSITIONS if self.secondary else TRANSITIONS
        if (hello.channel != 0) != self.secondary:
            raise ProtocolError(f"HELLO: channel {hello.channel} on a "
                                f"{'secondary' if self.secondary else 'primary'} connection")
        if hello.features & ~FEATURES:
            raise HelloRefused(f"HELLO: unknown features {hello.features & ~FEATURES:#x}")
        if self.admit is not None:
            self.admit(self, hello)
        self.hello = hello
        if hello.features & FEATURE_VERIFY and not self.secondary:
            self.page_hashes = np.full(self.npages, pages.ZERO_PAGE_HASH, dtype=np.uint64)
        if hello.features & FEATURE_POSTCOPY and not self.secondary:
            self.holdings = Holdings(self.memory)
        stream.send(ack(Command.HELLO))

    def _record_hashes(self, msg: Ranges, value: int | None = None) -> None:
        if self.page_hashes is None:
            return
        t0 = time.monotonic()
        pfns = pages.range_pfns(msg.starts, msg.counts)
        self.page_hashes[pfns] = (pages.hashes(self.memory, msg.starts, msg.counts)
                                  if value is None else np.uint64(value))
        self.stats["verify_ms"] = self.stats.get("verify_ms", 0.0) + \
            (time.monotonic() - t0) * 1000

    def _on_memory(self, msg: Ranges, stream: Stream) -> None:
        # The stream already put the data into guest memory (recv_body with mem).
        self.stats["pages"] += msg.npages
        self.stats["bytes"] += msg.npages * PAGE_SIZE
        self._record_hashes(msg)
        self._note(msg)

    _on_memory_zstd = _on_memory       # decompressed into guest memory by the stream

    def _on_zero(self, msg: Ranges, stream: Stream) -> None:
        pages.fill(self.memory, msg.starts, msg.counts, 0, discard=True)
        self.stats["zero_pages"] += msg.npages
        self._record_hashes(msg, pages.ZERO_PAGE_HASH)
        self._note(msg)

    def _on_fill(self, msg: Ranges, stream: Stream) -> None:
        pages.fill(self.memory, msg.starts, msg.counts, msg.pattern, discard=True)
        self.stats["fill_pages"] += msg.npages
        self._record_hashes(msg, pages.fill_page_hash(msg.pattern))
        self._note(msg)

    def _on_free(self, msg: Ranges, stream: Stream) -> None:
        # Whatever the page held is undefined at the source: drop our copy
        # (MADV_DONTNEED), which frees its host memory and leaves a zero page.
        pages.fill(self.memory, msg.starts, msg.counts, 0, discard=True)
        self.stats["free_pages"] += msg.npages
        self._record_hashes(msg, pages.ZERO_PAGE_HASH)
        self._note(msg)

    def _on_state(self, msg, stream: Stream) -> None:
        self.machine_state = decode_state(msg.payload)

    def _on_verify(self, msg: Ranges, stream: Stream) -> None:
        self._wait_secondaries()
        if self.page_hashes is not None:
            mine = self.page_hashes[pages.range_pfns(msg.starts, msg.counts)]
        else:
            mine = pages.hashes(self.memory, msg.starts, msg.counts)
        bad = np.nonzero(mine != msg.hashes)[0]
        if len(bad):
            # Map the first bad index back to its pfn.
            ends = np.cumsum(msg.counts.astype(np.int64))
            i = int(bad[0])
            r = int(np.searchsorted(ends, i, side="right"))
            pfn = int(msg.starts[r]) + i - (int(ends[r - 1]) if r else 0)
            self.verified = False
            raise MigrationError(f"verify: {len(bad)} of {len(mine)} pages differ from the "
                                 f"source (first at pfn {pfn:#x}); the guest was not resumed")
        self.verified = True
        self.stats["verified_pages"] = len(mine)

    def _on_postcopy(self, msg: Ranges, stream: Stream) -> None:
        if self.holdings is None:
            raise ProtocolError("POSTCOPY, but the source's HELLO did not announce postcopy")
        if not isinstance(stream, SocketStream):
            raise ProtocolError("postcopy needs a plain TCP connection (not TLS)")
        self.fetch.append((msg.starts, msg.counts))
        if self.state != State.MEMORY:
            return      # paused there: the pages dirtied since the first
        # The first, sent while the guest still runs on the source: drop its
        # pages now, the slow part of the switch. Over one connection nothing
        # sent before it lands after it; other connections may still hold
        # older copies of these pages, so with them the switch drops them all.
        if self.hello.channels == 1:
            self.dropped = pages.empty_bitmap(self.memory.npages)
            pages.assign_ranges(self.dropped, msg.starts, msg.counts, 1)
            drop_pages(self.memory, self.dropped)
        stream.send(ack(Command.POSTCOPY))

    def _postcopy_switch(self, stream: Stream) -> None:
        """COMPLETE after POSTCOPY: RAM under userfaultfd, the page server
        running, then restore and resume; RUNNING goes out through the server."""
        self._wait_secondaries()
        if self.machine_state is None:
            raise ProtocolError("COMPLETE before STATE")
        t0 = time.monotonic()
        server = PageServer(self.memory, stream.fd, self.holdings, self.page_hashes,
                            stream.timeout)
        self.server = server
        self.stats["postcopy_fetch_pages"] = server.switch(self.fetch, self.dropped)
        self.stats["postcopy_zero_known"] = server.zero_known
        self.stats["postcopy_switch_ms"] = server.switch_ms
        server.start()
        self._restore_and_resume()
        self.resumed_at = time.monotonic()
        self.stats["restore_ms"] = round((self.resumed_at - t0) * 1000, 3)
        server.write(Header(Command.RUNNING, 0).pack())
        if self.on_postcopy is not None:
            self.on_postcopy(self)

    def _restore_and_resume(self) -> None:
        if self.restore is not None:
            try:
                self.restore(self.machine_state)
            except Exception as e:
                raise MigrationError(f"restoring the machine state failed: {reason(e)}") from e
        if self.resume is not None:
            self.resume()

    def _postcopy_done(self, stream: Stream) -> None:
        """COMPLETE in postcopy: every page must be here; DONE tells the source."""
        if self.require_verify and not self.verified:
            raise MigrationError("verification was required but the source sent no VERIFY")
        self.stats["postcopy"] = self.server.stats()
        done = done_message(self.server.pc.st, self.stats["postcopy"]["requests"])
        self.server.finish()
        self.completed_at = time.monotonic()
        stream.send(done)

    def _on_complete(self, msg, stream: Stream) -> None:
        if self.secondary:
            return
        if self.state == State.POSTCOPY:
            return self._postcopy_switch(stream)
        if self.state == State.POSTCOPY_ACTIVE:
            return self._postcopy_done(stream)
        self._wait_secondaries()
        if self.require_verify and not self.verified:
            raise MigrationError("verification was required but the source sent no VERIFY")
        if self.machine_state is None:
            raise ProtocolError("COMPLETE before STATE")
        t0 = time.monotonic()
        self._restore_and_resume()
        self.stats["restore_ms"] = round((time.monotonic() - t0) * 1000, 3)
        self.completed_at = time.monotonic()
        stream.send(Control(Command.RUNNING))

    def add_secondary(self, sub: "Receiver") -> None:
        """Another connection of this migration (it runs sub.run itself)."""
        sub.page_hashes = self.page_hashes
        sub.holdings = self.holdings
        with self._secondaries_changed:
            self.secondaries.append(sub)
            self._secondaries_changed.notify_all()

    def _wait_secondaries(self, timeout: float = 120.0) -> None:
        """Every other connection HELLO announced has come and sent COMPLETE."""
        if self._secondaries_counted:
            return
        want = self.hello.channels - 1 if self.hello else 0
        deadline = time.monotonic() + timeout
        with self._secondaries_changed:
            while len(self.secondaries) < want:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MigrationError(f"only {len(self.secondaries) + 1} of the "
                                         f"{want + 1} connections of the migration came")
                self._secondaries_changed.wait(left)
            subs = list(self.secondaries)
        for r in subs:
            r.finished.wait(max(0.0, deadline - time.monotonic()))
            if r.state != State.COMPLETE:
                raise MigrationError(f"a secondary connection ended in state {r.state.name}: "
                                     f"{r.error or 'no COMPLETE'}")
            for k in ("pages", "zero_pages", "fill_pages", "free_pages", "bytes"):
                self.stats[k] += r.stats[k]
        self._secondaries_counted = True


class HelloRefused(ProtocolError):
    """A well-formed HELLO of a source this destination cannot take (page size,
    memory size, features): the destination was started for another guest."""


class Prefault:
    """Faults in all of guest RAM on a thread (GuestMemory.populate) while the
    destination waits for the source. stop() ends it and waits for the step
    in progress, so that afterwards nothing but the stream touches memory."""

    def __init__(self, memory):
        self._stop = threading.Event()
        self.thread = threading.Thread(target=memory.populate, args=(self._stop,),
                                       name="hv-prefault", daemon=True)

    def start(self) -> "Prefault":
        if self.thread is not None:
            self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None and self.thread.ident is not None:
            self.thread.join()


HANDSHAKE_TIMEOUT = 5.0     # seconds a new connection has to send its HELLO


class _Connections:
    """The connections one receive() accepts, each on its own thread so that
    none can hold up another. A connection must send a valid HELLO within the
    handshake timeout or it is dropped. The first admitted HELLO of channel 0
    binds the session; after that only the other channels of that session are
    admitted (each once, up to the announced count); anyone else gets ERROR
    at once and is closed."""

    def __init__(self, memory, restore, resume, *, timeout, handshake_timeout,
                 require_verify, log, prefault, tls=None, pause=None, on_postcopy=None):
        self.memory, self.restore, self.resume = memory, restore, resume
        self.pause, self.on_postcopy = pause, on_postcopy
        self.tls = tls                          # hv.tls.TlsCredentials: TLS only
        self.tls_context = tls.server_context() if tls is not None else None
        self.timeout = timeout
        self.handshake_timeout = min(handshake_timeout, timeout)
        self.require_verify, self.log, self.prefault = require_verify, log, prefault
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.decided = threading.Event()        # primary found, or a fatal refusal
        self.primary: tuple[Receiver, SocketStream] | None = None
        self.fatal: MigrationError | None = None
        self.bound: Receiver | None = None      # connection 0's receiver, once admitted
        self.session: Hello | None = None
        self.channels_seen: set[int] = set()
        self.socks: set[socket.socket] = set()
        self.admitted: list[SocketStream] = []

    def accept_loop(self, listener: socket.socket) -> None:
        listener.settimeout(0.2)
        while not self.closing.is_set():
            try:
                conn, peer = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn, peer),
                             name="hv-migrate-rx-conn", daemon=True).start()

    def _admit(self, rx: Receiver, hello: Hello) -> None:
        with self.lock:
            if self.closing.is_set():
                raise MigrationError("this destination has stopped receiving")
            if self.bound is None:
                if hello.channel != 0:
                    raise ProtocolError(f"HELLO: connection {hello.channel} of session "
                                        f"{hello.session:#x}, but no migration is being "
                                        f"received (connection 0 comes first)")
                self.bound, self.session, self.channels_seen = rx, hello, {0}
                return
            b = self.session
            if (hello.session == b.session and hello.channels == b.channels
                    and hello.channel not in self.channels_seen):
                self.channels_seen.add(hello.channel)
                self.bound.add_secondary(rx)
                return
        raise MigrationError(f"a migration (session {b.session:#x}) is already being "
                             f"received; this destination accepts one source at a time")

    def _connection(self, conn: socket.socket, peer) -> None:
        with self.lock:
            if self.closing.is_set():
                conn.close()
                return
            self.socks.add(conn)
        where = f"{peer[0]}:{peer[1]}"
        stream = SocketStream(conn, timeout=self.handshake_timeout)
        tls = None
        try:
            tune_socket(conn, self.timeout)
            tls = self._tls(conn, stream, where)
            if tls is None:
                return
            if tls is not conn:
                with self.lock:
                    self.socks.add(tls)
                stream = TlsStream(tls, timeout=self.handshake_timeout, peer="source")
            rx = Receiver(self.memory, self.restore, self.resume, secondary=None,
                          require_verify=self.require_verify, log=self.log,
                          prefault=self.prefault, admit=self._admit, pause=self.pause,
                          on_postcopy=self.on_postcopy)
            try:
                rx.step(stream)                 # HELLO, admitted or refused
            except MigrationError as e:
                self.log(f"refused the connection from {where}: {e}")
                if not isinstance(e, PeerError):
                    Receiver._send_error(stream, str(e))
                with self.lock:
                    if isinstance(e, HelloRefused) and self.bound is None:
                        self.fatal = e
                        self.decided.set()
                return
            stream.timeout = self.timeout
            with self.lock:
                self.admitted.append(stream)
            if not rx.secondary:
                self.log(f"incoming migration from {where}")
                with self.lock:
                    self.primary = (rx, stream)
                self.decided.set()
                stream = None                   # receive() runs and closes it
                return
            try:
                rx.run(stream)
            except MigrationError:
                pass                            # rx.error: connection 0 reports it
        except Exception as e:                  # never let a connection end unexplained
            self.log(f"connection from {where} failed: {reason(e)}")
        finally:
            if stream is not None:
                with self.lock:
                    self.socks.discard(conn)
                    self.socks.discard(tls)
                stream.close()

    def _tls(self, conn: socket.socket, stream: SocketStream, where: str):
        """The connection to speak hv over: conn itself without credentials,
        its TLS wrapping with them; None when it was refused (logged; the
        caller closes it). The first byte says which the source speaks."""
        conn.settimeout(self.handshake_timeout)
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except OSError as e:
            self.log(f"dropped the connection from {where}: {ssl_reason(e)}")
            return None
        if not first:
            return None
        is_tls = first[0] == TLS_HANDSHAKE_BYTE
        if self.tls is None:
            if is_tls:
                self.log(f"refused the connection from {where}: the source speaks TLS; start "
                         f"this destination with --tls-dir (or set tls-creds before "
                         f"migrate-incoming)")
                return None
            return conn
        if not is_tls:
            msg = "this destination accepts only TLS migrations: set tls-creds on the source"
            self.log(f"refused the connection from {where}: {msg}")
            Receiver._send_error(stream, msg)   # in plain text: the source reads it
            return None
        try:
            tls = self.tls_context.wrap_socket(conn, server_side=True)
        except (OSError, ValueError) as e:
            self.log(f"refused the connection from {where}: TLS handshake failed: "
                     f"{ssl_reason(e)}")
            return None
        why = self.tls.authorize(tls.getpeercert())
        if why is not None:
            self.log(f"refused the connection from {where}: {why}")
            Receiver._send_error(TlsStream(tls, timeout=1.0), f"this destination refused "
                                 f"the source: {why}")
            tls.close()
            return None
        return tls

    def wait_primary(self, accept_timeout, should_stop) -> tuple[Receiver, SocketStream]:
        deadline = None if accept_timeout is None else time.monotonic() + accept_timeout
        while True:
            # Short waits so that a shutdown request ends the wait.
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                raise MigrationError(f"no migration arrived within {accept_timeout:g} s")
            if self.decided.wait(left):
                with self.lock:
                    if self.primary is not None:
                        return self.primary
                    raise self.fatal
            if should_stop is not None and should_stop():
                raise MigrationError("stopped while waiting for the incoming migration")

    def close(self, acceptor: threading.Thread) -> None:
        """Stop accepting; wake every connection still running (each closes its own)."""
        self.closing.set()
        acceptor.join()
        with self.lock:
            socks = list(self.socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def receive(memory, listener: socket.socket, restore=None, resume=None, *,
            timeout: float = 60.0, accept_timeout: float | None = None,
            handshake_timeout: float = HANDSHAKE_TIMEOUT, require_verify: bool = False,
            log=None, should_stop=None, prefault: Prefault | None = None, tls=None,
            on_receiving: Callable[[Receiver], None] | None = None,
            pause: Callable[[], None] | None = None,
            on_postcopy: Callable[[Receiver], None] | None = None) -> Receiver:
    """Accept a migration on `listener` and drive it to COMPLETE (restore,
    resume, RUNNING). Returns the Receiver; raises MigrationError.
    on_receiving(receiver), when given, is called once the source's first
    connection is admitted (its receiver's stats then grow as pages arrive).
    In postcopy: on_postcopy(receiver) once the guest runs here, pause() when
    the migration fails after that (PostcopyFailed is raised).

    Connections are accepted on a thread while the migration runs: one that
    sends no HELLO within handshake_timeout is dropped, one of another source
    is refused with ERROR (see _Connections); timeout bounds every later read."""
    log = log or (lambda msg: None)
    conns = _Connections(memory, restore, resume, timeout=timeout,
                         handshake_timeout=handshake_timeout, require_verify=require_verify,
                         log=log, prefault=prefault, tls=tls, pause=pause,
                         on_postcopy=on_postcopy)
    acceptor = threading.Thread(target=conns.accept_loop, args=(listener,),
                                name="hv-migrate-accept", daemon=True)
    acceptor.start()
    stream = None
    try:
        rx, stream = conns.wait_primary(accept_timeout, should_stop)
        if on_receiving is not None:
            on_receiving(rx)
        rx.run(stream)
        with conns.lock:
            rx.stats["bytes_received"] = sum(s.bytes_in for s in conns.admitted)
        return rx
    finally:
        conns.close(acceptor)
        if stream is not None:
            stream.close()


def incoming(machine, uri: str, *, timeout: float = 60.0, accept_timeout: float | None = None,
             require_verify: bool = False, verbose: bool = True, on_listening=None,
             prefault: bool = True, on_receiving=None, tls=None, on_postcopy=None) -> dict:
    """Receive a migrating guest into `machine` (created, not booted).

    Listens on uri (tcp:HOST:PORT), accepts the source's connection(s),
    receives the pages into machine.memory, then machine.restore_state(state)
    and starts its vCPUs, and answers RUNNING. Returns statistics. Raises
    MigrationError (an HvError: the CLI prints it and exits non-zero) when
    the stream is malformed or the connection drops; nothing is resumed then.
    In postcopy the guest resumes at the switch (on_postcopy(receiver) is
    called then); a failure after it pauses the guest (hold "postcopy") and
    raises PostcopyFailed.

    With prefault, a thread faults in all of guest RAM while the receiver
    waits for the source (like QEMU's -mem-prealloc), so that page data later
    lands in memory that is already mapped instead of paying a page fault per
    page on the critical path. The prefault stops when the source's first
    message after HELLO arrives; the pages the source then calls FREE (or
    ZERO) are discarded again, so they cost the destination no memory.
    """
    def log(msg):
        if verbose:
            print(f"hv: {msg}", file=sys.stderr, flush=True)

    machine.status = "inmigrate"
    listener = listen(uri)
    prefaulter = Prefault(machine.memory).start() if prefault else None
    try:
        host, port = listener.getsockname()[:2]
        log(f"incoming migration listening on {format_uri(host, port)}")
        log(f"waiting for an incoming migration on {host}:{port}")
        if on_listening:
            on_listening(host, port)
        t0 = time.monotonic()
        rx = receive(machine.memory, listener, machine.restore_state, machine.start,
                     timeout=timeout,
                     accept_timeout=accept_timeout, require_verify=require_verify, log=log,
                     should_stop=lambda: machine.status == "shutdown",
                     prefault=prefaulter, on_receiving=on_receiving, tls=tls,
                     pause=lambda: machine.pause(PAUSE_POSTCOPY, timeout=1.0, keep=True),
                     on_postcopy=on_postcopy)
    finally:
        listener.close()
        if prefaulter is not None:
            prefaulter.stop()
    stats = dict(rx.stats)
    stats["verified"] = rx.verified
    stats["total_ms"] = round((time.monotonic() - t0) * 1000, 3)
    pc = stats.get("postcopy")
    tail = (f"; postcopy: {pc['pages_placed']} pages placed, {pc['requests']} asked for, "
            f"fault latency {pc['latency_mean_ms']} ms mean, {pc['latency_max_ms']} ms "
            f"worst" if pc else "")
    log(f"migration received: {stats['pages']} pages with data, {stats['zero_pages']} zero, "
        f"{stats['fill_pages']} filled, {stats['free_pages']} free{tail}; guest running")
    return stats


__all__ = ["HelloRefused", "PostcopyFailed", "Prefault", "Receiver", "State", "TRANSITIONS",
           "incoming", "receive", "VERSION"]
