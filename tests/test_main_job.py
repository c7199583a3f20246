"""The README's main job, end to end: scripts/migrate-between-hosts makes two
network namespaces, boots the Linux guest in one with a fill-then-free and a
hold workload, migrates it to the other with the free page bitmap and
--verify, and the guest re-checks its memory there. By default the guest is
on a network with a client in a third namespace that holds one TCP
connection to the guest's echo service through every migration. Kept small
(128 MiB guests), each test one boot: the default job goes A -> B -> A on
its boot, the destination-killed disk run checks that the guest on A keeps
answering, the two-vCPU run is the memory-only one (--no-net)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "migrate-between-hosts")
HOSTS = os.environ.get("HV_HOSTS_PREFIX", "hv-mig")
NAMESPACES = {f"{HOSTS}-a", f"{HOSTS}-b", f"{HOSTS}-c"}

pytestmark = pytest.mark.kvm

sys.path.insert(0, os.path.join(REPO, "scripts"))
import netclient  # noqa: E402  (scripts/netclient.py)


def net_missing() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not os.path.exists("/dev/net/tun"):
        return "the guest's network needs /dev/net/tun"
    if not shutil.which("ip"):
        return "needs ip(8)"
    return None


needs_net = pytest.mark.skipif(net_missing() is not None, reason=str(net_missing()))


def assert_net_intact(r, proc):
    """The client's one connection lived through every run: every request
    answered intact, in order, once; answered after the last migration;
    the guest answered a ping after each run."""
    assert r["net_requests"] >= 50, r                # > 1 s of requests at 20 ms
    assert r["net_errors"] == 0, r["net_error_list"]
    assert r["net_answered"] == r["net_requests"]
    assert r["net_bytes_checked"] == 32 * r["net_requests"]
    assert r["net_connection_survived"] is True, r["net_connection_closed"]
    assert r["net_ping_answered"] is True
    assert r["net_longest_stall_ms"] is not None and r["net_longest_stall_ms"] > 0
    for x in r["runs"]:
        assert x["net_errors"] == 0 and x["net_ping_received"] >= 1, x
        assert x["net_requests"] > 0 and x["net_answered"] == x["net_requests"], x
    assert "net errors          0\n" in proc.stdout
    assert "net connection      survived" in proc.stdout


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@needs_net
def test_migrate_between_hosts_reports_a_completed_verified_migration(linux_images, tmp_path):
    """The default job, then back (--fault none twice: A -> B -> A on one
    boot), the client's connection open throughout."""
    report = tmp_path / "report.json"
    fill_mib, keep_mib = 16, 8
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--mem", "128", "--keep-mib", str(keep_mib),
         "--fill-mib", str(fill_mib), "--free-pages", "bitmap", "--verify",
         "--fault", "none", "--fault", "none", "--json", str(report)],
        capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    r = json.loads(report.read_text())
    assert [(x["from"], x["to"], x["outcome"]) for x in r["runs"]] == \
        [("A", "B", "completed"), ("B", "A", "completed")]
    assert all(x["guest_verified"] and x["verified"] for x in r["runs"])
    assert r["guest_on"] == "A"
    assert_net_intact(r, proc)
    # the JSON's top level is the last run's (B -> A), and the totals of the net
    assert r["status"] == "completed"
    assert r["guest_alive_after"] is True
    assert r["verified"] is True
    assert r["pages_total"] == 128 * 256
    # The pages hvmem filled and freed are free in the guest's bitmap: skipped.
    assert r["pages_skipped_free"] >= fill_mib * 256 * 0.9
    # What the guest holds had to travel.
    assert r["pages_sent"] >= keep_mib * 256
    assert r["pages_sent"] + r["pages_skipped_free"] + r["pages_skipped_zero"] >= r["pages_total"]
    assert r["bytes_sent"] >= r["pages_sent"] * 4096
    assert r["downtime_ms"] is not None and r["downtime_ms"] <= r["total_time_ms"]
    assert "completed" in proc.stdout
    # Whatever happened, the hosts are gone.
    assert not NAMESPACES & netns_names()


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_migrate_between_hosts_moves_a_two_vcpu_guest_with_a_writer_on_each(linux_images,
                                                                              tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--mem", "128", "--cpus", "2", "--dirty-mib", "4",
         "--keep-mib", "8", "--fill-mib", "16", "--verify", "--no-net", "--json", str(report)],
        capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(report.read_text())
    assert r["status"] == "completed" and r["cpus"] == 2
    # --no-net: the memory-only job, no client, no network report
    assert "net_requests" not in r and "net client" not in proc.stdout
    assert r["guest_alive_after"] is True and r["verified"] is True
    # two writers kept dirtying during the rounds: more than one round was sent
    assert r["rounds"] >= 2, r["round_pages"]
    assert "2 vCPUs, a 4 MiB writer on each" in proc.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_migrate_between_hosts_refuses_bad_options():
    proc = subprocess.run([sys.executable, SCRIPT, "--free-pages", "everything"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, SCRIPT, "--net-interval-ms", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--net-interval-ms must be between" in proc.stderr
    assert "Traceback" not in proc.stderr


def disk_job(tmp_path, *extra, timeout=1200):
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--mem", "128", "--keep-mib", "8", "--fill-mib", "16",
         "--disk", "--json", str(report), *extra],
        capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    r = json.loads(report.read_text())
    return proc, r


def assert_disk_intact(r):
    """Every acknowledged record read back intact, in order, once; the guest
    kept writing where it ran after the migration; the image is clean."""
    assert r["disk_records_acked"] >= 4, r        # 3 before the migration, 1 after
    assert r["disk_acks_increasing"] is True
    assert r["disk_records_lost"] == 0, r
    assert r["disk_records_bad"] == 0, r           # nothing damaged, nothing written twice
    assert r["disk_records_read_back"] >= r["disk_records_acked_last"]
    assert r["disk_md5_matches"] is True
    # the host reads the same records from the image after the guest powered off
    assert r["disk_records_on_host"] == r["disk_records_read_back"]
    assert r["disk_fsck_clean"] is True, r["disk_fsck_output"]


@needs_net
def test_migrate_between_hosts_with_a_shared_disk_loses_no_acknowledged_record(
        linux_images, tmp_path):
    proc, r = disk_job(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert r["status"] == "completed" and r["guest_alive_after"] is True
    assert r["guest_on"] == "B"
    assert_disk_intact(r)
    assert r["disk_records_acked_on_b"] >= 1       # B wrote to the shared image too
    assert "0 lost, 0 bad" in proc.stdout and "e2fsck -fn clean" in proc.stdout
    assert_net_intact(r, proc)


@needs_net
def test_migrate_between_hosts_with_a_disk_whose_destination_dies_resumes_the_source(
        linux_images, tmp_path):
    # 4 MiB/s: the bulk pass takes seconds, and B is killed a quarter of the way in
    proc, r = disk_job(tmp_path, "--max-bandwidth-mib", "4",
                       "--kill-destination-after-mib", "5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert r["status"] == "failed", r
    assert r["killed_destination_after_bytes"] >= 5 << 20
    # mid-way: the guest's ~23 MiB with data had not all been sent
    assert r["bytes_sent"] < 12 << 20, r["bytes_sent"]
    assert r["guest_on"] == "A" and r["guest_alive_after"] is True
    assert r["disk_records_acked_on_b"] == 0
    assert_disk_intact(r)
    # the guest on A never stopped answering the client
    assert_net_intact(r, proc)
    assert not NAMESPACES & netns_names()


# ----------------------------------------------- the client's checks, no guest

def echo_server(ns, mangle):
    """An echo service on 127.0.0.1 in ns; mangle(record_index, record)
    gives what is sent back for each 32-byte record (None: close)."""
    with netclient.InNs(ns):
        srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        buf, i = b"", 0
        with conn:
            while data := conn.recv(4096):
                buf += data
                while len(buf) >= 32:
                    rec, buf = buf[:32], buf[32:]
                    out = mangle(i, rec)
                    i += 1
                    if out is None:
                        return
                    conn.sendall(out)
    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


@pytest.fixture
def lo_netns():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and ip(8)")
    ns = f"hv-netclient-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns])


@pytest.mark.parametrize("fault, want", [
    ("none", None),
    ("duplicate", "answered twice"),
    ("drop", "lost"),
    ("corrupt", "wrong data"),
    ("close", "closed by the guest"),
])
def test_echo_client_counts_what_the_echo_got_wrong(lo_netns, fault, want):
    def mangle(i, rec):
        if i != 10 or fault == "none":
            return rec
        return {"duplicate": rec + rec, "drop": b"",
                "corrupt": rec[:20] + b"X" + rec[21:], "close": None}[fault]
    port = echo_server(lo_netns, mangle)
    c = netclient.EchoClient(lo_netns, "127.0.0.1", port, interval=0.005)
    c.connect(10)
    c.start()
    time.sleep(0.3)
    c.stop(drain=2)
    st = c.stats()
    assert st["requests"] > 10          # the mangled record was sent
    if want is None:
        assert st["errors"] == 0 and st["answered"] == st["requests"], st
        assert c.closed is None
        assert 0 < st["longest_stall_ms"] < 1000
    else:
        assert st["errors"] >= 1 and any(want in e for e in st["error_list"]), st
