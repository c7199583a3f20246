"""The client of migrate-between-hosts's guest network: one TCP connection
to an echo service in the guest (busybox `nc -ll -p PORT -e cat`), kept
open for the whole run, and an ICMP ping. Both run in a network namespace
(the client's) from threads of the calling process: setns() moves only the
calling thread, and a socket stays in the namespace it was made in.

    c = EchoClient(ns, "10.78.0.10", 7)
    c.connect(timeout=60)           # retried while nothing listens yet
    c.start()                       # a request every 20 ms from now on
    ...                             # migrate the guest, as often as wanted
    c.stop()                        # waits for the answers still due
    c.stats(t0, t1)                 # the requests sent in [t0, t1)
    ping(ns, "10.78.0.10")          # {"sent": 3, "received": 3, "rtt_ms": [...]}
    read_rate(ns, "10.78.0.10", 9, 3.0)     # what the guest sends, MiB/s

Each request is a 32-byte record carrying its sequence number and a pattern
derived from it; the echo must bring every record back whole, once and in
order. Anything else is an error: a record that is wrong, lost (no answer
by the end), duplicated or out of order, and a connection that is reset
or closed. A request's wait runs from its send to the arrival of its
whole echo; a stall is a time the client waited while no answer came (a
guest slower than the requests answers late but steadily: no stall).
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
import time

RECORD = 32
CLONE_NEWNET = 0x40000000
#: errors kept verbatim (the rest are counted only)
KEEP_ERRORS = 20


def _setns(fd: int) -> None:
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


class InNs:
    """This thread in network namespace ns for the with block (sockets made
    in it stay there after it)."""

    def __init__(self, ns: str):
        self.ns = ns

    def __enter__(self):
        self.own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
        except OSError:
            os.close(self.own)
            raise
        try:
            _setns(fd)
        finally:
            os.close(fd)
        return self

    def __exit__(self, *exc):
        try:
            _setns(self.own)
        finally:
            os.close(self.own)


def record(seq: int) -> bytes:
    """Request seq: its number and a pattern that differs from record to record."""
    pattern = (seq * 2654435761) & 0xFFFFFFFF
    rec = f"hv {seq:010d} {pattern:08x}{pattern ^ 0x5A5A5A5A:08x}.\n".encode()
    assert len(rec) == RECORD
    return rec


def parse_seq(rec: bytes) -> int | None:
    """The sequence number in a record as echoed, None when it is not one."""
    try:
        return int(rec[3:13]) if rec[:3] == b"hv " else None
    except ValueError:
        return None


def connect_in(ns: str, ip: str, port: int, timeout: float, what: str) -> socket.socket:
    """A TCP connection from namespace ns to ip:port, retried while nothing
    listens there yet or the guest is not reachable yet."""
    deadline = time.monotonic() + timeout
    while True:
        s = None
        try:
            with InNs(ns):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(min(10.0, max(1.0, deadline - time.monotonic())))
            s.connect((ip, port))
            return s
        except OSError as e:   # refused, unreachable, timed out
            if s is not None:
                s.close()
            if time.monotonic() > deadline:
                raise ConnectionError(f"no {what} at {ip}:{port} within {timeout:.0f} s: "
                                      f"{e}") from None
            time.sleep(0.5)


def read_rate(ns: str, ip: str, port: int, seconds: float, timeout: float = 60.0) -> dict:
    """The rate a guest sends at: from namespace ns, read what the service
    at ip:port streams for `seconds` from its first byte, then close.
    {"bytes", "seconds", "mib_s"}."""
    s = connect_in(ns, ip, port, timeout, "stream service")
    got, t0 = 0, None
    buf = bytearray(1 << 16)
    try:
        s.settimeout(10.0)
        while True:
            n = s.recv_into(buf)
            if not n:
                break
            now = time.monotonic()
            if t0 is None:
                t0 = now        # the first byte starts the clock
                continue
            got += n
            if now - t0 >= seconds:
                break
    finally:
        s.close()
    dt = (time.monotonic() - t0) if t0 is not None else 0.0
    return {"bytes": got, "seconds": round(dt, 3),
            "mib_s": round(got / (1 << 20) / dt, 3) if dt > 0 else 0.0}


class EchoClient:
    def __init__(self, ns: str, ip: str, port: int, interval: float = 0.02):
        self.ns, self.ip, self.port, self.interval = ns, ip, port, interval
        self.sock: socket.socket | None = None
        self.local: str | None = None
        self.sent: list[float] = []         # send time of request i
        self.answered: dict[int, float] = {}  # request i: when its echo was whole
        self.errors: list[tuple[float, str]] = []  # (when, what)
        self.stopped = False
        self.bytes_checked = 0
        self.closed: str | None = None       # why the connection ended, if it did
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done = False
        self._threads: list[threading.Thread] = []

    # -- setup -------------------------------------------------------------------
    def connect(self, timeout: float = 60.0) -> None:
        """Connect, retrying while the service does not listen yet (the guest
        starts it in the background) or the guest is not reachable yet."""
        s = connect_in(self.ns, self.ip, self.port, timeout, "echo service")
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(0.2)
        self.sock = s
        self.local = "%s:%d" % s.getsockname()

    def start(self) -> None:
        for fn, name in ((self._send_loop, "netclient-send"), (self._recv_loop, "netclient-recv")):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, drain: float = 15.0) -> None:
        """Stop sending; wait up to drain s for the answers still due; close."""
        self._stop.set()
        if not self._threads:           # never started
            drain = 0
        else:
            self._threads[0].join()
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline and self.closed is None:
            with self._lock:
                if len(self.answered) >= len(self.sent):
                    break
            time.sleep(0.05)
        self._done = True
        if self._threads:
            self._threads[1].join(2)
        if self.sock is not None:
            self.sock.close()
        self.stopped = True

    # -- the two threads ---------------------------------------------------------------
    def _error(self, what: str) -> None:
        self.errors.append((time.monotonic(), what))

    def _send_loop(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set() and self.closed is None:
            seq = len(self.sent)
            data = record(seq)
            with self._lock:
                self.sent.append(time.monotonic())
            try:
                self.sock.sendall(data)
            except socket.timeout:
                # 200 ms of a full send buffer: sendall may have sent part of it,
                # so the stream can no longer be checked
                self._closed("send timed out with the send buffer full")
                return
            except OSError as e:
                self._closed(f"send: {e.strerror or e}")
                return
            nxt += self.interval
            delay = nxt - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                nxt = time.monotonic()      # late (a slow host): no burst to catch up

    def _closed(self, why: str) -> None:
        with self._lock:
            if self.closed is None:
                self.closed = why
                self._error(f"connection: {why}")

    def _recv_loop(self) -> None:
        buf = b""
        expect = 0
        while not self._done and self.closed is None:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as e:
                self._closed(f"recv: {e.strerror or e}")
                return
            now = time.monotonic()
            if not data:
                self._closed("closed by the guest (EOF)")
                return
            buf += data
            while len(buf) >= RECORD:
                rec, buf = buf[:RECORD], buf[RECORD:]
                with self._lock:
                    self.bytes_checked += RECORD
                    if expect < len(self.sent) and rec == record(expect):
                        self.answered[expect] = now
                        expect += 1
                        continue
                    seq = parse_seq(rec)
                    if seq is None or seq >= len(self.sent) or rec != record(seq):
                        self._error(f"wrong data where request {expect} was due: {rec!r}")
                        expect += 1
                    elif seq in self.answered:
                        self._error(f"request {seq} answered twice (duplicate)")
                    else:
                        # an answer ahead of its turn: those skipped are out of
                        # order, or lost (counted at the end, if never answered)
                        self._error(f"request {seq} answered where {expect} was due "
                                    f"(out of order)")
                        self.answered[seq] = now
                        expect = seq + 1

    # -- results --------------------------------------------------------------------------
    def stats(self, t0: float | None = None, t1: float | None = None) -> dict:
        """The requests sent in [t0, t1) (monotonic; None: unbounded): how
        many, answered, errors (those seen in the interval, and after stop()
        its requests never answered: lost); the longest stall, the longest
        time the client waited with no answer arriving (from a request's
        send, or the previous answer if that came later) and when it began;
        the longest and the median time from a request to its answer."""
        with self._lock:
            sent = list(self.sent)
            answered = dict(self.answered)
            errors = list(self.errors)

        def inside(t):
            return (t0 is None or t >= t0) and (t1 is None or t < t1)
        idx = [i for i, t in enumerate(sent) if inside(t)]
        worst, worst_at = 0.0, None
        waits = sorted(answered[i] - sent[i] for i in idx if i in answered)
        for i in idx:
            if i not in answered:
                continue
            # waiting with nothing arriving: since the request went out, or
            # since the answer before it came (a backlog is not a stall)
            since = max(sent[i], answered.get(i - 1, sent[i]))
            if answered[i] - since > worst:
                worst, worst_at = answered[i] - since, since
        errs = [w for t, w in errors if inside(t)]
        n_answered = sum(1 for i in idx if i in answered)
        lost = len(idx) - n_answered if self.stopped else 0
        if lost:
            errs.append(f"{lost} requests never answered (lost)")
        return {
            "requests": len(idx),
            "answered": n_answered,
            "errors": len(errs) - (1 if lost else 0) + lost,
            "error_list": errs[:KEEP_ERRORS],
            "longest_stall_ms": round(worst * 1000, 1) if worst_at is not None else None,
            "longest_stall_sent_at": worst_at,
            "longest_wait_ms": round(waits[-1] * 1000, 1) if waits else None,
            "median_ms": round(waits[len(waits) // 2] * 1000, 1) if waits else None,
            "last_answered_sent_at": max((sent[i] for i in idx if i in answered), default=None),
        }


# ------------------------------------------------------------------------- ping

def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(ns: str, ip: str, count: int = 3, timeout: float = 5.0, gap: float = 0.2) -> dict:
    """ICMP echo requests from namespace ns to ip (a raw socket: root):
    count of them, each waited for up to timeout s."""
    with InNs(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = (os.getpid() ^ threading.get_ident()) & 0xFFFF
    rtts = []
    try:
        for seq in range(1, count + 1):
            body = struct.pack("!d", time.monotonic()) + b"hv-ping".ljust(24, b".")
            hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            pkt = struct.pack("!BBHHH", 8, 0, _checksum(hdr + body), ident, seq) + body
            t0 = time.monotonic()
            s.sendto(pkt, (ip, 0))
            while (left := t0 + timeout - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    data, addr = s.recvfrom(2048)
                except socket.timeout:
                    break
                ihl = (data[0] & 0x0F) * 4
                typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                if addr[0] == ip and typ == 0 and rid == ident and rseq == seq:
                    rtts.append(round((time.monotonic() - t0) * 1000, 2))
                    break
            time.sleep(gap)
    finally:
        s.close()
    return {"sent": count, "received": len(rtts), "rtt_ms": rtts}
