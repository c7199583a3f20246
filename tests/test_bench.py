"""hv.bench: link rates parsed as tc writes them, two hosts joined by a
shaped veth link (root), and the charts drawn as PNG files."""

import os
import shutil
import subprocess
import sys

import pytest

from hv.bench import charts
from hv.bench.links import Hosts, LinkError, parse_rate, tbf_args


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
