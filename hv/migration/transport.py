"""Migration connections: URIs, listening and connecting, socket tuning,
SocketStream, which moves messages (hv.migration.protocol) over a socket
with the page data going straight between guest memory and the socket, and
TlsStream, the same over TLS (tls_client wraps the source's connections)."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import time

import numpy as np

from . import pages
from .protocol import MigrationError, Stream


def parse_uri(uri: str) -> tuple[str, int]:
    """'tcp:HOST:PORT' -> (host, port); an empty HOST is every address, an
    IPv6 address goes in brackets (tcp:[::1]:4444)."""
    if not uri.startswith("tcp:"):
        raise MigrationError(f"migration URI {uri!r}: only tcp:HOST:PORT is supported")
    host, sep, port = uri[4:].rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise MigrationError(f"migration URI {uri!r}: expected tcp:HOST:PORT with PORT a "
                             f"number 0..65535")
    if int(port) > 65535:
        raise MigrationError(f"migration URI {uri!r}: the port must be 0..65535, not {port}")
    if host.startswith("[") != host.endswith("]") or (
            ":" in host and not host.startswith("[")):
        raise MigrationError(f"migration URI {uri!r}: write an IPv6 address in brackets, "
                             f"like tcp:[::1]:{port}")
    host = host[1:-1] if host.startswith("[") else host
    return host or "0.0.0.0", int(port)


def format_uri(host: str, port: int) -> str:
    """The inverse of parse_uri."""
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def listen(uri: str) -> socket.socket:
    host, port = parse_uri(uri)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise MigrationError(f"cannot listen on {host}:{port} for the incoming migration: "
                             f"{e.strerror}") from e
    s.listen(16)
    return s


#: the longest TCP waits between two retransmissions on a migration
#: connection (Linux's default is 120 s). With the kernel's exponential
#: backoff, a link that comes back after a few seconds down would be tried
#: again only seconds later, and one back after 52 s only at 102 s, past the
#: I/O timeout: with this cap the connection resumes within a second.
RTO_MAX_MS = 1000
#: the socket option that sets it (Linux 6.15; older kernels refuse it and
#: keep their backoff)
TCP_RTO_MAX_MS = getattr(socket, "TCP_RTO_MAX_MS", 44)


def tune_socket(sock: socket.socket, timeout: float | None = None) -> None:
    """A migration connection, either side: no Nagle delay, 4 MiB buffers,
    retransmissions at most RTO_MAX_MS apart, and (with timeout, the I/O
    timeout in seconds) TCP gives up on unacknowledged data a second after
    hv's own wait would, rather than after tcp_retries2 retransmissions,
    which at RTO_MAX_MS apart would be some 15 s. All best effort."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    opts = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20),
            (socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20),
            (socket.IPPROTO_TCP, TCP_RTO_MAX_MS, RTO_MAX_MS)]
    if timeout is not None:
        opts.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                     min(int(timeout * 1000) + 1000, 2**31 - 1)))
    for level, opt, value in opts:
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass


def connect(uri: str, timeout: float) -> socket.socket:
    """A tuned connection to the destination at uri."""
    host, port = parse_uri(uri)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise MigrationError(f"cannot connect to {host}:{port}: {e.strerror or e}") from e
    tune_socket(sock, timeout)
    sock.settimeout(timeout)
    return sock


#: TCP states (tcp_info's first byte) in which the peer still takes data
_TCP_OPEN = (1, 8)          # ESTABLISHED, CLOSE_WAIT


def queued_bytes(sock) -> int:
    """Bytes written to a TCP socket that the peer has not acknowledged yet
    (SIOCOUTQ: unsent and in flight); 0 where the kernel cannot say.
    ConnectionError when the connection is gone (reset, closed)."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
    except (OSError, ValueError):
        return 0
    if state not in _TCP_OPEN:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        raise ConnectionError(os.strerror(err) if err else "connection closed")
    return struct.unpack("i", out)[0]


def close_socket(sock) -> None:
    """Shut a stream's socket down both ways (waking a peer blocked on it), then close it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


#: struct tcp_info (<linux/tcp.h>): tcpi_delivery_rate, bytes/s, Linux 4.9+
TCP_INFO_DELIVERY_RATE = struct.Struct("<Q")
TCP_INFO_DELIVERY_RATE_AT = 160


def delivery_rate(sock) -> float | None:
    """The rate TCP saw the peer acknowledge data at lately (TCP_INFO's
    delivery rate), the link's real rate: a send that only filled the socket
    buffer says nothing about it."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO,
                               TCP_INFO_DELIVERY_RATE_AT + TCP_INFO_DELIVERY_RATE.size)
    except (OSError, AttributeError):
        return None
    if len(info) < TCP_INFO_DELIVERY_RATE_AT + TCP_INFO_DELIVERY_RATE.size:
        return None
    rate = TCP_INFO_DELIVERY_RATE.unpack_from(info, TCP_INFO_DELIVERY_RATE_AT)[0]
    return float(rate) or None


class SocketStream(Stream):
    """Messages over a connected socket; page data moves with hv._pages
    (writev/readv straight from/to guest memory, GIL released)."""

    def __init__(self, sock, page_size: int = 4096, timeout: float | None = 60.0,
                 rate_bytes_per_sec: int = 0):
        self._pages = pages
        self.sock = sock
        self.fd = sock.fileno()
        self.page_size = page_size
        self.timeout = timeout
        self.rate = pages.Rate(rate_bytes_per_sec) if rate_bytes_per_sec else None
        self.bytes_out = 0
        self.bytes_in = 0

    def link_rate(self) -> float | None:
        return delivery_rate(self.sock)

    def set_rate(self, bytes_per_sec: int) -> None:
        """A new max_bandwidth for the sends that follow (0: unlimited)."""
        self.rate = pages.Rate(bytes_per_sec) if bytes_per_sec else None

    def write(self, data) -> None:
        try:
            self._pages.send_all(self.fd, data, self.rate, self.timeout)
        except (ConnectionError, TimeoutError, OSError) as e:
            raise MigrationError(f"connection lost while sending: {e}") from e
        self.bytes_out += len(data)

    def read(self, n: int) -> bytes:
        try:
            data = self._pages.recv_all(self.fd, n, self.timeout)
        except (ConnectionError, TimeoutError, OSError) as e:
            raise MigrationError(f"connection lost while receiving: {e}") from e
        self.bytes_in += n
        return data

    def write_pages(self, mem, starts, counts) -> int:
        try:
            n = self._pages.send_pages(self.fd, mem, starts, counts, self.rate, self.timeout,
                                       self.page_size)
        except (ConnectionError, TimeoutError, OSError) as e:
            raise MigrationError(f"connection lost while sending pages: {e}") from e
        self.bytes_out += n
        return n

    def read_pages(self, mem, starts, counts) -> int:
        try:
            n = self._pages.recv_pages(self.fd, mem, starts, counts, self.timeout,
                                       self.page_size)
        except (ConnectionError, TimeoutError, OSError) as e:
            raise MigrationError(f"connection lost while receiving pages: {e}") from e
        self.bytes_in += n
        return n

    def close(self) -> None:
        close_socket(self.sock)


# ------------------------------------------------------------------- TLS

#: the first byte of a TLS record carrying a handshake (ClientHello)
TLS_HANDSHAKE_BYTE = 0x16
TLS_BATCH_PAGES = 256       # pages gathered into one buffer per sendall (1 MiB)


def ssl_reason(e: BaseException) -> str:
    """What a failed TLS handshake or read means, in words."""
    import ssl
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return e.reason.replace("_", " ").lower() if e.reason else str(e)
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _not_tls(e: BaseException) -> bool:
    """The peer answered a ClientHello with something that is not TLS (or hung up)."""
    import ssl
    if isinstance(e, (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)):
        return True
    return isinstance(e, ssl.SSLError) and (e.reason or "") in (
        "WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING", "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL")


def tls_client(sock: socket.socket, creds, hostname: str, timeout: float):
    """Wrap a connected socket with the source's TLS context; the handshake
    runs under timeout. A failure is a MigrationError that says why."""
    import ssl
    sock.settimeout(timeout)
    try:
        tls = creds.client_context(hostname).wrap_socket(sock, server_hostname=hostname)
    except ssl.SSLCertVerificationError as e:
        sock.close()
        hint = (f" (tls-hostname {hostname!r}: the destination's certificate must name it)"
                if "hostname" in (e.verify_message or "").lower() or
                "IP address mismatch" in (e.verify_message or "") else
                " (the destination's certificate is not signed by this CA, or has expired)")
        raise MigrationError(f"TLS handshake with the destination failed: "
                             f"{ssl_reason(e)}{hint}") from None
    except (ssl.SSLError, OSError) as e:
        sock.close()
        if _not_tls(e):
            raise MigrationError("TLS handshake with the destination failed: the destination "
                                 "does not speak TLS: start it with --tls-dir (or set "
                                 "tls-creds before migrate-incoming)") from None
        raise MigrationError(f"TLS handshake with the destination failed: "
                             f"{ssl_reason(e)}") from None
    return tls


class _Bucket:
    """Token bucket for max_bandwidth on a TLS stream (the C one takes an fd)."""

    def __init__(self, bytes_per_sec: int):
        self.rate = float(bytes_per_sec)
        self.t = time.monotonic()
        self.tokens = 0.0
        self.slept_s = 0.0

    def take(self, n: int) -> None:
        now = time.monotonic()
        # at most 50 ms of burst
        self.tokens = min(self.rate * 0.05, self.tokens + (now - self.t) * self.rate) - n
        self.t = now
        if self.tokens < 0:
            wait = -self.tokens / self.rate
            self.slept_s += wait
            time.sleep(wait)
            self.t = time.monotonic()
            self.tokens = 0.0


class TlsStream(Stream):
    """The Stream interface over an ssl.SSLSocket. Page data is gathered
    from guest memory with numpy fancy indexing, TLS_BATCH_PAGES pages per
    buffer, and scattered back the same way: no Python per page."""

    def __init__(self, sock, page_size: int = 4096, timeout: float | None = 60.0,
                 rate_bytes_per_sec: int = 0, peer: str = "peer"):
        self.sock = sock
        self.peer = peer
        self.page_size = page_size
        self.timeout = timeout
        self.rate = _Bucket(rate_bytes_per_sec) if rate_bytes_per_sec else None
        self.bytes_out = 0
        self.bytes_in = 0
        self._buf = np.empty((TLS_BATCH_PAGES, page_size), dtype=np.uint8)

    def link_rate(self) -> float | None:
        return delivery_rate(self.sock)

    def set_rate(self, bytes_per_sec: int) -> None:
        """A new max_bandwidth for the sends that follow (0: unlimited)."""
        self.rate = _Bucket(bytes_per_sec) if bytes_per_sec else None

    @property
    def timeout(self):
        return self._timeout

    @timeout.setter
    def timeout(self, value):
        self._timeout = value
        try:
            self.sock.settimeout(value)
        except OSError:
            pass

    def _send(self, data) -> None:
        if self.rate is not None:
            view = memoryview(data).cast("B")
            step = max(1, min(len(view), 1 << 16))
            for i in range(0, len(view), step):
                self.rate.take(len(view[i:i + step]))
                self.sock.sendall(view[i:i + step])
        else:
            self.sock.sendall(data)

    def _lost(self, what: str, e: BaseException) -> MigrationError:
        import ssl
        refused = isinstance(e, ssl.SSLError) and "ALERT" in (e.reason or "")
        # TLS 1.3: the peer checks our certificate after our side of the
        # handshake ended; a peer that then hangs up before its first answer
        # refused this side's certificate
        if refused or (self.bytes_in == 0 and isinstance(
                e, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError))):
            return MigrationError(f"the {self.peer} refused this TLS session while {what} "
                                  f"({ssl_reason(e)}): its CA must have signed this side's "
                                  f"certificate, which must be valid now (and, with "
                                  f"tls-authz, name an allowed CN); its log says why")
        return MigrationError(f"connection lost while {what}: {ssl_reason(e)}")

    def _recv_into(self, view: memoryview) -> None:
        got, n = 0, len(view)
        while got < n:
            r = self.sock.recv_into(view[got:], n - got)
            if r == 0:
                raise ConnectionError(f"connection closed after {got} of {n} bytes")
            got += r

    def _pages2d(self, mem) -> np.ndarray:
        return mem.array()[:mem.size // self.page_size * self.page_size].reshape(
            -1, self.page_size)

    def write(self, data) -> None:
        try:
            self._send(data)
        except (ConnectionError, TimeoutError, OSError) as e:
            raise self._lost("sending", e) from e
        self.bytes_out += len(data)

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        try:
            self._recv_into(memoryview(buf))
        except (ConnectionError, TimeoutError, OSError) as e:
            raise self._lost("receiving", e) from e
        self.bytes_in += n
        return bytes(buf)

    def write_pages(self, mem, starts, counts) -> int:
        pfns = pages.range_pfns(starts, counts)
        src = self._pages2d(mem)
        n = 0
        try:
            for i in range(0, len(pfns), TLS_BATCH_PAGES):
                part = pfns[i:i + TLS_BATCH_PAGES]
                out = self._buf[:len(part)]
                np.take(src, part, axis=0, out=out)
                self._send(out.data.cast("B"))
                n += out.nbytes
        except (ConnectionError, TimeoutError, OSError) as e:
            raise self._lost("sending pages", e) from e
        self.bytes_out += n
        return n

    def read_pages(self, mem, starts, counts) -> int:
        # recv_body checked the ranges against guest RAM before this runs
        pfns = pages.range_pfns(starts, counts)
        dst = self._pages2d(mem)
        n = 0
        try:
            for i in range(0, len(pfns), TLS_BATCH_PAGES):
                part = pfns[i:i + TLS_BATCH_PAGES]
                buf = self._buf[:len(part)]
                self._recv_into(buf.data.cast("B"))
                dst[part] = buf
                n += buf.nbytes
        except (ConnectionError, TimeoutError, OSError) as e:
            raise self._lost("receiving pages", e) from e
        self.bytes_in += n
        return n

    def close(self) -> None:
        close_socket(self.sock)
