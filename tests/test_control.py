"""The JSON-lines control protocol (no /dev/kvm needed)."""

import json
import os
import socket
import threading

import pytest

from hv import control
from hv.errors import HvError


@pytest.fixture
def server(tmp_path):
    state = {"n": 0}

    def bump(args):
        state["n"] += args.get("by", 1)
        return {"n": state["n"]}

    def fail(args):
        raise control.ControlError("nope", "DeviceNotActive")

    def crash(args):
        raise RuntimeError("boom")

    commands = {"bump": bump, "fail": fail, "crash": crash,
                "bytes": lambda a: {"raw": b"\x01\x02"}}
    path = str(tmp_path / "ctl.sock")
    srv = control.ControlServer(path, commands)
    yield srv, commands, path
    srv.close()


def test_greeting_and_commands(server):
    srv, commands, path = server
    with control.ControlClient(path) as c:
        assert c.greeting["hv"]["version"]
        assert "bump" in c.greeting["hv"]["commands"]
        assert c.execute("bump") == {"n": 1}
        assert c.execute("bump", by=5) == {"n": 6}
        assert c.execute("bytes") == {"raw": "0102"}


def test_unknown_command_is_named(server):
    srv, commands, path = server
    with control.ControlClient(path) as c:
        resp = c.request("frobnicate")
        assert resp["error"]["class"] == "CommandNotFound"
        assert "frobnicate" in resp["error"]["desc"]
        with pytest.raises(control.ControlError, match="frobnicate"):
            c.execute("frobnicate")


def test_errors(server):
    srv, commands, path = server
    with control.ControlClient(path) as c:
        assert c.request("fail")["error"] == {"class": "DeviceNotActive", "desc": "nope"}
        assert "boom" in c.request("crash")["error"]["desc"]
        assert c.execute("bump") == {"n": 1}      # the connection survives


def test_raw_protocol_and_bad_json(server):
    srv, commands, path = server
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rwb")
    assert "hv" in json.loads(f.readline())
    f.write(b'{"execute": "bump", "arguments": {"by": 2}, "id": "a"}\n')
    f.write(b"this is not json\n")
    f.write(b'{"arguments": {}}\n')
    f.write(b"\n")
    f.write(b'{"execute": "bump", "arguments": [1]}\n')
    f.flush()
    assert json.loads(f.readline()) == {"id": "a", "return": {"n": 2}}
    assert "invalid JSON" in json.loads(f.readline())["error"]["desc"]
    assert "execute" in json.loads(f.readline())["error"]["desc"]
    assert "arguments" in json.loads(f.readline())["error"]["desc"]
    s.close()


def test_many_clients_and_late_commands(server):
    srv, commands, path = server
    clients = [control.ControlClient(path) for _ in range(4)]
    commands["late"] = lambda a: "here"
    results = []

    def work(c):
        for _ in range(20):
            c.execute("bump")
        results.append(c.execute("late"))

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == ["here"] * 4
    assert clients[0].execute("bump") == {"n": 81}
    for c in clients:
        c.close()


def test_socket_in_use(server, tmp_path):
    srv, commands, path = server
    with pytest.raises(HvError, match="in use"):
        control.ControlServer(path, {})


def test_stale_socket_replaced(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    srv = control.ControlServer(path, {"x": lambda a: 1})
    with control.ControlClient(path) as c:
        assert c.execute("x") == 1
    srv.close()
    assert not os.path.exists(path)
