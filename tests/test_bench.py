"""hv.bench: link rates parsed as tc writes them, two hosts joined by a
shaped veth link (root), and the charts drawn as PNG files."""

import os
import shutil
import subprocess
import sys

import pytest

from hv.bench import charts
from hv.bench.links import CLIENT_IP, TAP, GuestSegment, Hosts, LinkError, parse_rate, tbf_args

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))
import netclient  # noqa: E402  (scripts/netclient.py)


def test_link_rates_are_read_as_tc_writes_them():
    assert parse_rate("1gbit") == 10**9
    assert parse_rate("10gbit") == 10**10
    assert parse_rate("2.5gbit") == 25 * 10**8
    assert parse_rate("100mbit") == 10**8
    for bad in ("1gb", "fast", "", "0mbit", "5000gbit", "1 gigabit"):
        with pytest.raises(LinkError, match="link rate"):
            parse_rate(bad)
    # the bucket holds 5 ms at the rate, and never less than a GSO frame
    args = tbf_args(10**9)
    assert args[:2] == ["rate", f"{10**9}bit"]
    assert int(args[3]) >= 10**9 // 8 // 200
    assert int(tbf_args(10**6)[3]) > 64 << 10


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("tc"),
                    reason="network namespaces and tc need root and iproute2")
def test_hosts_are_joined_by_a_shaped_link_and_removed_after():
    with Hosts("hv-tbench", parse_rate("100mbit")) as h:
        out = subprocess.run(["ip", "netns", "exec", h.ns_a, "tc", "qdisc", "show", "dev",
                              h.if_a], capture_output=True, text=True).stdout
        assert "tbf" in out and "100Mbit" in out
        # bytes cross from A to B
        server = subprocess.Popen(
            ["ip", "netns", "exec", h.ns_b, sys.executable, "-c",
             "import socket; s = socket.create_server(('0.0.0.0', 5301)); print('up', "
             "flush=True); c, _ = s.accept(); n = 0\nwhile (d := c.recv(65536)): n += len(d)"
             "\nprint(n)"], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "up"
        subprocess.run(["ip", "netns", "exec", h.ns_a, sys.executable, "-c",
                        f"import socket; s = socket.create_connection(('{h.ip_b}', 5301), 10);"
                        " s.sendall(bytes(1 << 20)); s.close()"], check=True, timeout=60)
        assert server.communicate(timeout=60)[0].strip() == str(1 << 20)
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert h.ns_a not in names and h.ns_b not in names


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                    reason="network namespaces need root and iproute2")
def test_the_guest_segment_reaches_each_hosts_bridge_from_the_client():
    def ip(*argv):
        return subprocess.run(["ip", *argv], capture_output=True, text=True, check=True).stdout
    with Hosts("hv-tseg") as h:
        seg = GuestSegment("hv-tseg-c", (h.ns_a, h.ns_b)).create()
        try:
            assert CLIENT_IP in ip("-n", seg.client_ns, "addr", "show", "br0")
            for i, ns in enumerate((h.ns_a, h.ns_b)):
                assert "master br0" in ip("-n", ns, "link", "show", TAP)
                # an address on the host's bridge answers the client: the
                # client's switch, the veth and the host's bridge carry frames
                ip("-n", ns, "addr", "add", f"10.78.0.{201 + i}/24", "dev", "br0")
                p = netclient.ping(seg.client_ns, f"10.78.0.{201 + i}", count=1)
                assert p["received"] == 1, p
        finally:
            seg.remove()
    names = ip("netns", "list")
    assert "hv-tseg-c" not in names and h.ns_a not in names


def rows():
    return [
        {"config": "hv-bitmap", "tool": "hv", "status": "completed", "bytes_sent": 31 << 20,
         "total_time_ms": 90.0, "downtime_ms": 12.0, "round_pages": [7000, 40, 3],
         "samples": [(0.0, 0, 30 << 20), (0.05, 20 << 20, 10 << 20), (0.09, 31 << 20, 0)]},
        {"config": "qemu-hint", "tool": "qemu", "status": "completed",
         "bytes_sent": 44 << 20, "total_time_ms": 300.0, "downtime_ms": 40.0,
         "round_pages": [10500], "samples": [(0.0, 0, 60 << 20), (0.3, 44 << 20, 0)]},
        {"config": "hv-off", "tool": "hv", "status": "failed", "bytes_sent": None},
    ]


def test_charts_are_pngs(tmp_path):
    paths = [charts.pages_per_round(rows(), str(tmp_path / "rounds.png"), "default, 256 MiB",
                                    in_use_pages=7000),
             charts.bytes_and_time(rows(), str(tmp_path / "bytes.png"), "default, 256 MiB"),
             charts.timeline(rows(), str(tmp_path / "timeline.png"), "default, 256 MiB")]
    for p in paths:
        with open(p, "rb") as f:
            head = f.read(24)
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width = int.from_bytes(head[16:20], "big")
        assert width >= 900            # a real figure, not a stand-in


def test_one_report_from_hv_and_from_qemu():
    from hv.bench.report import FIELDS, from_query_migrate
    from hv.qmp_commands import PREFIX
    qemu = {"status": "completed", "total-time": 300, "setup-time": 12, "downtime": 40,
            "ram": {"transferred": 44 << 20, "total": 256 << 20, "normal": 10500,
                    "duplicate": 40000, "dirty-sync-count": 3, "page-size": 4096,
                    "mbps": 1000.0}}
    hv = dict(qemu, **{PREFIX + "rounds": [{"pages": 7000}, {"pages": 12}],
                       PREFIX + "pages-skipped-free": 50000,
                       PREFIX + "pages-skipped-zero": 1000, PREFIX + "verified": True})
    rq, rh = from_query_migrate(qemu), from_query_migrate(hv)
    assert set(rq) == set(rh) == set(FIELDS)
    assert (rq["pages_total"], rq["rounds"], rq["round_pages"], rq["pages_skipped_zero"],
            rq["pages_skipped_free"]) == (65536, 3, [10500], 40000, None)
    assert (rh["rounds"], rh["round_pages"], rh["pages_skipped_zero"],
            rh["pages_skipped_free"], rh["verified"]) == (2, [7000, 12], 1000, 50000, True)
    assert rh["throughput_mib_s"] == round(1000e6 / 8 / (1 << 20), 3)
    assert rq["setup_ms"] == 12 and rq["bytes_sent"] == 44 << 20


# ------------------------------------------------ bench-migration's dirty workload

def bench():
    """scripts/bench-migration as a module (its pure logic: no guest)."""
    import importlib.machinery
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "scripts", "bench-migration")
    loader = importlib.machinery.SourceFileLoader("bench_migration", path)
    spec = importlib.util.spec_from_loader("bench_migration", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def dirty_row(cfg, status="completed", downtime=100.0, total=5000.0, **kw):
    tool = cfg.split("-")[0]
    r = {"config": cfg, "tool": tool, "status": status, "downtime_ms": downtime,
         "total_time_ms": total, "bytes_sent": 80 << 20, "pages_sent": 20000,
         "pages_skipped_free": 5000 if tool == "hv" else None, "pages_skipped_zero": 100,
         "rounds": 12, "round_pages": [20000, 16000], "guest_alive_after": status == "completed",
         "held_mib": 16, "mode": cfg.rsplit("-", 1)[1], "forced": False,
         "throttle_max_pct": 0, "dirty_rates": [40000, 38000], "bandwidth_mib": 100,
         "postcopy_requests": None, "postcopy_pages_requested": None,
         "fault_latency_mean_ms": None, "fault_latency_max_ms": None}
    r.update(kw)
    return r


def dirty_run(**over):
    rows = {
        "hv-bitmap-precopy": dirty_row("hv-bitmap-precopy", downtime=700.0, total=21000.0,
                                       forced=True, rounds=32),
        "hv-bitmap-converge": dirty_row("hv-bitmap-converge", downtime=120.0, total=9000.0,
                                        throttle_max_pct=90, dirty_rates=[40000, 3000]),
        "hv-bitmap-postcopy": dirty_row("hv-bitmap-postcopy", downtime=20.0, total=2000.0,
                                        postcopy_requests=300, postcopy_pages_requested=310,
                                        fault_latency_mean_ms=1.5, fault_latency_max_ms=6.0),
        "qemu-hint-precopy": dirty_row("qemu-hint-precopy", downtime=900.0, total=25000.0,
                                       forced=True),
        "qemu-hint-converge": dirty_row("qemu-hint-converge", downtime=200.0, total=8000.0,
                                        throttle_max_pct=99),
        "qemu-hint-postcopy": dirty_row("qemu-hint-postcopy", downtime=30.0, total=2500.0,
                                        postcopy_requests=500, postcopy_blocktime_ms=900),
    }
    for cfg, change in over.items():
        if change is None:
            del rows[cfg]
        else:
            rows[cfg].update(change)
    return list(rows.values())


def by_aim(rows):
    return {a["aim"]: a for a in rows}


def test_dirty_aims_from_one_run():
    b = bench()
    a = by_aim(b.aims(dirty_run(), "dirty"))
    pre = a["precopy alone misses the downtime limit (hv)"]
    assert (pre["value"], pre["met"], pre["unit"]) == (700.0, True, "ms")
    ac = a["auto-converge completes within the downtime limit (hv)"]
    assert (ac["value"], ac["met"]) == (120.0, True)
    assert "throttle up to 90 %" in ac["how"] and "40000 -> 3000" in ac["how"]
    assert a["postcopy downtime (hv)"]["met"] is True
    lat = a["postcopy worst fault latency (hv)"]
    assert (lat["value"], lat["met"]) == (6.0, True)
    assert "900 ms" in lat["how"]                   # QEMU's blocktime beside it
    # per mode, hv against QEMU: ratios, and 1.00x is the bar
    down = a["precopy: downtime hv / QEMU"]
    assert down["value"] == 700 / 900 and down["met"] is True and down["unit"] == "x"
    tot = a["converge: total time hv / QEMU"]
    assert tot["value"] == 9000 / 8000 and tot["met"] is False
    assert a["postcopy: total time hv / QEMU"]["value"] == 2000 / 2500
    assert len(a) == 4 + 2 * 3
    # none of the other workloads' aims (hv-bitmap is not in this run)
    assert not any("free page bitmap" in name for name in a)


def test_dirty_aims_say_what_missed():
    b = bench()
    # precopy that converged after all: the guest did not outpace the link
    a = by_aim(b.aims(dirty_run(**{"hv-bitmap-precopy": {"forced": False,
                                                        "downtime_ms": 250.0}}), "dirty"))
    assert a["precopy alone misses the downtime limit (hv)"]["met"] is False
    # auto-converge paused anyway: not met even under the limit
    a = by_aim(b.aims(dirty_run(**{"hv-bitmap-converge": {"forced": True,
                                                         "downtime_ms": 280.0}}), "dirty"))
    assert a["auto-converge completes within the downtime limit (hv)"]["met"] is False
    a = by_aim(b.aims(dirty_run(**{"hv-bitmap-postcopy": {"downtime_ms": 51.0,
                                                         "fault_latency_max_ms": 10.5}}),
                      "dirty"))
    assert a["postcopy downtime (hv)"]["met"] is False
    assert a["postcopy worst fault latency (hv)"]["met"] is False
    # a config that failed or did not run: not measured, and why
    a = by_aim(b.aims(dirty_run(**{"qemu-hint-postcopy": {"status": "failed",
                                                         "error": "no userfaultfd"},
                                   "hv-bitmap-converge": None}), "dirty"))
    assert a["postcopy: downtime hv / QEMU"]["value"] is None
    assert "qemu-hint-postcopy did not complete" in a["postcopy: downtime hv / QEMU"]["how"]
    assert "no userfaultfd" in a["postcopy: total time hv / QEMU"]["how"]
    ac = a["auto-converge completes within the downtime limit (hv)"]
    assert ac["met"] is None and ac["how"] == "hv-bitmap-converge not run"
    # a postcopy without a single fault has no latency to judge
    a = by_aim(b.aims(dirty_run(**{"hv-bitmap-postcopy": {"fault_latency_max_ms": None}}),
                      "dirty"))
    assert a["postcopy worst fault latency (hv)"]["met"] is None


def test_dirty_aims_and_table_print():
    b = bench()
    rows = dirty_run(**{"qemu-hint-postcopy": {"status": "failed"}})
    text = b.aims_text(b.aims(rows, "dirty"), "dirty")
    assert "precopy alone misses the downtime limit (hv): 700.0 ms   aim > 300 ms" in text
    assert "precopy: downtime hv / QEMU: 0.778x   aim <= 1.00x   met" in text
    assert "converge: total time hv / QEMU: 1.125x   aim <= 1.00x   NOT MET" in text
    assert "postcopy: downtime hv / QEMU: -   aim <= 1.00x   not measured" in text
    # the main table has every row; the mode table is below it
    main, modes = b.table(rows).split("\n\n")[:2]
    main, modes = ({ln.split()[0]: ln for ln in t.splitlines()[1:]
                    if ln.startswith(("hv-", "qemu-"))} for t in (main, modes))
    assert set(main) == set(modes) == {r["config"] for r in rows}
    assert main["qemu-hint-postcopy"].split()[1] == "failed"
    assert modes["qemu-hint-postcopy"].split()[1:3] == ["postcopy", "failed"]
    conv = modes["hv-bitmap-converge"]
    assert "converge" in conv and "90 %" in conv and "40000 -> 3000" in conv
    assert "310" in modes["hv-bitmap-postcopy"] and "1.50/6.00" in modes["hv-bitmap-postcopy"]
    assert modes["hv-bitmap-precopy"].split()[6] == "yes"          # forced


def test_mode_driver_gives_qemu_what_hv_does_by_itself():
    b = bench()

    def q(status, syncs, rate=0, throttle=None):
        out = {"status": status, "ram": {"dirty-sync-count": syncs, "dirty-pages-rate": rate}}
        if throttle is not None:
            out["cpu-throttle-percentage"] = throttle
        return out
    # QEMU postcopy: migrate-start-postcopy once the bulk pass ended, once
    d = b.ModeDriver("qemu", "postcopy")
    assert d.observe(q("setup", 0)) == [] and d.observe(q("active", 1)) == []
    assert d.observe(q("active", 2, 30000)) == [("migrate-start-postcopy", {})]
    assert d.observe(q("active", 3, 30000)) == [] and d.observe(q("postcopy-active", 3)) == []
    assert d.postcopy_asked_at == 2 and d.dirty_rates == [30000]
    # QEMU precopy and auto-converge: the limit goes up after the rounds run out
    for mode in ("precopy", "converge"):
        d = b.ModeDriver("qemu", mode)
        assert d.observe(q("active", b.GIVE_UP_ROUNDS + 1, 500, 20)) == []
        assert d.observe(q("active", b.GIVE_UP_ROUNDS + 2, 400, 30)) == [
            ("migrate-set-parameters", {"downtime-limit": b.QEMU_MAX_DOWNTIME_MS})]
        assert d.observe(q("active", b.GIVE_UP_ROUNDS + 3, 400, 10)) == []
        assert (d.forced_at, d.throttle_max, d.dirty_rates) == (b.GIVE_UP_ROUNDS + 2, 30,
                                                                [500, 400])
        assert b.mode_result({}, d, "qemu")["forced"] is True
    # hv does both by itself: the driver only watches
    d = b.ModeDriver("hv", "postcopy")
    assert d.observe(q("active", 40, 100)) == [] and d.dirty_rates == [100]
    warn = {b.PREFIX + "warning": "the guest did not converge: ...; paused anyway "
                                  "(downtime_strategy \"force\")"}
    assert b.mode_result(warn, d, "hv")["forced"] is True
    assert b.mode_result({}, d, "hv")["forced"] is False
    # and the other workloads' configs have no mode
    assert b.ModeDriver("qemu", None).observe(q("active", 99)) == []
    assert b.mode_of("qemu-hint") is None and b.mode_of("hv-bitmap-converge") == "converge"


def test_mode_settings_are_the_same_modes_in_each_vmm():
    b = bench()
    P = b.PREFIX
    assert b.mode_settings("hv", None, 25) == ({}, {})
    params, caps = b.mode_settings("hv", "precopy", 25)
    assert params == {P + "max-rounds": b.GIVE_UP_ROUNDS, P + "downtime-strategy": "force"}
    assert caps == {}
    params, caps = b.mode_settings("hv", "converge", 25)
    assert caps == {"auto-converge": True} and params["cpu-throttle-initial"] == 20
    params, caps = b.mode_settings("qemu", "converge", 25)
    assert caps == {"auto-converge": True}
    assert params == {"cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
                      "max-cpu-throttle": 99}
    # postcopy's push on the path's rate in both
    path = {"max-postcopy-bandwidth": 25 << 20}
    assert b.mode_settings("hv", "postcopy", 25) == ({P + "postcopy-after-rounds": 0, **path},
                                                     {"postcopy-ram": True})
    assert b.mode_settings("qemu", "postcopy", 25) == (path, {"postcopy-ram": True})
    # the dirty workload's guest: the writer in the background, the holder answers
    import argparse
    args = argparse.Namespace(disk_image=None, keep_mib=16, fill_mib=0, dirty_mib=64)
    assert b.guest_command(args) == (f"hvmem dirty 64 {b.DIRTY_RATE} </dev/null & "
                                     f"exec hvmem hold 16")
    # the net workload's: its address and services first
    args = argparse.Namespace(disk_image=None, keep_mib=16, fill_mib=0, dirty_mib=0, net=True)
    cmd = b.guest_command(args)
    assert cmd.startswith(f"ip addr add {b.GUEST_IP}/24 dev eth0") and \
        f"-p {b.ECHO_PORT} -e cat " in cmd and f"-p {b.STREAM_PORT} -e /tmp/zeros" in cmd
    assert cmd.endswith("exec hvmem hold 16")


def test_downtime_from_the_events_of_both_vmms():
    b = bench()

    def ev(name, t):
        return {"event": name, "timestamp": {"seconds": int(t), "microseconds":
                                             round((t - int(t)) * 1e6)}}
    # a pause rolled back (STOP, RESUME on the source), then the real one
    src = [ev("STOP", 100.0), ev("RESUME", 100.2), ev("STOP", 101.5), ev("SHUTDOWN", 103.0)]
    dst = [ev("RESUME", 101.5405), ev("STOP", 110.0), ev("RESUME", 111.0)]
    assert b.paused_ms(src, dst) == 40.5
    assert b.paused_ms(src, []) is None
    assert b.paused_ms([ev("STOP", 120.0)], dst) is None      # no stop before the resume
    # the aims compare the events' downtime when both have it
    rows = dirty_run(**{"hv-bitmap-postcopy": {"paused_ms": 45.0},
                        "qemu-hint-postcopy": {"paused_ms": 60.0}})
    a = by_aim(b.aims(rows, "dirty"))["postcopy: downtime hv / QEMU"]
    assert a["value"] == 45 / 60 and a["met"] and "STOP to destination RESUME" in a["how"]
    a = by_aim(b.aims(dirty_run(), "dirty"))["postcopy: downtime hv / QEMU"]
    assert a["value"] == 20 / 30 and "as each VMM reports it" in a["how"]


def test_tls_aims():
    b = bench()

    def row(cfg, total, sent, bulk=None, status="completed"):
        return {"config": cfg, "tool": cfg.split("-")[0], "status": status,
                "total_time_ms": total, "bytes_sent": sent, "bulk_mib_s": bulk}
    rows = [row("hv-bitmap", 100.0, 30 << 20, 800.0), row("hv-bitmap-tls", 150.0, 30 << 20, 400.0),
            row("hv-off", 100.0, 80 << 20, 900.0), row("hv-off-tls", 200.0, 80 << 20, 600.0),
            row("qemu-hint", 170.0, 56 << 20), row("qemu-hint-tls", 300.0, 56 << 20)]
    a = by_aim(b.tls_aims(rows))
    assert a["TLS throughput vs plain (hv-bitmap)"]["value"] == 0.5
    assert a["TLS throughput vs plain (hv-bitmap)"]["met"] is False
    assert a["TLS throughput vs plain (hv-off)"]["met"] is True
    # against QEMU: bytes on the wire over the whole migration, the same for both
    thr = a["TLS throughput vs QEMU TLS"]
    assert thr["value"] == b.wire_mib_s(rows[1]) / b.wire_mib_s(rows[5])
    assert b.wire_mib_s(rows[1]) == 200.0 and thr["met"] is True
    tot = a["TLS total time vs QEMU TLS"]
    assert tot["value"] == 0.5 and tot["met"] is True
    # the TLS aims are part of any workload's aims; without TLS there are none
    dirty = dirty_run() + [dict(r, config=r["config"] + "-tls")
                           for r in dirty_run()[:1]]
    assert "TLS throughput vs plain (hv-bitmap-precopy)" in by_aim(b.aims(dirty, "dirty"))
    assert b.tls_aims(rows[:1] + rows[4:5]) == []
    rows[5]["status"] = "failed"
    a = by_aim(b.tls_aims(rows))
    assert a["TLS total time vs QEMU TLS"]["met"] is None


def test_hv_dirty_rate_from_its_rounds():
    b = bench()
    rounds = [{"round": 0, "pages": 20000, "ms": 800.0},
              {"round": 1, "dirty_pages": 12000, "pages": 12000, "ms": 2000.0},
              {"round": 2, "dirty_pages": 16000, "pages": 16000, "ms": 2500.0},
              {"round": 3, "dirty_pages": 16384, "final": True, "ms": 2600.0}]
    assert b.round_rates(rounds) == [15000, 8000]
    assert b.round_rates([rounds[0], dict(rounds[1], postcopy=True)]) == []
    d = b.ModeDriver("hv", "converge")
    r = b.mode_result({b.PREFIX + "rounds": rounds, "cpu-throttle-percentage": 40}, d, "hv")
    assert r["dirty_rates"] == [15000, 8000] and r["throttle_max_pct"] == 40
