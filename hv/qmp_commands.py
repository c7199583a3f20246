"""QEMU's QMP commands, with QEMU's names, arguments, units and replies,
mapped onto hv's machine, migration and balloon (the protocol itself is
hv.qmp). A script written for QEMU drives hv unchanged:

    migrate-set-capabilities {"capabilities": [{"capability": "events", "state": true}]}
    migrate-set-parameters   {"downtime-limit": 300, "max-bandwidth": 1073741824}
    migrate-incoming         {"uri": "tcp:0.0.0.0:4444"}     (run-guest --incoming defer)
    migrate                  {"uri": "tcp:HOST:4444"}
    query-migrate            -> MigrationInfo, on the source and the destination

hv's own settings and figures are downstream extensions named with the
prefix PREFIX, as qmp-spec.rst prescribes (__RFQDN_name): migrate-set-
parameters takes __io.github.hv_free-pages (bitmap|hint|off), _verify,
_dirty-log, _max-rounds, _downtime-strategy, _hint-wait-ms, _drop-cache,
_free-page-timeout-ms, _io-timeout (seconds a send or receive may wait) and _postcopy-after-rounds (with the capability
postcopy-ram: switch to postcopy by itself after that many dirty rounds; -1,
the default: only at migrate-start-postcopy, as QEMU); query-migrate adds
hv's figures (pages skipped as free or zero, the rounds; in postcopy the
pages requested and pushed, the destination's faults and their latency); the
console, the vCPU
exit counts and the free page bitmap are prefixed commands. A client that
knows none of them gets hv's defaults.

TLS as in QEMU: object-add {"qom-type": "tls-creds-x509", "id", "dir",
"endpoint"}, then migrate-set-parameters {"tls-creds": id, "tls-hostname"};
hv has no authz objects, so the destination's allowed client CNs go in
__io.github.hv_tls-authz-names (tls-authz takes "" only).

Events (sent through emit(event, data)): STOP, RESUME, SHUTDOWN, and, with
the "events" capability on as in QEMU, MIGRATION and MIGRATION_PASS;
BALLOON_CHANGE.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from . import __version__
from . import tls as hv_tls
from .memory import PAGE_SIZE
from .migration import snapshot
from .migration.commands import install as install_migration
from .migration.incoming import IncomingMigration
from .migration.protocol import MigrationError
from .migration.sender import MigrationParams
from .qmp import DEVICE_NOT_ACTIVE, QEMU_VERSION, Command, QmpError, QmpServer
from .vmm import (STATUS_PAUSED, STATUS_POSTMIGRATE, STATUS_RUNNING, STATUS_SHUTDOWN,
                  MachineError)

#: hv's downstream prefix: the reverse of the domain hv.github.io
PREFIX = "__io.github.hv_"
MIB = 1 << 20

#: hv's shutdown reasons -> QEMU's ShutdownCause and whether the guest asked
SHUTDOWN_CAUSES = {
    "quit": ("host-qmp-quit", False),
    "poweroff": ("guest-shutdown", True),
    "halt": ("guest-shutdown", True),
    "reboot": ("guest-reset", True),
    "terminated": ("host-signal", False),
    "interrupted": ("host-signal", False),
    "migrated": ("host-qmp-quit", False),
    "error": ("host-error", False),
    "internal-error": ("host-error", False),
}

#: QEMU's capabilities that hv has, with their defaults
CAPABILITIES = {"events": False, "multifd": False, "auto-converge": False,
                "dirty-limit": False, "postcopy-ram": False}

#: migrate-set-parameters member -> the MigrationParams field it sets
PARAMETER_FIELDS = {
    "downtime-limit": "downtime_ms",
    "max-bandwidth": "max_bandwidth_mib",
    "max-postcopy-bandwidth": "max_postcopy_bandwidth_mib",
    "multifd-channels": "connections",
    PREFIX + "free-pages": "free_pages",
    PREFIX + "verify": "verify",
    PREFIX + "dirty-log": "dirty_log",
    PREFIX + "max-rounds": "max_rounds",
    PREFIX + "downtime-strategy": "downtime_strategy",
    PREFIX + "hint-wait-ms": "hint_wait_ms",
    "cpu-throttle-initial": "cpu_throttle_initial",
    "cpu-throttle-increment": "cpu_throttle_increment",
    "max-cpu-throttle": "max_cpu_throttle",
    PREFIX + "drop-cache": "drop_cache",
    # QEMU's names; hv compresses on every connection, multifd or not, and
    # also takes "auto" (hv.migration.compression)
    "multifd-compression": "compression",
    "multifd-zstd-level": "compression_level",
    "vcpu-dirty-limit": "vcpu_dirty_limit",
    PREFIX + "postcopy-after-rounds": "postcopy_after_rounds",
    PREFIX + "free-page-timeout-ms": "free_page_timeout_ms",
    PREFIX + "io-timeout": "timeout_s",
}
PARAMETER_TYPES = {
    "downtime-limit": "int", "max-bandwidth": "int", "multifd-channels": "int",
    "max-postcopy-bandwidth": "int",
    PREFIX + "free-pages": "str", PREFIX + "verify": "bool", PREFIX + "dirty-log": "str",
    PREFIX + "max-rounds": "int", PREFIX + "downtime-strategy": "str",
    PREFIX + "hint-wait-ms": "int", PREFIX + "drop-cache": "str",
    PREFIX + "free-page-timeout-ms": "int",
    PREFIX + "io-timeout": "number",
    "cpu-throttle-initial": "int", "cpu-throttle-increment": "int", "max-cpu-throttle": "int",
    "multifd-compression": "str", "multifd-zstd-level": "int", "vcpu-dirty-limit": "int",
    PREFIX + "postcopy-after-rounds": "int",
    "tls-creds": "str", "tls-hostname": "str", "tls-authz": "str",
    PREFIX + "tls-authz-names": "list",
}
#: TLS parameters: object ids and names, turned into MigrationParams.tls by
#: _hv_args (the destination's into IncomingMigration's tls by migrate-incoming)
TLS_PARAMETERS = ("tls-creds", "tls-hostname", "tls-authz", PREFIX + "tls-authz-names")

#: hv's migration statuses that QEMU spells otherwise
_INCOMING_STATUS = {"deferred": "none", "starting": "setup"}


def _defaults() -> dict:
    d = MigrationParams(uri="tcp:127.0.0.1:0")
    return {
        "downtime-limit": int(d.downtime_ms),
        "max-bandwidth": int(d.max_bandwidth_mib * MIB),    # 0: no limit
        "max-postcopy-bandwidth": int(d.max_postcopy_bandwidth_mib * MIB),
        "multifd-channels": 2,                              # QEMU's default
        PREFIX + "verify": d.verify,
        PREFIX + "dirty-log": d.dirty_log,
        PREFIX + "max-rounds": d.max_rounds,
        PREFIX + "downtime-strategy": d.downtime_strategy,
        PREFIX + "hint-wait-ms": d.hint_wait_ms,
        PREFIX + "io-timeout": d.timeout_s,
        "cpu-throttle-initial": d.cpu_throttle_initial,
        "cpu-throttle-increment": d.cpu_throttle_increment,
        "max-cpu-throttle": d.max_cpu_throttle,
        "multifd-compression": d.compression,
        "multifd-zstd-level": d.compression_level,
        "vcpu-dirty-limit": d.vcpu_dirty_limit,
        PREFIX + "postcopy-after-rounds": d.postcopy_after_rounds,
        "tls-creds": "", "tls-hostname": "", "tls-authz": "",
    }


def _ms(value) -> int:
    return int(round(value or 0))


class QemuMonitor:
    """QEMU's command set over one Machine; commands() is the registry for
    hv.qmp.QmpServer, emit is where events go (the server's emit)."""

    def __init__(self, machine, emit: Callable[[str, dict], None] | None = None):
        self.machine = machine
        self.emit = emit or (lambda event, data: None)
        self.capabilities = dict(CAPABILITIES)
        self.parameters = _defaults()
        #: query-migrate's answer after a migrate to a file: URI (the last save)
        self._file_save: dict | None = None
        self._lock = threading.Lock()
        self.migrations = getattr(machine, "migration_commands", None) or \
            install_migration(machine)
        self.migrations.listeners.append(self._on_migration_event)
        self.incoming = IncomingMigration.of(machine)
        self.incoming.listeners.append(self._on_migration_event)
        machine.status_listeners.append(self._on_status)
        balloon = getattr(machine, "balloon", None)
        if balloon is not None and hasattr(balloon, "actual_listeners"):
            balloon.actual_listeners.append(self._on_balloon)

    def detach(self) -> None:
        """Stop listening to the machine (its QMP server has closed)."""
        for owner, fn in ((self.migrations.listeners, self._on_migration_event),
                          (self.incoming.listeners, self._on_migration_event),
                          (self.machine.status_listeners, self._on_status),
                          (getattr(getattr(self.machine, "balloon", None),
                                   "actual_listeners", []), self._on_balloon)):
            if fn in owner:
                owner.remove(fn)

    # -- events ------------------------------------------------------------------
    def _on_status(self, status: str, reason: str) -> None:
        if status == STATUS_PAUSED:
            self.emit("STOP", {})
        elif status == STATUS_RUNNING:
            self.emit("RESUME", {})
        elif status == STATUS_SHUTDOWN:
            why = self.machine.shutdown_reason or reason or "quit"
            cause, guest = SHUTDOWN_CAUSES.get(why, ("host-error", False))
            self.emit("SHUTDOWN", {"guest": guest, "reason": cause})

    def _on_migration_event(self, event: str, data: dict) -> None:
        if self.capabilities["events"]:
            self.emit(event, dict(data))

    def _on_balloon(self, actual_pages: int) -> None:
        self.emit("BALLOON_CHANGE", {"actual": self.machine.memory.size -
                                     int(actual_pages) * PAGE_SIZE})

    # -- the registry -------------------------------------------------------------
    def commands(self) -> dict[str, Command]:
        m = self.machine
        cmds = {
            "query-status": Command(self.query_status),
            "stop": Command(lambda a: m.commands["stop"]({})),
            "cont": Command(lambda a: m.commands["cont"]({})),
            "quit": Command(lambda a: m.commands["quit"]({})),
            "query-version": Command(self.query_version),
            "query-commands": Command(self.query_commands),
            "query-name": Command(lambda a: {}),
            "migrate": Command(self.migrate, {"*uri": "str", "*channels": "list",
                                              "*detach": "bool", "*resume": "bool",
                                              "*blk": "bool", "*inc": "bool"}),
            "migrate-incoming": Command(self.migrate_incoming,
                                        {"*uri": "str", "*channels": "list"}),
            "migrate_cancel": Command(self.migrate_cancel),
            "migrate-start-postcopy": Command(self.migrate_start_postcopy),
            "migrate-set-parameters": Command(self.set_parameters,
                                              {"*" + k: v for k, v in PARAMETER_TYPES.items()}),
            "query-migrate-parameters": Command(self.query_parameters),
            "migrate-set-capabilities": Command(self.set_capabilities,
                                                {"capabilities": "list"}),
            "query-migrate-capabilities": Command(self.query_capabilities),
            "query-migrate": Command(self.query_migrate),
            "object-add": Command(self.object_add, {"qom-type": "str", "id": "str",
                                                    "*dir": "str", "*endpoint": "str",
                                                    "*verify-peer": "bool"}),
            "object-del": Command(self.object_del, {"id": "str"}),
            "balloon": Command(self.balloon, {"value": "int"}),
            "query-balloon": Command(self.query_balloon),
            PREFIX + "console-input": Command(self.console_input,
                                              {"data": "str", "*timeout": "number"}),
            PREFIX + "query-exits": Command(lambda a: m.exit_summary()),
            PREFIX + "request-free-page-bitmap": Command(self.free_page_bitmap,
                                                         {"*timeout-ms": "int"}),
            PREFIX + "query-balloon": Command(self.hv_query_balloon),
            PREFIX + "snapshot-save": Command(self.snapshot_save,
                                              {"path": "str", "*free-pages": "bool"}),
        }
        self._names = sorted(cmds) + ["qmp_capabilities"]
        return cmds

    # -- run state ------------------------------------------------------------------
    def query_status(self, args: dict) -> dict:
        status = self.machine.status
        return {"running": status == STATUS_RUNNING, "status": status}

    def query_version(self, args: dict) -> dict:
        return {"qemu": dict(QEMU_VERSION), "package": f"hv-{__version__}"}

    def query_commands(self, args: dict) -> list:
        return [{"name": n} for n in sorted(self._names)]

    # -- migration: settings ------------------------------------------------------------
    def set_capabilities(self, args: dict) -> dict:
        wanted = {}
        for item in args["capabilities"]:
            if not isinstance(item, dict) or set(item) != {"capability", "state"}:
                raise QmpError("Parameter 'capabilities' expects a list of "
                               "{\"capability\": name, \"state\": bool}")
            name, state = item["capability"], item["state"]
            if name not in CAPABILITIES:
                raise QmpError(f"Parameter 'capability' does not accept value '{name}'"
                               if isinstance(name, str) else
                               "Invalid parameter type for 'capability', expected: string")
            if not isinstance(state, bool):
                raise QmpError("Invalid parameter type for 'state', expected: boolean")
            wanted[name] = state
        self._refuse_while_migrating()
        self.capabilities.update(wanted)
        return {}

    def query_capabilities(self, args: dict) -> list:
        return [{"capability": k, "state": v} for k, v in self.capabilities.items()]

    def set_parameters(self, args: dict) -> dict:
        with self._lock:
            merged = {**self.parameters, **args}
            hv_args = self._hv_args(merged, self.capabilities, "tcp:127.0.0.1:0")
            # the destination's credentials (endpoint server) are checked by
            # migrate and migrate-incoming, each for its own side
            hv_args.pop("tls", None)
            self._check(hv_args)
            self.parameters.update(args)
        return {}

    # -- objects: tls-creds-x509 ------------------------------------------------------
    def object_add(self, args: dict) -> dict:
        if args["qom-type"] != "tls-creds-x509":
            raise QmpError(f"hv cannot create objects of type '{args['qom-type']}'; it has "
                           f"tls-creds-x509 only")
        oid = args["id"]
        objs = hv_tls.objects(self.machine)
        if oid in objs:
            raise QmpError(f"Duplicate ID '{oid}' for object")
        if "dir" not in args:
            raise QmpError("tls-creds-x509 needs 'dir': the directory of ca-cert.pem and "
                           "the server's or client's certificate and key")
        endpoint = args.get("endpoint", "client")
        if endpoint not in hv_tls.ENDPOINTS:
            raise QmpError("Parameter 'endpoint' expects 'client' or 'server'")
        verify = args.get("verify-peer", True)
        if endpoint == "server" and not verify:
            raise QmpError("verify-peer must stay true for endpoint 'server': hv's "
                           "destination always requires the source's certificate")
        try:
            objs[oid] = hv_tls.TlsCredentials(args["dir"], endpoint, verify_peer=verify,
                                              id=oid)
        except hv_tls.TlsError as e:
            raise QmpError(str(e)) from None
        return {}

    def object_del(self, args: dict) -> dict:
        oid = args["id"]
        objs = hv_tls.objects(self.machine)
        if oid not in objs:
            raise QmpError(f"object '{oid}' not found")
        if self.parameters.get("tls-creds") == oid:
            raise QmpError(f"object '{oid}' is in use (tls-creds), can not be deleted")
        del objs[oid]
        return {}

    def _tls_creds(self, parameters: dict):
        """The credentials object tls-creds names (None for ""), with tls-authz."""
        oid = parameters.get("tls-creds") or ""
        authz = parameters.get("tls-authz") or ""
        if authz:
            raise QmpError(f"Parameter 'tls-authz': hv has no authz objects ('{authz}'); "
                           f"list the allowed client certificate CNs in "
                           f"'{PREFIX}tls-authz-names' instead")
        names = parameters.get(PREFIX + "tls-authz-names")
        if names is not None and not all(isinstance(n, str) for n in names):
            raise QmpError(f"Parameter '{PREFIX}tls-authz-names' expects a list of strings")
        if not oid:
            return None
        creds = hv_tls.objects(self.machine).get(oid)
        if creds is None:
            raise QmpError(f"Parameter 'tls-creds': no tls-creds-x509 object '{oid}' "
                           f"(create it with object-add)")
        return creds.with_authz(names) if names is not None else creds

    def query_parameters(self, args: dict) -> dict:
        out = dict(self.parameters)
        out.setdefault(PREFIX + "free-pages", self._default_free_pages())
        return out

    def _default_free_pages(self) -> str:
        """bitmap when the guest's balloon driver offers it, else off."""
        b = getattr(self.machine, "balloon", None)
        try:
            from .devices.virtio.balloon_defs import F_FREE_PAGE_BITMAP
            if b is not None and b.active and b.has_feature(F_FREE_PAGE_BITMAP):
                return "bitmap"
        except (ImportError, AttributeError):
            pass
        return "off"

    def _hv_args(self, parameters: dict, capabilities: dict, uri: str) -> dict:
        """QMP's parameters and capabilities -> the arguments of hv's migrate
        (MigrationParams fields). The source stays in postmigrate until quit."""
        args: dict = {"uri": uri, "shutdown_source": False}
        creds = self._tls_creds(parameters)
        if creds is not None:
            args["tls"] = creds
            args["tls_hostname"] = parameters.get("tls-hostname") or ""
        for name, value in parameters.items():
            if name in TLS_PARAMETERS:
                continue
            if name in ("max-bandwidth", "max-postcopy-bandwidth") \
                    and isinstance(value, int) and not isinstance(value, bool):
                value = value / MIB             # bytes/s -> MiB/s
            if name == "multifd-channels" and not capabilities.get("multifd"):
                continue                        # one connection without multifd
            args[PARAMETER_FIELDS[name]] = value
        args.setdefault("free_pages", self._default_free_pages())
        args["auto_converge"] = bool(capabilities.get("auto-converge"))
        args["dirty_limit"] = bool(capabilities.get("dirty-limit"))
        args["postcopy"] = bool(capabilities.get("postcopy-ram"))
        return args

    @staticmethod
    def _qmp_error(e: MigrationError) -> QmpError:
        """hv's message, naming the QMP parameter instead of hv's field."""
        desc = str(e)
        for name, field in PARAMETER_FIELDS.items():
            desc = desc.replace(f"'{field}'", f"'{name}'")
        return QmpError(desc)

    def _check(self, hv_args: dict) -> None:
        try:
            MigrationParams.from_args(dict(hv_args))
        except MigrationError as e:
            raise self._qmp_error(e) from None

    def _refuse_while_migrating(self) -> None:
        cur = self.migrations.current
        if cur is not None and not cur.finished:
            raise QmpError("There's a migration process in progress")

    # -- migration: running --------------------------------------------------------------
    @staticmethod
    def _uri(args: dict, command: str) -> str:
        uri, channels = args.get("uri"), args.get("channels")
        if (uri is None) == (channels is None):
            raise QmpError(f"{command}: give either 'uri' or 'channels', not both nor neither")
        if uri is not None:
            return uri
        if len(channels) != 1 or not isinstance(channels[0], dict):
            raise QmpError("Parameter 'channels' expects one main channel")
        ch = channels[0]
        addr = ch.get("addr")
        if ch.get("channel-type", "main") != "main" or not isinstance(addr, dict):
            raise QmpError("Parameter 'channels' expects one main channel with an 'addr'")
        if addr.get("transport") != "socket" or addr.get("type") != "inet":
            raise QmpError("hv migrates over TCP only: 'addr' must be "
                           "{\"transport\": \"socket\", \"type\": \"inet\", ...}")
        host, port = addr.get("host"), addr.get("port")
        if not isinstance(host, str) or not isinstance(port, (str, int)):
            raise QmpError("Parameter 'addr' needs 'host' and 'port'")
        return f"tcp:{host}:{port}"

    def migrate(self, args: dict) -> dict:
        if args.get("resume") or args.get("blk") or args.get("inc"):
            raise QmpError("hv does not resume postcopy nor migrate block devices")
        uri = self._uri(args, "migrate")
        status = self.machine.status
        if self.incoming.status not in ("none", "completed"):
            raise QmpError("Guest is waiting for an incoming migration")
        if status in (STATUS_POSTMIGRATE, STATUS_SHUTDOWN):
            raise QmpError(f"Guest is not in a state to be migrated (status {status})")
        if snapshot.parse_file_uri(uri) is not None:
            # QEMU's migrate to a file: the guest is saved and stays stopped
            self._save_file(uri, resume=False)
            return {}
        self._file_save = None
        with self._lock:
            hv_args = self._hv_args(dict(self.parameters), self.capabilities, uri)
        try:
            self.migrations.migrate(hv_args)
        except MigrationError as e:
            raise self._qmp_error(e) from None
        return {}

    def _save_file(self, uri: str, resume: bool, free_pages: bool | None = None) -> dict:
        if self.migrations.current is not None and not self.migrations.current.finished:
            raise QmpError("a migration is already running")
        if free_pages is None:
            free_pages = self.parameters.get(PREFIX + "free-pages",
                                             self._default_free_pages()) != "off"
        t0 = time.monotonic()
        try:
            st = snapshot.save(self.machine, snapshot.parse_file_uri(uri), resume=resume,
                               free_pages=free_pages)
        except (MigrationError, OSError) as e:
            self._file_save = {"status": "failed", "error-desc": str(e),
                               "total-time": _ms((time.monotonic() - t0) * 1000)}
            raise QmpError(f"saving the guest to {uri}: {e}") from None
        self._file_save = {
            "status": "completed", "total-time": _ms(st["total_ms"]),
            "downtime": _ms(st["pause_ms"]),
            "ram": {"transferred": st["bytes_written"], "total": st["pages_total"] * PAGE_SIZE,
                    "normal": st["pages_stored"], "duplicate": st["pages_skipped_zero"],
                    "page-size": PAGE_SIZE, "remaining": 0},
            PREFIX + "pages-skipped-free": st["pages_skipped_free"],
            PREFIX + "free-page-info": st["free_page_info"],
        }
        return st

    def snapshot_save(self, args: dict) -> dict:
        """Pause, save to path, resume (the guest keeps running here)."""
        status = self.machine.status
        if status not in (STATUS_RUNNING, STATUS_PAUSED):
            raise QmpError(f"Guest is not in a state to be saved (status {status})")
        st = self._save_file("file:" + args["path"], resume=True,
                             free_pages=args.get("free-pages"))
        return {k.replace("_", "-"): v for k, v in st.items()}

    def migrate_incoming(self, args: dict) -> dict:
        uri = self._uri(args, "migrate-incoming")
        with self._lock:
            creds = self._tls_creds(self.parameters)
        if creds is not None:
            if creds.endpoint == "client":
                raise QmpError(f"Parameter 'tls-creds': object '{creds.id}' has endpoint "
                               f"'client'; the destination needs endpoint 'server'")
            self.incoming.configure(tls=creds)      # only TLS sources from now on
        self.incoming.start(uri)
        return {}

    def migrate_cancel(self, args: dict) -> dict:
        cur = self.migrations.current
        if cur is not None and not cur.finished:
            cur.cancel()
        return {}

    def migrate_start_postcopy(self, args: dict) -> dict:
        """Switch the running migration to postcopy at the end of its current
        pass (QEMU's command; the capability postcopy-ram must be on)."""
        cur = self.migrations.current
        if cur is None or cur.finished:
            if not self.capabilities.get("postcopy-ram"):
                raise QmpError("Enable postcopy with migrate_set_capability before the start "
                               "of migration")
            raise QmpError("Postcopy must be started after migration has been started")
        try:
            cur.start_postcopy()
        except MigrationError as e:
            raise QmpError(str(e)) from None
        return {}

    def query_migrate(self, args: dict) -> dict:
        if self._file_save is not None:
            return dict(self._file_save)
        inc = self.incoming
        if inc.status not in ("none", "deferred") and self.migrations.current is None:
            return self._incoming_info(inc)
        cur = self.migrations.current
        if cur is None:
            return {}
        return self._outgoing_info(cur.query(), cur)

    def _outgoing_info(self, q: dict, migration) -> dict:
        status = q["status"]
        rounds = q.get("rounds") or []
        total_s = max((q.get("total_time_ms") or 0) / 1000, 1e-6)
        ram = {
            "transferred": int(q["bytes_sent"]),
            "remaining": int(q.get("remaining_pages") or 0) * PAGE_SIZE,
            "total": int(q["pages_total"]) * PAGE_SIZE,
            "duplicate": int(q["pages_skipped_zero"]),
            "skipped": 0,
            "normal": int(q["pages_sent"]),
            "normal-bytes": int(q["pages_sent"]) * PAGE_SIZE,
            "dirty-pages-rate": self._dirty_rate(rounds),
            "mbps": round(q.get("throughput_mib_s", 0.0) * MIB * 8 / 1e6, 3),
            "dirty-sync-count": int(q.get("dirty_syncs") or 0),
            "postcopy-requests": int(q.get("postcopy_requests") or 0),
            "page-size": PAGE_SIZE,
            "multifd-bytes": int(q["bytes_sent"]) if migration.p.connections > 1 else 0,
            "pages-per-second": int(q["pages_sent"] / total_s),
            "precopy-bytes": sum(int(r.get("bytes", 0)) for r in rounds
                                 if not r.get("final")),
            "downtime-bytes": sum(int(r.get("bytes", 0)) for r in rounds if r.get("final")),
            "postcopy-bytes": int(q.get("postcopy_bytes") or 0),
            "dirty-sync-missed-zero-copy": 0,
        }
        info: dict = {"status": status}
        if status != "setup":
            info["ram"] = ram
        info["total-time"] = _ms(q.get("total_time_ms"))
        info["setup-time"] = _ms(q.get("setup_ms"))
        if status in ("active", "device") and q.get("expected_downtime_ms") is not None:
            info["expected-downtime"] = _ms(q["expected_downtime_ms"])
        if (status == "completed" or q.get("postcopy")) and q.get("downtime_ms") is not None:
            info["downtime"] = _ms(q["downtime_ms"])
        if q.get("error") and status in ("failed", "cancelled"):
            info["error-desc"] = q["error"]
        if migration.p.auto_converge:
            info["cpu-throttle-percentage"] = int(q.get("cpu_throttle_percentage") or 0)
        # hv's own figures
        extra = {
            "free-pages": q.get("free_pages"),
            "pages-skipped-free": q.get("pages_skipped_free"),
            "pages-skipped-zero": q.get("pages_skipped_zero"),
            "pages-filled": q.get("pages_filled"),
            "rounds": rounds,
            "dirty-log": q.get("dirty_log") or None,
            "free-page-info": q.get("free_page_info"),
            "downtime-parts": q.get("downtime_parts"),
            "downtime-exceeded": q.get("downtime_exceeded") or None,
            "pause-rollbacks": q.get("pause_rollbacks") or None,
            "verified": q.get("verified"),
            "verify-ms": _ms(q["verify_ms"]) if q.get("verify_ms") else None,
            "compression": q.get("compression"),
            "dirty-limit": q.get("dirty_limit"),
            "pages-sent-before-bitmap": q.get("pages_sent_before_bitmap") or None,
            "warning": q.get("warning"),
        }
        if q.get("postcopy"):
            extra.update(_postcopy_figures(q))
        info.update({PREFIX + k: v for k, v in extra.items() if v is not None})
        return info

    @staticmethod
    def _dirty_rate(rounds: list) -> int:
        """Pages dirtied per second during the last round that measured it."""
        for r in reversed(rounds):
            if r.get("dirty_pages") and r.get("ms"):
                return int(r["dirty_pages"] / (r["ms"] / 1000))
        return 0

    def _incoming_info(self, inc: IncomingMigration) -> dict:
        status = _INCOMING_STATUS.get(inc.status, inc.status)
        if status == "none":
            return {}
        s = inc.stats()
        now = inc.ended_at or time.monotonic()
        info: dict = {"status": status}
        if inc.receiver is not None:
            received = s["pages"] + s["zero_pages"] + s["fill_pages"] + s["free_pages"]
            info["ram"] = {
                "transferred": int(s.get("bytes_received", s["bytes"])),
                "remaining": 0,
                "total": self.machine.memory.size,
                "duplicate": int(s["zero_pages"]),
                "skipped": 0,
                "normal": int(s["pages"]),
                "normal-bytes": int(s["pages"]) * PAGE_SIZE,
                "dirty-pages-rate": 0,
                "mbps": 0.0,
                "dirty-sync-count": 0,
                "postcopy-requests": int((inc.postcopy_stats() or {}).get("requests", 0)),
                "page-size": PAGE_SIZE,
                "multifd-bytes": 0,
                "pages-per-second": 0,
                "precopy-bytes": int(s["bytes"]),
                "downtime-bytes": 0,
                "postcopy-bytes": 0,
                "dirty-sync-missed-zero-copy": 0,
            }
            info[PREFIX + "pages-free"] = int(s["free_pages"])
            info[PREFIX + "pages-filled"] = int(s["fill_pages"])
            info[PREFIX + "pages-received"] = int(received)
            pc = inc.postcopy_stats()
            if pc is not None:
                info["ram"]["postcopy-bytes"] = int(pc["bytes"])
                info.update({PREFIX + "postcopy-" + k.replace("_", "-"): v
                             for k, v in pc.items()})
        # the destination's part of the downtime: the state restored and the
        # vCPUs resumed (postcopy: after RAM went under userfaultfd)
        for key in ("restore_ms", "postcopy_switch_ms"):
            if s.get(key) is not None:
                info[PREFIX + key.replace("_", "-")] = s[key]
        if inc.started_at is not None:
            info["total-time"] = int((now - inc.started_at) * 1000)
        if inc.error and status == "failed":
            info["error-desc"] = inc.error
        return info

    # -- balloon ----------------------------------------------------------------------
    def _balloon(self):
        b = getattr(self.machine, "balloon", None)
        if b is None:
            raise QmpError("No balloon device has been activated", DEVICE_NOT_ACTIVE)
        return b

    def balloon(self, args: dict) -> dict:
        b = self._balloon()
        value = args["value"]
        size = self.machine.memory.size
        if value <= 0:
            raise QmpError("Parameter 'value' expects a size")
        value = min(value, size)
        try:
            b.set_target((size - value) / MIB)
        except Exception as e:
            raise QmpError(str(e)) from None
        return {}

    def query_balloon(self, args: dict) -> dict:
        b = self._balloon()
        return {"actual": self.machine.memory.size - int(b.actual) * PAGE_SIZE}

    def hv_query_balloon(self, args: dict) -> dict:
        self._balloon()
        return self.machine.commands["query-balloon"]({})

    def free_page_bitmap(self, args: dict) -> dict:
        self._balloon()
        hv_args = {"timeout_ms": args["timeout-ms"]} if "timeout-ms" in args else {}
        return self.machine.commands["request-free-page-bitmap"](hv_args)

    # -- console -----------------------------------------------------------------------
    def console_input(self, args: dict) -> dict:
        hv_args = {"data": args["data"]}
        if "timeout" in args:
            hv_args["timeout_s"] = args["timeout"]
        try:
            return self.machine.commands["console-input"](hv_args)
        except MachineError as e:
            raise QmpError(str(e).replace("'timeout_s'", "'timeout'")) from None


def _postcopy_figures(q: dict) -> dict:
    """hv's postcopy figures of a source's statistics (query-migrate names)."""
    return {
        "postcopy-pages": q.get("postcopy_pages"),
        "postcopy-pages-requested": q.get("postcopy_pages_requested"),
        "postcopy-pages-pushed": q.get("postcopy_pages_pushed"),
        "postcopy-faults": q.get("postcopy_faults"),
        "postcopy-fault-latency-mean-ms": q.get("fault_latency_ms_mean"),
        "postcopy-fault-latency-max-ms": q.get("fault_latency_ms_max"),
        "postcopy-service-ms-mean": q.get("postcopy_service_ms_mean"),
        "postcopy-service-ms-max": q.get("postcopy_service_ms_max"),
        "postcopy-ms": q.get("postcopy_ms"),
    }


def serve(path: str, machine) -> QmpServer:
    """QEMU's commands for machine, served over QMP on the UNIX socket path."""
    monitor = QemuMonitor(machine)
    server = QmpServer(path, monitor.commands())
    monitor.emit = server.emit
    server.on_close.append(monitor.detach)
    server.monitor = monitor
    return server


__all__ = ["PREFIX", "QemuMonitor", "SHUTDOWN_CAUSES", "serve"]
