"""The source side of live migration (precopy), skipping free pages.

    Migration(machine, MigrationParams(uri="tcp:HOST:PORT", ...)).start()

runs in a thread (the control command `migrate` starts it; `query-migrate`
reads its statistics, `migrate-cancel` stops it):

1. connect (`connections` TCP connections), HELLO/ACK;
2. dirty logging on (KVM bitmap with manual protect + KVM_CLEAR_DIRTY_LOG,
   or the dirty ring), *before* asking the guest for free pages, so a page
   allocated after the guest called it free shows up as dirty;
3. free page information per `free_pages`: "bitmap" (the balloon's snapshot
   of the guest's free lists), "hint" (standard free page hinting: the hints
   that arrived when each chunk of the bulk pass is sent), or "off";
4. bulk pass: every page that is neither free nor zero is sent with its data,
   zero pages as ranges without data, free pages not at all (or as FILL
   ranges with the guest's PAGE_POISON value);
5. dirty rounds (KVM's log OR the VMM's own bitmap) until what remains fits
   downtime_ms at the measured bandwidth, or max_rounds;
6. pause the vCPUs, save the machine state, send the last dirty pages, STATE,
   (VERIFY), COMPLETE; wait for RUNNING; only then the source stops.
   With postcopy (hv.migration.postcopy) the switch replaces this step when
   asked for (start_postcopy(), QMP migrate-start-postcopy), after
   postcopy_after_rounds dirty rounds, or when the rounds run out: pause,
   the state, the pages still to fetch; the guest resumes on the
   destination, which fetches them on demand while the rest follows.

Any failure (connection lost, refused, timeout, cancel) resumes the source
guest and reports why: status "failed" or "cancelled" with `error`; except
after a postcopy switch, once the destination runs the guest: then the
source stays in postmigrate, keeping the guest's memory (see
hv.migration.postcopy).
Per-page work happens in hv._pages (classification, run scans, writev).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .. import params
from ..memory import PAGE_SIZE, bitmap_words
from . import pages
from .compression import COMPRESSION_MODES, DEFAULT_LEVEL, MAX_LEVEL, MIN_LEVEL, Compression
from .protocol import (
    FEATURE_POSTCOPY, FEATURE_VERIFY, FEATURES, Command, Control, Hello, MigrationError,
    PeerError, ProtocolError, Ranges, cancel as cancel_msg, error as error_msg)
from .contract import KvmSourceMachine, SourceMachine
from .dirty_limit import DirtyLimit
from .dirty_log import dirty_log_for
from .state_codec import state_message
from .transport import SocketStream, TlsStream, connect, parse_uri, queued_bytes, tls_client
from ..vmm import PAUSE_MIGRATION, PAUSE_USER

BATCH_PAGES = 2048          # pages per MEMORY message (8 MiB)
DRAIN_BYTES = 256 << 10     # what may still wait in a send queue when the guest pauses
CHUNK_PAGES = 16384         # bulk pass granularity (64 MiB)
STRIPE_WORDS = 8            # connections stripe memory in 512-page blocks


class Cancelled(MigrationError):
    pass


DIRTY_LOGS = ("auto", "bitmap", "ring", "vmm")
FREE_PAGE_MODES = ("bitmap", "hint", "off")
#: with the free page bitmap: what the guest drops before its snapshot
#: (Liang Li's 2016 drop-cache request): clean page cache, or that and slab
DROP_CACHES = ("none", "pagecache", "all")
#: what a migration does when the rest cannot be sent within downtime_ms:
#: cancel (and resume the source), force (pause anyway, and say so), or
#: iterate (keep sending rounds past max_rounds until it fits or is cancelled)
DOWNTIME_STRATEGIES = ("cancel", "force", "iterate")
MAX_DOWNTIME_MS = 2_000_000         # QEMU's downtime-limit maximum


def _tls_credentials(name: str, value):
    """hv.params check of MigrationParams.tls: credentials or None."""
    from ..tls import TlsCredentials
    if value is not None and not isinstance(value, TlsCredentials):
        raise params.ParameterError(f"'{name}' expects TLS credentials (hv.tls.TlsCredentials); "
                                    f"over QMP: object-add a tls-creds-x509 and set tls-creds")
    if value is not None and value.endpoint == "server":
        raise params.ParameterError(f"'{name}': credentials of endpoint 'server' cannot "
                                    f"start a migration; the source needs endpoint 'client'")
    return value


@dataclass
class MigrationParams:
    uri: str
    free_pages: str = "bitmap"          # FREE_PAGE_MODES
    downtime_ms: float = 300.0
    downtime_strategy: str = "cancel"   # DOWNTIME_STRATEGIES
    max_bandwidth_mib: float = 0.0      # MiB/s over all connections; 0 = unlimited.
                                        # Only while the guest runs: paused (the
                                        # stop-and-copy), it goes as fast as the link
                                        # does, as QEMU's does
    max_postcopy_bandwidth_mib: float = 0.0     # postcopy's background push (QEMU's
                                                # max-postcopy-bandwidth); 0 = unlimited
    connections: int = 1
    max_rounds: int = 30
    verify: bool = False
    dirty_log: str = "auto"             # auto: the ring when the machine has one, else
                                        # the bitmap; "vmm": no KVM (tests)
    timeout_s: float = 60.0             # any single send/receive
    free_page_timeout_ms: int = 30000   # waiting for the balloon's bitmap
    drop_cache: str = "none"            # bitmap: what the guest drops first (DROP_CACHES)
    hint_wait_ms: int = 0               # let hints arrive before the bulk pass
    progress: bool = False              # a status line on stderr
    shutdown_source: bool = True        # stop the source machine when completed
    linger_ms: int = 0                  # ... after someone read the final statistics
                                        # (query-migrate) or this long at most
                                        # (the migrate command: 3000)
    on_paused: object = None            # callback(machine) right after the pause (tests, --verify)
    #: auto-converge (QEMU's capability and parameter names and defaults): when
    #: a round's dirtying outpaces what it sent twice, throttle the vCPUs
    auto_converge: bool = False
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    max_cpu_throttle: int = 99
    #: dirty-limit (QEMU's capability and vcpu-dirty-limit, MB/s, default 1):
    #: with dirty rings, once the same trigger fires, each vCPU is throttled
    #: on its own to keep its dirty rate at the limit (hv.migration.dirty_limit)
    dirty_limit: bool = False
    vcpu_dirty_limit: int = 1
    #: the data pages on the wire: none, zstd (every batch), auto (while the
    #: link is slower than the compressor makes up for; hv.migration.compression)
    compression: str = "none"
    compression_level: int = DEFAULT_LEVEL
    tls: object = None                  # hv.tls.TlsCredentials: every connection over TLS
    tls_hostname: str = ""              # the name the destination's certificate must carry
                                        # ("": the URI's host)
    #: postcopy (QEMU's postcopy-ram): the switch may replace the final pause
    postcopy: bool = False
    #: switch by itself after this many dirty rounds (-1: only when asked)
    postcopy_after_rounds: int = -1

    #: how each argument of the migrate command is checked (hv.params)
    CHECKS = {
        "uri": (params.string,),
        "free_pages": (params.choice, FREE_PAGE_MODES),
        "downtime_ms": (params.number, 1, MAX_DOWNTIME_MS),
        "downtime_strategy": (params.choice, DOWNTIME_STRATEGIES),
        "max_bandwidth_mib": (params.number, 0, 1 << 30),
        "max_postcopy_bandwidth_mib": (params.number, 0, 1 << 30),
        "connections": (params.integer, 1, 64),
        "max_rounds": (params.integer, 0, 100_000),
        "verify": (params.boolean,),
        "dirty_log": (params.choice, DIRTY_LOGS),
        "timeout_s": (params.number, 0.001, 86400),
        "free_page_timeout_ms": (params.integer, 0, 3_600_000),
        "drop_cache": (params.choice, DROP_CACHES),
        "hint_wait_ms": (params.integer, 0, 3_600_000),
        "progress": (params.boolean,),
        "shutdown_source": (params.boolean,),
        "linger_ms": (params.integer, 0, 3_600_000),
        "auto_converge": (params.boolean,),
        "cpu_throttle_initial": (params.integer, 1, 99),
        "cpu_throttle_increment": (params.integer, 1, 99),
        "max_cpu_throttle": (params.integer, 1, 99),
        "dirty_limit": (params.boolean,),
        "vcpu_dirty_limit": (params.integer, 1, 1_000_000),
        "compression": (params.choice, COMPRESSION_MODES),
        "compression_level": (params.integer, MIN_LEVEL, MAX_LEVEL),
        "tls": (_tls_credentials,),
        "tls_hostname": (params.string,),
        "postcopy": (params.boolean,),
        "postcopy_after_rounds": (params.integer, -1, 100_000),
    }

    @classmethod
    def from_args(cls, args: dict) -> "MigrationParams":
        """The migrate command's arguments, each checked for type and range
        (ParameterError names the first bad one) before anything starts."""
        checked = {"linger_ms": 3000}
        try:
            params.refuse_unknown("migrate", args, cls.CHECKS)
            for name, (check, *extra) in cls.CHECKS.items():
                if name in args or name == "uri":
                    checked[name] = params.take(args, name, check, *extra)
        except params.ParameterError as e:
            raise MigrationError(str(e)) from None
        parse_uri(checked["uri"])
        if checked.get("postcopy") and checked.get("tls") is not None:
            raise MigrationError("postcopy cannot run over TLS in hv: the destination serves "
                                 "page faults from the raw connection; turn one of them off")
        return cls(**checked)


# ---------------------------------------------------------------- migration

@dataclass
class Stats:
    status: str = "setup"
    round: int = 0
    bytes_sent: int = 0
    pages_total: int = 0
    pages_sent: int = 0
    pages_skipped_free: int = 0
    pages_skipped_zero: int = 0
    pages_filled: int = 0
    throughput_mib_s: float = 0.0
    expected_downtime_ms: float | None = None
    total_time_ms: float = 0.0
    downtime_ms: float | None = None
    #: where the downtime went: pause, save, final_sync, final_send, verify, complete
    downtime_parts: dict | None = None
    downtime_limit_ms: float = 0.0
    #: the downtime went over downtime_limit_ms (forced, or mis-estimated)
    downtime_exceeded: bool = False
    #: final phases given up because the estimate after the pause did not fit
    pause_rollbacks: int = 0
    setup_ms: float = 0.0
    dirty_syncs: int = 0
    dirty_log: str = ""
    free_pages: str = "off"
    free_page_info: dict | None = None
    rounds: list = field(default_factory=list)
    remaining_pages: int = 0
    verified: bool | None = None
    #: time spent hashing pages for verify, all of it but the final round's
    #: while the guest runs
    verify_ms: float = 0.0
    #: the vCPUs' throttle now (auto-converge), percent
    cpu_throttle_percentage: int = 0
    #: what compression did (Compression.info()), with compression on
    compression: dict | None = None
    #: dirty-limit's per-vCPU rates and throttles (DirtyLimit.info()), once on
    dirty_limit: dict | None = None
    #: pages of the guest's kernel image sent while it built its free page bitmap
    pages_sent_before_bitmap: int = 0
    #: postcopy: switched; pages the destination was to fetch at the switch;
    #: REQUEST messages answered and the pages they asked for; pages pushed
    #: in the background; bytes sent after the switch
    postcopy: bool = False
    postcopy_pages: int = 0
    postcopy_requests: int = 0
    postcopy_pages_requested: int = 0
    postcopy_pages_pushed: int = 0
    postcopy_bytes: int = 0
    #: request arrival to answer sent, here (ms)
    postcopy_service_ms_mean: float | None = None
    postcopy_service_ms_max: float | None = None
    #: the destination's figures (DONE): faults it asked for, and the time
    #: from each fault to its page in place (ms)
    postcopy_faults: int | None = None
    fault_latency_ms_mean: float | None = None
    fault_latency_ms_max: float | None = None
    #: from the switch to DONE
    postcopy_ms: float | None = None
    warning: str | None = None
    error: str | None = None


#: what the last part of the downtime costs beyond sending pages: the machine
#: state, the destination's restore and resume, RUNNING coming back. A first
#: guess, replaced by what a rolled-back final phase measured.
TAIL_ESTIMATE_MS = 10.0
#: first guess of pausing the vCPUs, saving the state and the final sync
PAUSE_ESTIMATE_MS = 10.0

FINAL_STATUSES = ("completed", "failed", "cancelled")
#: pages of the kernel image per message while the free page bitmap is coming
RESIDENT_CHUNK_PAGES = 1024


class FreePages:
    """The free page bitmap (or hints), asked for on a thread of its own so
    that the migration goes on while the guest builds it."""

    def __init__(self, ask):
        self._box: dict = {}
        self._thread = threading.Thread(target=self._run, args=(ask,),
                                        name="hv-migrate-free-pages", daemon=True)
        self._thread.start()

    def _run(self, ask) -> None:
        try:
            self._box["free"] = ask()
        except BaseException as e:      # raised again on the migration's thread
            self._box["error"] = e

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> np.ndarray | None:
        """The free pages (None: none are skipped), once the guest answered."""
        self._thread.join()
        if "error" in self._box:
            raise self._box["error"]
        return self._box["free"]


class Migration:
    """One outgoing live migration of `machine`.

    listeners: fn(event, data) for every ("MIGRATION", {"status": s}) and
    ("MIGRATION_PASS", {"pass": n}), called from the migration's thread."""

    def __init__(self, machine: SourceMachine, params: MigrationParams):
        self.machine = machine
        self.p = params
        self.memory = machine.memory
        self.npages = self.memory.npages
        self.s = Stats(pages_total=self.npages, free_pages=params.free_pages,
                       downtime_limit_ms=params.downtime_ms)
        self.streams: list[SocketStream] = []
        self.thread: threading.Thread | None = None
        self.listeners: list = []
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._queried_final = threading.Event()
        self._t0 = None
        self._holding_pause = False
        self._complete_sent = False
        self._storage_released = False
        self._lock = threading.Lock()
        self._balloon = None
        self._rtt_ms = 0.0
        self._pause_cost_ms = PAUSE_ESTIMATE_MS
        self._tail_ms = TAIL_ESTIMATE_MS
        self._dirty_rate_high = 0
        self._compression = Compression(params.compression, params.compression_level)
        self._postcopy_asked = threading.Event()
        self._postcopy_source = None
        if params.auto_converge and not isinstance(machine, KvmSourceMachine):
            raise MigrationError("auto-converge throttles vCPUs: this machine has none")
        # per-page hashes of what the destination holds, kept up to date as
        # pages are sent (verify), so the pause only hashes the final round
        self._hashes = np.zeros(self.npages, dtype=np.uint64) if params.verify else None
        self.log = dirty_log_for(machine, params.dirty_log)
        self.s.dirty_log = self.log.kind
        self._dirty_limit: DirtyLimit | None = None
        if params.dirty_limit:
            if params.auto_converge:
                raise MigrationError("dirty-limit and auto-converge throttle the same vCPUs: "
                                     "turn one of them off (QEMU refuses both as well)")
            if self.log.kind != "ring":
                raise MigrationError("dirty-limit reads each vCPU's dirty rate from its dirty "
                                     "ring: start the guest with run-guest --dirty-ring BYTES")

    # -- control ----------------------------------------------------------
    def start(self) -> "Migration":
        self.thread = threading.Thread(target=self.run, name="hv-migrate", daemon=True)
        self.thread.start()
        if self.p.progress:
            threading.Thread(target=self._progress, name="hv-migrate-progress",
                             daemon=True).start()
        return self

    def wait(self, timeout: float | None = None) -> dict:
        self._done.wait(timeout)
        return self.query()

    def cancel(self) -> None:
        """Ask the migration to stop; the source keeps (or resumes) running.
        Refused once COMPLETE is on its way: the destination may be resuming
        the guest, and only its answer can say whether it did."""
        if self._complete_sent and not self._done.is_set():
            raise MigrationError("too late to cancel: the source has sent everything and "
                                 "the destination is resuming the guest")
        self._cancel.set()
        if not self._done.is_set():
            self._set_status("cancelling")

        def force():
            if not self._done.wait(2.0):
                for st_ in list(self.streams):   # unblock a stuck send/receive
                    try:
                        st_.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        threading.Thread(target=force, daemon=True).start()

    def start_postcopy(self) -> None:
        """Switch to postcopy at the end of the current pass (QEMU's
        migrate-start-postcopy)."""
        if not self.p.postcopy:
            raise MigrationError("Enable postcopy with migrate_set_capability before the "
                                 "start of migration")
        if self._done.is_set() or self.s.status not in ("setup", "active"):
            raise MigrationError("Postcopy must be started after migration has been started")
        self._postcopy_asked.set()

    def query(self) -> dict:
        with self._lock:
            d = dict(self.s.__dict__)
            d["rounds"] = [dict(r) for r in self.s.rounds]
        if self._compression.enabled:
            d["compression"] = self._compression.info()
        if self._dirty_limit is not None:
            d["dirty_limit"] = self._dirty_limit.info()
            if self.s.status in FINAL_STATUSES:
                self._queried_final.set()
        if self._t0 is not None and not self._done.is_set():
            d["total_time_ms"] = round((time.monotonic() - self._t0) * 1000, 3)
        return d

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    # -- events ---------------------------------------------------------------
    def _emit(self, event: str, data: dict) -> None:
        for fn in list(self.listeners):
            try:
                fn(event, data)
            except Exception:
                pass

    def _set_status(self, status: str) -> None:
        with self._lock:
            changed = self.s.status != status
            self.s.status = status
        if changed:
            self._emit("MIGRATION", {"status": status})

    def _sync(self) -> np.ndarray:
        bm = self.log.sync()
        with self._lock:
            self.s.dirty_syncs += 1
            n = self.s.dirty_syncs
        self._emit("MIGRATION_PASS", {"pass": n})
        return bm

    # -- main ---------------------------------------------------------------
    def run(self) -> None:
        self._t0 = time.monotonic()
        self._emit("MIGRATION", {"status": "setup"})
        try:
            self._migrate()
        except Exception as e:
            self._fail(e)
        finally:
            try:
                self._end_throttle()    # the guest runs at full speed, here or there
            except Exception as e:
                self.s.warning = f"could not end the CPU throttle: {e}"
            self._finish_timing()
            self._done.set()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("migration cancelled")

    def _finish_timing(self) -> None:
        self.s.total_time_ms = round((time.monotonic() - self._t0) * 1000, 3)

    def _fail(self, e: Exception) -> None:
        cancelled = isinstance(e, Cancelled) or self._cancel.is_set()
        reason = "migration cancelled" if cancelled else str(e) or type(e).__name__
        if not isinstance(e, MigrationError) and not cancelled:
            reason = f"{type(e).__name__}: {e}"
        # A send that failed because the destination gave up: its ERROR may
        # be waiting in the receive buffer, and says why.
        peer_said = isinstance(e, PeerError)
        # (in postcopy the return path's reader has read whatever came)
        if self.streams and not cancelled and not peer_said and self._postcopy_source is None:
            try:
                st0 = self.streams[0]
                st0.timeout = 0.5
                msg = st0.recv(self.npages)
                if isinstance(msg, Control) and msg.command == Command.ERROR:
                    reason = f"the destination failed: {msg.text}"
                    peer_said = True
            except Exception:
                pass
        # Tell the destination (best effort), then close everything.
        if self.streams:
            try:
                st0 = self.streams[0]
                st0.timeout = 1.0
                st0.send(cancel_msg(reason) if cancelled else error_msg(reason))
            except Exception:
                pass
        self._close()
        try:
            self.log.stop()
        except Exception:
            pass
        pc = self._postcopy_source
        if pc is not None and pc.running.is_set():
            # The guest ran on the destination: it never runs here again.
            if self._holding_pause:
                self.machine.enter_postmigrate()
                self._holding_pause = False
            with self._lock:
                self.s.error = (f"postcopy failed after the guest resumed on the destination: "
                                f"{reason}; the source cannot resume it (its memory moved on "
                                f"there), so it stays in postmigrate and keeps the guest's "
                                f"memory; {pc.left} of the {self.s.postcopy_pages} pages to "
                                f"fetch had not been sent")
            self._set_status("failed")
            return
        if self._holding_pause:
            if self._storage_released and not (self._complete_sent and not peer_said):
                # The destination did not resume: the disks are ours again.
                try:
                    self.machine.lock_storage()
                    self._storage_released = False
                except Exception as le:
                    reason += (f"; the source cannot take its storage back ({le}), so it "
                               "stays paused")
                    self.machine.pause(PAUSE_USER)
            if self._complete_sent and not peer_said:
                # COMPLETE went out and no answer came: the destination may
                # run the guest. Never run it here too; leave the choice to
                # the user, as a user's pause that cont undoes.
                reason += ("; the destination got everything and may be running the guest, so "
                           "the source stays paused: check the destination, and cont here "
                           "only if it does not run the guest")
                self.machine.pause(PAUSE_USER)
            self.machine.resume(PAUSE_MIGRATION)
            self._holding_pause = False
        self._hint_done()
        with self._lock:
            self.s.error = reason
        self._set_status("cancelled" if cancelled else "failed")

    def _close(self) -> None:
        for st_ in self.streams:
            try:
                st_.close()
            except OSError:
                pass

    def _hint_done(self) -> None:
        if self._balloon is not None and self.p.free_pages == "hint":
            try:
                self._balloon.free_page_hint_done()
            except Exception:
                pass

    # -- connection -----------------------------------------------------------
    def _connect(self) -> None:
        session = int.from_bytes(os.urandom(8), "little")
        rate = int(self.p.max_bandwidth_mib * (1 << 20) / self.p.connections)
        for i in range(self.p.connections):
            sock = connect(self.p.uri, self.p.timeout_s)
            if self.p.tls is not None:
                hostname = self.p.tls_hostname or parse_uri(self.p.uri)[0]
                st_ = TlsStream(tls_client(sock, self.p.tls, hostname, self.p.timeout_s),
                                PAGE_SIZE, self.p.timeout_s, rate, peer="destination")
            else:
                st_ = SocketStream(sock, PAGE_SIZE, self.p.timeout_s, rate)
            self.streams.append(st_)
            t0 = time.monotonic()
            # FEATURE_VERIFY: VERIFY will come, hash pages as they arrive
            features = FEATURES if self.p.verify else FEATURES & ~FEATURE_VERIFY
            if not self.p.postcopy:
                features &= ~FEATURE_POSTCOPY
            st_.send(Hello(PAGE_SIZE, self.memory.size, features, self.p.connections, i,
                           session))
            reply = st_.recv(self.npages)
            if i == 0:
                self._rtt_ms = (time.monotonic() - t0) * 1000
            self._expect_ack(reply, Command.HELLO)

    @staticmethod
    def _expect_ack(reply, what: Command) -> None:
        if isinstance(reply, Control) and reply.command == Command.ERROR:
            raise PeerError(f"the destination refused the migration: {reply.text}")
        if not (isinstance(reply, Control) and reply.acked == what):
            raise ProtocolError(f"expected ACK of {what.name} from the destination, got "
                                f"{getattr(reply, 'command', reply)!r}")

    # -- sending page sets ------------------------------------------------------
    def _channel_masks(self) -> list[np.ndarray] | None:
        n = len(self.streams)
        if n == 1:
            return None
        words = bitmap_words(self.npages)
        owner = (np.arange(words) // STRIPE_WORDS) % n
        return [np.where(owner == c, ~np.uint64(0), np.uint64(0)).astype(np.uint64)
                for c in range(n)]

    def _send_set(self, bm: np.ndarray, rnd: dict) -> None:
        """Send every page set in bm (zero pages as ZERO ranges), striped over
        the connections."""
        if self._masks is None:
            self._send_on(self.streams[0], bm, rnd)
            return
        errors = []

        def work(stream, part):
            try:
                self._send_on(stream, part, rnd)
            except Exception as e:
                errors.append(e)
        threads = []
        for stream, mask in zip(self.streams, self._masks):
            part = bm & mask
            t = threading.Thread(target=work, args=(stream, part), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def _record_hashes(self, starts, counts, value: int | None = None) -> None:
        """verify: what the destination now holds for these ranges, hashed
        from guest memory (or value, the hash of a zero or filled page)."""
        if self._hashes is None:
            return
        t0 = time.monotonic()
        pfns = pages.range_pfns(starts, counts)
        self._hashes[pfns] = (pages.hashes(self.memory, starts, counts) if value is None
                              else np.uint64(value))
        with self._lock:
            self.s.verify_ms += (time.monotonic() - t0) * 1000

    def _send_on(self, stream: SocketStream, bm: np.ndarray, rnd: dict) -> None:
        data, zero, nzero = pages.classify(self.memory, bm, self.npages)
        for s, c in pages.runs(zero, self.npages):
            self._check_cancel()
            stream.send(Ranges(Command.ZERO, s, c))
            self._record_hashes(s, c, pages.ZERO_PAGE_HASH)
        with self._lock:
            rnd["zero_pages"] += nzero
            if rnd["round"] == 0:
                self.s.pages_skipped_zero += nzero
        for s, c in pages.runs(data, self.npages, max_len=BATCH_PAGES):
            ends = np.cumsum(c)
            i = 0
            while i < len(s):
                self._check_cancel()
                base = int(ends[i - 1]) if i else 0
                j = max(i + 1, int(np.searchsorted(ends, base + BATCH_PAGES, side="right")))
                n = self._send_batch(stream, s[i:j], c[i:j])
                # hashed after the send: a write in between is in the dirty
                # log, so the page is sent (and hashed) again later
                self._record_hashes(s[i:j], c[i:j])
                npg = int(ends[j - 1]) - base
                with self._lock:
                    rnd["pages"] += npg
                    rnd["bytes"] += n
                    self.s.pages_sent += npg
                    self.s.bytes_sent += n
                i = j

    def _send_batch(self, stream: SocketStream, starts: np.ndarray, counts: np.ndarray) -> int:
        """One batch of data pages, compressed when the compression mode says
        so (hv.migration.compression); returns the bytes on the wire."""
        def plain():
            return stream.send(Ranges(Command.MEMORY, starts, counts), self.memory)
        if not self._compression.enabled:
            return plain()
        return self._compression.send_batch(stream, self.memory, starts, counts, plain)

    def _send_free(self, bm: np.ndarray, pattern: int) -> None:
        """The pages of bm are free: FILL ranges when the guest poisons free
        pages, else FREE ranges (the destination drops its copy). Each on
        the connection that carries those pages, so that a later MEMORY of
        the same page cannot overtake it."""
        if pattern:
            command = Command.FILL
            page_hash = pages.fill_page_hash(pattern)
        else:
            command, page_hash = Command.FREE, pages.ZERO_PAGE_HASH
        masks = self._masks or [None]
        for stream, mask in zip(self.streams, masks):
            part = bm if mask is None else bm & mask
            for s, c in pages.runs(part, self.npages):
                self._check_cancel()
                n = stream.send(Ranges(command, s, c, pattern=pattern))
                self._record_hashes(s, c, page_hash)
                with self._lock:
                    self.s.bytes_sent += n
                    if pattern:
                        self.s.pages_filled += int(c.sum())

    def _new_round(self, number: int) -> dict:
        rnd = {"round": number, "pages": 0, "zero_pages": 0, "bytes": 0, "dirty_pages": 0,
               "ms": 0.0}
        with self._lock:
            self.s.round = number
            self.s.rounds.append(rnd)
        return rnd

    def _end_round(self, rnd: dict, t0: float) -> float:
        dt = max(time.monotonic() - t0, 1e-6)
        rnd["ms"] = round(dt * 1000, 3)
        # pages' bytes a second: what the downtime estimates need, also when
        # compression puts fewer bytes on the wire than the pages hold
        bw = max(rnd["bytes"], rnd["pages"] * PAGE_SIZE) / dt
        if rnd.get("final"):
            return self._bw     # sent without max_bandwidth: says nothing of the rounds'
        if rnd["bytes"] >= 1 << 20 or self._bw == 0:
            self._bw = max(bw, 1.0)
            with self._lock:
                self.s.throughput_mib_s = round(rnd["bytes"] / dt / (1 << 20), 3)
        return self._bw

    # -- free pages -------------------------------------------------------------
    def _free_bitmap(self) -> np.ndarray | None:
        mode = self.p.free_pages
        if mode == "off":
            return None
        b = self._balloon = self.machine.balloon
        if b is None:
            self._note_free("no virtio-balloon device: free pages are not skipped")
            return None
        try:
            if mode == "bitmap":
                words, info = b.request_free_page_bitmap(self.p.free_page_timeout_ms,
                                                         drop_cache=self.p.drop_cache)
                with self._lock:
                    self.s.free_page_info = dict(info)
                return pages.as_bitmap(words, self.npages)
            b.free_page_hint_start()
            if self.p.hint_wait_ms:
                b.free_page_hint_wait(self.p.hint_wait_ms)
            return pages.as_bitmap(b.hinted_bitmap(), self.npages)
        except Exception as e:
            self._note_free(f"free page {mode} unavailable ({e}); sending every page")
            return None

    def _note_free(self, msg: str) -> None:
        with self._lock:
            self.s.free_page_info = {"warning": msg}

    def _poison(self) -> int:
        if self._balloon is None:
            return 0
        try:
            v = self._balloon.poison_value()
        except Exception:
            return 0
        return int(v or 0)

    # -- the migration --------------------------------------------------------
    def _estimate_ms(self, npages: int) -> float:
        """Downtime to send npages and finish: pause, final sync and state
        save, the pages at the measured bandwidth, the tail."""
        return (self._pause_cost_ms + npages * PAGE_SIZE / max(self._bw, 1.0) * 1000
                + self._tail_ms + self._rtt_ms)

    def _setup(self) -> "FreePages":
        """Dirty logging on, the free pages asked for, and the connections
        made while the guest builds its bitmap (the slow part: its kernel,
        emulated here, walks its free lists). Setup ends when pages can
        go."""
        self.log.start()        # before anyone says which pages are free
        asking = FreePages(self._free_bitmap)
        self._connect()         # a failure here does not wait for the guest
        self.s.setup_ms = round((time.monotonic() - self._t0) * 1000, 3)
        return asking

    def _send_resident(self, asking: "FreePages", rnd: dict) -> np.ndarray:
        """While the guest still builds its bitmap: the pages it never frees
        (its kernel image), a chunk at a time; returns those sent."""
        sent = pages.empty_bitmap(self.npages)
        full = self.memory.ram_bitmap()
        for start, length in self.machine.resident_ranges():
            first = start // PAGE_SIZE
            end = min(self.npages, -(-(start + length) // PAGE_SIZE))
            for s in range(first, end, RESIDENT_CHUNK_PAGES):
                if asking.done:
                    return sent
                self._check_cancel()
                part = pages.empty_bitmap(self.npages)
                pages.set_range(part, s, min(RESIDENT_CHUNK_PAGES, end - s))
                part &= full
                self._send_set(part, rnd)
                pages.or_into(sent, part)
                with self._lock:
                    self.s.pages_sent_before_bitmap += pages.count(part)
        return sent

    def _bulk_pass(self, asking: "FreePages") -> np.ndarray:
        """Round 0: every page but the free ones (the guest's kernel image
        first, while its bitmap is coming); returns the pages skipped as
        free."""
        p = self.p
        rnd = self._new_round(0)
        t0 = time.monotonic()
        early = self._send_resident(asking, rnd)
        free = asking.result()
        full, _ = pages.andnot(self.memory.ram_bitmap(), early)
        skipped_free = pages.empty_bitmap(self.npages)
        poison = self._poison()
        chunk_words = CHUNK_PAGES // 64
        nwords = len(full)
        for w0 in range(0, nwords, chunk_words):
            self._check_cancel()
            w1 = min(nwords, w0 + chunk_words)
            part = pages.empty_bitmap(self.npages)
            part[w0:w1] = full[w0:w1]
            if p.free_pages == "hint" and self._balloon is not None:
                try:
                    free = pages.as_bitmap(self._balloon.hinted_bitmap(), self.npages)
                except Exception:
                    pass
            if free is not None:
                part_free = pages.empty_bitmap(self.npages)
                part_free[w0:w1] = free[w0:w1]
                part, _ = pages.andnot(part, part_free)
                n_free = pages.count(part_free)
                pages.or_into(skipped_free, part_free)
                with self._lock:
                    self.s.pages_skipped_free += n_free
                if n_free:
                    self._send_free(part_free, poison)
            self._send_set(part, rnd)
        if p.free_pages == "hint" and self._balloon is not None:
            try:
                self._balloon.free_page_hint_stop()
            except Exception:
                pass
        self._end_round(rnd, t0)
        return skipped_free

    def _dirty_round(self, number: int, dirty: np.ndarray) -> None:
        rnd = self._new_round(number)
        rnd["dirty_pages"] = pages.count(dirty)
        t0 = time.monotonic()
        self._send_set(dirty, rnd)
        self._end_round(rnd, t0)

    #: QEMU's throttle-trigger-threshold: dirtying above this share of what a
    #: round sent counts as outpacing the link
    THROTTLE_TRIGGER = 0.5

    def _maybe_throttle(self, bytes_dirtied: int, bytes_sent: int) -> None:
        """Auto-converge, as QEMU's migration_trigger_throttle: the second
        period in which the guest dirtied more than half of what was sent
        raises the throttle (first to cpu_throttle_initial, then by
        cpu_throttle_increment, at most max_cpu_throttle)."""
        p = self.p
        if bytes_dirtied <= bytes_sent * self.THROTTLE_TRIGGER:
            return
        self._dirty_rate_high += 1
        if self._dirty_rate_high < 2:
            return
        self._dirty_rate_high = 0
        if p.dirty_limit:
            if self._dirty_limit is None:
                self._dirty_limit = DirtyLimit(self.machine, self.log,
                                               p.vcpu_dirty_limit).start()
            return
        now = self.machine.cpu_throttle_percentage
        pct = p.cpu_throttle_initial if not now else now + p.cpu_throttle_increment
        pct = min(pct, p.max_cpu_throttle)
        if pct != now:
            self.machine.set_cpu_throttle(pct)
        with self._lock:
            self.s.cpu_throttle_percentage = pct

    def _end_throttle(self) -> None:
        if self._dirty_limit is not None:
            self._dirty_limit.stop()
            with self._lock:
                self.s.dirty_limit = self._dirty_limit.info()
        if self.p.auto_converge and self.machine.cpu_throttle_percentage:
            self.machine.set_cpu_throttle(0)

    def _not_converged(self, n: int, expected_ms: float, rounds: int) -> str:
        return (f"the guest did not converge: after {rounds} rounds {n} dirty pages remain, "
                f"about {expected_ms:.0f} ms of downtime against the limit of "
                f"{self.p.downtime_ms:g} ms at {self._bw / (1 << 20):.0f} MiB/s")

    def _migrate(self) -> None:
        p = self.p
        self._bw = 0.0
        asking = self._setup()
        self._masks = self._channel_masks()
        self._check_cancel()
        self._set_status("active")
        skipped_free = self._bulk_pass(asking)

        # Dirty rounds until the rest fits the downtime (then the final phase,
        # which rolls back to another round when, paused, it does not fit).
        ever_dirty = pages.empty_bitmap(self.npages)
        number = 0
        forced = None
        while True:
            self._check_cancel()
            dirty = self._sync()
            pages.or_into(ever_dirty, dirty)
            n = pages.count(dirty)
            if number and (p.auto_converge or p.dirty_limit):
                self._maybe_throttle(n * PAGE_SIZE, self.s.rounds[-1]["bytes"])
            expected_ms = self._estimate_ms(n)
            with self._lock:
                self.s.remaining_pages = n
                self.s.expected_downtime_ms = round(expected_ms, 3)
            out_of_rounds = number >= p.max_rounds and p.downtime_strategy != "iterate"
            if self._postcopy_due(number, expected_ms <= p.downtime_ms, out_of_rounds):
                self._postcopy(dirty, ever_dirty, skipped_free, number)
                break
            if expected_ms <= p.downtime_ms or out_of_rounds:
                if expected_ms > p.downtime_ms:
                    if p.downtime_strategy == "cancel":
                        raise MigrationError(self._not_converged(n, expected_ms, number)
                                             + "; the source keeps running (raise downtime_ms "
                                             "or the bandwidth, or choose downtime_strategy "
                                             "\"force\" or \"iterate\")")
                    forced = self._not_converged(n, expected_ms, number)
                last = self._final_phase(dirty, ever_dirty, skipped_free, number,
                                         force=forced is not None or out_of_rounds)
                if last is None:
                    break
                # rolled back: what the paused sync found is the next round
                dirty = last
            number += 1
            self._dirty_round(number, dirty)

        if forced is not None:
            with self._lock:
                self.s.warning = (forced + "; paused anyway (downtime_strategy \"force\")")
        if p.shutdown_source:
            # The vCPUs stay paused; give a client polling query-migrate the
            # chance to read the final statistics before this process ends.
            self._queried_final.wait(p.linger_ms / 1000)
            stop_machine(self.machine)

    # -- postcopy ---------------------------------------------------------------
    def _postcopy_due(self, number: int, fits: bool, out_of_rounds: bool) -> bool:
        """Switch now: asked for (before the rest fits, as QEMU does), after
        postcopy_after_rounds rounds unless the rest fits, or instead of
        giving up when the rounds ran out."""
        p = self.p
        if not p.postcopy:
            return False
        if self._postcopy_asked.is_set():
            return True
        if fits:
            return False
        return (0 <= p.postcopy_after_rounds <= number) or out_of_rounds

    def _postcopy(self, dirty: np.ndarray, ever_dirty: np.ndarray, skipped_free: np.ndarray,
                  number: int) -> None:
        """The switch and the postcopy phase (hv.migration.postcopy): pause,
        send the pages still to fetch, the state and COMPLETE; serve the
        destination's requests and push the rest; done at DONE."""
        from .postcopy import PostcopySource
        p = self.p
        self._hint_done()
        st0 = self.streams[0]
        # The pages to fetch known now go first, while the guest still runs
        # here: the destination drops them (the slow part of its switch,
        # one madvise per run) and says so before the pause.
        s, c = pages.all_runs(dirty, self.npages)
        n = st0.send(Ranges(Command.POSTCOPY, s, c))
        self._expect_ack(st0.recv(self.npages), Command.POSTCOPY)
        with self._lock:
            self.s.bytes_sent += n
        parts = {}
        pause_t = time.monotonic()
        self.machine.pause(PAUSE_MIGRATION)
        self._holding_pause = True
        t = time.monotonic()
        parts["pause"] = (t - pause_t) * 1000
        self._set_status("device")
        if p.on_paused is not None:
            p.on_paused(self.machine)
        machine_state = self.machine.save_state()
        t2 = time.monotonic()
        parts["save"] = (t2 - t) * 1000
        fetch = dirty.copy()
        more = self._sync()
        pages.or_into(fetch, more)
        pages.or_into(ever_dirty, more)
        self.log.stop()             # paused for good: nothing changes here any more
        self._skipped_free, self._ever_dirty = skipped_free, ever_dirty
        t3 = time.monotonic()
        parts["final_sync"] = (t3 - t2) * 1000
        n = pages.count(fetch)
        rnd = self._new_round(number + 1)
        rnd["dirty_pages"] = n
        rnd["postcopy"] = True
        self.machine.unlock_storage()
        self._storage_released = True
        for extra in self.streams[1:]:
            extra.send(Control(Command.COMPLETE))
        # from now on everything goes over connection 0
        st0.set_rate(int(p.max_postcopy_bandwidth_mib * (1 << 20)))
        s, c = pages.all_runs(more, self.npages)       # dirtied since the first
        sent = st0.send(Ranges(Command.POSTCOPY, s, c))
        sent += st0.send(state_message(machine_state))
        st0.send(Control(Command.COMPLETE))
        self._complete_sent = True
        with self._lock:
            self.s.bytes_sent += sent + 24
            self.s.postcopy = True
            self.s.postcopy_pages = self.s.remaining_pages = n
        parts["switch_send"] = (time.monotonic() - t3) * 1000
        src = self._postcopy_source = PostcopySource(self, st0, fetch)
        self._set_status("postcopy-active")

        def on_running(at: float) -> None:
            # The guest runs on the destination: it never runs here again.
            self.machine.enter_postmigrate()
            self._holding_pause = False
            parts["resume"] = (at - pause_t) * 1000 - sum(parts.values())
            with self._lock:
                self.s.downtime_ms = round((at - pause_t) * 1000, 3)
                self.s.downtime_parts = {k: round(v, 3) for k, v in parts.items()}
                self.s.downtime_exceeded = self.s.downtime_ms > p.downtime_ms
        src.on_running = on_running
        done = src.run(p.timeout_s)
        rnd["pages"] = self.s.postcopy_pages_pushed + self.s.postcopy_pages_requested
        rnd["bytes"] = self.s.postcopy_bytes
        rnd["ms"] = round((time.monotonic() - t3) * 1000, 3)
        self._close()
        with self._lock:
            self.s.postcopy_faults = done["requests"]
            self.s.fault_latency_ms_mean = done["latency_mean_ms"]
            self.s.fault_latency_ms_max = done["latency_max_ms"]
            self.s.postcopy_ms = rnd["ms"]
            self.s.remaining_pages = 0
            self.s.verified = True if p.verify else None
        self._set_status("completed")

    def _send_postcopy_verify(self) -> None:
        """VERIFY after the postcopy push: the hashes of every page but the
        free ones never written, as the source holds them (paused since the
        switch), which is what the destination placed."""
        if not self.p.verify:
            return
        unsent_free, _ = pages.andnot(self._skipped_free, self._ever_dirty)
        check, _ = pages.andnot(self.memory.ram_bitmap(), unsent_free)
        s, c = pages.all_runs(check, self.npages)
        hashes = self._hashes[pages.range_pfns(s, c)]
        self.verify_hashes = (s, c, hashes)
        n = self.streams[0].send(Ranges(Command.VERIFY, s, c, hashes=hashes))
        with self._lock:
            self.s.bytes_sent += n

    def _final_phase(self, dirty: np.ndarray, ever_dirty: np.ndarray,
                     skipped_free: np.ndarray, number: int, force: bool) -> np.ndarray | None:
        """Pause, sync, and send the rest, the state and COMPLETE; wait for
        RUNNING. Returns None when the migration completed, or the dirty
        pages when the estimate taken after the pause said the rest does not
        fit the downtime: the guest was resumed and another round follows.

        With hints, the guest takes its hinted blocks back now (DONE, as QEMU
        does at completion): the config interrupt and the balloon's state
        travel with the machine state, so the guest frees them on whichever
        side it then runs; a block it reuses before the pause is dirty."""
        p = self.p
        self._check_cancel()
        self._hint_done()
        self._drain()
        parts = {}
        pause_t = time.monotonic()
        self.machine.pause(PAUSE_MIGRATION)
        self._holding_pause = True   # released again if anything fails
        t = time.monotonic()
        parts["pause"] = (t - pause_t) * 1000
        self._set_status("device")
        if p.on_paused is not None:
            p.on_paused(self.machine)
        machine_state = self.machine.save_state()
        t2 = time.monotonic()
        parts["save"] = (t2 - t) * 1000
        last = dirty
        more = self._sync()
        pages.or_into(last, more)
        pages.or_into(ever_dirty, more)
        t3 = time.monotonic()
        parts["final_sync"] = (t3 - t2) * 1000
        n_last = pages.count(last)
        spent = (t3 - pause_t) * 1000
        expected_ms = spent + self._estimate_ms(n_last) - self._pause_cost_ms
        if expected_ms > p.downtime_ms and not force and (
                number < p.max_rounds or p.downtime_strategy == "iterate"):
            # Does not fit after all: undo the pause, learn what it costs.
            self._pause_cost_ms = spent
            self.machine.resume(PAUSE_MIGRATION)
            self._holding_pause = False
            self._set_status("active")
            with self._lock:
                self.s.pause_rollbacks += 1
                self.s.expected_downtime_ms = round(expected_ms, 3)
            return last

        # The guest waits on every byte from here on: no max_bandwidth
        for st_ in self.streams:
            st_.set_rate(0)
        rnd = self._new_round(number + 1)
        rnd["dirty_pages"] = n_last
        rnd["final"] = True
        self._send_set(last, rnd)
        self._end_round(rnd, t3)
        st0 = self.streams[0]
        n = st0.send(state_message(machine_state))
        with self._lock:
            self.s.bytes_sent += n
        t4 = time.monotonic()
        parts["final_send"] = (t4 - t3) * 1000
        if p.verify:
            # Every page except free pages skipped and never written since,
            # from the hashes kept as pages were sent.
            unsent_free, _ = pages.andnot(skipped_free, ever_dirty)
            check, _ = pages.andnot(self.memory.ram_bitmap(), unsent_free)
            s, c = pages.all_runs(check, self.npages)
            hashes = self._hashes[pages.range_pfns(s, c)]
            self.verify_hashes = (s, c, hashes)
            st0.send(Ranges(Command.VERIFY, s, c, hashes=hashes))
        t5 = time.monotonic()
        parts["verify"] = (t5 - t4) * 1000
        # Shared storage changes hands: flushed at the pause, its locks go now
        # and the destination takes them when it resumes (Cloud Hypervisor's
        # order); _fail takes them back if the destination never runs.
        self.machine.unlock_storage()
        self._storage_released = True
        for extra in self.streams[1:]:
            extra.send(Control(Command.COMPLETE))
        st0.send(Control(Command.COMPLETE))
        self._complete_sent = True
        reply = st0.recv(self.npages)
        if isinstance(reply, Control) and reply.command == Command.ERROR:
            raise PeerError(f"the destination failed: {reply.text}")
        if not (isinstance(reply, Control) and reply.command == Command.RUNNING):
            raise ProtocolError(f"expected RUNNING from the destination, got "
                                f"{getattr(reply, 'command', reply)!r}")
        # The guest runs on the destination now: it never runs here again.
        self.machine.enter_postmigrate()
        self._holding_pause = False
        t6 = time.monotonic()
        parts["complete"] = (t6 - t5) * 1000
        downtime = (t6 - pause_t) * 1000
        self._close()
        self.log.stop()
        with self._lock:
            self.s.downtime_ms = round(downtime, 3)
            self.s.downtime_parts = {k: round(v, 3) for k, v in parts.items()}
            self.s.downtime_exceeded = downtime > p.downtime_ms
            if self.s.downtime_exceeded and not force:
                self.s.warning = (f"the downtime of {downtime:.0f} ms went over the limit of "
                                  f"{p.downtime_ms:g} ms that the estimate of "
                                  f"{expected_ms:.0f} ms promised")
            self.s.verified = True if p.verify else None
        self._set_status("completed")
        return None

    def _drain(self) -> None:
        """Wait, the guest running, until what the rounds wrote has left the
        connections' send queues (DRAIN_BYTES at most remain). A socket
        takes megabytes at once, on a slow link seconds of them: sent after
        the pause, they would be downtime (8 MiB at 100 Mbit/s: 0.7 s)."""
        deadline = time.monotonic() + self.p.timeout_s
        least = None
        while True:
            try:
                queued = [queued_bytes(st.sock) for st in self.streams]
            except ConnectionError as e:
                raise MigrationError(f"connection lost while sending pages: {e}") from e
            if max(queued) <= DRAIN_BYTES:
                return
            if least is None or sum(queued) < least:      # acknowledged more: wait on
                least = sum(queued)
                deadline = time.monotonic() + self.p.timeout_s
            self._check_cancel()
            if time.monotonic() > deadline:
                raise MigrationError(f"the destination acknowledged nothing for "
                                     f"{self.p.timeout_s:g} s")
            time.sleep(0.001)

    # -- progress -------------------------------------------------------------
    def progress_line(self) -> str:
        q = self.query()
        mib = q["bytes_sent"] / (1 << 20)
        secs = q["total_time_ms"] / 1000
        rate = q["throughput_mib_s"] or (mib / secs if secs else 0.0)
        return (f"migrate: {q['status']:<9} round {q['round']:>2}  {mib:8.1f} MiB sent  "
                f"{q['pages_sent']} pages, {q['pages_skipped_free']} free, "
                f"{q['pages_skipped_zero']} zero skipped  {rate:.0f} MiB/s  {secs:.1f} s")

    def _progress(self) -> None:
        while not self._done.wait(0.2):
            sys.stderr.write("\r" + self.progress_line() + "\033[K")
            sys.stderr.flush()
        q = self.query()
        tail = f" ({q['error']})" if q.get("error") else ""
        sys.stderr.write("\r" + self.progress_line() + tail + "\033[K\n")
        sys.stderr.flush()


def stop_machine(machine) -> None:
    """End the source machine after a completed migration."""
    machine.request_shutdown("migrated")


def migrate(machine, uri: str, **kw) -> dict:
    """Migrate synchronously; returns the final statistics."""
    m = Migration(machine, MigrationParams(uri=uri, **kw))
    m.run()
    return m.query()
