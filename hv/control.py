"""The QMP client hv's scripts and tests use, for hv and QEMU alike: a small
synchronous face over QEMU's own library (qemu.qmp's QEMUMonitorProtocol,
which negotiates capabilities and matches replies to requests by id).

    with ControlClient("/tmp/hv.sock") as c:
        c.execute("migrate-set-parameters", **{"downtime-limit": 300})
        c.execute("migrate", uri="tcp:10.0.0.2:4444")
        c.wait_event("MIGRATION", lambda d: d["status"] == "completed", timeout=60)

execute() returns the command's "return" value or raises ControlError with
the QMP error class and description. The server side is hv.qmp.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from .errors import HvError


class ControlError(HvError):
    """A QMP command failed; class_ is the QMP error class."""

    def __init__(self, desc: str, class_: str = "GenericError"):
        super().__init__(desc)
        self.class_ = class_
        self.desc = desc


def _qmp():
    try:
        from qemu.qmp.legacy import QEMUMonitorProtocol
    except ImportError as e:
        raise HvError("the QMP client needs QEMU's Python library: pip install qemu.qmp") \
            from e
    return QEMUMonitorProtocol


class ControlClient:
    """A connected, negotiated QMP client on a UNIX socket."""

    def __init__(self, path: str, timeout: float | None = 30.0):
        from qemu.qmp import QMPError
        self.path = path
        self._qmp = _qmp()(path)
        try:
            self.greeting = self._qmp.connect(negotiate=True)
        except (QMPError, OSError) as e:
            self._close_quietly()
            raise ConnectionError(f"QMP connection to {path} failed: {e}") from None
        self._qmp.settimeout(timeout)
        self._events: list[dict] = []

    def request(self, name: str, arguments: dict | None = None) -> dict:
        """Send one command; returns the raw response (return or error)."""
        return self._run(lambda: self._qmp.cmd_raw(name, arguments or None))

    def execute(self, name: str, arguments: dict | None = None, **kw):
        """Send one command; returns its "return" value or raises ControlError."""
        resp = self.request(name, {**(arguments or {}), **kw})
        if "error" in resp:
            raise ControlError(resp["error"].get("desc", ""),
                               resp["error"].get("class", "GenericError"))
        return resp.get("return")

    def _run(self, fn):
        from qemu.qmp import QMPError
        try:
            return fn()
        except (asyncio.TimeoutError, TimeoutError):
            raise TimeoutError(f"QMP {self.path}: no reply") from None
        except (QMPError, EOFError) as e:
            raise ConnectionError(f"QMP {self.path}: {e}") from None

    # -- events ---------------------------------------------------------------------
    def events(self, wait: float = 0.0) -> list[dict]:
        """Every event received so far (waiting up to wait s for one)."""
        got = self._run(lambda: self._qmp.get_events(wait=float(wait) if wait else False))
        return [dict(e) for e in got]

    def wait_event(self, name: str, match: Callable[[dict], bool] | None = None,
                   timeout: float = 30.0) -> dict:
        """The next event called name whose data match() accepts; the events
        before it are consumed."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self._events):
                if ev["event"] == name and (match is None or match(ev.get("data", {}))):
                    del self._events[:i + 1]
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} event within {timeout:g} s; saw "
                                   f"{[e['event'] for e in self._events]}")
            try:
                self._events += self.events(min(left, 1.0))
            except TimeoutError:
                pass

    # -- teardown ---------------------------------------------------------------------
    def _close_quietly(self) -> None:
        try:
            self._qmp.close()
        except Exception:
            pass

    def close(self) -> None:
        self._close_quietly()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(path: str, timeout: float = 60.0) -> ControlClient:
    """A client of the QMP socket at path, retrying while it does not exist yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ControlClient(path)
        except (OSError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
