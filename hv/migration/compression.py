"""Compression of the pages a migration sends: none, zstd, or auto.

zstd compresses each batch of data pages into one MEMORY_ZSTD frame (native
code, hv._pages over libzstd: the pages go from guest memory into the
compressor and from the decompressor into guest memory, no per-page
Python). Each connection has its own context, so with several connections
the batches compress in parallel.

auto decides batch by batch from two measured rates: the compressor's (input
bytes a second, and the ratio it gets on this guest's pages) and the
link's (bytes on the wire a second). A batch costs raw/L plain and
raw/C + ratio*raw/L compressed, so compression pays while L < C * (1 -
ratio): on a slow link it is on, on loopback it is off. The compressor is
measured on a sample (the first SAMPLE_PAGES pages of a batch, compressed
and thrown away: a fraction of a millisecond) at the first batch and every
PROBE_EVERY batches after; the link on every send of a batch (TCP's
delivery rate, TCP_INFO), so both stay current as the guest's data and the link change, and a fast link never
pays for a whole batch compressed. Until the link has been measured,
batches go plain.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..memory import PAGE_SIZE
from . import pages
from .protocol import Command, Ranges

COMPRESSION_MODES = ("none", "zstd", "auto")
#: QEMU's multifd-zstd-level range and default
MIN_LEVEL, MAX_LEVEL, DEFAULT_LEVEL = 1, 20, 1
#: a frame at least this share of its pages' size is sent as plain MEMORY
NOT_WORTH = 0.95
PROBE_EVERY = 32
SAMPLE_PAGES = 64
#: weight of the newest measurement in the rates (EWMA)
NEWEST = 0.25


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + NEWEST * (new - old)


class Compression:
    """The compression of one outgoing migration: the mode, one zstd context
    per connection, the measured rates, and what it saved."""

    def __init__(self, mode: str = "none", level: int = DEFAULT_LEVEL):
        self.mode = mode
        self.level = level
        self._contexts: dict[int, pages.Zstd] = {}
        self._lock = threading.Lock()
        self._batches = 0
        self.compress_bps: float | None = None
        self.ratio: float | None = None
        self.link_bps: float | None = None
        self.frames = 0               # batches sent compressed
        self.pages = 0
        self.bytes_in = 0             # their pages' size
        self.bytes_out = 0            # their frames' size
        self.plain_after_trying = 0   # compressed, but not worth sending so

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def _pays(self) -> bool:
        return (self.link_bps is not None and self.compress_bps is not None
                and self.link_bps < self.compress_bps * (1 - (self.ratio or 0)))

    def _sample_due(self) -> bool:
        with self._lock:
            n = self._batches
            self._batches += 1
            return self.compress_bps is None or n % PROBE_EVERY == 0

    def _sample(self, stream, memory, starts, counts) -> None:
        """Measure the compressor on the batch's first SAMPLE_PAGES pages."""
        ends = np.cumsum(counts)
        k = int(np.searchsorted(ends, SAMPLE_PAGES, side="left")) + 1
        s, c = starts[:k].copy(), counts[:k].copy()
        over = int(ends[k - 1]) - SAMPLE_PAGES
        if over > 0:
            c[-1] -= np.uint64(over)
        t0 = time.monotonic()
        frame = self.context(stream).compress(memory, s, c)
        self.compressed(int(c.sum()) * PAGE_SIZE, len(frame), time.monotonic() - t0)

    def use(self, stream=None, memory=None, starts=None, counts=None) -> bool:
        """Whether this batch is compressed (auto: measuring the compressor on
        a sample of it when due)."""
        if self.mode != "auto":
            return self.mode == "zstd"
        if self._sample_due() and memory is not None:
            self._sample(stream, memory, starts, counts)
        with self._lock:
            return self._pays()

    def context(self, stream) -> pages.Zstd:
        key = id(stream)
        with self._lock:
            z = self._contexts.get(key)
            if z is None:
                z = self._contexts[key] = pages.Zstd(self.level)
            return z

    def compressed(self, raw: int, frame: int, seconds: float) -> None:
        with self._lock:
            self.compress_bps = _ewma(self.compress_bps, raw / max(seconds, 1e-6))
            self.ratio = _ewma(self.ratio, frame / raw)

    def sent(self, wire: int, seconds: float, raw: int, was_compressed: bool,
             tcp_rate: float | None = None) -> None:
        """A batch went out: wire bytes in seconds. The link's rate is TCP's
        own measure when the stream has one (a write that only filled the
        socket buffer returns long before the link carried it), else the
        write's."""
        with self._lock:
            if tcp_rate:
                self.link_bps = _ewma(self.link_bps, tcp_rate)
            elif wire >= 64 * PAGE_SIZE:    # a few pages say little about the link
                self.link_bps = _ewma(self.link_bps, wire / max(seconds, 1e-6))
            if was_compressed:
                self.frames += 1
                self.pages += raw // PAGE_SIZE
                self.bytes_in += raw
                self.bytes_out += wire

    def info(self) -> dict:
        """query-migrate's view (hv's prefixed `compression`)."""
        mib = 1 << 20
        with self._lock:
            return {
                "mode": self.mode, "level": self.level,
                "active": self.mode == "zstd" or (self.mode == "auto" and self._pays()),
                "compressed-pages": self.pages,
                "compressed-bytes-in": self.bytes_in,
                "compressed-bytes-out": self.bytes_out,
                # what the compressor makes of this guest's pages (measured
                # on every compression, samples included)
                "ratio": round(self.ratio, 4) if self.ratio is not None else None,
                "compressor-mib-s": round(self.compress_bps / mib, 1)
                if self.compress_bps else None,
                "link-mib-s": round(self.link_bps / mib, 1) if self.link_bps else None,
            }

    def send_batch(self, stream, memory, starts, counts, send_plain) -> int:
        """Send one batch of data pages on stream: as a MEMORY_ZSTD frame when
        compression is used for it and pays, else with send_plain(). Returns
        the bytes written."""
        raw = int(counts.sum()) * PAGE_SIZE
        if not self.use(stream, memory, starts, counts):
            t0 = time.monotonic()
            n = send_plain()
            self.sent(n, time.monotonic() - t0, raw, False, stream.link_rate())
            return n
        t0 = time.monotonic()
        frame = self.context(stream).compress(memory, starts, counts)
        t1 = time.monotonic()
        self.compressed(raw, len(frame), t1 - t0)
        if len(frame) >= raw * NOT_WORTH:
            with self._lock:
                self.plain_after_trying += 1
            n = send_plain()
            self.sent(n, time.monotonic() - t1, raw, False, stream.link_rate())
            return n
        n = stream.send(Ranges(Command.MEMORY_ZSTD, starts, counts, data=frame))
        self.sent(n, time.monotonic() - t1, raw, True, stream.link_rate())
        return n
