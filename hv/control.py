"""The control socket: JSON lines over a UNIX socket, QMP style.

    server -> {"hv": {"version": "0.1.0", "commands": [...]}}          greeting
    client -> {"execute": "query-status", "arguments": {}, "id": 1}
    server -> {"return": {"status": "running", "running": true}, "id": 1}
    client -> {"execute": "nope"}
    server -> {"error": {"class": "CommandNotFound",
                         "desc": "The command nope has not been found"}}

Commands come from a registry ({name: handler(arguments) -> return value},
normally Machine.commands), looked up at each request so commands registered
later (devices, migration) are served too. Each client has its own thread;
any number of clients may be connected.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from typing import Callable

from . import __version__
from .errors import HvError

log = logging.getLogger("hv.control")

CLASS_GENERIC = "GenericError"
CLASS_NOT_FOUND = "CommandNotFound"
MAX_LINE = 1 << 20


class ControlError(HvError):
    """A command failed; class_ is the QMP error class."""

    def __init__(self, desc: str, class_: str = CLASS_GENERIC):
        super().__init__(desc)
        self.class_ = class_
        self.desc = desc


def _json_default(o):
    if isinstance(o, (bytes, bytearray)):
        return o.hex()
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "item"):       # numpy scalars
        return o.item()
    return str(o)


def dumps(obj) -> bytes:
    return json.dumps(obj, default=_json_default, separators=(",", ":")).encode() + b"\n"


def handle_request(commands: dict[str, Callable[[dict], object]], line: bytes) -> dict:
    """One request line -> the response object."""
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        return {"error": {"class": CLASS_GENERIC, "desc": f"invalid JSON: {e}"}}
    if not isinstance(req, dict) or not isinstance(req.get("execute"), str):
        return {"error": {"class": CLASS_GENERIC,
                          "desc": "expected an object with an 'execute' string"}}
    resp: dict = {}
    if "id" in req:
        resp["id"] = req["id"]
    name = req["execute"]
    args = req.get("arguments") or {}
    if not isinstance(args, dict):
        resp["error"] = {"class": CLASS_GENERIC, "desc": "'arguments' must be an object"}
        return resp
    handler = commands.get(name)
    if handler is None:
        resp["error"] = {"class": CLASS_NOT_FOUND,
                         "desc": f"The command {name} has not been found"}
        return resp
    try:
        result = handler(args)
        resp["return"] = {} if result is None else result
    except ControlError as e:
        resp["error"] = {"class": e.class_, "desc": e.desc}
    except (HvError, ValueError, KeyError, TypeError, OSError) as e:
        resp["error"] = {"class": CLASS_GENERIC, "desc": f"{name}: {e}"}
    except Exception as e:
        log.exception("control command %s failed", name)
        resp["error"] = {"class": CLASS_GENERIC, "desc": f"{name}: internal error: {e!r}"}
    return resp


class ControlServer:
    """Serves a command registry on a UNIX socket until close()."""

    def __init__(self, path: str, commands: dict[str, Callable[[dict], object]]):
        self.path = path
        self.commands = commands
        if os.path.exists(path):
            try:
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                probe.connect(path)
                probe.close()
                raise HvError(f"control socket {path!r} is in use by another process")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(path)
        except OSError as e:
            raise HvError(f"cannot create control socket {path!r}: {e.strerror}") from None
        self.sock.listen(8)
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="hv-control",
                                        daemon=True)
        self._thread.start()

    def greeting(self) -> dict:
        return {"hv": {"version": __version__, "commands": sorted(self.commands)}}

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self._clients.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="hv-control-client",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.sendall(dumps(self.greeting()))
            f = conn.makefile("rb")
            while True:
                line = f.readline(MAX_LINE)
                if not line:
                    break
                if not line.strip():
                    continue
                conn.sendall(dumps(handle_request(self.commands, line)))
        except OSError:
            pass
        finally:
            with self._lock:
                self._clients.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            for c in list(self._clients):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ControlClient:
    """A blocking client: c = ControlClient(path); c.execute("query-status")."""

    def __init__(self, path: str, timeout: float | None = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._f = self.sock.makefile("rb")
        self.greeting = self._read()
        self._id = 0

    def _read(self) -> dict:
        line = self._f.readline(MAX_LINE)
        if not line:
            raise ConnectionError("control socket closed")
        return json.loads(line)

    def request(self, name: str, arguments: dict | None = None) -> dict:
        """Send one command; returns the raw response object."""
        self._id += 1
        req = {"execute": name, "id": self._id}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(dumps(req))
        return self._read()

    def execute(self, name: str, arguments: dict | None = None, **kw):
        """Send one command; returns its "return" value or raises ControlError."""
        resp = self.request(name, {**(arguments or {}), **kw})
        if "error" in resp:
            raise ControlError(resp["error"]["desc"], resp["error"]["class"])
        return resp.get("return")

    def close(self) -> None:
        self._f.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
