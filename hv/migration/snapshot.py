"""Snapshots: a guest saved to a file, and a machine restored from one.

The file (version 1):

    [0, 64 KiB)            header: SNAPSHOT_MAGIC, u32 JSON length, the
                           JSON's sha256, the JSON (what the machine is,
                           where everything else lies, their sha256s)
    [64 KiB, +mem size)    the guest physical image: page p of guest memory
                           at 64 KiB + p * 4096. Only pages with data are
                           written; free pages (the guest's free page
                           bitmap) and zero pages are holes of a sparse
                           file, so they take no disk space and read as zero
    then                   the stored runs (starts, counts: u64 arrays), a
                           64-bit hash per stored page, the machine state
                           (hv.migration.state_codec)

The header goes in last, so a file whose writing was cut short has no
valid header. The image is page-aligned at the same offsets as guest
memory, so a restore maps it (MAP_PRIVATE, copy-on-write, as Firecracker
does) instead of reading it: restore time does not grow with guest size.
A mapped snapshot must not change while the guest runs from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time

import numpy as np

from .. import __version__
from . import pages
from .dirty_log import dirty_log_for
from ..memory import PAGE_SIZE
from .protocol import MigrationError
from .state_codec import decode_state, encode_state

SNAPSHOT_MAGIC = b"HVSNAP\x00\x01"
SNAPSHOT_VERSION = 1
HEADER_BYTES = 64 << 10
_PREFIX = struct.Struct("<8sI32s")

#: who holds the guest paused while it is saved (a migration's hold: cont
#: is refused until the state is on disk)
SNAPSHOT_PAUSE_OWNER = "migration"


class SnapshotError(MigrationError):
    """A snapshot that cannot be written, or a file that cannot be restored."""


def parse_file_uri(uri: str) -> str | None:
    """'file:PATH' -> PATH; None for any other URI."""
    if not uri.startswith("file:"):
        return None
    path = uri[5:]
    if not path:
        raise SnapshotError("file: URI without a path; write file:/path/to/snapshot")
    return path


def _sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _machine_shape(machine) -> dict:
    mem = machine.memory
    return {"mem_size": mem.size, "ram_size": mem.ram_size,
            "regions": [list(r) for r in mem.regions], "cpus": len(machine.vcpus),
            "devices": sorted(d.name for d in machine.devices())}


# -- save -----------------------------------------------------------------------------

def save(machine, path: str, *, free_pages: bool = True, free_page_timeout_ms: int = 30000,
         resume: bool = True) -> dict:
    """Write machine's guest to path (atomically: a temporary file renamed
    at the end). The guest is paused while its pages and state are written;
    with resume it runs again afterwards, else it stays paused for good
    (postmigrate, as after QEMU's migrate to a file). With free_pages and a
    balloon that offers the free page bitmap, the free pages are not stored
    (a dirty log catches what the guest allocates after answering). Returns
    statistics."""
    t0 = time.monotonic()
    mem = machine.memory
    log = dirty_log_for(machine, "auto")
    log.start()
    paused = False
    tmp = f"{path}.tmp-{os.getpid()}"
    stats = {"path": path, "pages_total": mem.npages, "free_page_info": None}
    try:
        free = None
        balloon = machine.balloon
        if free_pages and balloon is not None:
            try:
                words, info = balloon.request_free_page_bitmap(free_page_timeout_ms)
                free = pages.as_bitmap(words, mem.npages)
                stats["free_page_info"] = dict(info)
            except Exception as e:
                stats["free_page_info"] = {"warning": f"free page bitmap unavailable ({e}); "
                                                      f"every page is stored"}
        t_pause = time.monotonic()
        machine.pause(SNAPSHOT_PAUSE_OWNER)
        paused = True
        state = machine.save_state()
        keep = mem.ram_bitmap()
        stats["pages_skipped_free"] = 0
        if free is not None:
            free, _ = pages.andnot(free, log.sync())    # allocated since the answer
            ram = pages.count(keep)
            keep, n_keep = pages.andnot(keep, free)
            stats["pages_skipped_free"] = ram - n_keep
        data, _zero, nzero = pages.classify(mem, keep, mem.npages)
        stats["pages_skipped_zero"] = nzero
        starts, counts = pages.all_runs(data, mem.npages)
        stored = int(counts.sum()) if len(counts) else 0
        hashes = pages.hashes(mem, starts, counts)
        blob = encode_state(state)
        shape = _machine_shape(machine)
        _write(tmp, mem, starts, counts, hashes, blob, shape)
        os.replace(tmp, path)
        stats.update(pages_stored=stored, bytes_written=stored * PAGE_SIZE + len(blob),
                     file_bytes=os.path.getsize(path),
                     pause_ms=round((time.monotonic() - t_pause) * 1000, 3))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if paused:
            machine.resume(SNAPSHOT_PAUSE_OWNER)
        raise
    finally:
        log.stop()
    if resume:
        machine.resume(SNAPSHOT_PAUSE_OWNER)
    else:
        machine.enter_postmigrate()
    stats["total_ms"] = round((time.monotonic() - t0) * 1000, 3)
    return stats


def _write(tmp, mem, starts, counts, hashes, blob, shape) -> None:
    image_end = HEADER_BYTES + mem.size
    tables = (starts.astype("<u8").tobytes() + counts.astype("<u8").tobytes()
              + hashes.astype("<u8").tobytes())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, image_end + len(tables) + len(blob))
        for s, c in zip(starts.tolist(), counts.tolist()):
            a, b = s * PAGE_SIZE, (s + c) * PAGE_SIZE
            view = mem.view[a:b]
            off = 0
            while off < len(view):
                off += os.pwrite(fd, view[off:], HEADER_BYTES + a + off)
        os.pwrite(fd, tables, image_end)
        os.pwrite(fd, blob, image_end + len(tables))
        header = dict(shape, version=SNAPSHOT_VERSION, hv=__version__, page_size=PAGE_SIZE,
                      image_offset=HEADER_BYTES, runs=len(starts), stored_pages=len(hashes),
                      tables_offset=image_end, tables_bytes=len(tables),
                      tables_sha256=_sha(tables), state_offset=image_end + len(tables),
                      state_bytes=len(blob), state_sha256=_sha(blob), created=time.time())
        js = json.dumps(header, sort_keys=True).encode()
        if _PREFIX.size + len(js) > HEADER_BYTES:
            raise SnapshotError("snapshot header too large")
        os.fsync(fd)        # the image and state first: a header names only what is there
        os.pwrite(fd, _PREFIX.pack(SNAPSHOT_MAGIC, len(js), hashlib.sha256(js).digest()) + js,
                  0)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- restore --------------------------------------------------------------------------

class Snapshot:
    """An opened snapshot file, its header and tables checked."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise SnapshotError(f"cannot open snapshot {path!r}: {e.strerror}") from None
        try:
            self._read_header()
        except BaseException:
            os.close(self.fd)
            raise

    def _bad(self, what: str) -> SnapshotError:
        return SnapshotError(f"snapshot {self.path!r}: {what}")

    def _read(self, offset: int, n: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        if len(data) != n:
            raise self._bad("truncated (the file ends before its data; it was not written "
                            "completely)")
        return data

    def _read_header(self) -> None:
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, HEADER_BYTES, 0)
        if len(head) < _PREFIX.size or not head.startswith(SNAPSHOT_MAGIC[:6]):
            raise self._bad("not an hv snapshot (no HVSNAP header)")
        magic, n, digest = _PREFIX.unpack_from(head)
        if magic != SNAPSHOT_MAGIC:
            raise self._bad(f"snapshot format {magic[6:].hex()} is not version "
                            f"{SNAPSHOT_VERSION}; restore it with the hv that wrote it")
        js = head[_PREFIX.size:_PREFIX.size + n]
        if n > HEADER_BYTES - _PREFIX.size or hashlib.sha256(js).digest() != digest:
            raise self._bad("the header is corrupted (checksum mismatch)")
        try:
            h = json.loads(js)
        except ValueError:
            raise self._bad("the header is corrupted (not JSON)") from None
        if not isinstance(h, dict) or h.get("version") != SNAPSHOT_VERSION or \
                h.get("page_size") != PAGE_SIZE:
            raise self._bad(f"version {h.get('version') if isinstance(h, dict) else '?'} / "
                            f"page size not what this hv reads")
        self.header = h
        end = h["state_offset"] + h["state_bytes"]
        if size < end:
            raise self._bad(f"truncated: {size} bytes, its data ends at {end}")
        tables = self._read(h["tables_offset"], h["tables_bytes"])
        if _sha(tables) != h["tables_sha256"]:
            raise self._bad("the page tables are corrupted (checksum mismatch)")
        runs, stored = h["runs"], h["stored_pages"]
        if len(tables) != 8 * (2 * runs + stored):
            raise self._bad("the page tables have the wrong size")
        arr = np.frombuffer(tables, dtype="<u8")
        self.starts, self.counts = arr[:runs].copy(), arr[runs:2 * runs].copy()
        self.hashes = arr[2 * runs:].copy()
        npages = h["mem_size"] // PAGE_SIZE
        if not pages.ranges_valid(self.starts, self.counts, npages) or \
                int(self.counts.sum() if runs else 0) != stored:
            raise self._bad("the page tables name pages outside guest memory")

    def check_fits(self, machine) -> None:
        """The machine is the one the snapshot was taken of: same RAM layout,
        vCPUs and devices (else a clear error naming the difference)."""
        h, mine = self.header, _machine_shape(machine)
        if h["regions"] != mine["regions"]:
            raise self._bad(f"taken of a guest with {h['ram_size'] >> 20} MiB of RAM; this "
                            f"machine has {mine['ram_size'] >> 20} MiB (run-guest --mem "
                            f"{h['ram_size'] >> 20})")
        if h["cpus"] != mine["cpus"]:
            raise self._bad(f"taken of a guest with {h['cpus']} vCPUs; this machine has "
                            f"{mine['cpus']} (run-guest --cpus {h['cpus']})")
        if h["devices"] != mine["devices"]:
            raise self._bad(f"taken of a guest with devices {h['devices']}; this machine has "
                            f"{mine['devices']}: start it with the same devices")

    def state(self):
        h = self.header
        blob = self._read(h["state_offset"], h["state_bytes"])
        if _sha(blob) != h["state_sha256"]:
            raise self._bad("the machine state is corrupted (checksum mismatch)")
        try:
            return decode_state(blob)
        except MigrationError as e:
            raise self._bad(str(e)) from None

    def close(self) -> None:
        os.close(self.fd)


def restore(machine, path: str, *, mode: str = "map", verify: bool = False,
            start: bool = True) -> dict:
    """Load the snapshot at path into machine (created, not booted) and
    start it (unless start is False). mode "map" maps the image copy-on-write; "copy" reads it into
    guest memory. With verify every stored page's hash is checked first.
    Nothing runs when any check fails (SnapshotError says which)."""
    if mode not in ("map", "copy"):
        raise SnapshotError(f"snapshot restore mode {mode!r}: give map or copy")
    t0 = time.monotonic()
    snap = Snapshot(path)
    try:
        snap.check_fits(machine)
        state = snap.state()
        mem = machine.memory
        if mode == "map":
            mem.map_file(snap.fd, snap.header["image_offset"])
        else:
            _copy_in(snap, mem)
        if verify:
            got = pages.hashes(mem, snap.starts, snap.counts)
            bad = np.flatnonzero(got != snap.hashes)
            if len(bad):
                pfn = int(pages.range_pfns(snap.starts, snap.counts)[bad[0]])
                raise snap._bad(f"{len(bad)} stored pages differ from their hashes (first: "
                                f"guest page {pfn:#x}): the image is corrupted")
        machine.restore_state(state)
        t_restored = time.monotonic()
        if start:
            machine.start()
    finally:
        snap.close()
    h = snap.header
    return {"path": path, "mode": mode, "verified": verify, "pages_stored": h["stored_pages"],
            "restore_ms": round((t_restored - t0) * 1000, 3)}


def _copy_in(snap: Snapshot, mem) -> None:
    base = snap.header["image_offset"]
    for s, c in zip(snap.starts.tolist(), snap.counts.tolist()):
        a, b = s * PAGE_SIZE, (s + c) * PAGE_SIZE
        view = mem.view[a:b]
        got = os.preadv(snap.fd, [view], base + a)
        if got != b - a:
            raise snap._bad("truncated image")
