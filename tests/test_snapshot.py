"""Snapshots (hv.migration.snapshot): a running tiny guest saved to a file
and restored into a new machine, mapped or copied; sparse files; every kind
of bad file refused before anything runs."""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_migration_kvm import MEM_MIB, counter, make_machine, writer_guest  # noqa: E402

from hv.migration.snapshot import SnapshotError, restore, save  # noqa: E402

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")]


@pytest.fixture
def machines():
    made = []

    def make(kind="src", **kw):
        if kind == "src":
            m = writer_guest(**kw)
        elif "mem_mib" in kw:
            from hv.vmm import Machine, MachineConfig
            m = Machine(MachineConfig(**kw))
        else:
            m = make_machine(**kw)
        made.append(m)
        return m
    yield make
    for m in made:
        m.close()


def runs_on(m, seconds=10):
    c0 = counter(m)
    deadline = time.monotonic() + seconds
    while counter(m) == c0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("mode", ["map", "copy"])
def test_a_saved_guest_restores_whole_and_runs_on(machines, tmp_path, mode):
    src = machines("src")
    path = str(tmp_path / "guest.snap")
    st = save(src, path, resume=False)
    assert src.status == "postmigrate"              # QEMU's migrate to a file
    frozen = src.memory.array().copy()
    dst = machines("dst")
    r = restore(dst, path, mode=mode, verify=True, start=False)
    assert (dst.memory.array() == frozen).all()
    dst.start()
    assert runs_on(dst), "the restored guest does not run"
    assert counter(dst) > int.from_bytes(frozen[0x2000:0x2004].tobytes(), "little")
    print(f"\n{mode}: {st['pages_stored']} pages stored, {st['pages_skipped_zero']} zero, "
          f"file {st['file_bytes'] >> 20} MiB apparent; restore {r['restore_ms']} ms")
    # zero pages are holes: the file takes what the guest wrote, not its RAM size
    used = os.stat(path).st_blocks * 512
    assert used < (MEM_MIB << 20) // 2, used
    assert st["pages_skipped_zero"] > 0 and st["pages_stored"] >= (4 << 20) // 4096


def test_saving_a_running_guest_resumes_it(machines, tmp_path):
    src = machines("src")
    st = save(src, str(tmp_path / "g.snap"))
    assert src.status == "running" and runs_on(src)
    assert st["pause_ms"] >= 0


def test_bad_files_are_refused_and_nothing_runs(machines, tmp_path):
    src = machines("src")
    path = str(tmp_path / "g.snap")
    save(src, path)
    good = open(path, "rb").read()

    def refused(data, match, **kw):
        bad = tmp_path / "bad.snap"
        bad.write_bytes(data)
        dst = machines("dst", **kw)
        with pytest.raises(SnapshotError, match=match):
            restore(dst, str(bad), verify=True)
        assert not dst.started and dst.status == "prelaunch"

    refused(good[:len(good) // 2], "truncated")
    refused(b"hello" + good[5:], "not an hv snapshot")
    hdr = bytearray(good)
    hdr[100] ^= 0xff
    refused(bytes(hdr), "header is corrupted")
    state = bytearray(good)
    state[-20] ^= 0xff
    refused(bytes(state), "machine state is corrupted")
    page = bytearray(good)
    page[(64 << 10) + 0x1000] ^= 0xff                 # the guest's code page
    refused(bytes(page), "differ from their hashes")
    refused(good, "--mem 32", mem_mib=64)
    refused(good, "--cpus 1", cpus=2)
    with pytest.raises(SnapshotError, match="cannot open"):
        restore(machines("dst"), str(tmp_path / "missing.snap"))


def test_a_failed_save_leaves_the_guest_running_and_no_file(machines, tmp_path):
    src = machines("src")
    path = tmp_path / "nodir" / "g.snap"
    with pytest.raises(OSError):
        save(src, str(path))
    assert src.status == "running" and runs_on(src)
    assert not path.parent.exists()
