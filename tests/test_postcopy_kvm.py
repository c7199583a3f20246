"""Tiny KVM guests (tests/test_migration_kvm.py's writer) migrated with
postcopy over loopback: the guest resumes on the destination with pages
missing, faults them in, and goes on counting; the hashes of every page
match the source's. A connection lost after the switch pauses the
destination (hold "postcopy") and leaves the source in postmigrate with
the guest's memory; so does a destination killed during postcopy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from loopback import migrate_over_loopback  # noqa: E402
from test_migration_kvm import MEM_MIB, counter, make_machine, writer_guest  # noqa: E402

from hv.migration.protocol import MigrationError  # noqa: E402
from hv.migration.receiver import receive  # noqa: E402
from hv.migration.sender import Migration, MigrationParams  # noqa: E402
from hv.migration.transport import listen  # noqa: E402
from hv.vmm import PAUSE_POSTCOPY  # noqa: E402

pytestmark = pytest.mark.kvm

#: slow enough that the guest faults before the background push reaches its pages
POSTCOPY = dict(free_pages="off", postcopy=True, postcopy_after_rounds=0,
                max_bandwidth_mib=16, max_postcopy_bandwidth_mib=16, downtime_ms=20)


@pytest.fixture
def machines():
    made = []

    def make(kind="src", **kw):
        m = writer_guest(**kw) if kind == "src" else make_machine(**kw)
        made.append(m)
        return m
    yield make
    for m in made:
        try:
            m.close()
        except Exception:
            pass


def runs_on(m, c0: int, more: int = 1000, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while counter(m) <= c0 + more:
        assert time.monotonic() < deadline, "the guest does not run"
        time.sleep(0.01)


def test_tiny_guest_moves_in_postcopy_and_every_page_matches(machines):
    src, dst = machines("src"), machines("dst")
    snaps = {}
    q, res = migrate_over_loopback(src, dst, timeout=30, verify=True,
                                   on_paused=lambda m: snaps.setdefault("c", counter(m)),
                                   **POSTCOPY)
    assert q["status"] == "completed", q
    assert "error" not in res, res.get("error")
    rx = res["rx"]
    assert rx.verified and q["verified"]
    assert q["postcopy"] and q["rounds"][-1]["postcopy"]
    # the writer's 4 MiB window was dirty at the switch: fetched, partly on demand
    assert q["postcopy_pages"] >= 1024
    assert q["postcopy_pages_pushed"] + q["postcopy_pages_requested"] == q["postcopy_pages"]
    assert q["postcopy_requests"] > 0 and q["postcopy_faults"] > 0
    assert 0 < q["fault_latency_ms_mean"] <= q["fault_latency_ms_max"]
    assert q["downtime_ms"] < 200, q["downtime_parts"]
    pc = rx.stats["postcopy"]
    assert pc["missing"] == 0 and pc["pages_placed"] + pc["zero_placed"] == q["postcopy_pages"]
    # the zero pages of the bulk pass were counted placed at the switch, not fetched
    assert rx.stats["postcopy_zero_known"] >= q["pages_skipped_zero"] - q["postcopy_pages"]
    assert src.status == "shutdown"
    runs_on(dst, snaps["c"])


def test_migrate_start_postcopy_switches_a_migration_that_does_not_converge(machines):
    src, dst = machines("src"), machines("dst")
    with pytest.raises(MigrationError, match="Enable postcopy"):
        Migration(src, MigrationParams(uri="tcp:127.0.0.1:1")).start_postcopy()
    lst = listen("tcp:127.0.0.1:0")
    port = lst.getsockname()[1]
    res = {}

    def rx():
        try:
            res["rx"] = receive(dst.memory, lst, dst.restore_state, dst.start, timeout=30)
        except Exception as e:
            res["error"] = e
    t = threading.Thread(target=rx, daemon=True)
    t.start()
    # 1 ms of downtime never fits: it iterates until asked to switch
    mig = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", free_pages="off",
                                         postcopy=True, max_bandwidth_mib=32, downtime_ms=1,
                                         downtime_strategy="iterate")).start()
    deadline = time.monotonic() + 20
    while len(mig.query()["rounds"]) < 3:
        assert time.monotonic() < deadline and not mig.finished, mig.query()
        time.sleep(0.01)
    assert mig.query()["status"] == "active"
    mig.start_postcopy()
    q = mig.wait(30)
    t.join(30)
    assert q["status"] == "completed" and q["postcopy"], q
    assert len(q["rounds"]) >= 4 and q["rounds"][-1]["postcopy"]
    with pytest.raises(MigrationError, match="after migration has been started"):
        mig.start_postcopy()
    runs_on(dst, 0)


def start_postcopy_to(dst_uri: str, src, rate_mib: float = 2) -> Migration:
    """A postcopy migration slow enough to be caught in postcopy-active."""
    mig = Migration(src, MigrationParams(uri=dst_uri, **dict(
        POSTCOPY, max_bandwidth_mib=rate_mib, max_postcopy_bandwidth_mib=rate_mib)))
    mig.start()
    deadline = time.monotonic() + 30
    while mig.query()["status"] != "postcopy-active":
        assert time.monotonic() < deadline and not mig.finished, mig.query()
        time.sleep(0.005)
    return mig


def test_a_lost_connection_pauses_the_destination_and_the_source_keeps_the_guest(machines):
    src, dst = machines("src"), machines("dst")
    lst = listen("tcp:127.0.0.1:0")
    res = {}

    def rx():
        try:
            res["rx"] = receive(dst.memory, lst, dst.restore_state, dst.start, timeout=30,
                                pause=lambda: dst.pause(PAUSE_POSTCOPY, timeout=1,
                                                        keep=True))
        except Exception as e:
            res["error"] = e
    t = threading.Thread(target=rx, daemon=True)
    t.start()
    mig = start_postcopy_to(f"tcp:127.0.0.1:{lst.getsockname()[1]}", src)
    at_pause = src.memory.array().copy()            # paused since the switch
    time.sleep(0.3)
    mig.streams[0].sock.shutdown(socket.SHUT_RDWR)  # the link goes down
    q = mig.wait(20)
    t.join(20)
    assert q["status"] == "failed" and "cannot resume" in q["error"], q
    assert src.status == "postmigrate"
    assert (src.memory.array() == at_pause).all()   # every byte still here
    err = res.get("error")
    assert err is not None and "postcopy-paused" in str(err) and "missing" in str(err), res
    assert PAUSE_POSTCOPY in dst.pause_holders and dst.status == "paused"
    c = counter(dst)
    time.sleep(0.3)
    assert counter(dst) == c                         # it does not run with pages missing
    from hv.vmm import MachineError
    with pytest.raises(MachineError, match="postcopy-paused"):
        dst.commands["cont"]({})


def test_a_killed_destination_leaves_the_source_holding_the_memory(machines, tmp_path):
    src = machines("src")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "dst.log", "wb")
    dst = subprocess.Popen([sys.executable, "-c", "import sys; from hv.cli import main; "
                            "sys.exit(main())", "--mem", str(MEM_MIB), "--incoming",
                            f"tcp:127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while b"listening" not in (tmp_path / "dst.log").read_bytes():
            assert time.monotonic() < deadline and dst.poll() is None, \
                (tmp_path / "dst.log").read_text()
            time.sleep(0.05)
        mig = start_postcopy_to(f"tcp:127.0.0.1:{port}", src)
        at_pause = src.memory.array().copy()
        time.sleep(0.3)
        dst.send_signal(signal.SIGKILL)
        q = mig.wait(30)
    finally:
        if dst.poll() is None:
            dst.kill()
        dst.wait(10)
        log.close()
    assert q["status"] == "failed", q
    assert "postcopy failed after the guest resumed on the destination" in q["error"], q
    assert "keeps the guest's memory" in q["error"]
    assert src.status == "postmigrate"
    assert (src.memory.array() == at_pause).all()
