"""Migration over TLS between the fake machines of test_migration_loopback
(no KVM): mutual x509 authentication, the wire carries no plaintext page,
every bad certificate is refused with the source left running and the
destination untouched, plain/TLS mismatches say which side wants TLS."""

import datetime
import os
import shutil
import socket
import threading
import time

import pytest

from hv.memory import PAGE_SIZE
from hv.migration.sender import Migration, MigrationParams
from hv.tls import TlsCredentials, TlsError, make_ca, make_cert, make_creds, write_creds

from test_migration_loopback import FakeDest, FakeSource, check_same, start_receiver

PATTERN = b"hv-TLS-plaintext-marker!" * 8       # 192 bytes written into guest pages


@pytest.fixture(scope="module")
def creds_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    make_creds(str(d), ["localhost"], client_name="hv-source")
    return str(d)


def server(creds_dir, **kw):
    return TlsCredentials(creds_dir, endpoint="server", **kw)


def client(creds_dir):
    return TlsCredentials(creds_dir, endpoint="client")


def derived(creds_dir, tmp_path, *, ca=None, client_pair=None):
    """A copy of creds_dir whose CA or client certificate is replaced."""
    d = tmp_path / "derived"
    shutil.copytree(creds_dir, d)
    write_creds(str(d), ca=ca, client=client_pair)
    return str(d)


class CapturingProxy:
    """Forwards every connection to the receiver and keeps the bytes the
    source sent."""

    def __init__(self, port):
        self.lst = socket.create_server(("127.0.0.1", 0))
        self.port = self.lst.getsockname()[1]
        self.target = port
        self.captured = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lst.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(u, c, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(c, u, True), daemon=True).start()

    def _pipe(self, a, b, keep):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                if keep:
                    with self.lock:
                        self.captured += d
                b.sendall(d)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def marked_source():
    src = FakeSource()
    a = src.memory.array()
    for pfn in range(100, 300):             # inside the random data, sent as MEMORY
        a[pfn * PAGE_SIZE + 1000:pfn * PAGE_SIZE + 1000 + len(PATTERN)] = \
            memoryview(PATTERN).cast("B")
    return src


@pytest.mark.parametrize("connections", [1, 3])
def test_tls_migration_verifies_and_hides_page_content(creds_dir, connections):
    src, dst = marked_source(), FakeDest()
    port, t, res = start_receiver(dst, tls=server(creds_dir))
    proxy = CapturingProxy(port)
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{proxy.port}", dirty_log="vmm",
                                       verify=True, connections=connections,
                                       downtime_ms=2000, tls=client(creds_dir),
                                       tls_hostname="localhost"))
    m.run()
    t.join(10)
    q = m.query()
    assert q["status"] == "completed", q
    assert "error" not in res, res.get("error")
    assert res["rx"].verified and dst.running
    check_same(src, dst)
    assert dst.memory.array()[100 * PAGE_SIZE + 1000:][:len(PATTERN)].tobytes() == PATTERN
    wire = bytes(proxy.captured)
    assert len(wire) > 8 << 20                # the pages went through the proxy
    assert PATTERN[:24] not in wire and b"HVMG" not in wire
    assert wire[0] == 0x16                    # a TLS handshake record first


def test_tls_hostname_defaults_to_the_uri_host(creds_dir):
    src, dst = FakeSource(), FakeDest()
    port, t, res = start_receiver(dst, tls=server(creds_dir))
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", dirty_log="vmm",
                                       verify=True, tls=client(creds_dir)))
    m.run()
    t.join(10)
    assert m.query()["status"] == "completed", m.query()
    check_same(src, dst)


def _refused(src, creds, tls_hostname, server_creds, expect_source, expect_log=None,
             uri_host="127.0.0.1"):
    """A migration that must be refused: the source fails and keeps running,
    the destination restores and runs nothing and keeps waiting; returns
    the destination so that a proper source can then come."""
    logs = []
    dst = FakeDest()
    port, t, res = start_receiver(dst, tls=server_creds, log=logs.append)
    m = Migration(src, MigrationParams(uri=f"tcp:{uri_host}:{port}", dirty_log="vmm",
                                       verify=True, tls=creds, tls_hostname=tls_hostname,
                                       timeout_s=5))
    m.run()
    q = m.query()
    assert q["status"] == "failed", q
    assert expect_source in q["error"], q["error"]
    assert src.status == "running" and not src.shut
    c0 = src.counter
    time.sleep(0.1)
    assert src.counter > c0
    time.sleep(0.2)
    assert t.is_alive()                       # the destination still waits
    assert not dst.running and dst.state is None
    if expect_log:
        assert any(expect_log in line for line in logs), logs
    return dst, port, t, res


def _then_a_proper_source_migrates(src, creds, dst, port, t, res):
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", dirty_log="vmm",
                                       verify=True, tls=creds))
    m.run()
    t.join(10)
    assert m.query()["status"] == "completed", m.query()
    assert res["rx"].verified
    check_same(src, dst)


def test_source_without_client_certificate_is_refused(creds_dir, tmp_path):
    d = tmp_path / "nocert"
    shutil.copytree(creds_dir, d)
    os.remove(d / "client-cert.pem")
    with pytest.raises(TlsError, match="client-cert.pem is missing"):
        TlsCredentials(str(d), endpoint="client")
    # a plain ssl client that presents no certificate at all
    src = FakeSource()
    creds = client(creds_dir)
    creds._context = lambda endpoint, _c=creds: _no_cert_context(_c)
    dst, port, t, res = _refused(src, creds, "", server(creds_dir),
                                 "refused this TLS session",
                                 "TLS handshake failed")
    _then_a_proper_source_migrates(src, client(creds_dir), dst, port, t, res)


def _no_cert_context(creds):
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(creds.dir, "ca-cert.pem"))
    return ctx


def test_source_with_a_certificate_of_another_ca_is_refused(creds_dir, tmp_path):
    other = make_ca("another CA")
    d = derived(creds_dir, tmp_path, client_pair=make_cert(other, "hv-source", server=False))
    src = FakeSource()
    dst, port, t, res = _refused(src, TlsCredentials(d, endpoint="client"), "",
                                 server(creds_dir), "refused this TLS session",
                                 "TLS handshake failed")
    _then_a_proper_source_migrates(src, client(creds_dir), dst, port, t, res)


def test_source_with_an_expired_certificate_is_refused(tmp_path):
    # make_creds keeps no CA key: a CA of our own signs the expired certificate
    ca = make_ca()
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = make_cert(ca, "hv-source", server=False,
                        not_before=now - datetime.timedelta(days=10),
                        not_after=now - datetime.timedelta(days=1))
    server_pair = make_cert(ca, "localhost", server=True, hostnames=["localhost", "127.0.0.1"])
    d = tmp_path / "own"
    write_creds(str(d), ca=ca, server=server_pair, client=expired)
    src = FakeSource()
    dst, port, t, res = _refused(src, TlsCredentials(str(d), endpoint="client"), "",
                                 TlsCredentials(str(d), endpoint="server"),
                                 "refused this TLS session", "certificate")
    good = tmp_path / "good"
    write_creds(str(good), ca=ca, server=server_pair,
                client=make_cert(ca, "hv-source", server=False))
    _then_a_proper_source_migrates(src, TlsCredentials(str(good), endpoint="client"),
                                   dst, port, t, res)


def test_wrong_tls_hostname_is_refused_by_the_source(creds_dir):
    src = FakeSource()
    dst, port, t, res = _refused(src, client(creds_dir), "dest.example.org", server(creds_dir),
                                 "tls-hostname 'dest.example.org'", "TLS handshake failed")
    _then_a_proper_source_migrates(src, client(creds_dir), dst, port, t, res)


def test_destination_of_another_ca_is_refused_by_the_source(creds_dir, tmp_path):
    other = make_ca("another CA")
    d = derived(creds_dir, tmp_path, ca=other)   # the source trusts only `other`
    src = FakeSource()
    dst, port, t, res = _refused(src, TlsCredentials(d, endpoint="client"), "",
                                 server(creds_dir), "certificate verify failed")
    _then_a_proper_source_migrates(src, client(creds_dir), dst, port, t, res)


def test_client_cn_not_in_authz_is_refused(creds_dir):
    src = FakeSource()
    dst, port, t, res = _refused(src, client(creds_dir), "",
                                 server(creds_dir, authz=["someone-else"]),
                                 "CN 'hv-source' is not in tls-authz",
                                 "CN 'hv-source' is not in tls-authz")
    t.join(0.1)
    src2, dst2 = FakeSource(), FakeDest()
    port, t, res = start_receiver(dst2, tls=server(creds_dir, authz=["hv-source"]))
    _then_a_proper_source_migrates(src2, client(creds_dir), dst2, port, t, res)


def test_plain_source_to_tls_destination_is_refused(creds_dir):
    src = FakeSource()
    logs = []
    dst = FakeDest()
    port, t, res = start_receiver(dst, tls=server(creds_dir), log=logs.append)
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", dirty_log="vmm",
                                       timeout_s=5))
    m.run()
    q = m.query()
    assert q["status"] == "failed"
    assert "accepts only TLS migrations: set tls-creds on the source" in q["error"], q
    assert src.status == "running" and not dst.running and dst.state is None
    assert t.is_alive()
    assert any("accepts only TLS" in line for line in logs)
    _then_a_proper_source_migrates(src, client(creds_dir), dst, port, t, res)


def test_tls_source_to_plain_destination_is_refused(creds_dir):
    src = FakeSource()
    logs = []
    dst = FakeDest()
    port, t, res = start_receiver(dst, log=logs.append)
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", dirty_log="vmm",
                                       tls=client(creds_dir), timeout_s=5))
    m.run()
    q = m.query()
    assert q["status"] == "failed"
    assert "does not speak TLS: start it with --tls-dir" in q["error"], q
    assert src.status == "running" and not dst.running and dst.state is None
    assert any("the source speaks TLS; start this destination with --tls-dir" in line
               for line in logs), logs
    m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", dirty_log="vmm",
                                       verify=True))
    m.run()
    t.join(10)
    assert m.query()["status"] == "completed"
    check_same(src, dst)


def test_credentials_errors_name_the_file(tmp_path, creds_dir):
    with pytest.raises(TlsError, match="is not a directory"):
        TlsCredentials(str(tmp_path / "none"))
    d = tmp_path / "bad"
    shutil.copytree(creds_dir, d)
    with open(d / "server-key.pem", "w") as f:
        f.write("not a key")
    with pytest.raises(TlsError, match="server-key.pem"):
        TlsCredentials(str(d), endpoint="server")
    other = make_cert(make_ca(), "x", server=True)
    write_creds(str(d), server=(other[0], make_cert(make_ca(), "y", server=True)[1]))
    with pytest.raises(TlsError, match="server-key.pem does not belong to"):
        TlsCredentials(str(d), endpoint="server")
    modes = {n: os.stat(os.path.join(creds_dir, n)).st_mode & 0o777
             for n in ("server-key.pem", "client-key.pem")}
    assert set(modes.values()) == {0o600}


# ------------------------------------------------------------------ QMP

def _qmp_machine(m):
    m.status_listeners, m.shutdown_reason = [], None
    m.request_shutdown = getattr(m, "request_shutdown", lambda reason: None)
    return m


def _run(cmds, name, args=None):
    c = cmds[name]
    c.check(args or {})
    return c.handler(args or {})


def _free_port():
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def test_qmp_object_add_and_tls_parameters_migrate_over_tls(creds_dir):
    from hv.migration.incoming import IncomingMigration
    from hv.qmp_commands import PREFIX, QemuMonitor
    src = _qmp_machine(FakeSource())
    dst = _qmp_machine(FakeDest())
    dst.commands = {}
    smon, dmon = QemuMonitor(src), QemuMonitor(dst)
    scmds, dcmds = smon.commands(), dmon.commands()
    IncomingMigration.of(dst).configure(prefault=False, verbose=False)
    IncomingMigration.of(dst).defer()

    _run(dcmds, "object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": creds_dir,
                               "endpoint": "server"})
    _run(dcmds, "migrate-set-parameters", {"tls-creds": "tls0",
                                           PREFIX + "tls-authz-names": ["hv-source"]})
    port = _free_port()
    _run(dcmds, "migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})

    _run(scmds, "object-add", {"qom-type": "tls-creds-x509", "id": "sec0", "dir": creds_dir,
                               "endpoint": "client"})
    _run(scmds, "migrate-set-parameters", {"tls-creds": "sec0", "tls-hostname": "localhost",
                                           PREFIX + "dirty-log": "vmm",
                                           PREFIX + "verify": True})
    q = _run(scmds, "query-migrate-parameters")
    assert (q["tls-creds"], q["tls-hostname"], q["tls-authz"]) == ("sec0", "localhost", "")
    _run(scmds, "migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    smon.migrations.current.wait(20)
    assert smon.migrations.current.query()["status"] == "completed", \
        smon.migrations.current.query()
    IncomingMigration.of(dst).thread.join(10)
    assert IncomingMigration.of(dst).status == "completed"
    assert dst.running and IncomingMigration.of(dst).receiver.verified
    assert (src.memory.array() == dst.memory.array()).all()   # free pages "off": all sent

    # TLS off again: "" is QEMU's way
    _run(scmds, "migrate-set-parameters", {"tls-creds": ""})
    assert "tls" not in smon._hv_args(smon.parameters, smon.capabilities, "tcp:h:1")
    _run(scmds, "object-del", {"id": "sec0"})
    src.close()


def test_qmp_tls_errors_are_clear(creds_dir, tmp_path):
    from hv.qmp import QmpError
    from hv.qmp_commands import PREFIX, QemuMonitor
    m = _qmp_machine(FakeDest())
    m.commands = {}
    mon = QemuMonitor(m)
    cmds = mon.commands()
    with pytest.raises(QmpError, match="is not a directory"):
        _run(cmds, "object-add", {"qom-type": "tls-creds-x509", "id": "t",
                                  "dir": str(tmp_path / "none")})
    with pytest.raises(QmpError, match="tls-creds-x509 only"):
        _run(cmds, "object-add", {"qom-type": "tls-creds-psk", "id": "t", "dir": creds_dir})
    with pytest.raises(QmpError, match="verify-peer must stay true"):
        _run(cmds, "object-add", {"qom-type": "tls-creds-x509", "id": "t", "dir": creds_dir,
                                  "endpoint": "server", "verify-peer": False})
    with pytest.raises(QmpError, match="no tls-creds-x509 object 'nope'"):
        _run(cmds, "migrate-set-parameters", {"tls-creds": "nope"})
    _run(cmds, "object-add", {"qom-type": "tls-creds-x509", "id": "t", "dir": creds_dir,
                              "endpoint": "server"})
    with pytest.raises(QmpError, match="Duplicate ID 't'"):
        _run(cmds, "object-add", {"qom-type": "tls-creds-x509", "id": "t", "dir": creds_dir})
    with pytest.raises(QmpError, match="tls-authz-names"):
        _run(cmds, "migrate-set-parameters", {"tls-authz": "authz0"})
    _run(cmds, "migrate-set-parameters", {"tls-creds": "t"})
    with pytest.raises(QmpError, match="in use"):
        _run(cmds, "object-del", {"id": "t"})
    with pytest.raises(QmpError, match="endpoint 'client'"):
        _run(cmds, "migrate", {"uri": "tcp:127.0.0.1:1"})     # server credentials
    with pytest.raises(QmpError, match="not found"):
        _run(cmds, "object-del", {"id": "zz"})
    assert _run(cmds, "query-migrate-parameters")["tls-creds"] == "t"
    assert PREFIX + "tls-authz-names" not in _run(cmds, "query-migrate-parameters")


# ------------------------------------------------------------ TlsStream

def _tls_pair(creds_dir):
    import ssl
    lst = socket.create_server(("127.0.0.1", 0))
    out = {}

    def accept():
        c, _ = lst.accept()
        out["server"] = server(creds_dir).server_context().wrap_socket(c, server_side=True)
    th = threading.Thread(target=accept, daemon=True)
    th.start()
    c = socket.create_connection(lst.getsockname())
    cli = client(creds_dir).client_context().wrap_socket(c, server_hostname="127.0.0.1")
    th.join(5)
    lst.close()
    assert isinstance(cli, ssl.SSLSocket)
    return cli, out["server"]


def test_tls_stream_pages_rate_and_timeout(creds_dir):
    import numpy as np
    from hv.memory import GuestMemory
    from hv.migration.protocol import MigrationError
    from hv.migration.transport import TLS_BATCH_PAGES, TlsStream
    a, b = _tls_pair(creds_dir)
    tx = TlsStream(a, timeout=5, rate_bytes_per_sec=8 << 20)
    rx = TlsStream(b, timeout=5)
    src, dst = GuestMemory(4 << 20), GuestMemory(4 << 20)
    src.array()[:] = np.random.default_rng(3).integers(0, 256, 4 << 20, dtype=np.uint8)
    # scattered single pages and a run longer than one batch
    starts = np.array([1, 5, 7, 100], dtype=np.uint64)
    counts = np.array([1, 1, 2, TLS_BATCH_PAGES + 40], dtype=np.uint64)
    n = int(counts.sum()) * PAGE_SIZE
    t0 = time.monotonic()
    th = threading.Thread(target=tx.write_pages, args=(src, starts, counts))
    th.start()
    assert rx.read_pages(dst, starts, counts) == n
    th.join()
    assert time.monotonic() - t0 > 0.8 * n / (8 << 20) - 0.06   # the bucket's burst
    assert tx.bytes_out == n and rx.bytes_in == n
    for s, c in zip(starts.tolist(), counts.tolist()):
        sl = slice(s * PAGE_SIZE, (s + c) * PAGE_SIZE)
        assert (src.array()[sl] == dst.array()[sl]).all()
    assert not dst.array()[2 * PAGE_SIZE:5 * PAGE_SIZE].any()   # nothing else written
    rx.timeout = 0.2
    t0 = time.monotonic()
    with pytest.raises(MigrationError, match="receiving"):
        rx.read(8)                                  # the peer sends nothing
    assert time.monotonic() - t0 < 2
    tx.close()
    rx.close()


# ------------------------------------------------------------ a KVM guest

@pytest.mark.kvm
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")
def test_tiny_kvm_guest_migrates_over_tls_and_keeps_counting(creds_dir):
    from test_migration_kvm import counter, make_machine, writer_guest
    src, dst = writer_guest(), make_machine()
    try:
        port, t, res = start_receiver(dst, tls=server(creds_dir))
        m = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", free_pages="off",
                                           verify=True, connections=3, downtime_ms=500,
                                           tls=client(creds_dir)))
        m.run()
        t.join(30)
        q = m.query()
        assert q["status"] == "completed", q
        assert "error" not in res, res.get("error")
        assert res["rx"].verified
        c0 = counter(dst)
        deadline = time.monotonic() + 20
        while counter(dst) <= c0 + 1000:
            assert time.monotonic() < deadline, "guest does not run on the destination"
            time.sleep(0.01)
    finally:
        for mach in (src, dst):
            try:
                mach.close()
            except Exception:
                pass


def test_run_guest_tls_dir_errors_are_one_line(tmp_path, capsys, creds_dir):
    from hv.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--tls-dir", str(tmp_path / "none"), "--incoming", "defer"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert "--tls-dir" in err[0] and "make-creds" in err[0]
    d = tmp_path / "half"
    shutil.copytree(creds_dir, d)
    os.remove(d / "server-key.pem")
    with pytest.raises(SystemExit) as e:
        main(["--tls-dir", str(d), "--incoming", "defer"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "server-key.pem is missing" in err[0]


def test_make_creds_command(tmp_path, capsys):
    from hv.tls import main
    assert main(["make-creds", str(tmp_path / "c"), "--hostname", "dest.example.org",
                 "--client-name", "src1"]) == 0
    c = TlsCredentials(str(tmp_path / "c"))
    c.server_context()
    c.client_context("dest.example.org")
    from cryptography import x509
    with open(tmp_path / "c" / "server-cert.pem", "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "dest.example.org" in san.get_values_for_type(x509.DNSName)
    assert os.stat(tmp_path / "c" / "client-key.pem").st_mode & 0o777 == 0o600
