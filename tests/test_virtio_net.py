"""virtio-net through the fake Linux driver: a socketpair stands in for the tap
(datagrams carry one vnet-header frame each, as a tap fd does), and one test
uses a real tap in a network namespace of its own."""

import os
import shutil
import socket
import subprocess
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from netclient import InNs  # scripts/netclient.py: this thread in a namespace

from hv.devices import DeviceStateError
from hv.devices.virtio import mmio as r
from hv.devices.virtio import net as N
from hv.devices.virtio.driver_model import FakeIrqLine, MmioDriver
from hv.devices.virtio.mmio import VirtioMmioTransport
from hv.memory import GuestMemory

MAC = bytes.fromhex("525400abcdef")
MEM = 1 << 20
WANT = (1 << 32 | 1 << N.F_MAC | 1 << N.F_STATUS | 1 << N.F_CTRL_VQ
        | 1 << N.F_GUEST_ANNOUNCE)
BUF = 1530


class Rig:
    def __init__(self, fd=None, features=WANT):
        self.mem = GuestMemory(MEM)
        if fd is None:
            a, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            a.setblocking(False)
            fd = a.detach()
        self.dev = N.Net(self.mem, fd, MAC, tap="test")
        self.t = VirtioMmioTransport(self.dev, self.mem, FakeIrqLine())
        self.drv = MmioDriver(self.t, self.mem)
        assert self.drv.negotiate(features)
        self.rx, self.tx, self.ctrl = self.drv.setup_queues(3, 16)
        self.drv.driver_ok()

    def post_rx(self, n=1, size=BUF):
        bufs = []
        for _ in range(n):
            a = self.drv.heap.alloc(size)
            self.rx.add(inb=[(a, size)])
            bufs.append(a)
        self.rx.kick()
        return bufs

    def wait_used(self, q, n=1, timeout=5.0):
        got, deadline = [], time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            got += q.get_used()
            time.sleep(0.005)
        return got

    def close(self):
        self.dev.close()


@pytest.fixture
def rig():
    r_ = Rig()
    yield r_
    r_.close()


def frame(n=60, fill=0x5A):
    return b"\xff" * 6 + MAC + b"\x08\x00" + bytes([fill]) * (n - 14)


def test_config_mac_and_status_any_width(rig):
    assert bytes(rig.drv.config_read(i, 1) for i in range(6)) == MAC
    assert rig.drv.config_read(6, 2) == N.S_LINK_UP
    assert rig.drv.config_read(5, 2) == MAC[5] | N.S_LINK_UP << 8
    assert rig.drv.config_read(0, 4) == int.from_bytes(MAC[:4], "little")
    assert rig.drv.device_features() & WANT == WANT
    assert rig.drv.read(r.DEVICE_ID) == 1


def test_rx_frame_byte_exact_with_fixed_header(rig):
    (buf,) = rig.post_rx(1)
    f = frame(100)
    # tun may set DATA_VALID in byte 0; the guest must see flags 0 and num_buffers 1
    rig.peer.send(b"\x02\x01" + bytes(10) + f)
    used = rig.wait_used(rig.rx)
    assert used and used[0][1] == N.HDR_LEN + len(f)
    assert rig.mem.read(buf, N.HDR_LEN) == bytes(10) + b"\x01\x00"
    assert rig.mem.read(buf + N.HDR_LEN, len(f)) == f
    page = buf >> 12
    from hv.memory import unpack_bitmap
    assert unpack_bitmap(rig.mem.take_dirty_bitmap(), rig.mem.npages)[page]


def test_rx_waits_for_buffers(rig):
    rig.peer.send(bytes(12) + frame(60, 1))
    rig.peer.send(bytes(12) + frame(60, 2))
    time.sleep(0.2)
    assert rig.rx.get_used() == []
    a, b = rig.post_rx(2)
    assert len(rig.wait_used(rig.rx, 2)) == 2
    assert rig.mem.read(a + 12 + 14, 1) == b"\x01" and rig.mem.read(b + 12 + 14, 1) == b"\x02"


def test_tx_gathers_chain_verbatim(rig):
    hdr = bytes(12)
    f = frame(200, 7)
    parts = [hdr + f[:10], f[10:150], f[150:]]
    bufs = []
    for p in parts:
        a = rig.drv.heap.alloc(len(p))
        rig.mem.write(a, p)
        bufs.append((a, len(p)))
    rig.tx.add(out=bufs)
    rig.tx.kick()
    rig.peer.settimeout(2)
    assert rig.peer.recv(4096) == hdr + f
    assert rig.tx.get_used()


def send_tx(rg, data):
    a = rg.drv.heap.alloc(len(data))
    rg.mem.write(a, data)
    rg.tx.add(out=[(a, len(data))])
    rg.tx.kick()
    assert rg.wait_used(rg.tx)


def tx_header(flags=0, gso=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0):
    import struct
    return struct.pack("<BBHHHHH", flags, gso, hdr_len, gso_size, csum_start, csum_offset, 0)


def test_tx_offloads_pass_to_the_tap_only_when_negotiated():
    offloads = 1 << N.F_CSUM | 1 << N.F_HOST_TSO4
    rg = Rig(features=WANT | offloads)
    try:
        assert rg.drv.device_features() & offloads == offloads
        rg.peer.settimeout(2)
        # a 9000-byte TCP frame left to checksum and segment: to the tap as it is
        big = frame(9000, 9)
        tso = tx_header(N.HDR_F_NEEDS_CSUM, N.GSO_TCPV4, 54, 1448, 34, 16)
        send_tx(rg, tso + big)
        assert rg.peer.recv(65536) == tso + big
        # what the guest did not negotiate, and flags only rx may carry: dropped
        for bad in (tx_header(0, N.GSO_TCPV6), tx_header(0, N.GSO_TCPV4 | N.GSO_ECN),
                    tx_header(2), tx_header(0, 3)):
            before = rg.dev.counters["tx_dropped"]
            send_tx(rg, bad + frame(60))
            assert rg.dev.counters["tx_dropped"] == before + 1, bad
    finally:
        rg.close()
    rg = Rig()      # no offloads negotiated: a checksum request is dropped
    try:
        send_tx(rg, tx_header(N.HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16) + frame(60))
        assert rg.dev.counters["tx_dropped"] == 1 and rg.dev.counters["tx_frames"] == 0
    finally:
        rg.close()


def ctrl_cmd(rig, data):
    a = rig.drv.heap.alloc(len(data))
    ack = rig.drv.heap.alloc(1)
    rig.mem.write(a, data)
    rig.mem.write(ack, b"\x7f")
    rig.ctrl.add(out=[(a, len(data))], inb=[(ack, 1)])
    rig.ctrl.kick()
    return rig.mem.read(ack, 1)[0]


def test_announce_and_ack(rig):
    rig.dev.announce()
    assert rig.drv.config_read(6, 2) == N.S_LINK_UP | N.S_ANNOUNCE
    assert rig.drv.ack_interrupt() & r.INT_CONFIG
    assert ctrl_cmd(rig, bytes([3, 0])) == N.CTRL_OK
    assert rig.drv.config_read(6, 2) == N.S_LINK_UP
    assert ctrl_cmd(rig, bytes([0, 0, 1])) == N.CTRL_ERR  # rx-mode: not offered
    rig.peer.settimeout(2)
    rarps = [rig.peer.recv(4096) for _ in N.RARP_DELAYS]
    want = bytes(12) + N.rarp_frame(MAC)
    assert rarps == [want] * len(N.RARP_DELAYS)
    f = want[12:]
    assert len(f) == 60 and f[12:14] == b"\x80\x35" and f[20:22] == b"\x00\x03"
    assert f[22:28] == MAC and f[32:38] == MAC
    assert not rig.t.broken


def test_wrong_size_announce_ack_needs_reset(rig):
    ctrl_cmd(rig, bytes([3, 0, 0]))
    assert rig.t.broken


def test_quiesce_holds_rx_until_unquiesce(rig):
    (buf,) = rig.post_rx(1)
    rig.t.quiesce()
    rig.mem.freeze()
    rig.peer.send(bytes(12) + frame(80, 9))
    time.sleep(0.3)
    assert rig.rx.get_used() == [] and rig.mem.read(buf + 12, 6) == bytes(6)
    rig.mem.thaw()
    rig.t.unquiesce()
    assert rig.wait_used(rig.rx)
    assert rig.mem.read(buf + 12, 80) == frame(80, 9)


def test_save_restore_round_trip_and_bad_state(rig):
    rig.dev.announce()
    saved = rig.t.save()
    assert saved["device"] == {"mac": MAC, "status": 3, "features": rig.drv.features}
    other = Rig()
    try:
        other.t.restore(saved)
        assert other.dev.mac == MAC and other.dev.status == 3
        assert other.dev.save() == saved["device"]
        for bad in ({**saved["device"], "mac": b"\x01" * 6},
                    {**saved["device"], "status": 99},
                    {**saved["device"], "features": 1 << 60},
                    {"mac": MAC, "status": 1}):
            with pytest.raises(DeviceStateError):
                other.dev.restore(bad)
    finally:
        other.close()


def test_tap_gone_sets_link_down(rig):
    rig.peer.close()
    rig.tx.add(out=[(rig.drv.heap.alloc(72), 72)])
    rig.tx.kick()
    # a closed peer gives ECONNREFUSED on a socketpair, not EIO: emulate a dead tap
    rig.dev._tap_failed(OSError(5, "Input/output error"))
    assert rig.drv.config_read(6, 2) & N.S_LINK_UP == 0
    assert not rig.t.broken


# -- malformed chains --------------------------------------------------------------------
chain_st = st.lists(st.tuples(st.booleans(), st.integers(0, 2000)), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(queue=st.sampled_from(["rx", "tx", "ctrl"]), bufs=chain_st)
# a zero-length buffer before the command's two bytes ends nothing
@example(queue="ctrl", bufs=[(False, 0), (False, 2), (True, 1)])
def test_malformed_chains_need_reset_or_work(queue, bufs):
    rg = Rig()
    try:
        mem_bufs = [(rg.drv.heap.alloc(max(n, 1)), n, w) for w, n in bufs]
        out = [(a, n) for a, n, w in mem_bufs if not w]
        inb = [(a, n) for a, n, w in mem_bufs if w]
        q = getattr(rg, queue)
        good = {"rx": not out and len(inb) == 1 and inb[0][1] >= N.MIN_RX_BUF
                or not out and sum(n for _, n in inb) >= N.MIN_RX_BUF,
                "tx": not inb and N.HDR_LEN <= sum(n for _, n in out),
                "ctrl": len(inb) == 1 and inb[0][1] >= 1 and sum(n for _, n in out) >= 2
                and True}[queue]
        if queue == "ctrl" and good:
            for a, n in out:
                rg.mem.write(a, bytes([3]) * n)  # class 3, cmd 3: answered ERR
        q.add(out=out, inb=inb)
        q.kick()
        if queue == "rx":
            rg.peer.send(bytes(12) + frame(60))
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and not rg.t.broken and not rg.rx.get_used():
                time.sleep(0.005)
        assert rg.t.broken == (not good), (queue, bufs)
    finally:
        rg.close()


# -- a real tap ------------------------------------------------------------------------------
def _ns_ok():
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun") and shutil.which("ip")


@pytest.mark.skipif(not _ns_ok(), reason="needs root, /dev/net/tun and ip(8)")
def test_real_tap_frames_both_ways():
    ns = f"hv-net-unit-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap"],
                       check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "tap0", "up"], check=True)
        # Open the tap and a packet socket on its host side inside the namespace.
        with InNs(ns):
            tapfd = N.open_tap("tap0")
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
            s.bind(("tap0", 0))
        rg = Rig(fd=tapfd)
        try:
            s.settimeout(2)
            f = frame(90, 3)
            a = rg.drv.heap.alloc(12 + len(f))
            rg.mem.write(a, bytes(12) + f)
            rg.tx.add(out=[(a, 12 + len(f))])
            rg.tx.kick()
            while s.recv(4096) != f:
                pass  # the kernel's own IPv6 chatter may come first
            (buf,) = rg.post_rx(1)
            g = b"\x52\x54\x00\xab\xcd\xef" + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + \
                bytes(range(46))
            s.send(g)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                used = rg.wait_used(rg.rx, 1, 0.5)
                if used and rg.mem.read(buf + 12, len(g)) == g:
                    break
                if used:
                    (buf,) = rg.post_rx(1)
            assert rg.mem.read(buf + 12, len(g)) == g
            assert rg.mem.read(buf, 12) == bytes(10) + b"\x01\x00"
        finally:
            rg.close()
            s.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns])


# -- run-guest --net errors ----------------------------------------------------------------
def test_cli_net_argument_errors(capsys):
    from hv.cli import main
    for bad in ("tap=", "foo=1", "tap=a,mac=zz:00:00:00:00:00", "tap=a,mac=01:00:00:00:00:01",
                "mac=52:54:00:00:00:01", "tap=a,tap=b"):
        with pytest.raises(SystemExit) as e:
            main(["--net", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--net" in err, err


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")
def test_cli_missing_tap_is_one_line(capsys):
    from hv.cli import main
    assert main(["--mem", "64", "--kernel", "/nonexistent", "--net",
                 "tap=hvnosuch0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hvnosuch0" in err, err


def test_held_device_reads_nothing_until_released(rig):
    rig.dev.held = True  # what a Machine's device is until start()
    (buf,) = rig.post_rx(1)
    rig.peer.send(bytes(12) + frame(64, 4))
    time.sleep(0.3)
    assert rig.rx.get_used() == []
    rig.dev.release()
    assert rig.wait_used(rig.rx)
    assert rig.mem.read(buf + 12, 64) == frame(64, 4)
