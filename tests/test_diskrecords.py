"""The host side of migrate-between-hosts --disk (scripts/diskrecords.py),
without a guest: the records, how a records file is judged, the ack lines
of a console cut in two by a migration, and the image checks on an image
holding a records file."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

import diskrecords as D


def test_records_are_fixed_lines_with_a_payload_busybox_awk_reads_as_a_number():
    assert D.record(1) == b"rec 000001 12654435761\n"
    lines = D.records(3000).splitlines()
    assert len(lines) == 3000 and len(set(lines)) == 3000
    assert {len(x) for x in lines} == {22}
    # 11 digits without a leading zero: never read as octal
    assert all(x.split()[2][:1] == b"1" for x in lines)


@pytest.mark.skipif(not shutil.which("busybox"), reason="busybox is not installed")
def test_the_guest_writer_and_check_agree_with_the_host(tmp_path):
    """The writer's printf and the check's awk, run by the busybox the guest
    image is built from, against record()."""
    f = tmp_path / "records"
    script = D.GUEST_SCRIPT
    writer = next(x for x in script.splitlines() if x.strip().startswith("printf "))
    writer = writer.strip().rstrip("&").strip().replace("$f", str(f))
    subprocess.run(["busybox", "sh", "-c", f"i=0; while [ $i -lt 1200 ]; do i=$((i + 1)); "
                    f"{writer}; done"], check=True)
    assert f.read_bytes() == D.records(1200)
    awk = script[script.index("awk -v"):script.index("' $f") + 1]

    def check():
        out = subprocess.run(["busybox", "sh", "-c", f"{awk} {f}"], capture_output=True,
                             text=True, check=True).stdout
        return out.strip()
    assert check() == "disk: check lines=1200 good=1200"
    data = bytearray(f.read_bytes())
    i = data.index(b"rec 000700 ") + 11
    data[i] = ord("2")                     # record 700 damaged
    f.write_bytes(bytes(data))
    assert check() == "disk: check lines=1200 good=699"
    assert D.good_prefix(bytes(data)) == (1200, 699)
    f.write_bytes(D.records(10) + D.record(10))   # the last one written twice
    assert check() == "disk: check lines=11 good=10"
    assert D.good_prefix(f.read_bytes()) == (11, 10)


def test_acks_are_whole_lines_and_a_line_cut_by_the_pause_is_not_counted():
    a = b"boot\r\ndisk: ack 1\r\ndisk: ack 2\r\nhvmem: hold 8 MiB\r\ndisk: ack 3\r\ndisk: ack 4"
    b = b"\r\ndisk: ack 5\r\nxdisk: ack 6\r\n"
    assert D.acked(a, b) == [1, 2, 3, 5]
    assert D.acked(a + b) == [1, 2, 3, 4, 5]


def test_summary_of_an_image_counts_lost_and_bad_records(tmp_path):
    if not shutil.which("debugfs") and not shutil.which("/usr/sbin/debugfs"):
        pytest.skip("e2fsprogs is not installed")
    image = D.make_image(str(tmp_path), "8M", files={D.RECORDS_NAME: D.records(20)})
    g = {"lines": 20, "good": 20, "md5": hashlib.md5(D.records(20)).hexdigest()}
    s = D.summary(list(range(1, 16)), [16, 17, 18], g, image)
    assert s["disk_records_acked"] == 18 and s["disk_records_acked_on_b"] == 3
    assert s["disk_records_lost"] == 0 and s["disk_records_bad"] == 0
    assert s["disk_records_on_host"] == 20 and s["disk_host_matches_guest"] is True
    assert s["disk_fsck_clean"] is True and s["disk_md5_matches"] is True
    assert D.ok(s)
    assert "18 acked (3 on B), 20 read back intact, 0 lost, 0 bad" in D.report_lines(s)
    # the guest read back fewer than it acknowledged: lost
    lost = D.summary(list(range(1, 25)), [], g, image)
    assert lost["disk_records_lost"] == 4 and not D.ok(lost)
    # acknowledged twice, or out of order
    assert not D.ok(D.summary([1, 2, 2], [], g, image))
    # a record written twice after the good ones
    twice = D.summary([1], [], {"lines": 21, "good": 20, "md5": None}, image)
    assert twice["disk_records_bad"] == 1 and not D.ok(twice)
    # an image whose file system is damaged
    with open(image, "r+b") as f:
        f.seek(1024 + 0x38)             # the superblock's magic
        f.write(b"\0\0")
    broken = D.summary([1], [], g, image)
    assert broken["disk_fsck_clean"] is False and not D.ok(broken)
