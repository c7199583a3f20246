"""run-guest end to end (subprocesses) and its error handling."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from hv import cli, control

GUESTS = os.path.join(os.path.dirname(__file__), "guests")
PVH = os.path.join(GUESTS, "pvh.elf")
PVH_IDLE = os.path.join(GUESTS, "pvh-idle.elf")


def run_guest(*args, timeout=60, **kw):
    return subprocess.run([sys.executable, "-m", "hv", *args], capture_output=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def test_parser_has_the_options():
    p = cli.build_parser()
    a = p.parse_args(["--kernel", "k", "--mem", "64", "--exec", "true", "--balloon",
                      "--control", "/tmp/x", "--verbose", "--append", "a=b"])
    assert (a.kernel, a.mem, a.exec_cmd, a.balloon, a.control, a.verbose, a.append) == (
        "k", 64, "true", True, "/tmp/x", True, "a=b")
    assert p.parse_args([]).mem == 128


def test_balloon_options(capsys):
    p = cli.build_parser()
    a = p.parse_args(["--balloon", "--balloon-opt", "reporting=off", "--balloon-opt",
                      "hint=on", "--balloon-opt", "stats_interval_s=5"])
    assert cli.balloon_options(a) == {"reporting": False, "free_page_hint": True,
                                      "stats_interval_s": 5.0}
    # the --balloon-reporting spelling goes the same way; a later --balloon-opt wins
    a = p.parse_args(["--balloon", "--balloon-reporting", "off"])
    assert cli.balloon_options(a) == {"reporting": False}
    a = p.parse_args(["--balloon-reporting", "off", "--balloon-opt", "reporting=on"])
    assert cli.balloon_options(a) == {"reporting": True}
    assert cli.balloon_options(p.parse_args([])) == {}
    for argv, msg in ((["--balloon", "--balloon-opt", "colour=red"],
                       "unknown balloon option 'colour'; known: "),
                      (["--balloon", "--balloon-opt", "reporting=maybe"], "is not on or off"),
                      (["--balloon", "--balloon-opt", "stats_interval_s=-1"], "number >= 0"),
                      (["--balloon", "--balloon-opt", "reporting"], "is not KEY=VALUE"),
                      (["--balloon-opt", "reporting=off"], "needs --balloon")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and "Traceback" not in err, err


def test_migration_and_cpu_options_are_run_guests():
    a = cli.build_parser().parse_args(["--incoming", "tcp:1.2.3.4:5", "--cpus", "2"])
    assert a.incoming == "tcp:1.2.3.4:5" and a.cpus == 2


def test_no_kvm_is_a_usage_error(monkeypatch, capsys):
    import hv.kvm
    monkeypatch.setattr(hv.kvm, "KVM_PATH", "/dev/no-kvm-here")
    rc = cli.main(["--kernel", PVH, "--initrd", ""])
    err = capsys.readouterr().err
    assert rc == 2
    assert "not found: load the kvm module" in err and "Traceback" not in err


@pytest.mark.kvm
def test_bad_kernel_and_memory():
    r = run_guest("--kernel", os.path.join(GUESTS, "pm32.bin"), "--initrd", "")
    assert r.returncode == 2
    assert b"not a kernel image" in r.stderr and b"Traceback" not in r.stderr
    r = run_guest("--kernel", PVH, "--initrd", "", "--mem", "4")
    assert r.returncode == 2 and b"MiB" in r.stderr
    r = run_guest("--kernel", "/no/such/kernel", "--initrd", "")
    assert r.returncode == 2 and b"not found" in r.stderr


@pytest.mark.kvm
def test_tiny_guest_output_and_verbose():
    r = run_guest("--kernel", PVH, "--initrd", "", "--mem", "16", "--verbose",
                  "--append", "from=test")
    assert r.returncode == 0, r.stderr
    assert b"pvh: magic ok" in r.stdout and b"from=test" in r.stdout
    assert b"vCPU exits: IoOut" in r.stderr
    assert b"guest ended (poweroff)" in r.stderr


@pytest.mark.kvm
def test_control_socket_commands(tmp_path):
    path = str(tmp_path / "ctl.sock")
    p = subprocess.Popen([sys.executable, "-m", "hv", "--kernel", PVH_IDLE, "--initrd", "",
                          "--mem", "16", "--control", path],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.05)
        with control.ControlClient(path) as c:
            while (status := c.execute("query-status")["status"]) != "running":
                assert status == "prelaunch" and time.monotonic() < deadline
                time.sleep(0.05)
            c.execute("stop")
            assert c.execute("query-status") == {"running": False, "status": "paused"}
            assert c.wait_event("STOP", timeout=10)
            c.execute("cont")
            assert c.wait_event("RESUME", timeout=10)
            assert c.execute("query-status")["status"] == "running"
            time.sleep(1)                      # let the guest finish printing
            resp = c.request("bogus-command")
            assert resp["error"]["class"] == "CommandNotFound"
            assert "bogus-command" in resp["error"]["desc"]
            c.execute("quit")
            # QEMU's order: the reply, then SHUTDOWN, then the socket closes
            ev = c.wait_event("SHUTDOWN", timeout=20)
            assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert b"idle" in p.stdout.read()


@pytest.mark.kvm
@pytest.mark.linux
def test_exec_prints_and_returns_status(linux_images):
    kernel, initrd = linux_images
    r = run_guest("--kernel", kernel, "--initrd", initrd, "--mem", "64",
                  "--exec", "echo hi; exit 7", timeout=400)
    assert r.returncode == 7, r.stderr[-2000:]
    lines = r.stdout.decode(errors="replace").splitlines()
    assert "hi" in [l.strip() for l in lines]
    assert b"Traceback" not in r.stderr


@pytest.mark.kvm
def test_interactive_terminal_ctrl_a_x():
    import pty
    import select
    import termios
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    p = subprocess.Popen([sys.executable, "-m", "hv", "--kernel", PVH_IDLE, "--initrd", "",
                          "--mem", "16"], stdin=slave, stdout=slave, stderr=slave)
    out = b""
    try:
        deadline = time.monotonic() + 20
        while b"idle" not in out:
            assert time.monotonic() < deadline, out
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                out += os.read(master, 4096)
        assert termios.tcgetattr(slave)[3] & termios.ECHO == 0     # raw mode
        os.write(master, b"\x01x")
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert termios.tcgetattr(slave) == before                       # restored
    os.close(master)
    os.close(slave)


@pytest.mark.kvm
@pytest.mark.linux
def test_guest_reboot_ends_run_guest(linux_images):
    kernel, initrd = linux_images
    t0 = time.monotonic()
    r = run_guest("--kernel", kernel, "--initrd", initrd, "--mem", "64", "--verbose",
                  "--exec", "reboot -f", timeout=400)
    assert b"guest ended (reboot)" in r.stderr, r.stderr[-2000:]
    assert r.returncode == 1            # no exit status line: the guest rebooted
    assert b"Traceback" not in r.stderr
    assert time.monotonic() - t0 < 300


def test_harness_types_through_console_input(tmp_path):
    """harness.Guest.type() uses the control socket's console-input
    when it knows the socket, the process's stdin otherwise."""
    import harness as H
    typed = []
    path = str(tmp_path / "ctl.sock")
    from hv import qmp
    from hv.qmp_commands import PREFIX
    srv = qmp.QmpServer(path, {PREFIX + "console-input": qmp.Command(
        lambda a: typed.append(a["data"]), {"data": "str"})})
    echo = [sys.executable, "-c",
            "import sys; print('got', sys.stdin.readline().strip(), flush=True)"]
    g = H.Guest("ctl", None, echo, str(tmp_path), control_path=path)
    s = H.Guest("stdin", None, echo, str(tmp_path))
    try:
        g.type("verify\n")
        assert typed == ["verify\n"]
        s.type("verify\n")
        assert s.wait_line("got ", 20) == "got verify"
    finally:
        g.proc.stdin.close()
        g.stop()
        s.stop()
        srv.close()
    assert H.verify_ok("hvmem: verify ok\r") and not H.verify_ok("hvmem: verify okay")


def test_dirty_ring_option_parses():
    p = cli.build_parser()
    assert p.parse_args([]).dirty_ring == 0
    assert p.parse_args(["--dirty-ring", "64K"]).dirty_ring == 65536
    assert p.parse_args(["--dirty-ring", "1MiB"]).dirty_ring == 1 << 20
    assert p.parse_args(["--dirty-ring", "0x1000"]).dirty_ring == 4096


@pytest.mark.kvm
def test_dirty_ring_sizes_are_checked():
    for size in ("1000", "2048", "2M"):
        r = run_guest("--kernel", PVH, "--initrd", "", "--mem", "16", "--dirty-ring", size)
        assert r.returncode == 2, r.stderr
        assert b"power of two from 4096 to" in r.stderr and b"Traceback" not in r.stderr
    r = run_guest("--kernel", PVH, "--initrd", "", "--mem", "16", "--dirty-ring", "lots")
    assert r.returncode == 2 and b"not a byte count" in r.stderr


@pytest.mark.kvm
def test_run_guest_migrates_with_the_dirty_ring(tmp_path):
    """run-guest --dirty-ring lets migrate use the dirty ring
    (__io.github.hv_dirty-log "ring")."""
    import socket
    import harness as H
    from hv.qmp_commands import PREFIX
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--kernel", PVH_IDLE, "--initrd", "", "--mem", "16"]
    ssock, dsock = str(tmp_path / "src.sock"), str(tmp_path / "dst.sock")
    dst = H.Guest("dst", None, H.RUN_GUEST + common + [
        "--control", dsock, "--incoming", f"tcp:127.0.0.1:{port}"], str(tmp_path))
    src = H.Guest("src", None, H.RUN_GUEST + common + [
        "--dirty-ring", "64K", "--control", ssock], str(tmp_path))
    try:
        src.wait_for("idle", 30)
        dst.wait_for("waiting for an incoming migration", 30)
        ring = {PREFIX + "dirty-log": "ring", PREFIX + "free-pages": "off"}
        with H.control(dsock, 10) as d:       # a destination does not migrate away
            with pytest.raises(control.ControlError, match="waiting for an incoming"):
                d.execute("migrate", uri="tcp:127.0.0.1:1")
        with H.control(ssock, 30) as c:
            q = H.qmp_migrate(c, f"tcp:127.0.0.1:{port}", ring, timeout=60)
            assert q["status"] == "completed", q
            assert q[PREFIX + "dirty-log"] == "ring"
            # QEMU's source stays in postmigrate until quit
            assert c.execute("query-status") == {"running": False, "status": "postmigrate"}
            c.execute("quit")
        assert src.proc.wait(30) == 0, src.tail()
        with H.control(dsock, 10) as d:
            assert d.execute("query-status")["status"] == "running"
            d.execute("quit")
        assert dst.proc.wait(30) == 0
    finally:
        src.stop()
        dst.stop()


@pytest.mark.kvm
def test_run_guest_saves_to_a_file_and_restores_from_it(tmp_path):
    """QMP's migrate to file:PATH saves the guest and leaves the source in
    postmigrate; __io.github.hv_snapshot-save saves and resumes; run-guest
    --incoming file:PATH runs the saved guest; restoring into a machine of
    another size is one clear line, and nothing runs."""
    import harness as H
    from hv.qmp_commands import PREFIX
    common = ["--kernel", PVH_IDLE, "--initrd", "", "--mem", "16"]
    ssock, dsock = str(tmp_path / "src.sock"), str(tmp_path / "dst.sock")
    live, final = str(tmp_path / "live.snap"), str(tmp_path / "final.snap")
    src = H.Guest("src", None, H.RUN_GUEST + common + ["--control", ssock], str(tmp_path))
    try:
        src.wait_for("idle", 30)
        with H.control(ssock, 30) as c:
            st = c.execute(PREFIX + "snapshot-save", path=live)
            assert st["pages-stored"] > 0 and os.path.exists(live)
            assert c.execute("query-status")["status"] == "running"
            c.execute("migrate", uri="file:" + final)
            q = c.execute("query-migrate")
            assert q["status"] == "completed" and q["ram"]["normal"] > 0, q
            assert c.execute("query-status")["status"] == "postmigrate"
            with pytest.raises(control.ControlError, match="postmigrate"):
                c.execute("cont")
            c.execute("quit")
        assert src.proc.wait(30) == 0
    finally:
        src.stop()
    dst = H.Guest("dst", None, H.RUN_GUEST + common + [
        "--control", dsock, "--incoming", "file:" + final, "--incoming-require-verify"],
        str(tmp_path))
    try:
        with H.control(dsock, 30) as d:
            deadline = time.monotonic() + 30
            while d.execute("query-status")["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert d.execute("query-migrate")["status"] == "completed"
            d.execute("quit")
        assert dst.proc.wait(30) == 0
    finally:
        dst.stop()
    r = subprocess.run(H.RUN_GUEST + ["--kernel", PVH_IDLE, "--initrd", "", "--mem", "32",
                                      "--incoming", "file:" + final],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "run-guest --mem 16" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


def _not_an_initramfs(tmp_path):
    p = tmp_path / "kernel-config.txt"
    p.write_text("CONFIG_BLK_DEV_INITRD=y\n")
    return str(p)


@pytest.mark.parametrize("argv, msg", [
    (["--incoming", "tcp:127.0.0.1:99999"], "the port must be 0..65535, not 99999"),
    (["--incoming", "tcp:[::1]:70000"], "the port must be 0..65535, not 70000"),
    (["--incoming", "tcp:"], "expected tcp:HOST:PORT with PORT a number 0..65535"),
    (["--incoming", "tcp::x"], "expected tcp:HOST:PORT with PORT a number 0..65535"),
    (["--incoming", "udp:1.2.3.4:5"], "only tcp:HOST:PORT is supported"),
    (["--incoming", "tcp:::1:5"], "write an IPv6 address in brackets"),
    (["--incoming-io-timeout", "-1"], "'-1' is not a number of seconds > 0"),
    (["--incoming-io-timeout", "0"], "'0' is not a number of seconds > 0"),
    (["--incoming-io-timeout", "nan"], "'nan' is not a number of seconds > 0"),
    (["--incoming-io-timeout", "inf"], "'inf' is not a number of seconds > 0"),
    (["--incoming-timeout", "-1"], "'-1' is not a number of seconds > 0"),
    (["--incoming-timeout", "inf"], "'inf' is not a number of seconds > 0"),
    (["--initrd", "/dev/null"], "initrd '/dev/null' is not an initramfs (it is empty)"),
    (["--initrd", _not_an_initramfs], "is not an initramfs (it starts with b'CONFIG_B')"),
    (["--initrd", "/no/such/initrd"], "initrd '/no/such/initrd' not found"),
])
def test_bad_arguments_are_one_line_usage_errors(argv, msg, capsys, tmp_path):
    """Refused while parsing, before any machine exists: one line, status 2."""
    argv = [a(tmp_path) if callable(a) else a for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(["--kernel", PVH, *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert msg in err and "Traceback" not in err and err.count("\n") == 1, err


def test_initramfs_formats_are_accepted(tmp_path):
    for name, head in (("newc", b"070701"), ("crc", b"070702"), ("odc", b"070707"),
                       ("gz", b"\x1f\x8b\x08\x00"), ("xz", b"\xfd7zXZ\x00"),
                       ("zst", b"\x28\xb5\x2f\xfd"), ("lz4", b"\x02\x21\x4c\x18"),
                       ("padded", b"\0" * 512 + b"070701")):
        p = tmp_path / name
        p.write_bytes(head + b"\0" * 100)
        assert cli.build_parser().parse_args(["--initrd", str(p)]).initrd == str(p)
    assert cli.build_parser().parse_args(["--initrd", ""]).initrd == ""


def test_incoming_prints_its_uri_for_scripts(capsys):
    """--incoming tcp:HOST:0 listens on a free port; stderr names it in a form a
    script can read back (and still says it is waiting)."""
    import re
    from hv.memory import GuestMemory
    from hv.migration.protocol import MigrationError
    from hv.migration.receiver import incoming
    from hv.migration.transport import parse_uri

    class Unbooted:
        memory = GuestMemory(1 << 20)
        status = "prelaunch"

        def restore_state(self, s):
            pass

        def start(self):
            pass
    seen = []
    with pytest.raises(MigrationError, match="no migration arrived within 0.3 s"):
        incoming(Unbooted(), "tcp:127.0.0.1:0", accept_timeout=0.3, prefault=False,
                 on_listening=lambda h, p: seen.append(p))
    lines = capsys.readouterr().err.splitlines()
    m = [re.fullmatch(r"hv: incoming migration listening on (tcp:\S+)", l) for l in lines]
    uris = [x.group(1) for x in m if x]
    assert len(uris) == 1 and parse_uri(uris[0]) == ("127.0.0.1", seen[0]) and seen[0] > 0
    assert any("waiting for an incoming migration" in l for l in lines)
