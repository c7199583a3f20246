"""QEMU's commands over a machine (hv.qmp_commands) with a stand-in machine:
parameters and capabilities mapped onto hv's MigrationParams, errors naming
QMP's parameters, run-state events, the balloon's absence. No /dev/kvm."""

from types import SimpleNamespace

import pytest

from hv.errors import HvError
from hv.migration.sender import MigrationParams
from hv.qmp import DEVICE_NOT_ACTIVE, QmpError
from hv.qmp_commands import PREFIX, QemuMonitor


@pytest.fixture
def monitor():
    machine = SimpleNamespace(commands={}, status_listeners=[], status="running",
                              shutdown_reason=None, balloon=None,
                              memory=SimpleNamespace(size=64 << 20))
    events = []
    mon = QemuMonitor(machine, lambda e, d: events.append((e, d)))
    return mon, mon.commands(), machine, events


def run(cmds, name, args=None):
    c = cmds[name]
    c.check(args or {})
    return c.handler(args or {})


def test_parameters_map_onto_migration_params(monitor):
    mon, cmds, machine, _ = monitor
    assert run(cmds, "query-migrate-parameters")["max-postcopy-bandwidth"] == 0   # unlimited
    run(cmds, "migrate-set-parameters", {"downtime-limit": 120, "max-bandwidth": 64 << 20,
                                         "max-postcopy-bandwidth": 32 << 20,
                                         "multifd-channels": 4, PREFIX + "free-pages": "hint",
                                         PREFIX + "verify": True, PREFIX + "max-rounds": 3})
    hv = mon._hv_args(mon.parameters, mon.capabilities, "tcp:127.0.0.1:1")
    p = MigrationParams.from_args(hv)
    assert (p.downtime_ms, p.max_bandwidth_mib, p.connections, p.free_pages, p.verify,
            p.max_rounds, p.shutdown_source) == (120, 64.0, 1, "hint", True, 3, False)
    assert p.max_postcopy_bandwidth_mib == 32.0
    run(cmds, "migrate-set-capabilities", {"capabilities": [
        {"capability": "multifd", "state": True}]})
    p = MigrationParams.from_args(mon._hv_args(mon.parameters, mon.capabilities, "tcp:h:1"))
    assert p.connections == 4
    q = run(cmds, "query-migrate-parameters")
    assert q["max-bandwidth"] == 64 << 20 and q[PREFIX + "free-pages"] == "hint"
    assert {"capability": "multifd", "state": True} in run(cmds, "query-migrate-capabilities")


def test_auto_converge_is_qemus_capability_and_parameters(monitor):
    mon, cmds, machine, _ = monitor
    q = run(cmds, "query-migrate-parameters")
    assert (q["cpu-throttle-initial"], q["cpu-throttle-increment"],
            q["max-cpu-throttle"]) == (20, 10, 99)          # QEMU's defaults
    run(cmds, "migrate-set-parameters", {"cpu-throttle-initial": 30,
                                         "cpu-throttle-increment": 15, "max-cpu-throttle": 80})
    p = MigrationParams.from_args(mon._hv_args(mon.parameters, mon.capabilities, "tcp:h:1"))
    assert not p.auto_converge
    run(cmds, "migrate-set-capabilities", {"capabilities": [
        {"capability": "auto-converge", "state": True}]})
    p = MigrationParams.from_args(mon._hv_args(mon.parameters, mon.capabilities, "tcp:h:1"))
    assert (p.auto_converge, p.cpu_throttle_initial, p.cpu_throttle_increment,
            p.max_cpu_throttle) == (True, 30, 15, 80)
    with pytest.raises(QmpError, match="'max-cpu-throttle'"):
        run(cmds, "migrate-set-parameters", {"max-cpu-throttle": 100})


def test_dirty_limit_is_qemus_capability_and_parameter(monitor):
    mon, cmds, machine, _ = monitor
    assert run(cmds, "query-migrate-parameters")["vcpu-dirty-limit"] == 1   # QEMU's default
    run(cmds, "migrate-set-capabilities", {"capabilities": [
        {"capability": "dirty-limit", "state": True}]})
    run(cmds, "migrate-set-parameters", {"vcpu-dirty-limit": 50})
    p = MigrationParams.from_args(mon._hv_args(mon.parameters, mon.capabilities, "tcp:h:1"))
    assert (p.dirty_limit, p.vcpu_dirty_limit, p.auto_converge) == (True, 50, False)
    with pytest.raises(QmpError, match="'vcpu-dirty-limit'"):
        run(cmds, "migrate-set-parameters", {"vcpu-dirty-limit": 0})


def test_compression_is_qemus_multifd_compression_on_every_connection(monitor):
    mon, cmds, machine, _ = monitor
    q = run(cmds, "query-migrate-parameters")
    assert (q["multifd-compression"], q["multifd-zstd-level"]) == ("none", 1)
    run(cmds, "migrate-set-parameters", {"multifd-compression": "zstd",
                                         "multifd-zstd-level": 3})
    p = MigrationParams.from_args(mon._hv_args(mon.parameters, mon.capabilities, "tcp:h:1"))
    assert (p.compression, p.compression_level, p.connections) == ("zstd", 3, 1)
    run(cmds, "migrate-set-parameters", {"multifd-compression": "auto"})
    assert run(cmds, "query-migrate-parameters")["multifd-compression"] == "auto"
    with pytest.raises(QmpError, match="'multifd-compression'"):
        run(cmds, "migrate-set-parameters", {"multifd-compression": "zlib"})
    with pytest.raises(QmpError, match="'multifd-zstd-level'"):
        run(cmds, "migrate-set-parameters", {"multifd-zstd-level": 21})


def test_defaults_are_hvs_and_free_pages_follow_the_balloon(monitor):
    mon, cmds, machine, _ = monitor
    q = run(cmds, "query-migrate-parameters")
    assert q[PREFIX + "free-pages"] == "off"          # no balloon here
    assert q["downtime-limit"] == int(MigrationParams(uri="x").downtime_ms)
    assert run(cmds, "query-migrate") == {}


def test_bad_parameters_are_named_as_qmp_names_them(monitor):
    mon, cmds, machine, _ = monitor
    with pytest.raises(QmpError, match="'downtime-limit'"):
        run(cmds, "migrate-set-parameters", {"downtime-limit": 0})
    with pytest.raises(QmpError, match="'__io.github.hv_free-pages'"):
        run(cmds, "migrate-set-parameters", {PREFIX + "free-pages": "everything"})
    with pytest.raises(QmpError, match="'compress-level' is unexpected"):
        run(cmds, "migrate-set-parameters", {"compress-level": 1})
    with pytest.raises(QmpError, match="'max-bandwidth', expected: integer"):
        run(cmds, "migrate-set-parameters", {"max-bandwidth": "fast"})
    with pytest.raises(QmpError, match="rdma-pin-all"):      # QEMU's, not hv's
        run(cmds, "migrate-set-capabilities", {"capabilities": [
            {"capability": "rdma-pin-all", "state": True}]})
    assert run(cmds, "query-migrate-parameters")["downtime-limit"] != 0   # nothing kept
    assert run(cmds, "migrate_cancel") == {}           # nothing runs: fine


def test_migrate_needs_a_uri_or_channels_and_tcp(monitor):
    mon, cmds, machine, _ = monitor
    with pytest.raises(QmpError, match="either 'uri' or 'channels'"):
        run(cmds, "migrate", {})
    with pytest.raises(QmpError, match="TCP only"):
        run(cmds, "migrate", {"channels": [{"channel-type": "main", "addr": {
            "transport": "socket", "type": "unix", "path": "/x"}}]})
    assert mon._uri({"channels": [{"channel-type": "main", "addr": {
        "transport": "socket", "type": "inet", "host": "10.0.0.2", "port": "4444"}}]},
        "migrate") == "tcp:10.0.0.2:4444"
    with pytest.raises(HvError, match="not specified"):    # the server makes it GenericError
        run(cmds, "migrate-incoming", {"uri": "tcp:127.0.0.1:1"})


def test_run_state_events(monitor):
    mon, cmds, machine, events = monitor
    for fn in machine.status_listeners:
        fn("paused", "user")
        fn("running", "user")
        fn("postmigrate", "")
    machine.shutdown_reason = "poweroff"
    for fn in machine.status_listeners:
        fn("shutdown", "poweroff")
    assert events == [("STOP", {}), ("RESUME", {}),
                      ("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})]
    mon._on_migration_event("MIGRATION", {"status": "active"})
    assert len(events) == 3                            # events capability off
    mon.capabilities["events"] = True
    mon._on_migration_event("MIGRATION", {"status": "active"})
    assert events[-1] == ("MIGRATION", {"status": "active"})
    mon.detach()
    assert machine.status_listeners == []


def test_no_balloon_is_device_not_active(monitor):
    mon, cmds, machine, _ = monitor
    for name, args in (("query-balloon", {}), ("balloon", {"value": 1 << 20})):
        with pytest.raises(QmpError) as e:
            run(cmds, name, args)
        assert e.value.class_ == DEVICE_NOT_ACTIVE


def test_balloon_value_is_what_the_guest_keeps(monitor):
    mon, cmds, machine, events = monitor
    targets = []
    machine.balloon = SimpleNamespace(actual=0, set_target=targets.append,
                                      actual_listeners=[])
    run(cmds, "balloon", {"value": 48 << 20})
    assert targets == [16.0]                           # MiB inflated
    machine.balloon.actual = 16 * 256
    assert run(cmds, "query-balloon") == {"actual": 48 << 20}
    mon._on_balloon(16 * 256)
    assert events[-1] == ("BALLOON_CHANGE", {"actual": 48 << 20})


def test_postcopy_is_qemus_capability_and_command_with_hvs_rounds(monitor):
    mon, cmds, machine, _ = monitor
    assert run(cmds, "query-migrate-parameters")[PREFIX + "postcopy-after-rounds"] == -1
    p = MigrationParams.from_args(mon._hv_args(mon.parameters, mon.capabilities, "tcp:h:1"))
    assert not p.postcopy and p.postcopy_after_rounds == -1
    with pytest.raises(QmpError, match="Enable postcopy with migrate_set_capability"):
        run(cmds, "migrate-start-postcopy")
    run(cmds, "migrate-set-capabilities", {"capabilities": [
        {"capability": "postcopy-ram", "state": True}]})
    run(cmds, "migrate-set-parameters", {PREFIX + "postcopy-after-rounds": 2})
    p = MigrationParams.from_args(mon._hv_args(mon.parameters, mon.capabilities, "tcp:h:1"))
    assert p.postcopy and p.postcopy_after_rounds == 2
    with pytest.raises(QmpError, match="after migration has been started"):
        run(cmds, "migrate-start-postcopy")
    with pytest.raises(QmpError, match="postcopy-after-rounds"):
        run(cmds, "migrate-set-parameters", {PREFIX + "postcopy-after-rounds": -2})


def test_postcopy_figures_in_query_migrate(monitor):
    mon, cmds, machine, _ = monitor
    q = {"status": "postcopy-active", "bytes_sent": 1 << 20, "pages_total": 16384,
         "pages_skipped_zero": 0, "pages_sent": 100, "rounds": [], "postcopy": True,
         "postcopy_pages": 300, "postcopy_requests": 7, "postcopy_pages_requested": 9,
         "postcopy_pages_pushed": 200, "postcopy_bytes": 4096 * 209, "downtime_ms": 12.4,
         "fault_latency_ms_mean": None, "fault_latency_ms_max": None,
         "postcopy_service_ms_mean": 0.5, "postcopy_service_ms_max": 2.0}
    info = mon._outgoing_info(q, SimpleNamespace(p=MigrationParams(uri="tcp:h:1")))
    assert info["status"] == "postcopy-active" and info["downtime"] == 12
    assert info["ram"]["postcopy-requests"] == 7 and info["ram"]["postcopy-bytes"] == 4096 * 209
    assert info[PREFIX + "postcopy-pages-pushed"] == 200
    assert info[PREFIX + "postcopy-pages-requested"] == 9
    assert PREFIX + "postcopy-fault-latency-max-ms" not in info    # DONE has not come


def test_io_timeout_is_hvs_prefixed_parameter_in_seconds(monitor):
    mon, cmds, machine, _ = monitor
    assert run(cmds, "query-migrate-parameters")[PREFIX + "io-timeout"] == \
        MigrationParams(uri="x").timeout_s
    run(cmds, "migrate-set-parameters", {PREFIX + "io-timeout": 7.5})
    p = MigrationParams.from_args(mon._hv_args(mon.parameters, mon.capabilities, "tcp:h:1"))
    assert p.timeout_s == 7.5
    with pytest.raises(QmpError, match="'__io.github.hv_io-timeout'"):
        run(cmds, "migrate-set-parameters", {PREFIX + "io-timeout": 0})
