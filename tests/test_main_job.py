"""The README's main job, end to end: scripts/migrate-between-hosts makes two
network namespaces, boots the Linux guest in one with a fill-then-free and a
hold workload, migrates it to the other with the free page bitmap and
--verify, and the guest re-checks its memory there. Kept small (128 MiB
guest) so that it costs one boot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "migrate-between-hosts")
HOSTS = os.environ.get("HV_HOSTS_PREFIX", "hv-mig")

pytestmark = pytest.mark.kvm


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_migrate_between_hosts_reports_a_completed_verified_migration(linux_images, tmp_path):
    report = tmp_path / "report.json"
    fill_mib, keep_mib = 16, 8
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--mem", "128", "--keep-mib", str(keep_mib),
         "--fill-mib", str(fill_mib), "--free-pages", "bitmap", "--verify",
         "--json", str(report)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    r = json.loads(report.read_text())
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
    assert not {f"{HOSTS}-a", f"{HOSTS}-b"} & netns_names()


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_migrate_between_hosts_moves_a_two_vcpu_guest_with_a_writer_on_each(linux_images,
                                                                              tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--mem", "128", "--cpus", "2", "--dirty-mib", "4",
         "--keep-mib", "8", "--fill-mib", "16", "--verify", "--json", str(report)],
        capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(report.read_text())
    assert r["status"] == "completed" and r["cpus"] == 2
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


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_migrate_between_hosts_with_a_shared_disk_loses_no_acknowledged_record(
        linux_images, tmp_path):
    proc, r = disk_job(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert r["status"] == "completed" and r["guest_alive_after"] is True
    assert r["guest_on"] == "B"
    assert_disk_intact(r)
    assert r["disk_records_acked_on_b"] >= 1       # B wrote to the shared image too
    assert "0 lost, 0 bad" in proc.stdout and "e2fsck -fn clean" in proc.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
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
    assert not {f"{HOSTS}-a", f"{HOSTS}-b"} & netns_names()
