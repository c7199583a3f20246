"""virtio-blk (device ID 2) on a raw image file.

One request queue. A request is a chain: a 16-byte device-readable header
{le32 type, le32 reserved, le64 sector}, the data (device-readable for OUT,
device-writable for IN and GET_ID), and a device-writable status byte, the
last byte of the chain. What the device does with each:

    IN      preadv straight into guest RAM (pages marked VMM-dirty after)
    OUT     pwritev from guest RAM (IOERR on a read-only disk)
    FLUSH   fdatasync
    GET_ID  the 20-byte serial
    other   UNSUPP

A request past the end of the disk, data in the wrong direction or not a
multiple of 512 bytes is answered IOERR and logged; the VMM and the guest
keep running. A chain with no room for the header or the status byte cannot
be answered at all: the device then needs a reset (as any VirtioError).

Threads: the notify (vCPU thread) only wakes the I/O worker. The worker pops
chains under the transport lock, does the file I/O without it (the vCPU
keeps running), and returns the chains under the lock again. quiesce() stops
popping and waits until nothing is in flight, then flushes; unquiesce() lets
the worker go on.

The image is locked with an OFD lock (write lock read-write, read lock
read-only) so that two VMMs never write one image. lock_storage() takes it,
unlock_storage() drops it; the machine takes it before the vCPUs first run
and a migration source drops it after the final pause (the destination takes
it when it resumes). Until the lock is held the worker issues no I/O.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import threading

from ...errors import HvError
from ...memory import GuestMemory
from .. import DeviceStateError, checked_state
from .device import VirtioDevice
from .queue import DescChain, Descriptor, Virtqueue, VirtioError

log = logging.getLogger("hv.virtio.blk")

VIRTIO_ID_BLOCK = 2

# feature bits (include/uapi/linux/virtio_blk.h)
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9

# request types and status values
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2

SECTOR = 512
ID_BYTES = 20
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2     # QEMU's convention: header and status take two
HEADER = struct.Struct("<IIQ")
# capacity le64, size_max le32, seg_max le32, geometry 4 bytes, blk_size le32
CONFIG = struct.Struct("<QII4xI")

#: warnings per kind of bad request before they go to debug (a guest can send millions)
LOG_LIMIT = 10


class BlkError(HvError):
    """A disk image hv cannot use (missing, unreadable, locked, wrong size)."""


def _flock(kind: int) -> bytes:
    # struct flock on Linux x86-64: l_type, l_whence, l_start, l_len, l_pid (0 for OFD)
    return struct.pack("hhxxxxqqixxxx", kind, os.SEEK_SET, 0, 0, 0)


class Blk(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    name = "blk"

    def __init__(self, path: str, *, readonly: bool = False, serial: str | None = None,
                 memory: GuestMemory | None = None):
        super().__init__()
        # opened before the machine exists (a bad image fails early); the
        # transport brings guest memory
        self.memory = memory
        self.path = os.path.abspath(path)
        self.readonly = bool(readonly)
        try:
            self.fd = os.open(self.path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise BlkError(f"disk image {path}: {e.strerror}") from None
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise BlkError(f"disk image {path} is not a regular file")
            size = st.st_size
            if size < SECTOR:
                raise BlkError(f"disk image {path} holds {size} bytes, less than one "
                               f"{SECTOR}-byte sector")
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size
        self.capacity = size // SECTOR
        if size % SECTOR:
            log.warning("blk: %s: the last %d bytes are not a whole sector and are not used",
                        path, size % SECTOR)
        name = serial if serial is not None else os.path.basename(self.path)
        self.serial = name.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
        self.locked = False
        self._paused = False
        self._pending = False
        self._inflight = 0
        self._generation = 0          # bumped by reset: late completions are dropped
        self._stop = False
        self._warned: dict[str, int] = {}
        self.counters = {"reads": 0, "writes": 0, "flushes": 0, "bytes_read": 0,
                         "bytes_written": 0, "errors": 0, "unsupported": 0}
        self._cond = threading.Condition(self.lock)
        self._worker: threading.Thread | None = None

    # -- the image lock ------------------------------------------------------------
    def lock_storage(self) -> None:
        """Take the OFD lock on the image; BlkError if another VMM holds it."""
        with self.lock:
            if self.locked:
                return
            kind = fcntl.F_RDLCK if self.readonly else fcntl.F_WRLCK
            try:
                fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(kind))
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise BlkError(
                        f"disk image {self.path} is locked by another VMM that "
                        f"{'writes' if self.readonly else 'uses'} it; stop that VMM or give "
                        "this one another image") from None
                raise BlkError(f"disk image {self.path}: cannot lock it: {e.strerror}") \
                    from None
            self.locked = True
            self._cond.notify_all()   # the worker may serve what waits

    def unlock_storage(self) -> None:
        """Flush and drop the lock (a migration source after its final pause).
        Only while quiesced or not yet running: no I/O is in flight then."""
        with self.lock:
            if not self.locked:
                return
            self._cond.wait_for(lambda: self._inflight == 0)
            try:
                os.fdatasync(self.fd)
            except OSError as e:
                log.warning("blk: %s: fdatasync before unlocking: %s", self.path, e)
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK))
            self.locked = False

    # -- VirtioDevice ----------------------------------------------------------------
    def attach(self, transport) -> None:
        super().attach(transport)
        self.memory = transport.memory
        self._cond = threading.Condition(self.lock)

    def features(self) -> int:
        f = super().features() | 1 << F_SEG_MAX | 1 << F_BLK_SIZE | 1 << F_FLUSH
        if self.readonly:
            f |= 1 << F_RO
        return f

    def queue_sizes(self, features: int) -> list[int]:
        return [QUEUE_SIZE]

    def read_config(self, offset: int, size: int) -> bytes:
        cfg = CONFIG.pack(self.capacity, 0, SEG_MAX, SECTOR)
        return cfg[offset:offset + size].ljust(size, b"\0")

    def activate(self, features: int, queues: list[Virtqueue]) -> None:
        with self.lock:
            super().activate(features, queues)
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="hv-blk-io",
                                                daemon=True)
                self._worker.start()

    def process(self, queue_index: int) -> None:
        # vCPU thread: hand the queue to the worker
        with self.lock:
            self._pending = True
            self._cond.notify_all()

    def reset(self) -> None:
        with self.lock:
            # The guest may reuse the buffers after a reset: finish what is in flight first.
            self._cond.wait_for(lambda: self._inflight == 0)
            super().reset()
            self._pending = False
            self._generation += 1

    def quiesce(self) -> None:
        with self.lock:
            self._paused = True
            self._cond.wait_for(lambda: self._inflight == 0)
            if self.locked and not self.readonly:
                try:
                    os.fdatasync(self.fd)
                except OSError as e:
                    log.warning("blk: %s: fdatasync at pause: %s", self.path, e)

    def unquiesce(self) -> None:
        with self.lock:
            self._paused = False
            # Chains made available before a migration's pause were not popped.
            self._pending = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Until every available chain was served (or cannot be now); for tests."""
        with self.lock:
            return self._cond.wait_for(lambda: self._inflight == 0 and not (
                self._pending and self._can_serve()), timeout)

    def close(self) -> None:
        with self.lock:
            self._stop = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._inflight == 0, 10.0)
        if self._worker is not None:
            self._worker.join(5.0)
        if self.fd >= 0:
            os.close(self.fd)   # drops the OFD lock with the last reference
            self.fd = -1
            self.locked = False

    # -- the I/O worker ----------------------------------------------------------------
    def _can_serve(self) -> bool:
        return (self.active and self.locked and not self._paused and self.queues != []
                and not (self.transport is not None and self.transport.broken))

    def _run(self) -> None:
        while True:
            with self.lock:
                self._cond.wait_for(lambda: self._stop or (self._pending and self._can_serve()))
                if self._stop:
                    return
                self._pending = False
                q, gen = self.queues[0], self._generation
                chains: list[DescChain] = []
                error = None
                try:
                    while len(chains) < q.size and (c := q.pop()) is not None:
                        chains.append(c)
                except VirtioError as e:
                    error = str(e)
                self._inflight = len(chains)
            done = []
            try:
                for c in chains:
                    done.append(self._serve(c))
            except Exception as e:  # a device bug: the chain is not answered
                log.exception("blk: serving a request")
                error = error or f"internal error: {type(e).__name__}: {e}"
            with self.lock:
                try:
                    if gen == self._generation:
                        for head, used_len in done:
                            if head is not None:
                                q.add_used(head, used_len)
                        bad = [reason for head, reason in done if head is None]
                        if error is None and bad:
                            error = bad[0]
                        if error is not None and self.transport is not None:
                            self.transport.set_needs_reset(error)
                        elif done:
                            self.signal_used(0)
                except Exception as e:
                    log.error("blk: returning requests: %s", e)
                    if self.transport is not None:
                        self.transport.set_needs_reset(f"returning requests: {e}")
                finally:
                    self._inflight = 0
                    self._cond.notify_all()

    def _warn(self, kind: str, msg: str, *args) -> None:
        n = self._warned.get(kind, 0)
        self._warned[kind] = n + 1
        (log.warning if n < LOG_LIMIT else log.debug)("blk: " + msg, *args)

    def _serve(self, chain: DescChain):
        """-> (head, used length), or (None, reason) for a chain that cannot be answered."""
        if chain.readable_len < HEADER.size:
            return None, (f"virtio-blk: request {chain.head} has {chain.readable_len} "
                          f"device-readable bytes, less than its {HEADER.size}-byte header")
        if chain.writable_len < 1:
            return None, f"virtio-blk: request {chain.head} has no status byte"
        rtype, _, sector = HEADER.unpack(chain.read_all(self.memory, limit=HEADER.size))
        data_in = _trim(chain.readable, HEADER.size, 0)    # device-readable after the header
        data_out = _trim(chain.writable, 0, 1)             # device-writable before the status
        last = chain.writable[-1]
        status_addr = last.addr + last.length - 1
        written = 0
        if rtype == T_IN:
            status, written = self._read(chain.head, sector, data_in, data_out)
        elif rtype == T_OUT:
            status = self._write(chain.head, sector, data_in, data_out)
        elif rtype == T_FLUSH:
            status = self._flush()
        elif rtype == T_GET_ID:
            if data_in:
                self._warn("dir", "GET_ID request %d carries device-readable data",
                           chain.head)
                status = S_IOERR
            else:
                written = self._copy_to_guest(self.serial, data_out)
                status = S_OK
        else:
            self._warn("type", "request %d of unknown type %d", chain.head, rtype)
            self.counters["unsupported"] += 1
            status = S_UNSUPP
        if status == S_IOERR:
            self.counters["errors"] += 1
        self.memory.write(status_addr, bytes([status]))
        return chain.head, written + 1

    def _range_ok(self, head: int, sector: int, nbytes: int, what: str) -> bool:
        if nbytes % SECTOR:
            self._warn("align", "%s request %d of %d bytes, not whole sectors", what, head,
                       nbytes)
            return False
        if sector > self.capacity or nbytes // SECTOR > self.capacity - sector:
            self._warn("range", "%s request %d for sectors %d+%d past the end (%d sectors)",
                       what, head, sector, nbytes // SECTOR, self.capacity)
            return False
        return True

    def _read(self, head, sector, data_in, data_out) -> tuple[int, int]:
        if data_in:
            self._warn("dir", "IN request %d carries device-readable data", head)
            return S_IOERR, 0
        nbytes = sum(n for _, n in data_out)
        if not self._range_ok(head, sector, nbytes, "IN"):
            return S_IOERR, 0
        views = [self.memory.slice(a, n) for a, n in data_out if n]
        try:
            got = os.preadv(self.fd, views, sector * SECTOR) if views else 0
        except OSError as e:
            self._warn("io", "read at sector %d: %s", sector, e)
            return S_IOERR, 0
        finally:
            for a, n in data_out:
                self.memory.mark_dirty(a, n)
        if got != nbytes:
            self._warn("io", "short read at sector %d: %d of %d bytes (image shrunk?)",
                       sector, got, nbytes)
            return S_IOERR, 0
        self.counters["reads"] += 1
        self.counters["bytes_read"] += nbytes
        return S_OK, nbytes

    def _write(self, head, sector, data_in, data_out) -> int:
        if data_out:
            self._warn("dir", "OUT request %d carries device-writable data", head)
            return S_IOERR
        if self.readonly:
            self._warn("ro", "OUT request %d to the read-only disk %s", head, self.path)
            return S_IOERR
        nbytes = sum(n for _, n in data_in)
        if not self._range_ok(head, sector, nbytes, "OUT"):
            return S_IOERR
        views = [self.memory.slice(a, n) for a, n in data_in if n]
        try:
            put = os.pwritev(self.fd, views, sector * SECTOR) if views else 0
        except OSError as e:
            self._warn("io", "write at sector %d: %s", sector, e)
            return S_IOERR
        if put != nbytes:
            self._warn("io", "short write at sector %d: %d of %d bytes", sector, put, nbytes)
            return S_IOERR
        self.counters["writes"] += 1
        self.counters["bytes_written"] += nbytes
        return S_OK

    def _flush(self) -> int:
        if self.readonly:
            return S_OK
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            self._warn("io", "fdatasync: %s", e)
            return S_IOERR
        self.counters["flushes"] += 1
        return S_OK

    def _copy_to_guest(self, data: bytes, segs) -> int:
        done = 0
        for a, n in segs:
            k = min(n, len(data) - done)
            if k <= 0:
                break
            self.memory.write(a, data[done:done + k])
            done += k
        return done

    # -- commands ----------------------------------------------------------------------
    def _cmd_query(self, args: dict):
        with self.lock:
            return {"path": self.path, "readonly": self.readonly, "size": self.size,
                    "locked": self.locked, **self.counters}

    def commands(self):
        return {"query-blk": self._cmd_query}

    # -- saved state ---------------------------------------------------------------------
    def save(self) -> dict:
        with self.lock:
            # Nothing is in flight once quiesced; the queues travel with the transport.
            return {"path": self.path, "size": self.size, "readonly": self.readonly,
                    "serial": self.serial}

    def restore(self, state: dict) -> None:
        if isinstance(state, dict):
            for key, mine in (("path", self.path), ("size", self.size),
                              ("readonly", self.readonly)):
                if key in state and state[key] != mine:
                    raise DeviceStateError(
                        f"{self.name}: the source's disk has {key} {state[key]!r:.80}, this "
                        f"one {mine!r}: open the same image on the destination")
        checked_state(self.name, state, {"path": frozenset({self.path}),
                                         "size": (self.size, self.size), "readonly": bool,
                                         "serial": bytes})
        if len(state["serial"]) != ID_BYTES:
            raise DeviceStateError(f"{self.name}: saved serial of {len(state['serial'])} "
                                   f"bytes, expected {ID_BYTES}")
        with self.lock:
            self.serial = state["serial"]


_TRUE, _FALSE = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


def disk_options(item) -> dict:
    """Checked Blk(...) keyword arguments from a path, a dict {"path", "readonly",
    "serial"} or a "path=FILE[,readonly=on][,serial=ID]" string (run-guest
    --disk). Raises BlkError saying what is wrong."""
    if isinstance(item, (str, os.PathLike)) and "=" not in str(item):
        item = {"path": os.fspath(item)}
    if isinstance(item, str):
        pairs = {}
        for part in item.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or not key:
                raise BlkError(f"disk {item!r}: {part!r} is not KEY=VALUE")
            if key in pairs:
                raise BlkError(f"disk {item!r}: {key} given twice")
            pairs[key] = value.strip()
        item = pairs
    if not isinstance(item, dict):
        raise BlkError(f"disk {item!r:.60} is not a path or a table of options")
    unknown = sorted(set(item) - {"path", "readonly", "serial"})
    if unknown:
        raise BlkError(f"disk: unknown option {unknown[0]!r}; known: path, readonly, serial")
    path = item.get("path")
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise BlkError("disk: path=FILE is missing")
    ro = item.get("readonly", False)
    if not isinstance(ro, bool):
        v = str(ro).strip().lower()
        if v not in _TRUE + _FALSE:
            raise BlkError(f"disk {path}: readonly={ro!r} is not on or off")
        ro = v in _TRUE
    serial = item.get("serial")
    if serial is not None and (not isinstance(serial, str) or len(serial.encode()) > ID_BYTES):
        raise BlkError(f"disk {path}: serial {serial!r:.40} is not a string of at most "
                       f"{ID_BYTES} bytes")
    return {"path": os.fspath(path), "readonly": ro, "serial": serial}


def _trim(descs: list[Descriptor], skip: int, drop_tail: int) -> list[tuple[int, int]]:
    """The (addr, len) segments of descs without their first `skip` and last
    `drop_tail` bytes (the header may share a descriptor with data, and the
    status byte with the last data bytes)."""
    segs = [(d.addr, d.length) for d in descs]
    out = []
    total = sum(n for _, n in segs)
    end = total - drop_tail
    pos = 0
    for a, n in segs:
        lo, hi = max(pos, skip), min(pos + n, end)
        if hi > lo:
            out.append((a + lo - pos, hi - lo))
        pos += n
    return out
