"""The Linux guest migrated in postcopy with the free page bitmap: the
source is a machine in this process running a writer (`hvmem dirty`) and
`hvmem hold`, the destination a run-guest process (its own, so that a
thread of it waiting on a missing page never holds this process's GIL).
After the move hvmem re-checks every byte it holds, the page hashes match,
and no page the bitmap called free (and the guest did not write since)
was ever requested."""

from __future__ import annotations

import os
import socket
import tempfile
import time

import pytest

import harness as H
from conftest import Console
from hv.images import exec_arg
from hv.migration import pages
from hv.migration.sender import Migration, MigrationParams
from hv.qmp_commands import PREFIX

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

MEM_MIB, KEEP_MIB, FILL_MIB, DIRTY_MIB, DIRTY_RATE = 128, 8, 32, 8, 4000
COMMAND = (f"hvmem dirty {DIRTY_MIB} {DIRTY_RATE} </dev/null & "
           f"hvmem fill {FILL_MIB} --free && exec hvmem hold {KEEP_MIB}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_linux_guest_moves_in_postcopy_without_fetching_a_free_page(linux_images):
    from hv.vmm import Machine, MachineConfig
    kernel, initrd = linux_images
    console = Console()
    src = Machine(MachineConfig(mem_mib=MEM_MIB, kernel=kernel, initrd=initrd, balloon=True,
                                append=exec_arg(COMMAND)))
    src.console_listeners.append(console)
    logdir = tempfile.mkdtemp(prefix="hv-postcopy-")
    sock = os.path.join(logdir, "dst.sock")
    port = free_port()
    dst = None
    try:
        src.boot()
        src.start()
        console.wait_for(f"hvmem: hold {KEEP_MIB} MiB", timeout=900)
        dst = H.Guest("dst", None, H.RUN_GUEST + [
            "--kernel", kernel, "--initrd", initrd, "--mem", str(MEM_MIB), "--balloon",
            "--incoming", f"tcp:127.0.0.1:{port}", "--control", sock], logdir, sock)
        dst.wait_for("listening", 60)
        # 4 MiB/s: the background push of what is left after the switch takes
        # about a second, so the writer surely touches pages not there yet
        mig = Migration(src, MigrationParams(
            uri=f"tcp:127.0.0.1:{port}", free_pages="bitmap", postcopy=True,
            postcopy_after_rounds=0, max_bandwidth_mib=4, max_postcopy_bandwidth_mib=4,
            downtime_ms=30, verify=True,
            shutdown_source=False))
        mig.run()
        q = mig.query()
        print(f"\npostcopy: {q['status']}, downtime {q['downtime_ms']} ms, "
              f"{q['postcopy_pages']} pages to fetch, {q['postcopy_pages_requested']} "
              f"requested in {q['postcopy_requests']} requests, {q['postcopy_pages_pushed']} "
              f"pushed, fault latency {q['fault_latency_ms_mean']} ms mean "
              f"{q['fault_latency_ms_max']} ms worst, {q['pages_skipped_free']} free")
        assert q["status"] == "completed", q
        assert q["postcopy"] and q["verified"], q
        assert not (q.get("free_page_info") or {}).get("warning"), q["free_page_info"]
        assert q["pages_skipped_free"] > FILL_MIB * 256 // 2, q
        assert q["postcopy_pages"] > 0 and q["postcopy_requests"] > 0, q
        # not one page the bitmap said was free (and the guest left alone) was asked for
        pc = mig._postcopy_source
        free_untouched, _ = pages.andnot(mig._skipped_free, mig._ever_dirty)
        assert pages.count(pc.requested) > 0
        assert pages.count(pc.requested & free_untouched) == 0
        # DONE ends the source's migration; the destination reports completed a
        # moment later, once its connections have closed
        with H.control(sock, 30) as c:
            deadline = time.monotonic() + 30
            while (info := c.execute("query-migrate"))["status"] != "completed" \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
        assert info["status"] == "completed", info
        assert info[PREFIX + "postcopy-missing"] == 0
        assert info[PREFIX + "postcopy-requests"] == q["postcopy_faults"]
        mark = dst.mark()
        dst.type("verify\n")
        assert H.verify_ok(dst.wait_line("hvmem: verify ", 120, mark))
    finally:
        if dst is not None:
            dst.stop()
        src.close()
