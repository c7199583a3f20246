"""Numbered records on a shared disk across a migration: the guest side and
the host side of migrate-between-hosts --disk (and of the tests).

The image is a raw ext4 file made with `python -m hv.images disk`, in a
directory both hosts see; it carries the guest's script, records.sh
(GUEST_SCRIPT), so that the kernel command line only has to mount it and
start it. The guest then:

  1. fills FILL MiB and frees them, starts `hvmem hold KEEP` in the
     background (its "hvmem: hold ... checksum=" line as without a disk);
  2. starts the writer: record i is the line record(i), appended to
     /mnt/records, then `sync /mnt/records` (busybox's sync FILE is an
     fsync of that file), then "disk: ack i" on the console. A number is
     printed only after its record is on the disk; the writer stops at
     MAX records or when told;
  3. reads command lines on the console: "verify" (hvmem hold re-checks its
     memory, SIGUSR1), "check" (stop the writer, read every record back,
     print one "disk: check ..." line, unmount, power off).

The check (awk in the guest) reads /mnt/records in order and counts the
leading lines that are exactly record(1), record(2), ...: `good`; `lines`
is how many there are. Every acknowledged record must be among the good
ones (lost = acked - good, when positive), and a line that is not the next
record (bad = lines - good) is a record damaged or written twice. After the
guest powered off the host runs `e2fsck -fn` on the image and reads the
records straight from it (debugfs), and compares them too.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time

#: in the image's root; the guest mounts the image at /mnt
SCRIPT_NAME = "records.sh"
RECORDS_NAME = "records"
IMAGE_SIZE = "64M"
#: the writer stops here if nobody tells it earlier
MAX_RECORDS = 100000

#: record i's payload: 10**10 + a Knuth multiplicative hash of i, 11 decimal
#: digits without a leading zero (busybox awk reads "0..." as octal, and its
#: printf %d stops at 32 bits, so the check compares it as a number)
_MUL, _MOD, _BASE = 2654435761, 1 << 32, 10 ** 10

GUEST_SCRIPT = r"""# hv guest: numbered records with fsync, across a migration (scripts/diskrecords.py)
# sh /mnt/records.sh FILL_MIB KEEP_MIB MAX_RECORDS
fill=$1 keep=$2 max=$3 f=/mnt/records
[ "$fill" -gt 0 ] && { hvmem fill "$fill" --free || exit 1; }
hvmem hold "$keep" </dev/null &
h=$!
(
    i=0
    while [ ! -e /tmp/stop ] && [ $i -lt "$max" ]; do
        i=$((i + 1))
        printf 'rec %06d %d\n' $i $((10000000000 + (i * 2654435761) % 4294967296)) >> $f &&
            sync $f && echo "disk: ack $i"
    done
    echo "disk: writer stopped after $i"
) </dev/null &
w=$!
while read -r c; do
    case "$c" in
    verify) kill -USR1 $h ;;
    check)
        touch /tmp/stop
        wait $w
        awk -v m=2654435761 -v n=4294967296 '
            good == NR - 1 && NF == 3 && $1 == "rec" && $2 == sprintf("%06d", NR) &&
                length($3) == 11 && $3 + 0 == 10000000000 + (NR * m) % n { good = NR }
            END { printf "disk: check lines=%d good=%d\n", NR, good }' $f
        echo "disk: md5 $(md5sum < $f)"
        umount /mnt && echo "disk: unmounted"
        kill $h
        exit 0 ;;
    esac
done
"""


def record(i: int) -> bytes:
    """The line the guest writes as record i (1-based), newline included."""
    return b"rec %06d %d\n" % (i, _BASE + (i * _MUL) % _MOD)


def records(n: int) -> bytes:
    """Records 1..n as the file holds them when nothing was lost."""
    return b"".join(record(i) for i in range(1, n + 1))


def good_prefix(data: bytes) -> tuple[int, int]:
    """(lines, good) of a records file, as the guest's check counts them."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    good = 0
    for k, line in enumerate(lines, 1):
        if line + b"\n" != record(k):
            break
        good = k
    return len(lines), good


def make_image(directory: str, size: str = IMAGE_SIZE, files: dict | None = None,
               name: str = "disk.img") -> str:
    """An ext4 image (hv.images' own `disk` command) in directory holding
    files ({name: bytes or str}; default: the guest's records.sh); returns
    its path."""
    out = os.path.join(directory, name)
    content = tempfile.mkdtemp(prefix="content-", dir=directory)
    try:
        for fname, data in (files or {SCRIPT_NAME: GUEST_SCRIPT}).items():
            with open(os.path.join(content, fname), "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        from hv.images import make_disk, parse_size
        make_disk(out, parse_size(size), content)
    finally:
        shutil.rmtree(content, ignore_errors=True)
    return out


def guest_command(fill_mib: int, keep_mib: int, writers: str = "",
                  max_records: int = MAX_RECORDS) -> str:
    """hv.exec's command: mount the disk, then records.sh (writers: a
    prefix of background commands, e.g. hvmem dirty)."""
    # run from a copy: a script read from /mnt would keep it from unmounting
    return (f"{writers}mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && "
            f"cp /mnt/{SCRIPT_NAME} /tmp/ && "
            f"exec sh /tmp/{SCRIPT_NAME} {fill_mib} {keep_mib} {max_records}")


_ACK = re.compile(rb"^disk: ack (\d+)\r?\n", re.M)
_CHECK = re.compile(r"disk: check lines=(\d+) good=(\d+)")
_MD5 = re.compile(r"disk: md5 ([0-9a-f]{32})")


def acked(*outputs: bytes) -> list[int]:
    """The record numbers acknowledged on these consoles, in order (a whole
    line each: one the pause cut in two between A and B is not counted)."""
    return [int(m.group(1)) for out in outputs for m in _ACK.finditer(bytes(out))]


def wait_acks(guest, n: int, timeout: float) -> None:
    """Until the guest (a harness Guest) acknowledged record n."""
    deadline = time.monotonic() + timeout
    while max(acked(guest.out), default=0) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{guest.name}: record {n} not acknowledged within "
                               f"{timeout:.0f} s:\n" + guest.tail())
        try:
            guest.wait_for("disk: ack ", 5, guest.mark())   # the next one, or its exit
        except TimeoutError:
            pass


def check_in_guest(guest, timeout: float) -> dict:
    """Type "check" on the guest's console; its answer as numbers."""
    mark = guest.mark()
    guest.type("check\n")
    line = guest.wait_line("disk: check ", timeout, mark)
    text = guest.wait_for("disk: unmounted", timeout, mark)
    m, md5 = _CHECK.search(line), _MD5.search(text)
    return {"lines": int(m.group(1)), "good": int(m.group(2)),
            "md5": md5.group(1) if md5 else None}


def fsck(image: str) -> tuple[bool, str]:
    """e2fsck -fn on the host: (clean, its last lines)."""
    p = subprocess.run([_tool("e2fsck"), "-fn", image], capture_output=True, text=True)
    return p.returncode == 0, (p.stdout + p.stderr).strip()[-600:]


def host_records(image: str) -> bytes | None:
    """/records read from the image on the host (debugfs), None if it fails."""
    p = subprocess.run([_tool("debugfs"), "-R", f"cat /{RECORDS_NAME}", image],
                       capture_output=True)
    return p.stdout if p.returncode == 0 else None


def _tool(name: str) -> str:
    return shutil.which(name) or os.path.join("/usr/sbin", name)


def summary(acks_a: list[int], acks_b: list[int], guest_check: dict | None,
            image: str) -> dict:
    """The report's disk_* fields from the records acknowledged on A and then
    on B, and the guest's check; call after the guest powered off."""
    acks = acks_a + acks_b
    top = max(acks, default=0)
    clean, fsck_out = fsck(image)
    on_host = host_records(image)
    host_lines, host_good = good_prefix(on_host) if on_host is not None else (None, None)
    g = guest_check or {}
    good = g.get("good")
    md5_ok = (g.get("md5") == hashlib.md5(records(g["lines"])).hexdigest()
              if g.get("md5") and good == g.get("lines") else None)
    return {
        "disk_image": image,
        "disk_records_acked": len(acks),
        "disk_records_acked_on_b": len(acks_b),
        "disk_records_acked_last": top,
        "disk_acks_increasing": all(a < b for a, b in zip(acks, acks[1:])),
        "disk_records_read_back": good,
        "disk_records_in_file": g.get("lines"),
        # an acknowledged record missing or damaged
        "disk_records_lost": max(0, top - good) if good is not None else None,
        # a line that is not the next record: damaged, or a record written twice
        "disk_records_bad": g["lines"] - good if good is not None else None,
        "disk_md5_matches": md5_ok,
        "disk_records_on_host": host_good,
        "disk_host_matches_guest": (host_lines, host_good) == (g.get("lines"), good),
        "disk_fsck_clean": clean,
        "disk_fsck_output": fsck_out,
    }


def ok(s: dict) -> bool:
    """Every acknowledged record read back intact, nothing extra, fsck clean."""
    return (s.get("disk_records_lost") == 0 and s.get("disk_records_bad") == 0
            and s.get("disk_acks_increasing") is True and s.get("disk_fsck_clean") is True
            and s.get("disk_host_matches_guest") is True
            and s.get("disk_md5_matches") is not False)


def report_lines(s: dict) -> str:
    def f(v):
        return "-" if v is None else str(v)
    return (f"  disk records        {f(s.get('disk_records_acked'))} acked "
            f"({f(s.get('disk_records_acked_on_b'))} on B), "
            f"{f(s.get('disk_records_read_back'))} read back intact, "
            f"{f(s.get('disk_records_lost'))} lost, {f(s.get('disk_records_bad'))} bad\n"
            f"  disk on the host    {f(s.get('disk_records_on_host'))} records, "
            f"e2fsck -fn {'clean' if s.get('disk_fsck_clean') else 'NOT CLEAN'}")
