"""The destination's side of a migration as a control client sees it: one
IncomingMigration per machine (IncomingMigration.of(machine)) knows whether
a migration is awaited, being received, done or failed, and how far it got,
so that the destination answers query-migrate with its own status and
reports MIGRATION events.

    inc = IncomingMigration.of(machine)
    inc.run("tcp:0.0.0.0:4444")           # run-guest --incoming tcp:...: blocks
    inc.defer()                           # run-guest --incoming defer: waits for
    inc.start("tcp:0.0.0.0:4444")         # ... migrate-incoming: a thread

run() and start() call hv.migration.receiver.incoming(); when a deferred
migration fails, the machine ends with machine.error set (QEMU's destination
exits when the incoming migration fails). A postcopy migration runs the
guest here from the switch on (status postcopy-active); when it fails after
that, the guest is kept, paused, and the status is postcopy-paused (QEMU's):
run() raises PostcopyFailed, and nothing ends the machine.
"""

from __future__ import annotations

import sys
import threading
import time

from . import snapshot
from .postcopy import PostcopyFailed
from .protocol import MigrationError
from .receiver import incoming
from .transport import parse_uri

#: how long migrate-incoming waits for the listening socket before answering
LISTEN_WAIT_S = 10.0


class IncomingMigration:
    def __init__(self, machine, *, timeout: float = 60.0, accept_timeout: float | None = None,
                 require_verify: bool = False, prefault: bool = True, verbose: bool = True,
                 tls=None):
        self.machine = machine
        # tls: hv.tls.TlsCredentials (endpoint server): accept TLS sources only
        self.options = dict(timeout=timeout, accept_timeout=accept_timeout,
                            require_verify=require_verify, prefault=prefault, verbose=verbose,
                            tls=tls)
        #: none (no incoming migration), deferred (waiting for a URI), then
        #: QEMU's MigrationStatus: setup, active, postcopy-active, completed,
        #: failed, postcopy-paused
        self.status = "none"
        self.error: str | None = None
        self.receiver = None
        self.result: dict | None = None
        self.started_at: float | None = None
        self.active_at: float | None = None
        self.ended_at: float | None = None
        #: fn(event, data) for ("MIGRATION", {"status": s}) on every status change
        self.listeners: list = []
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None
        #: a file: URI restores a snapshot: mapped (copy-on-write) or copied in
        self.snapshot_mode = "map"

    @classmethod
    def of(cls, machine) -> "IncomingMigration":
        inc = getattr(machine, "incoming_migration", None)
        if inc is None:
            inc = machine.incoming_migration = cls(machine)
        return inc

    def configure(self, **options) -> None:
        self.options.update(options)

    # -- status ---------------------------------------------------------------
    def _set_status(self, status: str) -> None:
        with self._lock:
            if self.status == status:
                return
            self.status = status
        for fn in list(self.listeners):
            try:
                fn("MIGRATION", {"status": status})
            except Exception:
                pass

    def _on_receiving(self, rx) -> None:
        self.receiver = rx
        self.active_at = time.monotonic()
        self._set_status("active")

    def _on_postcopy(self, rx) -> None:
        self._set_status("postcopy-active")

    def postcopy_stats(self) -> dict | None:
        """The page server's figures (faults, requests, latency) once it runs."""
        rx = self.receiver
        if self.result is not None:
            return self.result.get("postcopy")
        server = getattr(rx, "server", None)
        return server.stats() if server is not None else None

    def stats(self) -> dict:
        """Page counts received so far, over every connection."""
        rx = self.receiver
        if rx is None:
            return {"pages": 0, "zero_pages": 0, "fill_pages": 0, "free_pages": 0, "bytes": 0}
        if self.result is not None:
            return dict(self.result)
        total = {k: rx.stats.get(k, 0) for k in ("pages", "zero_pages", "fill_pages",
                                                 "free_pages", "bytes")}
        if not getattr(rx, "_secondaries_counted", False):
            for sub in list(getattr(rx, "secondaries", [])):
                for k in total:
                    total[k] += sub.stats.get(k, 0)
        # known once the guest runs here, while postcopy still goes on
        for k in ("restore_ms", "postcopy_switch_ms"):
            if rx.stats.get(k) is not None:
                total[k] = rx.stats[k]
        return total

    # -- running ----------------------------------------------------------------
    def defer(self) -> None:
        """Wait, not booted, for start(uri) (QEMU's -incoming defer)."""
        self.machine.status = "inmigrate"
        self.status = "deferred"

    def run(self, uri: str, on_listening=None) -> dict:
        """Receive the migration here and now; raises MigrationError."""
        self.started_at = time.monotonic()
        self._set_status("setup")
        path = snapshot.parse_file_uri(uri)
        try:
            if path is not None:
                self.active_at = time.monotonic()
                self._set_status("active")
                self.result = snapshot.restore(self.machine, path, mode=self.snapshot_mode,
                                               verify=self.options["require_verify"])
            else:
                self.result = incoming(self.machine, uri, on_listening=on_listening,
                                       on_receiving=self._on_receiving,
                                       on_postcopy=self._on_postcopy, **self.options)
        except Exception as e:
            self.error = str(e) or type(e).__name__
            self.ended_at = time.monotonic()
            self._set_status("postcopy-paused" if isinstance(e, PostcopyFailed) else "failed")
            raise
        self.ended_at = time.monotonic()
        self._set_status("completed")
        return self.result

    def start(self, uri: str) -> None:
        """migrate-incoming: receive on a thread; returns once it listens
        (a URI it cannot listen on is an error here, and may be retried).
        A file: URI restores the snapshot here and now (its errors are
        this command's)."""
        is_file = snapshot.parse_file_uri(uri) is not None
        if not is_file:
            parse_uri(uri)
        with self._lock:
            if self.status != "deferred":
                raise MigrationError(
                    "The incoming migration has already been started" if self.status != "none"
                    else "'-incoming' was not specified on the command line "
                         "(start run-guest with --incoming defer)")
            self.status = "starting"    # taken: a second migrate-incoming is refused
        if is_file:
            try:
                self.run(uri)
            except MigrationError:
                with self._lock:
                    self.status = "deferred"        # nothing runs; another file may
                raise
            return
        listening = threading.Event()
        failure: list[str] = []

        def work():
            try:
                self.run(uri, on_listening=lambda host, port: listening.set())
            except PostcopyFailed as e:
                # the guest is here, paused: keep it (postcopy-paused)
                print(f"hv: {e}", file=sys.stderr, flush=True)
            except Exception as e:
                if not listening.is_set():
                    failure.append(str(e))
                    listening.set()
                    with self._lock:
                        self.status = "deferred"    # may be tried again
                    return
                m = self.machine
                m.error = m.error or f"incoming migration failed: {e}"
                m.request_shutdown("error")
        self.thread = threading.Thread(target=work, name="hv-migrate-incoming", daemon=True)
        self.thread.start()
        listening.wait(LISTEN_WAIT_S)
        if failure:
            raise MigrationError(failure[0])
