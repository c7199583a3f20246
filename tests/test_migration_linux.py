"""Live migration of the Linux guest image (slow: one guest is booted for the
whole module and migrated from machine to machine, once per free-page mode;
a second one, booted for the dirtying test, runs a steady writer).

The first guest runs `hvmem fill FILL --free && exec hvmem hold KEEP`; after
each migration "verify" is typed on the new machine's console and hvmem
re-checks every byte it holds. The second runs an interactive shell with
`hvmem hold KEEP` and `hvmem dirty DIRTY RATE` in the background; SIGUSR1
makes its hold verify.
"""

import threading
import time

import pytest

from conftest import Console
from loopback import migrate_over_loopback
from hv.images import exec_arg
from hv.memory import PAGE_SIZE
from hv.migration.protocol import MigrationError
from hv.migration.transport import listen
from hv.migration.sender import Migration, MigrationParams

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

MEM_MIB = 128
KEEP_MIB, FILL_MIB = 8, 32
HOLD_CMD = f"hvmem fill {FILL_MIB} --free && exec hvmem hold {KEEP_MIB}"
VERIFY_OK = "hvmem: verify ok"
# the dirtying guest: 8 MiB rewritten at 2000 pages/s (8 MiB/s), far below
# what loopback carries, so the dirty rounds converge
DIRTY_MIB, DIRTY_RATE = 8, 2000
DOWNTIME_MS, MAX_ROUNDS = 300, 30


def new_machine(images, console, boot=False, command=HOLD_CMD):
    """A 128 MiB machine with a balloon; the guest runs command (hv.exec), or
    an interactive shell when command is None."""
    from hv.vmm import Machine, MachineConfig
    kernel, initrd = images
    append = exec_arg(command) if command else ""
    m = Machine(MachineConfig(mem_mib=MEM_MIB, kernel=kernel, initrd=initrd, balloon=True,
                              append=append))
    m.console_listeners.append(console)
    if boot:
        m.boot()
        m.start()
    return m


def close_all(state):
    """Close every machine a module guest has run on."""
    for x in state["old"] + [state["machine"]]:
        try:
            x.close()
        except Exception:
            pass


@pytest.fixture(scope="module")
def guest(linux_images):
    """{"machine": the machine the guest currently runs on, "console": ...}"""
    console = Console()
    m = new_machine(linux_images, console, boot=True)
    try:
        console.wait_for(f"hvmem: hold {KEEP_MIB} MiB", timeout=900)
    except TimeoutError:
        m.stop()
        m.close()
        raise
    state = {"machine": m, "console": console, "images": linux_images, "old": []}
    yield state
    close_all(state)


def migrate(guest, verify=True, prefault=False, **params):
    dst = new_machine(guest["images"], guest["console"], command=guest.get("command", HOLD_CMD))
    src = guest["machine"]
    q, res = migrate_over_loopback(src, dst, timeout=60, verify=verify, prefault=prefault,
                                   **params)
    if q["status"] == "completed":
        guest["old"].append(src)
        guest["machine"] = dst
    else:
        guest["old"].append(dst)
    return q, res


def verify_line(guest, trigger=b"verify\n"):
    """Make hvmem hold check its memory (trigger: typed on the console);
    return its whole answer line."""
    c = guest["console"]
    mark = c.mark()
    guest["machine"].console_input(trigger)
    return c.wait_line("hvmem: verify ", 120, mark)


def guest_verifies(guest, trigger=b"verify\n"):
    return verify_line(guest, trigger) == VERIFY_OK


@pytest.mark.parametrize("mode", ["bitmap", "hint", "off"])
def test_linux_guest_migrates(guest, mode):
    q, res = migrate(guest, free_pages=mode, prefault=True)
    assert q["status"] == "completed", q
    assert "error" not in res, res.get("error")
    assert res["rx"].verified
    assert guest["machine"].status == "running"
    assert guest_verifies(guest)
    if mode == "bitmap" and not (q.get("free_page_info") or {}).get("warning"):
        # the freed FILL MiB (and most of the rest) were not sent
        assert q["pages_skipped_free"] > FILL_MIB * 256 // 2, q
        assert q["pages_sent"] < (MEM_MIB - FILL_MIB // 2) * 256
        # the destination faulted in all of its RAM while it waited, and gave
        # back what the source skipped as free (FREE ranges)
        resident = guest["machine"].memory.resident_bytes() // PAGE_SIZE
        assert resident <= q["pages_total"] - q["pages_skipped_free"] * 9 // 10, (resident, q)
    if mode == "off":
        assert q["pages_skipped_free"] == 0


def test_cut_migration_leaves_linux_guest_running(guest):
    lst = listen("tcp:127.0.0.1:0")
    port = lst.getsockname()[1]

    def rude():
        c, _ = lst.accept()
        c.recv(1 << 20)
        c.close()
        lst.close()
    threading.Thread(target=rude, daemon=True).start()
    src = guest["machine"]
    mig = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", free_pages="off",
                                         timeout_s=10))
    mig.run()
    q = mig.query()
    assert q["status"] == "failed" and q["error"]
    assert src.status == "running"
    assert guest_verifies(guest)
    with pytest.raises(MigrationError):
        MigrationParams.from_args({"uri": "udp:1"})


def test_linux_guest_snapshot_restores_twice_without_its_free_pages(guest, tmp_path):
    """Save the running guest (free pages skipped), restore the file twice:
    two independent guests, each verifying what hvmem holds; the original
    runs on."""
    import os
    from hv.migration.snapshot import restore, save
    src = guest["machine"]
    path = str(tmp_path / "linux.snap")
    st = save(src, path)
    assert src.status == "running"
    assert st["pages_skipped_free"] >= FILL_MIB * 256 * 0.9, st
    # on disk: the pages with data and little more (free and zero are holes)
    allocated = os.stat(path).st_blocks * 512
    assert allocated <= st["pages_stored"] * PAGE_SIZE * 1.05 + (1 << 20), (allocated, st)
    copies = []
    try:
        for i in range(2):
            console = Console()
            m = new_machine(guest["images"], console)
            copies.append(m)
            r = restore(m, path, verify=True)
            print(f"\nrestore {i}: {r['restore_ms']} ms, {st['pages_stored']} pages stored of "
                  f"{st['pages_total']}, {st['pages_skipped_free']} free, "
                  f"{st['pages_skipped_zero']} zero, {allocated >> 20} MiB on disk")
            assert verify_line({"machine": m, "console": console}) == VERIFY_OK
        # independent: what one copy does, the other does not see
        copies[0].console_input(b"\x03")       # stop hvmem hold on the first only
        c1 = Console()
        copies[1].console_listeners.append(c1)
        assert verify_line({"machine": copies[1], "console": c1}) == VERIFY_OK
    finally:
        for m in copies:
            m.close()
    assert guest_verifies(guest)


@pytest.fixture(scope="module")
def dirty_guest(linux_images):
    """A guest whose shell runs `hvmem hold KEEP` and `hvmem dirty DIRTY RATE`
    in the background ($HOLD is hold's pid)."""
    console = Console()
    m = new_machine(linux_images, console, boot=True, command=None)
    state = {"machine": m, "console": console, "images": linux_images, "old": [],
             "command": None}
    try:
        console.wait_for("hv-guest: ready", timeout=900)
        mark = console.mark()
        m.console_input(f"hvmem hold {KEEP_MIB} </dev/null & HOLD=$!\n".encode())
        console.wait_line(f"hvmem: hold {KEEP_MIB} MiB checksum=", 300, mark)
        mark = console.mark()
        m.console_input(f"hvmem dirty {DIRTY_MIB} {DIRTY_RATE} </dev/null & "
                        f"DIRTY=$!\n".encode())
        console.wait_line(f"hvmem: dirtying {DIRTY_MIB} MiB at {DIRTY_RATE} pages/s", 300,
                          mark)
        time.sleep(1)                 # let the writer get into its stride
    except BaseException:
        m.stop()
        m.close()
        raise
    yield state
    close_all(state)


# Unlimited, loopback converges during the bulk pass; at 16 MiB/s (twice the
# dirty rate) the rest after the bulk pass does not fit the downtime at once.
@pytest.mark.parametrize("max_bandwidth_mib", [0, 16])
def test_linux_guest_migrates_while_dirtying(dirty_guest, max_bandwidth_mib):
    q, res = migrate(dirty_guest, verify=False, free_pages="bitmap",
                     downtime_ms=DOWNTIME_MS, max_rounds=MAX_ROUNDS,
                     max_bandwidth_mib=max_bandwidth_mib)
    rounds = q["rounds"]
    print(f"\ndirtying {DIRTY_MIB} MiB at {DIRTY_RATE} pages/s, bandwidth "
          f"{max_bandwidth_mib or 'unlimited'}: {q['status']}, "
          f"{len(rounds)} rounds, pages {[r['pages'] for r in rounds]}, "
          f"dirty {[r['dirty_pages'] for r in rounds]}, "
          f"ms {[round(r['ms']) for r in rounds]}, downtime {q['downtime_ms']} ms "
          f"(expected {q['expected_downtime_ms']} ms), total {q['total_time_ms']} ms, "
          f"{q['throughput_mib_s']} MiB/s")
    assert q["status"] == "completed", q
    assert "error" not in res, res.get("error")
    # What the sender promises: round 0 is the bulk pass and the last one the
    # stop-and-copy; it paused either when the rest fitted the downtime at the
    # measured rate or after max_rounds dirty rounds.
    assert rounds[0]["round"] == 0 and rounds[-1].get("final")
    dirty_rounds = len(rounds) - 2
    assert 0 <= dirty_rounds <= MAX_ROUNDS
    assert q["expected_downtime_ms"] <= DOWNTIME_MS or dirty_rounds == MAX_ROUNDS, q
    assert q["downtime_ms"] > 0
    # the writer ran during the migration: pages were sent again after the bulk pass
    assert sum(r["pages"] for r in rounds[1:]) > 0, rounds

    g = dirty_guest
    assert g["machine"].status == "running"
    c = g["console"]
    mark = c.mark()
    g["machine"].console_input(b"kill -0 $DIRTY && echo alive-$((6*7))\n")
    assert c.wait_line("alive-42", 60, mark) == "alive-42"
    assert verify_line(g, b"kill -USR1 $HOLD\n") == VERIFY_OK
