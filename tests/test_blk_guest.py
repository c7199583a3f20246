"""virtio-blk with the Linux guest under hv (needs /dev/kvm and the guest images).

One 64 MiB guest with an ext4 disk made by `python -m hv.images disk --from
DIR`: it mounts /dev/vda and hashes a file the host put there, writes
numbered records with a sync after each (some of them while it migrates on
loopback to a second machine opened on the same image), and the destination
reads every record back. After the guest unmounted and powered off, e2fsck
on the host finds the file system clean.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import Console
from loopback import migrate_over_loopback

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

BEFORE, TOTAL = 20, 120     # records written before the migration, and in all


class Shell:
    """A machine whose guest runs its interactive shell on the console."""

    def __init__(self, m, console):
        self.m, self.console, self._n = m, console, 0

    def run(self, cmd: str, timeout: float = 300) -> str:
        """Type cmd; return what it printed; fail on a non-zero status."""
        self._n += 1
        tag = f"BLK{self._n}"
        start = self.console.mark()
        # the quotes keep the shell's echo of the line from matching
        line = f'{cmd}; echo "{tag[:2]}""{tag[2:]}=$?"\n'.encode()
        self.m.console_input(line, timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = self.console.wait_for(f"{tag}=", 5, start)
                break
            except TimeoutError:
                if self.m.status == "shutdown" or time.monotonic() > deadline:
                    raise
        out = text[:text.rindex(f"{tag}=")]
        status = self.console.wait_line(f"{tag}=", 5, start)
        assert status == f"{tag}=0", f"{cmd!r} failed ({status}):\n{out}"
        return out


def machine(images, disk, console):
    from hv.vmm import Machine, MachineConfig
    kernel, initrd = images
    m = Machine(MachineConfig(mem_mib=64, kernel=kernel, initrd=initrd,
                              disks=[{"path": disk}]))
    m.console_listeners.append(console)
    return m


def test_guest_reads_writes_and_migrates_a_disk(linux_images, tmp_path):
    src_dir = tmp_path / "content"
    src_dir.mkdir()
    payload = os.urandom(300_000)
    (src_dir / "known.bin").write_bytes(payload)
    disk = str(tmp_path / "disk.img")
    p = subprocess.run([sys.executable, "-m", "hv.images", "disk", "--size", "32M",
                        "--out", disk, "--from", str(src_dir)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr

    console = Console()
    src = machine(linux_images, disk, console)
    dst = None
    try:
        src.boot()
        src.start()
        assert src.disks[0].locked
        console.wait_for("hv-guest: ready", timeout=900)
        sh = Shell(src, console)
        sh.run("mkdir -p /mnt && mount -t ext4 /dev/vda /mnt")
        out = sh.run("sha256sum /mnt/known.bin")
        assert hashlib.sha256(payload).hexdigest() + "  /mnt/known.bin" in out
        sh.run(f"for i in $(seq 1 {BEFORE}); do echo record $i >> /mnt/log; sync; done")
        # a destination that fails to restore: the source takes its lock back and runs on
        bad = machine(linux_images, disk, console)

        def refuse(state):
            raise RuntimeError("test: this destination refuses the guest")
        try:
            q, res = migrate_over_loopback(src, bad, restore=refuse, timeout=60,
                                           free_pages="off")
        finally:
            bad.close()
        assert q["status"] == "failed" and "refuses" in q.get("error", ""), q
        assert src.status == "running" and src.disks[0].locked
        sh.run("tail -n 1 /mnt/log")
        # more records while the guest migrates: requests in flight at the pause
        # (the quotes keep the shell's echo from matching "writer-done")
        mark = console.mark()
        sh.run(f"(for i in $(seq {BEFORE + 1} {TOTAL}); do echo record $i >> /mnt/log; "
               "sync; done; echo writer\"\"-done) </dev/null > /dev/console 2>&1 & true")

        dst = machine(linux_images, disk, console)
        assert not dst.disks[0].locked       # opened, but no lock and no I/O until it runs
        q, res = migrate_over_loopback(src, dst, timeout=120, free_pages="off")
        assert q["status"] == "completed", q
        assert "error" not in res, res.get("error")
        assert dst.status == "running" and src.status in ("postmigrate", "shutdown")
        assert dst.disks[0].locked and not src.disks[0].locked

        sh = Shell(dst, console)
        console.wait_for("writer-done", timeout=300, start=mark)
        out = sh.run("cat /mnt/log")
        records = [line.strip() for line in out.splitlines() if line.startswith("record ")]
        assert records == [f"record {i}" for i in range(1, TOTAL + 1)], console.text[-3000:]
        sh.run("umount /mnt && sync")
        assert dst.disks[0].counters["writes"] > 0   # the destination wrote too
        dst.request_shutdown("test done")
    finally:
        for m in (src, dst):
            if m is not None:
                m.stop()
                m.close()
    p = subprocess.run(["/usr/sbin/e2fsck", "-fn", disk], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def _cached_kib(sh: Shell) -> int:
    out = sh.run("grep '^Cached:' /proc/meminfo")
    return int(re.search(r"^Cached:\s+(\d+) kB", out, re.M).group(1))


def test_free_page_bitmap_drops_the_page_cache_first(linux_images, tmp_path):
    """drop_cache=pagecache on the bitmap request: a file's clean page cache
    (read from the disk) is dropped in the guest before the snapshot, so its
    pages count as free; drop_cache=none leaves it."""
    from hv.vmm import Machine, MachineConfig
    src_dir = tmp_path / "content"
    src_dir.mkdir()
    (src_dir / "big.bin").write_bytes(os.urandom(12 << 20))
    disk = str(tmp_path / "disk.img")
    from hv.images import make_disk
    make_disk(disk, 32 << 20, str(src_dir))
    kernel, initrd = linux_images
    console = Console()
    m = Machine(MachineConfig(mem_mib=64, kernel=kernel, initrd=initrd, balloon=True,
                              balloon_options={"reporting": False}, disks=[disk]))
    m.console_listeners.append(console)
    try:
        m.boot()
        m.start()
        console.wait_for("hv-guest: ready", timeout=900)
        sh = Shell(m, console)
        sh.run("mkdir -p /mnt && mount -t ext4 -o ro /dev/vda /mnt && cat /mnt/big.bin > /dev/null")
        cached = _cached_kib(sh)
        _, kept = m.balloon.request_free_page_bitmap(120_000, drop_cache="none")
        assert _cached_kib(sh) > cached - 2048        # still cached
        _, dropped = m.balloon.request_free_page_bitmap(120_000, drop_cache="pagecache")
        after = _cached_kib(sh)
        gained = dropped["free_pages"] - kept["free_pages"]
        print(f"cached {cached} KiB -> {after} KiB; free pages {kept['free_pages']} -> "
              f"{dropped['free_pages']} (+{gained})")
        assert cached - after >= 10 << 10, (cached, after)
        assert gained >= (10 << 20) // 4096, (kept, dropped)
        sh.run("umount /mnt")
    finally:
        m.stop()
        m.close()


def test_drop_cache_in_a_live_migration_sends_fewer_pages(linux_images, tmp_path):
    """Two real live migrations of one guest that read a 12 MiB file from its
    disk: drop_cache=none sends the file's page cache, drop_cache=pagecache
    (asked with the free page bitmap) does not; the guest reads the file
    again, from the disk, intact after the second."""
    from hv.images import make_disk
    from hv.vmm import Machine, MachineConfig
    src_dir = tmp_path / "content"
    src_dir.mkdir()
    payload = os.urandom(12 << 20)
    (src_dir / "big.bin").write_bytes(payload)
    disk = str(tmp_path / "disk.img")
    make_disk(disk, 32 << 20, str(src_dir))
    kernel, initrd = linux_images
    console = Console()

    def machine():
        m = Machine(MachineConfig(mem_mib=64, kernel=kernel, initrd=initrd, balloon=True,
                                  balloon_options={"reporting": False}, disks=[disk]))
        m.console_listeners.append(console)
        return m
    machines = [machine()]
    try:
        a = machines[0]
        a.boot()
        a.start()
        console.wait_for("hv-guest: ready", timeout=900)
        sh = Shell(a, console)
        sh.run("mkdir -p /mnt && mount -t ext4 -o ro /dev/vda /mnt && cat /mnt/big.bin > /dev/null")
        cached = _cached_kib(sh)
        assert cached >= 12 << 10, cached
        sent = {}
        for drop in ("none", "pagecache"):
            src, dst = machines[-1], machine()
            machines.append(dst)
            q, res = migrate_over_loopback(src, dst, timeout=120, free_pages="bitmap",
                                           drop_cache=drop)
            assert q["status"] == "completed", q
            assert "error" not in res, res.get("error")
            info = q["free_page_info"] or {}
            assert info.get("drop_cache") == drop, info
            sent[drop] = q["pages_sent"]
            sh = Shell(dst, console)
            after = _cached_kib(sh)
            print(f"drop_cache={drop}: {q['pages_sent']} pages sent, "
                  f"{q['pages_skipped_free']} skipped free; Cached {cached} -> {after} KiB")
            if drop == "none":
                assert after > cached - 2048, (cached, after)   # the cache travelled
        # the file's 3072 pages, less what the guest's own activity may add
        assert sent["none"] - sent["pagecache"] >= 0.8 * (12 << 20) // 4096, sent
        out = sh.run("sha256sum /mnt/big.bin && umount /mnt")
        assert hashlib.sha256(payload).hexdigest() in out
    finally:
        for m in machines:
            m.stop()
            m.close()
