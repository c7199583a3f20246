"""Migration connections: URIs, listening and connecting, socket tuning, and
SocketStream, which moves messages (hv.migration.protocol) over a socket
with the page data going straight between guest memory and the socket."""

from __future__ import annotations

import socket

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


def tune_socket(sock: socket.socket) -> None:
    """A migration connection, either side: no Nagle delay, 4 MiB buffers
    (best effort)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass


def connect(uri: str, timeout: float) -> socket.socket:
    """A tuned connection to the destination at uri."""
    host, port = parse_uri(uri)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise MigrationError(f"cannot connect to {host}:{port}: {e.strerror or e}") from e
    tune_socket(sock)
    sock.settimeout(timeout)
    return sock


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
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
