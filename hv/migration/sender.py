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

Any failure (connection lost, refused, timeout, cancel) resumes the source
guest and reports why: status "failed" or "cancelled" with `error`.
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

from ..memory import PAGE_SIZE, bitmap_words
from . import pages
from .protocol import (
    FEATURES, Command, Control, Hello, MigrationError, PeerError, ProtocolError, Ranges,
    SocketStream, cancel as cancel_msg, error as error_msg, state as state_msg)
from .receiver import parse_uri, tune_socket

BATCH_PAGES = 2048          # pages per MEMORY message (8 MiB)
CHUNK_PAGES = 16384         # bulk pass granularity (64 MiB)
STRIPE_WORDS = 8            # connections stripe memory in 512-page blocks


class Cancelled(MigrationError):
    pass


@dataclass
class MigrationParams:
    uri: str
    free_pages: str = "bitmap"          # "bitmap" | "hint" | "off"
    downtime_ms: float = 300.0
    max_bandwidth_mib: float = 0.0      # MiB/s over all connections; 0 = unlimited
    connections: int = 1
    max_rounds: int = 30
    verify: bool = False
    dirty_log: str = "bitmap"           # "bitmap" | "ring" | "vmm" (no KVM: tests)
    timeout_s: float = 60.0             # any single send/receive
    free_page_timeout_ms: int = 30000   # waiting for the balloon's bitmap
    hint_wait_ms: int = 0               # let hints arrive before the bulk pass
    progress: bool = False              # a status line on stderr
    shutdown_source: bool = True        # stop the source machine when completed
    linger_ms: int = 0                  # ... after someone read the final statistics
                                        # (query-migrate) or this long at most
                                        # (the migrate command: 3000)
    on_paused: object = None            # callback(machine) right after the pause (tests, --verify)

    @classmethod
    def from_args(cls, args: dict) -> "MigrationParams":
        if "uri" not in args:
            raise MigrationError('migrate needs {"uri": "tcp:HOST:PORT"}')
        known = set(cls.__dataclass_fields__) - {"on_paused"}
        unknown = set(args) - known
        if unknown:
            raise MigrationError(f"migrate: unknown arguments {sorted(unknown)}; known: "
                                 f"{sorted(known)}")
        args.setdefault("linger_ms", 3000)
        p = cls(**args)
        if p.free_pages not in ("bitmap", "hint", "off"):
            raise MigrationError(f'free_pages must be "bitmap", "hint" or "off", not '
                                 f'{p.free_pages!r}')
        if p.dirty_log not in ("bitmap", "ring", "vmm"):
            raise MigrationError('dirty_log must be "bitmap", "ring" or "vmm"')
        if not 1 <= int(p.connections) <= 64:
            raise MigrationError("connections must be 1..64")
        p.connections = int(p.connections)
        parse_uri(p.uri)
        return p


# ------------------------------------------------------------- dirty logs

class VmmDirtyLog:
    """Only the VMM's own writes (GuestMemory.take_dirty_bitmap): for machines
    without KVM, and ORed into the KVM logs below."""

    def __init__(self, machine):
        self.memory = machine.memory
        self.npages = self.memory.npages

    def start(self) -> None:
        self.memory.take_dirty_bitmap()

    def sync(self) -> np.ndarray:
        return pages.as_bitmap(self.memory.take_dirty_bitmap(), self.npages)

    def stop(self) -> None:
        pass


class KvmDirtyLog(VmmDirtyLog):
    """KVM_GET_DIRTY_LOG on slot 0, with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 when
    offered: a sync reads the log, then re-protects exactly those pages with
    KVM_CLEAR_DIRTY_LOG before they are sent."""

    SLOT = 0

    def __init__(self, machine):
        super().__init__(machine)
        self.machine = machine
        self.vm = machine.vm
        self.manual = False

    def _set_logging(self, on: bool) -> None:
        fn = getattr(self.machine, "set_dirty_logging", None)
        if fn is not None:
            fn(on)
            return
        from .._kvm import lib
        self.vm.set_user_memory_region(self.SLOT, 0, self.memory.size, self.memory.host_addr,
                                       lib.KVM_MEM_LOG_DIRTY_PAGES if on else 0)

    def start(self) -> None:
        from .._kvm import lib
        if getattr(self.vm, "manual_dirty_log_protect", False):
            self.manual = True
        elif self.vm.check_extension(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
            try:
                self.vm.enable_manual_dirty_log_protect(initially_set=False)
                self.manual = True
            except OSError:
                self.manual = False
        self._set_logging(True)
        super().start()

    def sync(self) -> np.ndarray:
        kvm = self.vm.get_dirty_log(self.SLOT, self.npages)
        bm = pages.as_bitmap(kvm, self.npages)
        if self.manual and pages.count(bm):
            self.vm.clear_dirty_log(self.SLOT, 0, self.npages, bm)
        pages.or_into(bm, super().sync())
        return bm

    def stop(self) -> None:
        try:
            self._set_logging(False)
        except OSError:
            pass


class RingDirtyLog(KvmDirtyLog):
    """The per-vCPU dirty rings (the machine must have been created with them).
    A full ring (KVM_EXIT_DIRTY_RING_FULL) is harvested on the vCPU thread into
    the pending set, so nothing is lost between syncs."""

    def __init__(self, machine):
        super().__init__(machine)
        # checked here so that the migrate command refuses at once
        if not getattr(self.vm, "dirty_ring_bytes", 0):
            raise MigrationError("dirty_log \"ring\" needs a machine created with a dirty ring "
                                 "(run-guest --dirty-ring BYTES, MachineConfig.dirty_ring_bytes:"
                                 " KVM_CAP_DIRTY_LOG_RING is enabled before the vCPUs exist)")

    def start(self) -> None:
        self._pending = np.zeros(self.npages, dtype=bool)
        self._plock = threading.Lock()
        self._set_logging(True)
        if hasattr(self.machine, "dirty_ring_full_handler"):
            self.machine.dirty_ring_full_handler = self._on_full
        VmmDirtyLog.start(self)

    def _harvest(self, vcpu) -> None:
        slots, offsets = vcpu.harvest_dirty_ring_arrays()
        offs = offsets[(slots == self.SLOT) & (offsets < self.npages)]
        self._pending[offs.astype(np.int64)] = True

    def _on_full(self, vcpu) -> None:
        with self._plock:
            self._harvest(vcpu)
            self.vm.reset_dirty_rings()

    def sync(self) -> np.ndarray:
        from ..memory import pack_bitmap
        with self._plock:
            for vcpu in self.machine.vcpus:
                self._harvest(vcpu)
            self.vm.reset_dirty_rings()
            bits, self._pending = self._pending, np.zeros(self.npages, dtype=bool)
        bm = pages.as_bitmap(pack_bitmap(bits), self.npages)
        pages.or_into(bm, VmmDirtyLog.sync(self))
        return bm

    def stop(self) -> None:
        if getattr(self.machine, "dirty_ring_full_handler", None) == self._on_full:
            self.machine.dirty_ring_full_handler = None
        super().stop()


def dirty_log_for(machine, kind: str):
    if kind == "vmm" or getattr(machine, "vm", None) is None:
        return VmmDirtyLog(machine)
    if kind == "ring":
        return RingDirtyLog(machine)
    return KvmDirtyLog(machine)


def find_balloon(machine):
    b = getattr(machine, "balloon", None)
    if b is not None:
        return b
    for bus_name in ("mmio",):
        bus = getattr(machine, bus_name, None)
        if bus is None:
            continue
        for _, _, dev in bus.devices():
            d = getattr(dev, "device", dev)
            if hasattr(d, "request_free_page_bitmap"):
                return d
    return None


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
    setup_ms: float = 0.0
    free_pages: str = "off"
    free_page_info: dict | None = None
    rounds: list = field(default_factory=list)
    remaining_pages: int = 0
    verified: bool | None = None
    error: str | None = None


class Migration:
    """One outgoing live migration of `machine`."""

    def __init__(self, machine, params: MigrationParams):
        self.machine = machine
        self.p = params
        self.memory = machine.memory
        self.npages = self.memory.npages
        self.s = Stats(pages_total=self.npages, free_pages=params.free_pages)
        self.streams: list[SocketStream] = []
        self.thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._queried_final = threading.Event()
        self._t0 = None
        self._paused_by_us = False
        self._lock = threading.Lock()
        self._balloon = None
        self.log = dirty_log_for(machine, params.dirty_log)

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
        """Ask the migration to stop; the source keeps (or resumes) running."""
        self._cancel.set()

        def force():
            if not self._done.wait(2.0):
                for st_ in list(self.streams):   # unblock a stuck send/receive
                    try:
                        st_.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        threading.Thread(target=force, daemon=True).start()

    def query(self) -> dict:
        with self._lock:
            d = dict(self.s.__dict__)
            d["rounds"] = [dict(r) for r in self.s.rounds]
            if self.s.status in ("completed", "failed", "cancelled"):
                self._queried_final.set()
        if self._t0 is not None and not self._done.is_set():
            d["total_time_ms"] = round((time.monotonic() - self._t0) * 1000, 3)
        return d

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    # -- main ---------------------------------------------------------------
    def run(self) -> None:
        self._t0 = time.monotonic()
        try:
            self._migrate()
        except Exception as e:
            self._fail(e)
        finally:
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
        if self.streams and not cancelled and not isinstance(e, PeerError):
            try:
                st0 = self.streams[0]
                st0.timeout = 0.5
                msg = st0.recv(self.npages)
                if isinstance(msg, Control) and msg.command == Command.ERROR:
                    reason = f"the destination failed: {msg.text}"
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
        if self._paused_by_us:
            self.machine.resume()
            self._paused_by_us = False
        self._hint_done()
        with self._lock:
            self.s.status = "cancelled" if cancelled else "failed"
            self.s.error = reason

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
        host, port = parse_uri(self.p.uri)
        session = int.from_bytes(os.urandom(8), "little")
        rate = int(self.p.max_bandwidth_mib * (1 << 20) / self.p.connections)
        for i in range(self.p.connections):
            try:
                sock = socket.create_connection((host, port), timeout=self.p.timeout_s)
            except OSError as e:
                raise MigrationError(f"cannot connect to {host}:{port}: "
                                     f"{e.strerror or e}") from e
            tune_socket(sock)
            sock.settimeout(self.p.timeout_s)
            st_ = SocketStream(sock, PAGE_SIZE, self.p.timeout_s, rate)
            self.streams.append(st_)
            st_.send(Hello(PAGE_SIZE, self.memory.size, FEATURES, self.p.connections, i,
                           session))
            reply = st_.recv(self.npages)
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

    def _send_on(self, stream: SocketStream, bm: np.ndarray, rnd: dict) -> None:
        data, zero, nzero = pages.classify(self.memory, bm, self.npages)
        for s, c in pages.runs(zero, self.npages):
            self._check_cancel()
            stream.send(Ranges(Command.ZERO, s, c))
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
                n = stream.send(Ranges(Command.MEMORY, s[i:j], c[i:j]), self.memory)
                npg = int(ends[j - 1]) - base
                with self._lock:
                    rnd["pages"] += npg
                    rnd["bytes"] += n
                    self.s.pages_sent += npg
                    self.s.bytes_sent += n
                i = j

    def _send_fill(self, bm: np.ndarray, pattern: int) -> None:
        for s, c in pages.runs(bm, self.npages):
            self._check_cancel()
            n = self.streams[0].send(Ranges(Command.FILL, s, c, pattern=pattern))
            with self._lock:
                self.s.bytes_sent += n
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
        bw = rnd["bytes"] / dt
        if rnd["bytes"] >= 1 << 20 or self._bw == 0:
            self._bw = max(bw, 1.0)
        with self._lock:
            self.s.throughput_mib_s = round(self._bw / (1 << 20), 3)
        return self._bw

    # -- free pages -------------------------------------------------------------
    def _free_bitmap(self) -> np.ndarray | None:
        mode = self.p.free_pages
        if mode == "off":
            return None
        b = self._balloon = find_balloon(self.machine)
        if b is None:
            self._note_free("no virtio-balloon device: free pages are not skipped")
            return None
        try:
            if mode == "bitmap":
                words, info = b.request_free_page_bitmap(self.p.free_page_timeout_ms)
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
    def _migrate(self) -> None:
        p = self.p
        self._bw = 0.0
        self._connect()
        self._masks = self._channel_masks()
        self._check_cancel()
        with self._lock:
            self.s.status = "active"
        # Dirty logging on before anyone says which pages are free.
        self.log.start()
        free = self._free_bitmap()
        self.s.setup_ms = round((time.monotonic() - self._t0) * 1000, 3)
        full = pages.full_bitmap(self.npages)
        skipped_free = pages.empty_bitmap(self.npages)
        poison = self._poison()

        # Bulk pass, chunk by chunk (hints are re-read before each chunk).
        rnd = self._new_round(0)
        t0 = time.monotonic()
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
                if poison and n_free:
                    self._send_fill(part_free, poison)
            self._send_set(part, rnd)
        if p.free_pages == "hint" and self._balloon is not None:
            try:
                self._balloon.free_page_hint_stop()
            except Exception:
                pass
        self._end_round(rnd, t0)

        # Dirty rounds until the rest fits the downtime.
        ever_dirty = pages.empty_bitmap(self.npages)
        number = 0
        while True:
            self._check_cancel()
            dirty = self.log.sync()
            pages.or_into(ever_dirty, dirty)
            n = pages.count(dirty)
            expected_ms = n * PAGE_SIZE / max(self._bw, 1.0) * 1000
            with self._lock:
                self.s.remaining_pages = n
                self.s.expected_downtime_ms = round(expected_ms, 3)
            if expected_ms <= p.downtime_ms or number >= p.max_rounds:
                break
            number += 1
            rnd = self._new_round(number)
            rnd["dirty_pages"] = n
            t0 = time.monotonic()
            self._send_set(dirty, rnd)
            self._end_round(rnd, t0)

        # Stop-and-copy. With hints, let the guest take its hinted blocks back
        # now (DONE, as QEMU does at completion): the config interrupt and the
        # balloon's state travel with the machine state, so the guest frees
        # them on whichever side it then runs; a block it reuses before the
        # pause is dirty and sent.
        self._check_cancel()
        self._hint_done()
        pause_t = time.monotonic()
        if getattr(self.machine, "status", "running") != "paused":
            self.machine.pause()
            self._paused_by_us = True   # resumed again if anything fails
        with self._lock:
            self.s.status = "device"
        if p.on_paused is not None:
            p.on_paused(self.machine)
        machine_state = self.machine.save_state()
        last = dirty
        more = self.log.sync()
        pages.or_into(last, more)
        pages.or_into(ever_dirty, more)
        rnd = self._new_round(number + 1)
        rnd["dirty_pages"] = pages.count(last)
        rnd["final"] = True
        t0 = time.monotonic()
        self._send_set(last, rnd)
        self._end_round(rnd, t0)
        st0 = self.streams[0]
        n = st0.send(state_msg(machine_state))
        with self._lock:
            self.s.bytes_sent += n
        if p.verify:
            # Every page except free pages skipped and never written since.
            unsent_free, _ = pages.andnot(skipped_free, ever_dirty)
            check, _ = pages.andnot(full, unsent_free)
            s, c = pages.all_runs(check, self.npages)
            hashes = pages.hashes(self.memory, s, c)
            self.verify_hashes = (s, c, hashes)
            st0.send(Ranges(Command.VERIFY, s, c, hashes=hashes))
        for extra in self.streams[1:]:
            extra.send(Control(Command.COMPLETE))
        st0.send(Control(Command.COMPLETE))
        reply = st0.recv(self.npages)
        if isinstance(reply, Control) and reply.command == Command.ERROR:
            raise PeerError(f"the destination failed: {reply.text}")
        if not (isinstance(reply, Control) and reply.command == Command.RUNNING):
            raise ProtocolError(f"expected RUNNING from the destination, got "
                                f"{getattr(reply, 'command', reply)!r}")
        downtime = (time.monotonic() - pause_t) * 1000
        self._close()
        self.log.stop()
        with self._lock:
            self.s.downtime_ms = round(downtime, 3)
            self.s.verified = True if p.verify else None
            self.s.status = "completed"
        self._paused_by_us = False
        if p.shutdown_source:
            # The vCPUs stay paused; give a client polling query-migrate the
            # chance to read the final statistics before this process ends.
            self._queried_final.wait(p.linger_ms / 1000)
            stop_machine(self.machine)

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
    """Stop the source machine after a completed migration."""
    fn = getattr(machine, "request_shutdown", None)
    if callable(fn):
        fn("migrated")
        return
    for name in ("shutdown", "stop", "quit"):
        fn = getattr(machine, name, None)
        if callable(fn):
            fn()
            return


def migrate(machine, uri: str, **kw) -> dict:
    """Migrate synchronously; returns the final statistics."""
    m = Migration(machine, MigrationParams(uri=uri, **kw))
    m.run()
    return m.query()
