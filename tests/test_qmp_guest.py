"""One QMP script, written for QEMU, run against hv and against QEMU 7.2
itself: query-status, migrate_cancel during a slow migration, a whole live
migration to a deferred destination (migrate-set-capabilities,
migrate-set-parameters, migrate-incoming, migrate, MIGRATION events,
query-migrate on both sides), quit. The client is qemu.qmp's own; the guest
is the Linux image with 64 MiB."""

from __future__ import annotations

import shutil
import socket
import time

import pytest

import harness as H

pytest.importorskip("qemu.qmp", reason="QEMU's QMP library (pip install qemu.qmp) is missing")
from hv.control import ControlError  # noqa: E402

pytestmark = [pytest.mark.kvm, pytest.mark.linux]
MEM = "64"
READY = "hv-guest: ready"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hv_argv(kernel, initrd, sock, incoming=None):
    argv = H.RUN_GUEST + ["--kernel", kernel, "--initrd", initrd, "--mem", MEM,
                          "--control", sock]
    return argv + (["--incoming", incoming] if incoming else [])


def qemu_argv(kernel, initrd, sock, incoming=None):
    from hv import images
    argv = images.qemu_argv(int(MEM), "", kernel, initrd)
    argv += ["-qmp", f"unix:{sock},server=on,wait=off"]
    return argv + (["-incoming", incoming] if incoming else [])


@pytest.fixture(params=["hv", "qemu"])
def vmm(request, linux_images):
    if request.param == "qemu" and shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    kernel, initrd = linux_images
    argv = hv_argv if request.param == "hv" else qemu_argv
    return request.param, (lambda sock, incoming=None: argv(kernel, initrd, sock, incoming))


def wait_status(c, wanted, timeout=30):
    deadline = time.monotonic() + timeout
    while (s := c.execute("query-status"))["status"] != wanted:
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    return s


def test_the_same_qmp_script_drives_hv_and_qemu(vmm, tmp_path):
    name, argv = vmm
    socks = {k: str(tmp_path / f"{k}.qmp") for k in ("src", "dst1", "dst2")}
    guests = []

    def start(key, incoming=None):
        g = H.Guest(f"{name}-{key}", None, argv(socks[key], incoming), str(tmp_path))
        guests.append(g)
        return g

    try:
        src = start("src")
        start("dst1", "defer")
        dst2 = start("dst2", "defer")
        src.wait_for(READY, 600)
        with H.control(socks["src"]) as s, H.control(socks["dst1"]) as d1, \
                H.control(socks["dst2"]) as d2:
            assert s.greeting["QMP"]["version"]["qemu"]["major"] >= 7
            st = s.execute("query-status")
            assert st["running"] is True and st["status"] == "running"
            assert d1.execute("query-status")["status"] == "inmigrate"
            assert s.execute("query-migrate") == {}
            names = {c["name"] for c in s.execute("query-commands")}
            assert {"migrate", "migrate-incoming", "query-migrate", "migrate_cancel",
                    "migrate-set-parameters", "query-status", "quit"} <= names
            with pytest.raises(ControlError, match="unexpected"):
                s.execute("migrate", uri="tcp:127.0.0.1:1", colour="blue")

            for c in (s, d1, d2):
                c.execute("migrate-set-capabilities",
                          capabilities=[{"capability": "events", "state": True}])
            caps = {x["capability"]: x["state"]
                    for x in s.execute("query-migrate-capabilities")}
            assert caps["events"] is True

            # A slow migration, cancelled: the source keeps running.
            port1 = free_port()
            d1.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port1}")
            s.execute("migrate-set-parameters", **{"max-bandwidth": 256 << 10,
                                                  "downtime-limit": 300})
            p = s.execute("query-migrate-parameters")
            assert p["max-bandwidth"] == 256 << 10 and p["downtime-limit"] == 300
            s.execute("migrate", uri=f"tcp:127.0.0.1:{port1}")
            s.wait_event("MIGRATION", lambda d: d["status"] == "active", 30)
            q = s.execute("query-migrate")
            assert q["status"] == "active", q
            # QEMU counts its ROMs too
            assert q["ram"]["total"] >= int(MEM) << 20 and q["ram"]["page-size"] == 4096
            assert isinstance(q["total-time"], int)
            s.execute("migrate_cancel")
            s.wait_event("MIGRATION", lambda d: d["status"] == "cancelled", 30)
            assert s.execute("query-migrate")["status"] == "cancelled"
            wait_status(s, "running", 10)
            s.execute("migrate_cancel")                 # nothing runs: still fine

            # The whole migration, QEMU's way.
            s.execute("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
            port2 = free_port()
            d2.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port2}")
            with pytest.raises(ControlError):
                d2.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port2}")
            s.execute("migrate", uri=f"tcp:127.0.0.1:{port2}", detach=True)
            seen = []
            ev = s.wait_event("MIGRATION", lambda d: seen.append(d["status"]) or
                              d["status"] in ("completed", "failed"), 120)
            assert ev["data"]["status"] == "completed", (seen, s.execute("query-migrate"))
            assert "active" in seen
            q = s.execute("query-migrate")
            assert q["status"] == "completed"
            assert isinstance(q["downtime"], int) and q["downtime"] <= q["total-time"]
            assert q["ram"]["transferred"] > 0 and q["ram"]["normal"] > 0
            assert "expected-downtime" not in q and "error-desc" not in q
            assert s.execute("query-status")["status"] == "postmigrate"
            if name == "hv":        # QEMU 7.2 lets cont run both copies; hv refuses
                with pytest.raises(ControlError, match="postmigrate"):
                    s.execute("cont")
            d2.wait_event("MIGRATION", lambda d: d["status"] == "completed", 60)
            wait_status(d2, "running", 30)
            qd = d2.execute("query-migrate")
            assert qd["status"] == "completed", qd
            if name == "hv":
                assert qd["ram"]["normal"] > 0
            s.execute("quit")
            d2.execute("quit")
        assert src.proc.wait(30) == 0
        dst2.proc.wait(30)
    finally:
        for g in guests:
            g.stop()
