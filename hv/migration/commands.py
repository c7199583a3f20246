"""Control commands for live migration: migrate, query-migrate, migrate-cancel.

    install(machine)     adds them to machine.commands (the CLI calls it)

    migrate        {"uri": "tcp:HOST:PORT", "free_pages": "bitmap"|"hint"|"off",
                    "downtime_ms": 300, "downtime_strategy": "cancel"|"force"|"iterate",
                    "max_bandwidth_mib": 0, "connections": 1, "max_rounds": 30,
                    "verify": false, "dirty_log": "auto"|"bitmap"|"ring",
                    "progress": false}
                   checks every argument (an error names the bad one), then starts
                   the migration thread and returns {} at once
    query-migrate  the statistics (status "none" before any migration)
    migrate-cancel stops a running migration; the guest keeps running here
    migrate-start-postcopy  switches a migration started with "postcopy": true
                   to postcopy at the end of its current pass

listeners (fn(event, data)) are attached to every migration started here.
"""

from __future__ import annotations

import threading

from .protocol import MigrationError
from .sender import Migration, MigrationParams


class MigrationCommands:
    def __init__(self, machine):
        self.machine = machine
        self.current: Migration | None = None
        self.listeners: list = []
        self._lock = threading.Lock()

    def migrate(self, args: dict | None = None):
        args = dict(args or {})
        with self._lock:
            if self.current is not None and not self.current.finished:
                raise MigrationError("a migration is already running; query-migrate shows it, "
                                     "migrate-cancel stops it")
            params = MigrationParams.from_args(args)
            migration = Migration(self.machine, params)
            migration.listeners.extend(self.listeners)
            self.current = migration.start()
        return {}

    def query(self, args: dict | None = None):
        m = self.current
        if m is None:
            return {"status": "none"}
        return m.query()

    def start_postcopy(self, args: dict | None = None):
        m = self.current
        if m is None or m.finished:
            raise MigrationError("Postcopy must be started after migration has been started")
        m.start_postcopy()
        return {}

    def cancel(self, args: dict | None = None):
        m = self.current
        if m is None or m.finished:
            raise MigrationError("no migration is running")
        m.cancel()
        return {}


def install(machine) -> MigrationCommands:
    cmds = MigrationCommands(machine)
    machine.commands["migrate"] = cmds.migrate
    machine.commands["query-migrate"] = cmds.query
    machine.commands["migrate-cancel"] = cmds.cancel
    machine.commands["migrate-start-postcopy"] = cmds.start_postcopy
    machine.migration_commands = cmds
    return cmds
