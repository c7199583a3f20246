"""The QMP server (hv.qmp) with a fake command registry: QEMU's framing and
negotiation, its errors, hostile input, many clients and slow clients. No
/dev/kvm needed; the client is QEMU's own library (qemu.qmp) through
hv.control, or a raw socket where the bytes matter."""

import json
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from hv import control, qmp
from hv.errors import HvError

pytest.importorskip("qemu.qmp", reason="QEMU's QMP library (pip install qemu.qmp) is missing")


@pytest.fixture
def server(tmp_path):
    state = {"n": 0}

    def bump(args):
        state["n"] += args.get("by", 1)
        return {"n": state["n"]}

    def fail(args):
        raise qmp.QmpError("nope", qmp.DEVICE_NOT_ACTIVE)

    def crash(args):
        raise RuntimeError("boom")

    commands = {"bump": qmp.Command(bump, {"*by": "int"}),
                "fail": qmp.Command(fail),
                "crash": qmp.Command(crash),
                "echo": qmp.Command(lambda a: a, {"text": "str", "*flag": "bool"}),
                "bytes": qmp.Command(lambda a: {"raw": b"\x01\x02"})}
    path = str(tmp_path / "qmp.sock")
    srv = qmp.QmpServer(path, commands)
    yield srv, commands, path, state
    srv.close()


class Raw:
    """A hand-driven QMP connection: bytes in, messages out."""

    def __init__(self, path, negotiate=True):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(path)
        self.f = self.s.makefile("rb")
        self.greeting = self.read()
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}')
            assert self.read() == {"return": {}}

    def send(self, data: bytes):
        self.s.sendall(data)

    def line(self) -> bytes:
        line = self.f.readline()
        if not line:
            raise ConnectionError("closed")
        return line

    def read(self) -> dict:
        return json.loads(self.line())

    def close(self):
        self.s.close()


def test_greeting_negotiation_and_commands(server):
    srv, commands, path, _ = server
    with control.ControlClient(path) as c:
        v = c.greeting["QMP"]["version"]
        assert set(v["qemu"]) == {"major", "minor", "micro"}
        assert v["package"].startswith("hv-")
        assert c.greeting["QMP"]["capabilities"] == []
        assert c.execute("bump") == {"n": 1}
        assert c.execute("bump", by=5) == {"n": 6}
        assert c.execute("bytes") == {"raw": "0102"}


def test_output_ends_with_crlf_and_id_is_echoed_verbatim(server):
    srv, commands, path, _ = server
    r = Raw(path, negotiate=False)
    r.send(b'{"execute": "qmp_capabilities", "id": {"any": ["json", 1]}}')
    line = r.line()
    assert line.endswith(b"}\r\n")
    assert json.loads(line) == {"return": {}, "id": {"any": ["json", 1]}}
    r.send(b'{"execute": "bump", "id": 3.5}')
    assert r.read() == {"return": {"n": 1}, "id": 3.5}
    r.close()


def test_everything_waits_for_negotiation(server):
    srv, commands, path, state = server
    r = Raw(path, negotiate=False)
    srv.emit("STOP")                           # no events before negotiation
    r.send(b'{"execute": "bump", "id": 1}')
    resp = r.read()
    assert resp["error"]["class"] == "CommandNotFound" and resp["id"] == 1
    assert state["n"] == 0
    r.send(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    assert "oob" in r.read()["error"]["desc"]
    r.send(b'{"execute": "qmp_capabilities"}')
    assert r.read() == {"return": {}}
    r.send(b'{"execute": "qmp_capabilities"}')
    assert r.read()["error"]["class"] == "CommandNotFound"
    srv.emit("STOP")
    ev = r.read()
    assert ev["event"] == "STOP" and set(ev["timestamp"]) == {"seconds", "microseconds"}
    srv.emit("MIGRATION", {"status": "active"})
    assert r.read()["data"] == {"status": "active"}
    r.close()


def test_errors_and_argument_checks(server):
    srv, commands, path, _ = server
    with control.ControlClient(path) as c:
        assert c.request("fail")["error"] == {"class": "DeviceNotActive", "desc": "nope"}
        assert "boom" in c.request("crash")["error"]["desc"]
        resp = c.request("frobnicate")
        assert resp["error"]["class"] == "CommandNotFound" and "frobnicate" in \
            resp["error"]["desc"]
        with pytest.raises(control.ControlError, match="'color' is unexpected"):
            c.execute("echo", text="x", color="red")
        with pytest.raises(control.ControlError, match="'text' is missing"):
            c.execute("echo")
        with pytest.raises(control.ControlError, match="'text', expected: string"):
            c.execute("echo", text=1)
        with pytest.raises(control.ControlError, match="'flag', expected: boolean"):
            c.execute("echo", text="x", flag=1)
        with pytest.raises(control.ControlError, match="'by', expected: integer"):
            c.execute("bump", by=True)
        assert c.execute("echo", text="x", flag=False) == {"text": "x", "flag": False}
        assert c.execute("bump") == {"n": 1}      # the connection survives


def test_unknown_and_malformed_members(server):
    srv, commands, path, _ = server
    r = Raw(path)
    r.send(b'{"execute": "bump", "colour": 1}')
    assert "'colour' is unexpected" in r.read()["error"]["desc"]
    r.send(b'{"arguments": {}}')
    assert "lacks member 'execute'" in r.read()["error"]["desc"]
    r.send(b'{"execute": 7}')
    assert "'execute' must be a string" in r.read()["error"]["desc"]
    r.send(b'{"execute": "bump", "arguments": [1]}')
    assert "'arguments' must be an object" in r.read()["error"]["desc"]
    r.send(b'[1, 2]')
    assert "must be a JSON object" in r.read()["error"]["desc"]
    r.send(b'{"execute": "bump"}')
    assert r.read() == {"return": {"n": 1}}
    r.close()


def test_input_is_a_stream_not_lines(server):
    srv, commands, path, _ = server
    r = Raw(path)
    # two requests with no separator, then one split byte by byte, with a
    # brace and an escaped quote inside a string
    r.send(b'{"execute":"bump","id":1}{"execute":"bump","id":2}')
    assert [r.read()["id"], r.read()["id"]] == [1, 2]
    for b in b'{"execute": "echo", "arguments": {"text": "{\\"}["}, "id": 3}':
        r.send(bytes([b]))
    assert r.read() == {"return": {"text": '{"}['}, "id": 3}
    r.close()


def test_garbage_then_valid_requests(server):
    srv, commands, path, _ = server
    r = Raw(path)
    r.send(b"this is not json\n\xff\xfe\x00 }}]] 42 ")
    assert r.read()["error"]["class"] == "GenericError"
    r.send(b'{"execute": "bump", "arguments": {"by": 2}, "id": "a"}')
    assert r.read() == {"return": {"n": 2}, "id": "a"}
    r.send(b'{"execute": "echo", "arguments": {"text": "\xff"}, "id": "b"}')
    assert "JSON parse error" in r.read()["error"]["desc"]
    r.send(b'{"execute": "bump", "arguments": {"by": 1, }, "id": "c"}')
    assert "JSON parse error" in r.read()["error"]["desc"]
    r.send(b'{"execute": "bump", "id": "d"}')
    assert r.read() == {"return": {"n": 3}, "id": "d"}
    r.close()


def test_a_20_mib_object_is_refused_and_skipped(server):
    srv, commands, path, state = server
    r = Raw(path)
    big = b'{"execute": "echo", "arguments": {"text": "' + b"x" * (20 << 20) + b'"}}'
    sender = threading.Thread(target=r.send, args=(big,))
    sender.start()
    resp = r.read()
    sender.join(60)
    assert "larger than" in resp["error"]["desc"]
    r.send(b'{"execute": "bump", "id": 1}')
    assert r.read() == {"return": {"n": 1}, "id": 1}
    r.close()


def test_deep_nesting_is_refused_before_parsing(server):
    srv, commands, path, state = server
    r = Raw(path)
    depth = 100_000
    r.send(b'{"execute": "echo", "arguments": {"text": "x", "flag": '
           + b'{"a": ' * depth + b"1" + b"}" * depth + b"}}")
    assert "nesting deeper than" in r.read()["error"]["desc"]
    r.send(b"[" * depth + b"]" * depth)
    assert "nesting deeper than" in r.read()["error"]["desc"]
    r.send(b'{"execute": "bump", "id": 1}')
    assert r.read() == {"return": {"n": 1}, "id": 1}
    # a nest that never closes, then the client hangs up: nothing breaks
    r.send(b"[" * depth)
    assert "nesting deeper than" in r.read()["error"]["desc"]
    r.close()
    with control.ControlClient(path) as c:
        assert c.execute("bump") == {"n": 2}


def test_fifty_clients_at_once(server):
    srv, commands, path, state = server
    errors = []

    def work():
        try:
            with control.ControlClient(path) as c:
                for _ in range(10):
                    c.execute("bump")
                with pytest.raises(control.ControlError):
                    c.execute("echo", text=5)
        except Exception as e:      # reported below
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert state["n"] == 500


def test_late_commands_are_served(server):
    srv, commands, path, _ = server
    with control.ControlClient(path) as c:
        commands["late"] = qmp.Command(lambda a: "here")
        assert c.execute("late") == "here"


def test_a_client_that_does_not_read_is_dropped_and_never_stalls_events(server):
    srv, commands, path, _ = server
    sleeper = Raw(path)                      # negotiated, then never reads
    with control.ControlClient(path) as c:
        spent, seen = 0.0, 0
        for batch in range(40):
            t0 = time.monotonic()
            for i in range(500):
                srv.emit("BALLOON_CHANGE", {"actual": i, "pad": "y" * 200})
            spent += time.monotonic() - t0
            while seen < (batch + 1) * 500:   # this client reads its events
                seen += len(c.events(5.0))
        assert spent < 10                     # emit never waited for the sleeper
        deadline = time.monotonic() + 30
        while srv.clients > 1:
            assert time.monotonic() < deadline, "the sleeping client was not dropped"
            time.sleep(0.05)
        assert c.execute("bump") == {"n": 1}
    sleeper.close()


def test_events_reach_qemu_qmp_clients(server):
    srv, commands, path, _ = server
    with control.ControlClient(path) as a, control.ControlClient(path) as b:
        srv.emit("MIGRATION", {"status": "completed"})
        for c in (a, b):
            ev = c.wait_event("MIGRATION", lambda d: d["status"] == "completed", 10)
            assert ev["timestamp"]["seconds"] > 0


def test_qmp_shell_runs_commands_from_stdin(server):
    srv, commands, path, _ = server
    shell = shutil.which("qmp-shell")
    if shell is None:
        pytest.skip("qmp-shell (pip install qemu.qmp) is not on PATH")
    r = subprocess.run([shell, path], input="bump by=4\necho text=hello\nnope\n",
                       capture_output=True, text=True, timeout=30)
    out = r.stdout + r.stderr
    assert '"n": 4' in out, out
    assert '"text": "hello"' in out, out
    assert "CommandNotFound" in out, out


def test_socket_in_use(server, tmp_path):
    srv, commands, path, _ = server
    with pytest.raises(HvError, match="in use"):
        qmp.QmpServer(path, {})


def test_stale_socket_replaced(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    srv = qmp.QmpServer(path, {"x": qmp.Command(lambda a: 1)})
    with control.ControlClient(path) as c:
        assert c.execute("x") == 1
    srv.close()
    assert not os.path.exists(path)


def test_json_stream_scanner_units():
    s = qmp.JsonStream(max_bytes=64, max_depth=3)
    assert s.feed(b' {"a": "}\\\\"} [1] ') == [("value", b'{"a": "}\\\\"}'), ("value", b"[1]")]
    assert s.feed(b'{"a": [[[1]]]}') == [
        ("error", "JSON nesting deeper than 3 levels; the value is ignored")]
    out = s.feed(b'{"a": "' + b"z" * 100 + b'"}{"b": 1}')
    assert out[0][0] == "error" and "larger than 64" in out[0][1]
    assert out[1] == ("value", b'{"b": 1}')


def test_the_reply_to_quit_arrives_before_the_server_closes(tmp_path):
    """quit ends the process as soon as its handler returns; its reply must
    still be sent (QEMU: the reply, then SHUTDOWN, then the socket closes)."""
    path = str(tmp_path / "quit.sock")
    holder = {}

    def quit_(args):
        threading.Thread(target=holder["srv"].close).start()
        time.sleep(0.3)             # the server is closing while this runs
        return {}
    holder["srv"] = qmp.QmpServer(path, {"quit": qmp.Command(quit_)})
    r = Raw(path)
    r.send(b'{"execute": "quit", "id": 1}')
    assert r.read() == {"return": {}, "id": 1}
    r.close()


def _connect_as(uid: int, path: str) -> str:
    """Connect to path from a child process running as uid; what it got."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            try:
                s.connect(path)
                got = s.recv(4096)
                out = b"greeting" if got.startswith(b'{"QMP"') else b"closed"
            except PermissionError:
                out = b"denied"
            except OSError as e:
                out = repr(e).encode()
            os.write(w, out)
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_control_socket_is_owner_only_and_refuses_other_users():
    import tempfile
    d = tempfile.mkdtemp(prefix="hv-qmp-")
    os.chmod(d, 0o755)          # others may reach the socket file, not use it
    path = os.path.join(d, "qmp.sock")
    srv = qmp.QmpServer(path, {})
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert _connect_as(65534, path) == "denied"
        # even where the file's mode lets them in, the server checks who connects
        os.chmod(path, 0o666)
        assert _connect_as(65534, path) == "closed"
        assert _connect_as(0, path) == "greeting"
    finally:
        srv.close()
        shutil.rmtree(d, ignore_errors=True)
