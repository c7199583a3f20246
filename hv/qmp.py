"""The QEMU Machine Protocol (QMP) on a UNIX socket, as QEMU's
docs/interop/qmp-spec.rst defines it, so that QEMU's own clients (the
`qemu.qmp` library, `qmp-shell`) and QEMU-driving scripts work unchanged.

    S: {"QMP": {"version": {"qemu": {...}, "package": "hv-0.1.0"}, "capabilities": []}}
    C: {"execute": "qmp_capabilities"}
    S: {"return": {}}
    C: {"execute": "query-status", "id": 7}
    S: {"return": {"running": true, "status": "running"}, "id": 7}
    S: {"event": "STOP", "data": {}, "timestamp": {"seconds": ..., "microseconds": ...}}

This module is the protocol only: framing, negotiation, argument checking
against each command's declared schema, error classes and events. The
commands themselves come from a registry {name: Command}, looked up at each
request (hv.qmp_commands builds QEMU's command set over a Machine).

Input is a stream of JSON objects, not lines: a scanner finds where each
top-level value ends and how deep it nests *before* json parses it, so an
object over MAX_OBJECT_BYTES or nested deeper than MAX_DEPTH is answered
with one GenericError and skipped (its bytes are discarded as they arrive,
nothing is buffered) and the stream resynchronises after it.

Every client has a reader thread (which runs its commands in order) and a
writer thread fed by a bounded queue. Events are put on the queues without
waiting, so a client that stops reading cannot stall the VMM: when its queue
is full it is dropped.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from . import __version__
from .errors import HvError

log = logging.getLogger("hv.qmp")

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"

#: the largest JSON value a client may send (QEMU: MAX_TOKEN_SIZE, 64 MiB)
MAX_OBJECT_BYTES = 1 << 20
#: the deepest nesting of objects and arrays accepted (QEMU: 1024); far
#: below what Python's json parser can recurse into
MAX_DEPTH = 64
#: messages waiting for one client; a client this far behind is dropped
CLIENT_QUEUE = 1024
#: how long a write to a client may block before the client is dropped
SEND_TIMEOUT_S = 30.0
#: what the greeting reports as the QEMU version: the QMP commands and
#: members hv implements are those of QEMU 7.2's schema
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}


class QmpError(HvError):
    """A command failed; class_ is the QMP error class."""

    def __init__(self, desc: str, class_: str = GENERIC_ERROR):
        super().__init__(desc)
        self.class_ = class_
        self.desc = desc


# ------------------------------------------------------------------ schemas

#: schema type -> (Python check, what the error message says it expects)
_TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "string"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "number"),
    "bool": (lambda v: isinstance(v, bool), "boolean"),
    "dict": (lambda v: isinstance(v, dict), "object"),
    "list": (lambda v: isinstance(v, list), "array"),
    "any": (lambda v: True, "any"),
}


@dataclass
class Command:
    """One QMP command: handler(arguments) -> return value (None: {}).

    args is the argument schema in QAPI's spelling, {"uri": "str",
    "*detach": "bool"} (a leading * marks an optional member); the server
    refuses unknown, missing and mistyped arguments before the handler runs.
    args None leaves all checking to the handler."""

    handler: Callable[[dict], object]
    args: dict[str, str] | None = field(default_factory=dict)

    def check(self, arguments: dict) -> None:
        if self.args is None:
            return
        spec = {k.lstrip("*"): (v, k.startswith("*")) for k, v in self.args.items()}
        for name in arguments:
            if name not in spec:
                raise QmpError(f"Parameter '{name}' is unexpected")
        for name, (kind, optional) in spec.items():
            if name not in arguments:
                if not optional:
                    raise QmpError(f"Parameter '{name}' is missing")
                continue
            ok, what = _TYPES[kind]
            if not ok(arguments[name]):
                raise QmpError(f"Invalid parameter type for '{name}', expected: {what}")


def _json_default(o):
    if isinstance(o, (bytes, bytearray)):
        return o.hex()
    if isinstance(o, (set, tuple, frozenset)):
        return list(o)
    if hasattr(o, "item"):       # numpy scalars
        return o.item()
    return str(o)


def encode(obj) -> bytes:
    """One output message: compact JSON ending with CRLF (as QEMU sends)."""
    return json.dumps(obj, default=_json_default, separators=(", ", ": ")).encode() + b"\r\n"


def timestamp() -> dict:
    t = time.time()
    seconds = int(t)
    return {"seconds": seconds, "microseconds": int((t - seconds) * 1_000_000)}


def error(desc: str, class_: str = GENERIC_ERROR) -> dict:
    return {"error": {"class": class_, "desc": desc}}


# ------------------------------------------------------------ the scanner

_OUTSIDE = re.compile(rb'[{}\[\]"]')
_IN_STRING = re.compile(rb'["\\]')
_WHITESPACE = b" \t\r\n"


class JsonStream:
    """Splits a byte stream into top-level JSON values without parsing them.

    feed(data) returns a list of items, each either ("value", bytes) for one
    complete value of at most max_bytes nesting at most max_depth, or
    ("error", desc) for input that is not one: a value too large or too
    deep (skipped to its end) or bytes outside any object or array (skipped
    up to the next '{' or '[')."""

    def __init__(self, max_bytes: int = MAX_OBJECT_BYTES, max_depth: int = MAX_DEPTH):
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.buf = bytearray()      # the value being read (empty while skipping)
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.skipping = False       # inside a value already refused
        self.junk = False           # inside bytes that belong to no value

    def feed(self, data: bytes) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        i, n = 0, len(data)
        while i < n:
            if self.depth == 0 and not self.in_string:
                # between values: whitespace, the start of one, or junk
                c = data[i]
                if c in b"{[":
                    if self.junk:
                        self.junk = False
                    self.buf = bytearray()
                    self.skipping = False
                    self.depth = 1
                    self.buf.append(c)
                    i += 1
                    continue
                if c in _WHITESPACE:
                    i += 1
                    continue
                if not self.junk:
                    self.junk = True
                    out.append(("error", "JSON parse error, QMP input must be a JSON object"))
                j = min((k for k in (data.find(b"{", i), data.find(b"[", i)) if k >= 0),
                        default=n)
                i = j
                continue
            start = i
            if self.in_string:
                if self.escape:
                    self.escape = False
                    i += 1
                else:
                    m = _IN_STRING.search(data, i)
                    if m is None:
                        i = n
                    else:
                        i = m.end()
                        if m.group() == b"\\":
                            self.escape = True
                        else:
                            self.in_string = False
            else:
                m = _OUTSIDE.search(data, i)
                if m is None:
                    i = n
                else:
                    i = m.end()
                    c = m.group()
                    if c == b'"':
                        self.in_string = True
                    elif c in (b"{", b"["):
                        self.depth += 1
                        if self.depth > self.max_depth and not self.skipping:
                            self._refuse(out, f"JSON nesting deeper than {self.max_depth} "
                                              f"levels; the value is ignored")
                    else:
                        self.depth -= 1
            if not self.skipping:
                self.buf += data[start:i]
                if len(self.buf) > self.max_bytes:
                    self._refuse(out, f"JSON value larger than {self.max_bytes} bytes; "
                                      f"the value is ignored")
            if self.depth == 0 and not self.in_string:
                if not self.skipping:
                    out.append(("value", bytes(self.buf)))
                self.buf = bytearray()
                self.skipping = False
        return out

    def _refuse(self, out: list, desc: str) -> None:
        out.append(("error", desc))
        self.skipping = True
        self.buf = bytearray()


def parse_request(raw: bytes) -> dict:
    """One complete input value -> the request object (QmpError otherwise)."""
    try:
        req = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise QmpError(f"JSON parse error, {e}") from None
    if not isinstance(req, dict):
        raise QmpError("QMP input must be a JSON object")
    return req


# ------------------------------------------------------------ the server

class Client:
    """One connection: its own negotiation state and outgoing queue."""

    def __init__(self, server: "QmpServer", conn: socket.socket, number: int):
        self.server = server
        self.conn = conn
        self.name = f"qmp-client-{number}"
        self.negotiated = False
        self.closed = threading.Event()
        self.out: queue.Queue = queue.Queue(CLIENT_QUEUE)
        self.writer_thread: threading.Thread | None = None
        #: clear while a command runs: its reply must go out before finish()
        #: closes (quit ends the process right after its handler returns)
        self.idle = threading.Event()
        self.idle.set()
        conn.settimeout(SEND_TIMEOUT_S)

    def send(self, msg: dict) -> bool:
        """Queue one message without waiting; a client this far behind is dropped."""
        if self.closed.is_set():
            return False
        try:
            self.out.put_nowait(encode(msg))
            return True
        except queue.Full:
            log.warning("%s does not read its messages; dropping it", self.name)
            self.close()
            return False

    def writer(self) -> None:
        try:
            while True:
                data = self.out.get()
                if data is None:
                    return
                self.conn.sendall(data)
        except OSError:
            pass
        finally:
            self.close()

    def reader(self) -> None:
        stream = JsonStream(self.server.max_object_bytes, self.server.max_depth)
        try:
            while not self.closed.is_set():
                try:
                    data = self.conn.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    return
                for kind, item in stream.feed(data):
                    if kind == "error":
                        self.send(error(item))
                        continue
                    self.idle.clear()
                    try:
                        self.send(self.server.dispatch(self, item))
                    finally:
                        self.idle.set()
        except OSError:
            pass
        finally:
            self.close()

    def finish(self, timeout: float = 1.0) -> None:
        """Close after sending what is queued (the last events), waiting at
        most timeout s for a slow reader."""
        self.idle.wait(timeout)
        try:
            self.out.put_nowait(None)
        except queue.Full:
            pass
        t = self.writer_thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self.close()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        try:
            self.out.put_nowait(None)
        except queue.Full:
            pass
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server._forget(self)


def peer_uid(conn: socket.socket) -> int | None:
    """The user id of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    try:
        _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        return None
    return uid


class QmpServer:
    """Serves a command registry ({name: Command}) over QMP on a UNIX socket
    until close(). emit(event, data) sends an event to every negotiated client."""

    def __init__(self, path: str, commands: dict[str, Command], *,
                 max_object_bytes: int = MAX_OBJECT_BYTES, max_depth: int = MAX_DEPTH):
        self.path = path
        self.commands = commands
        self.max_object_bytes = max_object_bytes
        self.max_depth = max_depth
        if os.path.exists(path):
            try:
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                probe.connect(path)
                probe.close()
                raise HvError(f"control socket {path!r} is in use by another process")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # owner-only from the moment it exists: whoever can connect can stop,
        # migrate or quit the guest
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(path)
            os.chmod(path, 0o600)
        except OSError as e:
            self.sock.close()
            raise HvError(f"cannot create control socket {path!r}: {e.strerror}") from None
        finally:
            os.umask(old_umask)
        self.sock.listen(64)
        self._clients: set[Client] = set()
        self._lock = threading.Lock()
        self._count = 0
        self._closed = False
        #: called once by close() (the command layer detaches its listeners)
        self.on_close: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._accept_loop, name="hv-qmp", daemon=True)
        self._thread.start()

    @staticmethod
    def greeting() -> dict:
        return {"QMP": {"version": {"qemu": dict(QEMU_VERSION), "package": f"hv-{__version__}"},
                        "capabilities": []}}

    # -- connections ---------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            uid = peer_uid(conn)
            if uid not in (os.geteuid(), 0):
                log.warning("control socket: refused a client of uid %s (only uid %d and "
                            "root may control this guest)", uid, os.geteuid())
                conn.close()
                continue
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._count += 1
                client = Client(self, conn, self._count)
                self._clients.add(client)
            client.send(self.greeting())
            client.writer_thread = threading.Thread(target=client.writer,
                                                    name=f"{client.name}-tx", daemon=True)
            client.writer_thread.start()
            threading.Thread(target=client.reader, name=f"{client.name}-rx", daemon=True).start()

    def _forget(self, client: Client) -> None:
        with self._lock:
            self._clients.discard(client)

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._clients)

    # -- requests ----------------------------------------------------------------
    def dispatch(self, client: Client, raw: bytes) -> dict:
        """One complete input value from client -> the response object."""
        try:
            req = parse_request(raw)
        except QmpError as e:
            return error(e.desc, e.class_)
        resp: dict = {}
        if "id" in req:
            resp["id"] = req["id"]
        try:
            resp["return"] = self._execute(client, req)
        except QmpError as e:
            resp["error"] = {"class": e.class_, "desc": e.desc}
        # the id goes last, as QEMU puts it
        if "id" in resp:
            resp["id"] = resp.pop("id")
        return resp

    def _execute(self, client: Client, req: dict):
        for member in req:
            if member not in ("execute", "arguments", "id"):
                raise QmpError(f"QMP input member '{member}' is unexpected")
        if "execute" not in req:
            raise QmpError("QMP input lacks member 'execute'")
        name = req["execute"]
        if not isinstance(name, str):
            raise QmpError("QMP input member 'execute' must be a string")
        args = req.get("arguments", {})
        if not isinstance(args, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        if name == "qmp_capabilities":
            return self._negotiate(client, args)
        if not client.negotiated:
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                           COMMAND_NOT_FOUND)
        command = self.commands.get(name)
        if command is None:
            raise QmpError(f"The command {name} has not been found", COMMAND_NOT_FOUND)
        command.check(args)
        try:
            result = command.handler(args)
        except QmpError:
            raise
        except (HvError, ValueError, KeyError, TypeError, OSError) as e:
            raise QmpError(str(e) or type(e).__name__) from None
        except Exception as e:
            log.exception("QMP command %s failed", name)
            raise QmpError(f"{name}: internal error: {e!r}") from None
        return {} if result is None else result

    def _negotiate(self, client: Client, args: dict):
        if client.negotiated:
            raise QmpError("Capabilities negotiation is already complete, command ignored",
                           COMMAND_NOT_FOUND)
        Command(lambda a: None, {"*enable": "list"}).check(args)
        for cap in args.get("enable", []):
            raise QmpError(f"Capability '{cap}' not available")
        client.negotiated = True
        return {}

    # -- events --------------------------------------------------------------------
    def emit(self, event: str, data: dict | None = None) -> None:
        """Send an event to every client past negotiation; never blocks."""
        msg = {"event": event, "timestamp": timestamp()}
        if data:
            msg["data"] = data
        with self._lock:
            clients = [c for c in self._clients if c.negotiated]
        for c in clients:
            c.send(msg)

    # -- teardown ------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fn in self.on_close:
            fn()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            c.finish()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
