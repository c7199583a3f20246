"""virtio-blk through the fake driver (no /dev/kvm): requests byte-exact against
the image file, errors answered with a status, malformed chains, quiesce, the
image lock, saved state."""

import os
import struct
import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv.devices import DeviceStateError
from hv.devices.virtio import blk as B
from hv.devices.virtio import mmio as r
from hv.devices.virtio.driver_model import FakeIrqLine, MmioDriver
from hv.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from hv.memory import GuestMemory

MEM = 1 << 20
SECTORS = 64
HDR, DATA, STATUS = 0x10000, 0x20000, 0x30000


def image(tmp_path, name="disk.img", sectors=SECTORS):
    path = tmp_path / name
    path.write_bytes(bytes((i * 7 + i // 512) & 0xFF for i in range(sectors * 512)))
    return str(path)


class Disk:
    """A Blk behind a transport, probed and locked as a machine would."""

    def __init__(self, path, readonly=False, memory=None, lock=True):
        self.mem = memory or GuestMemory(MEM)
        self.dev = B.Blk(path, readonly=readonly)
        self.irq = FakeIrqLine()
        self.t = r.VirtioMmioTransport(self.dev, self.mem, self.irq, "blk")
        self.drv = MmioDriver(self.t, self.mem, heap_base=0x80000)
        assert self.drv.negotiate(self.dev.features())
        (self.q,) = self.drv.setup_queues(1, 16)
        self.drv.driver_ok()
        if lock:
            self.dev.lock_storage()

    def request(self, rtype, sector=0, out=(), inb=(), kick=True):
        """Post header + buffers + status byte; returns the head."""
        self.mem.write(HDR, struct.pack("<IIQ", rtype, 0, sector))
        self.mem.write(STATUS, b"\xee")
        head = self.q.add(out=[(HDR, 16), *out], inb=[*inb, (STATUS, 1)])
        if kick:
            self.q.kick()
        return head

    def done(self):
        assert self.dev.wait_idle(10)
        return self.q.get_used()

    def status(self):
        return self.mem.read(STATUS, 1)[0]

    def close(self):
        self.dev.close()


@pytest.fixture
def disk(tmp_path):
    d = Disk(image(tmp_path))
    yield d
    d.close()


def test_config_and_features(disk):
    f = disk.drv.features
    for bit in (B.F_SEG_MAX, B.F_BLK_SIZE, B.F_FLUSH, 32):
        assert f >> bit & 1
    assert not f >> B.F_RO & 1
    assert disk.drv.config_read(0, 8) == SECTORS
    assert disk.drv.config_read(12) == B.SEG_MAX
    assert disk.drv.config_read(20) == 512
    assert disk.t.read(r.DEVICE_ID, 4) == struct.pack("<I", 2)


def test_read_write_flush_get_id(disk, tmp_path):
    path = disk.dev.path
    want = open(path, "rb").read()
    # IN of 3 sectors from sector 5 into two data buffers
    disk.request(B.T_IN, 5, inb=[(DATA, 1024), (DATA + 4096, 512)])
    (head, n), = disk.done()
    assert disk.status() == B.S_OK and n == 1536 + 1
    assert disk.mem.read(DATA, 1024) + disk.mem.read(DATA + 4096, 512) == want[2560:2560 + 1536]
    # the device's writes are VMM-dirty (migration sends them)
    dirty = disk.mem.take_dirty_bitmap()
    assert dirty[0] >> (DATA >> 12) & 1
    # OUT of 2 sectors at sector 60
    payload = os.urandom(1024)
    disk.mem.write(DATA, payload)
    disk.request(B.T_OUT, 60, out=[(DATA, 1024)])
    (_, n), = disk.done()
    assert disk.status() == B.S_OK and n == 1
    got = open(path, "rb").read()
    assert got[60 * 512:62 * 512] == payload and got[:60 * 512] == want[:60 * 512]
    disk.request(B.T_FLUSH)
    disk.done()
    assert disk.status() == B.S_OK and disk.dev.counters["flushes"] == 1
    disk.request(B.T_GET_ID, inb=[(DATA, 20)])
    (_, n), = disk.done()
    assert disk.status() == B.S_OK and n == 21
    assert disk.mem.read(DATA, 20) == b"disk.img".ljust(20, b"\0")
    # interrupts went to the driver
    assert disk.irq.level and disk.drv.ack_interrupt() & r.INT_VRING


def test_errors_are_statuses(disk, tmp_path):
    before = open(disk.dev.path, "rb").read()
    cases = [
        (B.T_IN, SECTORS - 1, (), [(DATA, 1024)], B.S_IOERR),      # past the end
        (B.T_IN, 2**64 - 1, (), [(DATA, 512)], B.S_IOERR),          # sector overflow
        (B.T_OUT, SECTORS, [(DATA, 512)], (), B.S_IOERR),           # past the end
        (B.T_IN, 0, (), [(DATA, 100)], B.S_IOERR),                  # not whole sectors
        (B.T_IN, 0, [(DATA, 512)], (), B.S_IOERR),                  # wrong direction
        (B.T_OUT, 0, (), [(DATA, 512)], B.S_IOERR),                 # wrong direction
        (99, 0, (), [(DATA, 512)], B.S_UNSUPP),                     # unknown type
    ]
    for rtype, sector, out, inb, want in cases:
        disk.request(rtype, sector, out=out, inb=inb)
        disk.done()
        assert disk.status() == want, (rtype, sector)
    assert not disk.t.broken
    assert open(disk.dev.path, "rb").read() == before
    # still serving
    disk.request(B.T_IN, 0, inb=[(DATA, 512)])
    disk.done()
    assert disk.status() == B.S_OK


def test_readonly_refuses_writes(tmp_path):
    path = image(tmp_path)
    before = open(path, "rb").read()
    d = Disk(path, readonly=True)
    try:
        assert d.drv.features >> B.F_RO & 1
        d.mem.write(DATA, b"x" * 512)
        d.request(B.T_OUT, 0, out=[(DATA, 512)])
        d.done()
        assert d.status() == B.S_IOERR
        d.request(B.T_IN, 1, inb=[(DATA, 512)])
        d.done()
        assert d.status() == B.S_OK and d.mem.read(DATA, 512) == before[512:1024]
        assert open(path, "rb").read() == before
    finally:
        d.close()


def test_truly_malformed_chain_needs_reset(disk):
    # a header of 8 bytes cannot be answered: NEEDS_RESET, the VMM runs on
    disk.q.add(out=[(HDR, 8)], inb=[(STATUS, 1)])
    disk.q.kick()
    disk.dev.wait_idle(10)
    assert disk.t.broken and "header" in disk.t.needs_reset_reason
    disk.t.save()


def test_no_io_before_lock(tmp_path):
    d = Disk(image(tmp_path), lock=False)
    try:
        d.request(B.T_IN, 0, inb=[(DATA, 512)])
        assert d.dev.wait_idle(0.5)   # nothing it may do yet
        assert d.status() == 0xEE and d.q.get_used() == []
        d.dev.lock_storage()
        d.done()
        assert d.status() == B.S_OK
    finally:
        d.close()


def test_ofd_lock_refuses_second_writer(tmp_path):
    path = image(tmp_path)
    a = B.Blk(path)
    a.lock_storage()
    b = B.Blk(path)
    ro = B.Blk(path, readonly=True)
    try:
        with pytest.raises(B.BlkError, match="locked by another VMM"):
            b.lock_storage()
        with pytest.raises(B.BlkError, match="locked by another VMM"):
            ro.lock_storage()
        # another process too (OFD locks are per open file, across processes)
        code = ("import fcntl,struct,os,sys; fd=os.open(sys.argv[1],os.O_RDWR); "
                "fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack('hhxxxxqqixxxx', "
                "fcntl.F_WRLCK, 0, 0, 0, 0))")
        p = subprocess.run([sys.executable, "-c", code, path], capture_output=True)
        assert p.returncode != 0
        a.unlock_storage()
        b.lock_storage()          # the hand-over a migration does
        assert b.locked
    finally:
        for d in (a, b, ro):
            d.close()
    # two readers share
    x, y = B.Blk(path, readonly=True), B.Blk(path, readonly=True)
    x.lock_storage()
    y.lock_storage()
    x.close()
    y.close()


def test_bad_images(tmp_path):
    with pytest.raises(B.BlkError, match="No such file"):
        B.Blk(str(tmp_path / "missing.img"))
    (tmp_path / "tiny").write_bytes(b"x" * 100)
    with pytest.raises(B.BlkError, match="less than one"):
        B.Blk(str(tmp_path / "tiny"))
    with pytest.raises(B.BlkError, match="Is a directory|not a regular file"):
        B.Blk(str(tmp_path))
    for bad in ("path=", "readonly=on", "path=x,readonly=maybe", "path=x,speed=9",
                "path=x,path=y", "path=x,serial=" + "s" * 21):
        with pytest.raises(B.BlkError):
            B.disk_options(bad)
    assert B.disk_options("path=/x,readonly=on") == {"path": "/x", "readonly": True,
                                                     "serial": None}


def test_quiesce_leaves_nothing_in_flight(tmp_path):
    d = Disk(image(tmp_path))
    gate = threading.Event()
    entered = threading.Event()
    real = os.preadv

    def slow_preadv(fd, bufs, off):
        entered.set()
        gate.wait(5)
        return real(fd, bufs, off)

    try:
        B.os.preadv = slow_preadv
        d.request(B.T_IN, 0, inb=[(DATA, 512)])
        assert entered.wait(5)
        t = threading.Thread(target=d.t.quiesce)
        t.start()
        t.join(0.3)
        assert t.is_alive()          # waits for the request in flight
        gate.set()
        t.join(5)
        assert not t.is_alive() and d.dev._inflight == 0
        assert d.status() == B.S_OK and len(d.q.get_used()) == 1
        # paused: a new request is not taken until unquiesce
        d.request(B.T_IN, 1, inb=[(DATA, 512)])
        assert d.dev.wait_idle(0.3) and d.status() == 0xEE
        d.t.unquiesce()
        d.done()
        assert d.status() == B.S_OK
    finally:
        B.os.preadv = real
        gate.set()
        d.close()


def test_save_restore(tmp_path):
    path = image(tmp_path)
    a = Disk(path)
    a.request(B.T_IN, 0, inb=[(DATA, 512)])
    a.done()
    a.t.quiesce()
    state = a.t.save()
    a.dev.unlock_storage()
    a.close()
    b = Disk(path, lock=False)
    try:
        b.t.restore(state)
        assert b.q.size == 16 and b.t.queues[0].last_avail_idx == 1
        for bad in ({**state["device"], "size": 512}, {**state["device"], "path": "/other"},
                    {**state["device"], "serial": b"x"}, {**state["device"], "extra": 1},
                    {"path": path}, "junk"):
            with pytest.raises(DeviceStateError):
                b.dev.restore(bad)
        with pytest.raises(DeviceStateError, match="size 512"):
            b.dev.restore({**state["device"], "size": 512})
    finally:
        b.close()
    # a destination disk of another size is refused with the reason
    other = image(tmp_path, "other.img", SECTORS * 2)
    c = B.Blk(other)
    with pytest.raises(DeviceStateError, match="same image"):
        c.restore({**state["device"], "path": c.path})
    c.close()


addr_st = st.one_of(st.integers(0, MEM + 4096), st.sampled_from([HDR, DATA, STATUS, MEM - 1,
                                                                  MEM - 16]))
len_st = st.one_of(st.integers(0, 2048), st.sampled_from([0, 1, 16, 512, 1024, 2**32 - 1]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(descs=st.lists(st.tuples(addr_st, len_st, st.integers(0, 7), st.integers(0, 17)),
                      min_size=1, max_size=5),
       header=st.tuples(st.sampled_from([0, 1, 4, 8, 2, 99]), st.integers(0, 2**32 - 1),
                        st.one_of(st.integers(0, SECTORS + 2), st.integers(0, 2**64 - 1))),
       readonly=st.booleans())
def test_malformed_chains_never_crash(tmp_path_factory, descs, header, readonly):
    tmp = tmp_path_factory.mktemp("fuzz")
    path = image(tmp, sectors=8)
    before = open(path, "rb").read()
    d = Disk(path, readonly=readonly)
    try:
        ram = d.mem.array()
        d.mem.write(HDR, struct.pack("<IIQ", *header))
        table = []
        for a, n, f, nx in descs:
            table.append((a, n, f & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE | 4), nx))
        for i, (a, n, f, nx) in enumerate(table):
            d.mem.write(d.q.desc + 16 * i, struct.pack("<QIHH", a, n, f, nx))
        snapshot = bytes(ram)
        d.q.publish(0)
        d.q.kick()
        assert d.dev.wait_idle(10)
        # the device wrote only into device-writable buffers and the used ring
        allowed = bytearray(MEM)
        for a, n, f, _ in table:
            if f & VIRTQ_DESC_F_WRITE and a + n <= MEM:
                allowed[a:a + n] = b"\1" * n
        allowed[d.q.used:d.q.used + 6 + 8 * d.q.size] = b"\1" * (6 + 8 * d.q.size)
        allowed[d.q.avail:d.q.avail + 6 + 2 * d.q.size] = b"\1" * (6 + 2 * d.q.size)
        now = bytes(ram)
        for i in (k for k in range(0, MEM, 4096) if now[k:k + 4096] != snapshot[k:k + 4096]):
            for j in range(i, i + 4096):
                if now[j] != snapshot[j]:
                    assert allowed[j], f"device wrote outside its buffers at {j:#x}"
        if d.t.broken:
            assert not d.t.needs_reset_reason.startswith("internal error")
        if readonly:
            assert open(path, "rb").read() == before
        d.t.save()
    finally:
        d.close()


# -- the image tool and run-guest --disk -------------------------------------------

def test_images_disk(tmp_path, capsys):
    from hv import images
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_text("hello from the host\n")
    out = tmp_path / "d.img"
    assert images.main(["disk", "--size", "8M", "--out", str(out), "--from", str(src)]) == 0
    assert out.stat().st_size == 8 << 20
    p = subprocess.run(["/usr/sbin/e2fsck", "-fn", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run(["/usr/sbin/debugfs", "-R", "cat /hello.txt", str(out)],
                       capture_output=True, text=True)
    assert p.stdout == "hello from the host\n"
    capsys.readouterr()
    for argv, msg in ((["--size", "8M", "--out", str(out)], "already exists"),
                      (["--size", "12Q", "--out", str(tmp_path / "x")], "not a size"),
                      (["--size", "1000", "--out", str(tmp_path / "x")], "512-byte"),
                      (["--size", "2T", "--out", str(tmp_path / "x")], "out of range"),
                      (["--size", "8M", "--out", str(tmp_path / "x"), "--from",
                        str(tmp_path / "nope")], "not a directory"),
                      (["--size", "8M"], "required")):
        assert images.main(["disk", *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_run_guest_disk_argument_errors(tmp_path, capsys):
    from hv import cli
    img = image(tmp_path)
    a = cli.build_parser().parse_args(["--disk", f"path={img},readonly=on", "--disk", img])
    assert a.disks == [{"path": img, "readonly": True, "serial": None},
                       {"path": img, "readonly": False, "serial": None}]
    for arg, msg in ((f"path={tmp_path}/missing.img", "does not exist"),
                     (f"path={img},readonly=perhaps", "not on or off"),
                     (f"path={img},cache=none", "unknown option")):
        with pytest.raises(SystemExit) as e:
            cli.build_parser().parse_args(["--disk", arg])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1


@pytest.mark.kvm
def test_run_guest_refuses_a_locked_image(tmp_path):
    from tests.conftest import GUESTS
    img = image(tmp_path)
    holder = B.Blk(img)
    holder.lock_storage()
    try:
        p = subprocess.run([sys.executable, "-m", "hv", "--kernel",
                            os.path.join(GUESTS, "pvh.elf"), "--initrd", "", "--mem", "64",
                            "--disk", f"path={img}"], capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
    finally:
        holder.close()
    assert p.returncode == 2, p.stderr
    assert "locked by another VMM" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.kvm
def test_machine_takes_the_lock_to_run(tmp_path):
    """start() locks the disks; a paused machine that gave its locks up
    (a migration source) runs again only once it has them back."""
    from hv.vmm import Machine, MachineConfig
    from tests.conftest import GUESTS
    img = image(tmp_path)
    m = Machine(MachineConfig(mem_mib=64, kernel=os.path.join(GUESTS, "pvh-idle.elf"),
                              initrd="", disks=[f"path={img}"]))
    other = B.Blk(img)
    try:
        assert not m.disks[0].locked
        m.boot()
        m.start()
        assert m.disks[0].locked and m.status == "running"
        m.pause("migration")
        m.unlock_storage()
        other.lock_storage()                 # the "destination" has it now
        with pytest.raises(B.BlkError, match="locked by another VMM"):
            m.resume("migration")
        assert m.status == "paused" and m.pause_holders == {"migration"}
        other.unlock_storage()
        m.resume("migration")
        assert m.status == "running" and m.disks[0].locked
    finally:
        other.close()
        m.stop()
        m.close()
