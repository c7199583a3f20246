"""virtio-balloon: memory the guest gives back, its statistics, and which of its
pages are free.

Queues (present when negotiated, numbered densely as Linux does):
inflate, deflate, stats, free_page (hint), reporting, bitmap (hv extension).
Constants and wire layouts live in balloon_defs.

What migration uses (all thread-safe, callable from a non-vCPU thread):

  request_free_page_bitmap(timeout_ms, drop_cache="none") -> (words, info)
      Writes a new bitmap command id to config and raises a config interrupt;
      the patched guest driver snapshots its buddy allocator's free lists and
      answers in chunks on the bitmap queue. words is a KVM-layout uint64
      bitmap over guest RAM (bit set = free at the snapshot). Dirty logging
      must be on before calling: a page allocated after the snapshot is
      caught by the next dirty-log sync.
  free_page_hint_start() / free_page_hint_stop() / free_page_hint_done()
      The Linux 4.20+ hint protocol (cmd_id >= 2, STOP = 0, DONE = 1).
      hinted_bitmap(), take_hinted_bitmap(), clear_hinted(dirty_words).
  poison_value() -> int | None
      The value free pages hold when PAGE_POISON was negotiated; a
      destination that skips free pages must fill them with it.
  inflated_bitmap()
      Pages in the balloon (discarded on the host: they read as zero).

The guest's notifications are processed on the vCPU thread under the
transport lock; request_* wait on a condition of that lock, so they never
block the vCPU.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time

import numpy as np

from ... import params
from ...memory import (PAGE_SHIFT, PAGE_SIZE, GuestMemory, bitmap_words, pack_bitmap,
                       unpack_bitmap)
from .. import DeviceStateError, checked_state
from .balloon_defs import (
    BITMAP_F_ABORTED, BITMAP_F_LAST, BITMAP_HDR, CFG_ACTUAL, CFG_FREE_PAGE_BITMAP_CMD_ID,
    CFG_FREE_PAGE_BITMAP_DROP, CFG_FREE_PAGE_HINT_CMD_ID, CFG_NUM_PAGES, CFG_POISON_VAL, CMD_ID_DONE, CMD_ID_STOP,
    CONFIG_SIZE, DROP_CACHE, F_DEFLATE_ON_OOM, F_FREE_PAGE_BITMAP, F_FREE_PAGE_HINT, F_MUST_TELL_HOST,
    F_PAGE_POISON, F_REPORTING, F_STATS_VQ, FEATURE_NAMES, PFN_SHIFT, QUEUE_ROLES, STAT,
    STAT_NAMES, VIRTIO_ID_BALLOON, BalloonError, BalloonTimeout)
from .device import VirtioDevice
from .queue import VIRTIO_F_INDIRECT_DESC, DescChain, Virtqueue, VirtioError

log = logging.getLogger("hv.virtio.balloon")

MIB_PAGES = (1 << 20) >> PFN_SHIFT

# Free page hint states (QEMU's names).
HINT_STOP, HINT_REQUESTED, HINT_START, HINT_DONE = "stop", "requested", "start", "done"


def _ranges(pfns: np.ndarray):
    """Contiguous runs (first, count) of a sorted array of PFNs."""
    if len(pfns) == 0:
        return
    breaks = np.nonzero(np.diff(pfns) != 1)[0] + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pfns)]))
    for s, e in zip(starts, ends):
        yield int(pfns[s]), int(e - s)


#: Balloon(...) keyword arguments configurable by name (run-guest --balloon-opt
#: KEY=VALUE, MachineConfig.balloon_options), with their short spellings.
OPTION_TYPES = {"deflate_on_oom": bool, "stats": bool, "free_page_hint": bool,
                "reporting": bool, "page_poison": bool, "free_page_bitmap": bool,
                "must_tell_host": bool, "stats_interval_s": float}
OPTION_ALIASES = {"hint": "free_page_hint", "bitmap": "free_page_bitmap",
                  "poison": "page_poison", "oom": "deflate_on_oom"}
_TRUE, _FALSE = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


def option_names() -> list[str]:
    return sorted(OPTION_TYPES) + sorted(OPTION_ALIASES)


def balloon_option(key: str, value) -> tuple[str, object]:
    """One balloon option by name (or alias) -> (Balloon keyword, typed value).
    value is a string ("on"/"off", "2.5") or already a bool/number. Raises
    BalloonError naming the known options or the accepted values."""
    name = OPTION_ALIASES.get(key, key)
    kind = OPTION_TYPES.get(name)
    if kind is None:
        raise BalloonError(f"unknown balloon option {key!r}; known: "
                           + ", ".join(option_names()))
    if kind is bool:
        if isinstance(value, bool):
            return name, value
        v = str(value).strip().lower()
        if v in _TRUE or v in _FALSE:
            return name, v in _TRUE
        raise BalloonError(f"balloon option {key}: {value!r} is not on or off")
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if isinstance(value, bool) or not number >= 0 or number == float("inf"):
        raise BalloonError(f"balloon option {key}: {value!r} is not a number >= 0")
    return name, number


def balloon_options(options) -> dict:
    """Checked Balloon(...) keyword arguments from {key: value} or "KEY=VALUE" strings."""
    if isinstance(options, dict):
        pairs = list(options.items())
    else:
        pairs = []
        for item in options:
            key, sep, value = str(item).partition("=")
            if not sep or not key.strip():
                raise BalloonError(f"balloon option {item!r} is not KEY=VALUE")
            pairs.append((key.strip(), value.strip()))
    return dict(balloon_option(k, v) for k, v in pairs)


class Balloon(VirtioDevice):
    device_id = VIRTIO_ID_BALLOON
    name = "balloon"

    def __init__(self, memory: GuestMemory, *, deflate_on_oom: bool = True,
                 stats: bool = True, free_page_hint: bool = True,
                 reporting: bool = True, page_poison: bool = True,
                 free_page_bitmap: bool = True, must_tell_host: bool = False,
                 stats_interval_s: float = 0.0):
        super().__init__()
        self.memory = memory
        self.npages = memory.npages
        #: fn(actual_pages) whenever the driver reports a new balloon size
        self.actual_listeners: list = []
        offer = 1 << VIRTIO_F_INDIRECT_DESC
        for on, bit in ((must_tell_host, F_MUST_TELL_HOST), (stats, F_STATS_VQ),
                        (deflate_on_oom, F_DEFLATE_ON_OOM),
                        (free_page_hint, F_FREE_PAGE_HINT), (page_poison, F_PAGE_POISON),
                        (reporting, F_REPORTING), (free_page_bitmap, F_FREE_PAGE_BITMAP)):
            if on:
                offer |= 1 << bit
        self._offer = offer
        self.stats_interval_s = stats_interval_s
        self._cond = threading.Condition(self.lock)
        self._stop = threading.Event()
        self._stats_thread: threading.Thread | None = None
        self._init_state()
        # Ids survive device resets so the guest never sees an old one reused.
        self._hint_seq = 1
        self._bitmap_seq = 0

    def _init_state(self) -> None:
        self.roles: list[str] = []
        self.num_pages = getattr(self, "num_pages", 0)   # the host's target survives reset
        self.actual = 0
        self.poison_val = 0
        self.inflated = np.zeros(self.npages, dtype=bool)
        # stats
        self.stats: dict[str, int] = {}
        self.stats_time: float | None = None
        self.stats_head: int | None = None
        self._stats_seq = 0
        # free page hint
        self.hint_status = HINT_STOP
        self.hint_cmd_id = 0
        self.hinted = np.zeros(self.npages, dtype=bool)
        self.hint_rounds = 0
        # free page reporting
        self.reported_bytes = 0
        # free page bitmap
        self.bitmap_cmd_id = 0
        self.bitmap_drop = 0
        self._bm: dict | None = None
        self.bitmap_rounds = 0
        self.counters = {"inflated_pages": 0, "deflated_pages": 0, "bad_pfns": 0}

    # -- VirtioDevice -------------------------------------------------------------
    def attach(self, transport) -> None:
        super().attach(transport)
        self._cond = threading.Condition(self.lock)

    def features(self) -> int:
        return self._offer | super().features()

    def _roles_for(self, features: int) -> list[tuple[str, int]]:
        return [(role, size) for role, bit, size in QUEUE_ROLES
                if bit is None or features >> bit & 1]

    def queue_sizes(self, features: int) -> list[int]:
        return [size for _, size in self._roles_for(features)]

    def activate(self, features: int, queues: list[Virtqueue]) -> None:
        super().activate(features, queues)
        self.roles = [role for role, _ in self._roles_for(features)]
        names = [n for b, n in FEATURE_NAMES.items() if features >> b & 1]
        log.info("balloon: driver ready with %s", ",".join(names) or "no features")
        if self.stats_interval_s > 0 and self._stats_thread is None:
            self._stats_thread = threading.Thread(target=self._stats_loop,
                                                  name="balloon-stats", daemon=True)
            self._stats_thread.start()

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self._fail_bitmap("the guest reset the balloon device")
            self._init_state()
            self._cond.notify_all()

    def _config(self) -> bytearray:
        cfg = bytearray(CONFIG_SIZE)
        for off, value in ((CFG_NUM_PAGES, self.num_pages), (CFG_ACTUAL, self.actual),
                           (CFG_FREE_PAGE_HINT_CMD_ID, self._hint_config_id()),
                           (CFG_POISON_VAL, self.poison_val),
                           (CFG_FREE_PAGE_BITMAP_CMD_ID, self.bitmap_cmd_id),
                           (CFG_FREE_PAGE_BITMAP_DROP, self.bitmap_drop)):
            struct.pack_into("<I", cfg, off, value)
        return cfg

    def read_config(self, offset: int, size: int) -> bytes:
        with self.lock:
            cfg = self._config()
        return bytes(cfg[offset:offset + size]).ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        with self.lock:
            cfg = self._config()
            if offset < 0 or offset + len(data) > CONFIG_SIZE:
                log.debug("balloon: config write at %d outside config", offset)
                return
            cfg[offset:offset + len(data)] = data
            actual, poison = struct.unpack_from("<I", cfg, CFG_ACTUAL)[0], \
                struct.unpack_from("<I", cfg, CFG_POISON_VAL)[0]
            # Only actual and poison_val are the driver's to write.
            changed = False
            if offset < CFG_ACTUAL + 4 and offset + len(data) > CFG_ACTUAL:
                changed = self.actual != actual
                self.actual = actual
            if offset < CFG_POISON_VAL + 4 and offset + len(data) > CFG_POISON_VAL:
                self.poison_val = poison
        if changed:
            # outside the lock: a listener may query the balloon
            for fn in list(self.actual_listeners):
                try:
                    fn(actual)
                except Exception:
                    log.exception("balloon: actual listener failed")

    def _hint_config_id(self) -> int:
        if self.hint_status in (HINT_REQUESTED, HINT_START):
            return self.hint_cmd_id
        if self.hint_status == HINT_DONE:
            return CMD_ID_DONE
        return CMD_ID_STOP

    def process(self, queue_index: int) -> None:
        if queue_index >= len(self.roles):
            return
        role = self.roles[queue_index]
        q = self.queues[queue_index]
        handler = getattr(self, "_handle_" + role)
        used = False
        try:
            while True:
                chain = q.pop()
                if chain is None:
                    break
                if handler(q, chain):
                    used = True
        except Exception as e:
            # The device is about to need a reset: nobody will answer.
            self._fail_bitmap(f"the device needs a reset: {e}")
            raise
        finally:
            if used:
                self.signal_used(queue_index)

    def _fail_bitmap(self, reason: str) -> None:
        if self._bm is not None and not self._bm["done"]:
            self._bm["error"] = reason
            self._bm["done"] = True
            self._cond.notify_all()

    # -- inflate / deflate ------------------------------------------------------------
    def _pfns(self, chain: DescChain) -> np.ndarray:
        data = chain.read_all(self.memory)
        pfns = np.frombuffer(data[:len(data) // 4 * 4], dtype="<u4").astype(np.int64)
        bad = pfns >= self.npages
        if bad.any():
            self.counters["bad_pfns"] += int(bad.sum())
            log.warning("balloon: guest named %d page frames outside guest RAM, e.g. %#x",
                        int(bad.sum()), int(pfns[bad][0]))
            pfns = pfns[~bad]
        return np.unique(pfns)

    def _handle_inflate(self, q: Virtqueue, chain: DescChain) -> bool:
        pfns = self._pfns(chain)
        self.inflated[pfns] = True
        for first, count in _ranges(pfns):
            self._discard(first << PFN_SHIFT, count << PFN_SHIFT)
        self.counters["inflated_pages"] += len(pfns)
        q.add_used(chain.head, 0)
        return True

    def _handle_deflate(self, q: Virtqueue, chain: DescChain) -> bool:
        pfns = self._pfns(chain)
        self.inflated[pfns] = False
        self.counters["deflated_pages"] += len(pfns)
        q.add_used(chain.head, 0)
        return True

    def _discard(self, gpa: int, length: int) -> None:
        """Give pages back to the host. They now read as zero: that is a change
        the guest did not make, so it goes into the VMM's dirty log and a
        migration sends the zeros instead of leaving older data on the
        destination."""
        self.memory.discard(gpa, length)
        self.memory.mark_dirty(gpa, length)

    def set_target(self, target_mib: float) -> None:
        if isinstance(target_mib, bool) or not isinstance(target_mib, (int, float)) or \
                not math.isfinite(target_mib):
            raise BalloonError(f"balloon target {target_mib!r} is not a number of MiB")
        pages = int(target_mib * MIB_PAGES)
        if pages < 0 or pages > self.npages:
            raise BalloonError(f"balloon target {target_mib} MiB is outside 0.."
                               f"{self.npages // MIB_PAGES} MiB of guest RAM")
        with self.lock:
            self.num_pages = pages
            self.config_changed()

    def inflated_bitmap(self) -> np.ndarray:
        with self.lock:
            return pack_bitmap(self.inflated)

    # -- stats ---------------------------------------------------------------------
    def _handle_stats(self, q: Virtqueue, chain: DescChain) -> bool:
        if self.stats_head is not None:
            # The driver only ever has one stats buffer; a second one means it
            # lost track. Give the old one back.
            q.add_used(self.stats_head, 0)
        data = chain.read_all(self.memory, limit=STAT.size * 64)
        for i in range(len(data) // STAT.size):
            tag, val = STAT.unpack_from(data, i * STAT.size)
            self.stats[STAT_NAMES.get(tag, f"tag_{tag}")] = val
        self.stats_time = time.time()
        self.stats_head = chain.head
        self._stats_seq += 1
        self._cond.notify_all()
        return False  # kept until the host wants fresh stats

    def request_stats(self, timeout_ms: int = 2000) -> dict[str, int]:
        """Ask the guest for fresh statistics; returns them (the last ones on timeout)."""
        with self.lock:
            # paused: giving the buffer back would write the used ring
            if not self.active or "stats" not in self.roles or self.quiesced:
                return dict(self.stats)
            if self.stats_head is not None:
                seq = self._stats_seq
                idx = self.roles.index("stats")
                self.queues[idx].add_used(self.stats_head, 0)
                self.stats_head = None
                self.signal_used(idx)
                self._cond.wait_for(lambda: self._stats_seq != seq or not self.active,
                                    timeout_ms / 1000)
            return dict(self.stats)

    def _stats_loop(self) -> None:
        while not self._stop.wait(self.stats_interval_s):
            try:
                self.request_stats()
            except Exception as e:  # keep polling; the device may be reset
                log.debug("balloon: stats poll: %s", e)

    # -- free page hint -------------------------------------------------------------
    def _handle_free_page(self, q: Virtqueue, chain: DescChain) -> bool:
        if chain.readable:
            data = chain.read_all(self.memory, limit=4)
            if len(data) < 4:
                raise VirtioError("free page hint: command id buffer shorter than 4 bytes")
            cmd_id = struct.unpack("<I", data)[0]
            if self.hint_status in (HINT_REQUESTED, HINT_START):
                if cmd_id == CMD_ID_STOP:
                    self.hint_status = HINT_STOP
                    self.hint_rounds += 1
                    self._cond.notify_all()
                elif cmd_id == self.hint_cmd_id:
                    self.hint_status = HINT_START
        if chain.writable and self.hint_status == HINT_START:
            for d in chain.writable:
                first = (d.addr + PAGE_SIZE - 1) >> PAGE_SHIFT
                last = (d.addr + d.length) >> PAGE_SHIFT
                if last > first:
                    self.hinted[first:last] = True
        q.add_used(chain.head, 0)
        return True

    def _hint_feature(self) -> None:
        if not self.active or not self.has_feature(F_FREE_PAGE_HINT):
            raise BalloonError("the guest's balloon driver did not negotiate "
                               "VIRTIO_BALLOON_F_FREE_PAGE_HINT")

    def free_page_hint_start(self, clear: bool = True) -> int:
        """Start a hint round: a new cmd_id in config + config interrupt."""
        with self.lock:
            self._hint_feature()
            self._hint_seq = self._hint_seq + 1 if self._hint_seq < 0xFFFFFFFF else 2
            self.hint_cmd_id = max(self._hint_seq, 2)
            self.hint_status = HINT_REQUESTED
            if clear:
                self.hinted[:] = False
            self.config_changed()
            return self.hint_cmd_id

    def free_page_hint_stop(self) -> None:
        """Ask the guest to stop hinting (before a dirty-log sync)."""
        with self.lock:
            if self.hint_status in (HINT_REQUESTED, HINT_START):
                self.hint_status = HINT_STOP
                self.config_changed()

    def free_page_hint_done(self) -> None:
        """Let the guest take its hinted blocks back (migration finished)."""
        with self.lock:
            if self.active and self.has_feature(F_FREE_PAGE_HINT):
                self.hint_status = HINT_DONE
                self.config_changed()

    def free_page_hint_wait(self, timeout_ms: int) -> bool:
        """Wait until the guest posted STOP for the current round."""
        with self.lock:
            return self._cond.wait_for(lambda: self.hint_status != HINT_START and
                                       self.hint_status != HINT_REQUESTED,
                                       timeout_ms / 1000)

    def hinted_bitmap(self) -> np.ndarray:
        with self.lock:
            return pack_bitmap(self.hinted)

    def take_hinted_bitmap(self) -> np.ndarray:
        with self.lock:
            words = pack_bitmap(self.hinted)
            self.hinted[:] = False
            return words

    def clear_hinted(self, dirty_words: np.ndarray) -> None:
        """Forget hints for pages dirtied since (KVM-layout words)."""
        dirty = unpack_bitmap(dirty_words, self.npages)
        with self.lock:
            self.hinted &= ~dirty

    # -- free page reporting ------------------------------------------------------------
    def _handle_reporting(self, q: Virtqueue, chain: DescChain) -> bool:
        # With page poisoning the free pages hold poison_val, not zeros: keep them.
        if not (self.has_feature(F_PAGE_POISON) and self.poison_val):
            for d in chain.writable + chain.readable:
                start = (d.addr + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
                end = (d.addr + d.length) & ~(PAGE_SIZE - 1)
                if end > start:
                    self._discard(start, end - start)
                    self.reported_bytes += end - start
        q.add_used(chain.head, 0)
        return True

    def poison_value(self) -> int | None:
        """poison_val if PAGE_POISON was negotiated (free pages hold it), else None."""
        with self.lock:
            return self.poison_val if self.active and self.has_feature(F_PAGE_POISON) else None

    # -- free page bitmap (hv extension) --------------------------------------------------
    def _handle_bitmap(self, q: Virtqueue, chain: DescChain) -> bool:
        q.add_used(chain.head, 0)
        bm = self._bm
        if chain.readable_len < BITMAP_HDR.size:
            raise VirtioError(f"free page bitmap: chunk of {chain.readable_len} bytes is "
                              f"shorter than its {BITMAP_HDR.size}-byte header")
        hdr = chain.read_all(self.memory, limit=BITMAP_HDR.size)
        cmd_id, flags, start, nr = BITMAP_HDR.unpack(hdr)
        if bm is None or bm["done"] or cmd_id != bm["cmd_id"]:
            log.debug("balloon: stale bitmap chunk for command %d", cmd_id)
            return True
        if flags & BITMAP_F_ABORTED:
            bm["error"] = "the guest aborted the free page bitmap"
            bm["done"] = True
            self._cond.notify_all()
            return True
        nbytes = (nr + 63) // 64 * 8
        if BITMAP_HDR.size + nbytes > chain.readable_len:
            raise VirtioError(f"free page bitmap: chunk claims {nr} pages but carries only "
                              f"{chain.readable_len - BITMAP_HDR.size} bytes of bits")
        raw = chain.read_all(self.memory, limit=BITMAP_HDR.size + nbytes)[BITMAP_HDR.size:]
        if start < self.npages and nr:
            n = min(nr, self.npages - start)
            bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8),
                                 bitorder="little")[:n].astype(bool)
            bm["bits"][start:start + n] = bits
            bm["covered"] += n
        bm["chunks"] += 1
        bm["guest_pfns"] = max(bm["guest_pfns"], start + nr)
        if flags & BITMAP_F_LAST:
            bm["done"] = True
            bm["end"] = time.monotonic()
            self._cond.notify_all()
        return True

    def request_free_page_bitmap(self, timeout_ms: int = 30000,
                                 drop_cache: str = "none") -> tuple[np.ndarray, dict]:
        """Ask the guest for a snapshot of its free pages; see the module
        docstring. drop_cache (none, pagecache, all) asks it to drop clean
        page cache (and reclaimable slab) first, so those pages are free too."""
        if drop_cache not in DROP_CACHE:
            raise BalloonError(f"drop_cache {drop_cache!r} is not one of "
                               + ", ".join(DROP_CACHE))
        with self.lock:
            if not self.active or not self.has_feature(F_FREE_PAGE_BITMAP):
                raise BalloonError(
                    "the guest's balloon driver did not negotiate the free page bitmap "
                    f"(feature bit {F_FREE_PAGE_BITMAP}); boot a guest kernel with "
                    "guest-images/patches/0010-virtio-balloon-free-page-bitmap.patch")
            if self.transport is not None and self.transport.broken:
                raise BalloonError("the balloon device needs a reset: "
                                   f"{self.transport.needs_reset_reason}")
            self._bitmap_seq = self._bitmap_seq + 1 if self._bitmap_seq < 0xFFFFFFFF else 1
            cmd_id = self._bitmap_seq
            bm = {"cmd_id": cmd_id, "bits": np.zeros(self.npages, dtype=bool),
                  "covered": 0, "chunks": 0, "guest_pfns": 0, "done": False,
                  "error": None, "start": time.monotonic(), "end": None}
            if self._bm is not None and not self._bm["done"]:
                self._bm["error"] = "superseded by a newer request"
                self._bm["done"] = True
            self._bm = bm
            self.bitmap_cmd_id = cmd_id
            self.bitmap_drop = DROP_CACHE[drop_cache]
            self.config_changed()
            self._cond.notify_all()
            ok = self._cond.wait_for(lambda: bm["done"], timeout_ms / 1000)
            if not ok:
                bm["done"] = True
                bm["error"] = "timeout"
                raise BalloonTimeout(f"the guest did not send its free page bitmap within "
                                     f"{timeout_ms} ms (command {cmd_id})")
            if bm["error"]:
                raise BalloonError(f"free page bitmap {cmd_id}: {bm['error']}")
            self.bitmap_rounds += 1
            bits = bm["bits"]
            # Pages in the balloon are free for the host too (they read as zero).
            info = {"cmd_id": cmd_id, "free_pages": int(bits.sum()), "drop_cache": drop_cache,
                    "total_pages": self.npages, "guest_pfns": bm["guest_pfns"],
                    "chunks": bm["chunks"],
                    "elapsed_ms": round((bm["end"] - bm["start"]) * 1000, 3)}
            return pack_bitmap(bits), info

    def free_page_bitmap(self, timeout_ms: int = 30000) -> np.ndarray:
        """request_free_page_bitmap() without the info: KVM-layout uint64 words."""
        return self.request_free_page_bitmap(timeout_ms)[0]

    def has_free_page_bitmap(self) -> bool:
        with self.lock:
            return self.active and self.has_feature(F_FREE_PAGE_BITMAP)

    # -- commands --------------------------------------------------------------------
    def _cmd_balloon(self, args: dict):
        params.refuse_unknown("balloon", args, ("target_mib",))
        self.set_target(params.take(args, "target_mib", params.number, 0,
                                    self.npages / MIB_PAGES))
        return {}

    def _cmd_query(self, args: dict):
        params.refuse_unknown("query-balloon", args, ("refresh", "timeout_ms"))
        if params.take(args, "refresh", params.boolean, default=False):
            self.request_stats(params.take(args, "timeout_ms", params.integer, 0, 600_000,
                                           default=2000))
        with self.lock:
            return {"target_mib": self.num_pages / MIB_PAGES,
                    "actual_mib": self.actual / MIB_PAGES,
                    "target_pages": self.num_pages, "actual_pages": self.actual,
                    "inflated_pages": int(self.inflated.sum()),
                    "features": [n for b, n in FEATURE_NAMES.items()
                                 if self.acked_features >> b & 1],
                    "stats": dict(self.stats), "stats_time": self.stats_time,
                    "reported_mib": self.reported_bytes / (1 << 20),
                    "poison_value": self.poison_value()}

    def _cmd_bitmap(self, args: dict):
        params.refuse_unknown("request-free-page-bitmap", args, ("timeout_ms", "drop_cache"))
        _, info = self.request_free_page_bitmap(
            params.take(args, "timeout_ms", params.integer, 1, 600_000, default=30000),
            params.take(args, "drop_cache", params.choice, tuple(DROP_CACHE), default="none"))
        return {"free_pages": info["free_pages"], "total_pages": info["total_pages"],
                "elapsed_ms": info["elapsed_ms"], "chunks": info["chunks"]}

    def commands(self):
        return {"balloon": self._cmd_balloon, "query-balloon": self._cmd_query,
                "request-free-page-bitmap": self._cmd_bitmap}

    def close(self) -> None:
        self._stop.set()

    # -- saved state ------------------------------------------------------------------
    def save(self) -> dict:
        with self.lock:
            return {
                "num_pages": self.num_pages, "actual": self.actual,
                "poison_val": self.poison_val,
                "inflated": pack_bitmap(self.inflated).tobytes(),
                "stats": dict(self.stats), "stats_head": self.stats_head,
                "hint_status": self.hint_status, "hint_cmd_id": self.hint_cmd_id,
                "hint_seq": self._hint_seq,
                "hinted": pack_bitmap(self.hinted).tobytes(),
                "bitmap_cmd_id": self.bitmap_cmd_id, "bitmap_seq": self._bitmap_seq,
                "bitmap_drop": self.bitmap_drop, "reported_bytes": self.reported_bytes,
                "counters": dict(self.counters),
            }

    def restore(self, state: dict) -> None:
        pages, u32, u64 = (0, self.npages), (0, 0xFFFFFFFF), (0, (1 << 64) - 1)
        bitmap_bytes = bitmap_words(self.npages) * 8
        fields = {"num_pages": pages, "actual": u32, "poison_val": u32, "inflated": bytes,
                  "hint_status": frozenset((HINT_STOP, HINT_REQUESTED, HINT_START, HINT_DONE)),
                  "hint_cmd_id": u32, "hint_seq": u32, "hinted": bytes,
                  "bitmap_cmd_id": u32, "bitmap_seq": u32,
                  "bitmap_drop": frozenset(DROP_CACHE.values()), "reported_bytes": u64}
        checked_state(self.name, {k: state.get(k) for k in fields} if isinstance(state, dict)
                      else state, fields)
        for key in ("inflated", "hinted"):
            if len(state[key]) != bitmap_bytes:
                raise DeviceStateError(f"{self.name}: saved {key} bitmap of {len(state[key])} "
                                       f"bytes, expected {bitmap_bytes}")
        for key in ("stats", "counters"):
            if not isinstance(state.get(key), dict) or not all(
                    isinstance(k, str) and isinstance(v, int) for k, v in state[key].items()):
                raise DeviceStateError(f"{self.name}: saved {key} is not a table of counts")
        head = state.get("stats_head")
        if head is not None and not (isinstance(head, int) and 0 <= head < 0x10000):
            raise DeviceStateError(f"{self.name}: saved stats_head {head!r} is not a "
                                   f"descriptor index")
        with self.lock:
            def bits(raw):
                return unpack_bitmap(np.frombuffer(raw, dtype="<u8"), self.npages).copy()
            self.num_pages = state["num_pages"]
            self.actual = state["actual"]
            self.poison_val = state["poison_val"]
            self.inflated = bits(state["inflated"])
            self.stats = dict(state["stats"])
            self.stats_head = state["stats_head"]
            self.hint_status = state["hint_status"]
            self.hint_cmd_id = state["hint_cmd_id"]
            self._hint_seq = state["hint_seq"]
            self.hinted = bits(state["hinted"])
            self.bitmap_cmd_id = state["bitmap_cmd_id"]
            self._bitmap_seq = state["bitmap_seq"]
            self.bitmap_drop = state["bitmap_drop"]
            self.reported_bytes = state["reported_bytes"]
            self.counters = dict(state["counters"])
