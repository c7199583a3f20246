"""The 16550A register model."""

from hv.devices import IrqLine
from hv.devices import uart as U


class FakeIrq(IrqLine):
    gsi = 4

    def __init__(self):
        self.level = False
        self.edges = 0

    def set_level(self, level):
        if level and not self.level:
            self.edges += 1
        self.level = level


def make():
    irq = FakeIrq()
    s = U.Serial(irq)
    out = bytearray()
    s.listeners.append(out.extend)
    return s, irq, out


def rd(s, reg):
    return s.read(reg, 1)[0]


def test_transmit_goes_to_listeners():
    s, irq, out = make()
    for b in b"hello":
        s.write(U.THR, bytes([b]))
    assert out == b"hello"
    assert rd(s, U.LSR) & (U.LSR_THRE | U.LSR_TEMT) == U.LSR_THRE | U.LSR_TEMT
    assert not irq.level


def test_thre_interrupt():
    s, irq, out = make()
    s.write(U.IER, bytes([U.IER_THRE]))
    assert irq.level                                  # THR empty at once
    assert rd(s, U.IIR) & 0x0f == U.IIR_THRE          # reading IIR clears it
    assert not irq.level
    assert rd(s, U.IIR) & 0x01
    s.write(U.THR, b"x")
    assert irq.level and irq.edges == 2
    s.write(U.IER, b"\0")
    assert not irq.level


def test_receive_fifo_and_rda():
    s, irq, out = make()
    s.write(U.IER, bytes([U.IER_RDA]))
    assert not irq.level
    assert s.enqueue(b"ab") == 2
    assert irq.level
    assert rd(s, U.IIR) & 0x0f == U.IIR_RDA
    assert rd(s, U.LSR) & U.LSR_DR
    assert rd(s, U.RBR) == ord("a")
    assert irq.level
    assert rd(s, U.RBR) == ord("b")
    assert not irq.level
    assert not rd(s, U.LSR) & U.LSR_DR
    assert rd(s, U.RBR) == 0


def test_fifo_control_and_overrun():
    s, irq, out = make()
    s.write(U.FCR, bytes([U.FCR_ENABLE]))
    assert rd(s, U.IIR) & 0xc0 == 0xc0
    s.enqueue(b"123")
    s.write(U.FCR, bytes([U.FCR_ENABLE | U.FCR_CLEAR_RX]))
    assert not rd(s, U.LSR) & U.LSR_DR
    n = s.enqueue(bytes(U.RX_CAPACITY + 10))
    assert n == U.RX_CAPACITY
    assert rd(s, U.LSR) & U.LSR_OE
    assert not rd(s, U.LSR) & U.LSR_OE               # cleared by the read


def test_divisor_latch():
    s, irq, out = make()
    s.write(U.LCR, bytes([U.LCR_DLAB | 0x03]))
    s.write(U.DLL, b"\x01")
    s.write(U.DLM, b"\x02")
    assert rd(s, U.DLL) == 1 and rd(s, U.DLM) == 2
    assert s.divisor == 0x201
    s.write(U.LCR, b"\x03")
    s.write(U.THR, b"z")                              # not a divisor write any more
    assert out == b"z" and s.divisor == 0x201
    assert rd(s, U.LCR) == 3


def test_loopback():
    s, irq, out = make()
    s.write(U.MCR, bytes([U.MCR_LOOP | U.MCR_RTS | U.MCR_OUT2]))
    msr = rd(s, U.MSR)
    assert msr & U.MSR_CTS and msr & U.MSR_DCD and not msr & U.MSR_DSR
    s.write(U.THR, b"q")
    assert out == b""
    assert rd(s, U.LSR) & U.LSR_DR and rd(s, U.RBR) == ord("q")
    assert s.enqueue(b"ignored") == 0                 # the line is looped back
    s.write(U.MCR, bytes([U.MCR_OUT2]))
    assert rd(s, U.MSR) == U.MSR_DEFAULT


def test_scratch_and_ier_mask():
    s, irq, out = make()
    s.write(U.SCR, b"\x5a")
    assert rd(s, U.SCR) == 0x5a
    s.write(U.IER, b"\xff")
    assert rd(s, U.IER) == 0x0f


def test_save_restore():
    s, irq, out = make()
    s.write(U.IER, bytes([U.IER_RDA]))
    s.write(U.LCR, b"\x03")
    s.write(U.SCR, b"\x11")
    s.enqueue(b"xyz")
    state = s.save()
    assert isinstance(state["rx"], bytes)
    t, irq2, _ = make()
    t.restore(state)
    assert irq2.level
    assert t.save() == state
    assert bytes(rd(t, U.RBR) for _ in range(3)) == b"xyz"


# -- the other legacy ports (hv.devices.legacy) ------------------------------------

from hv.devices import legacy as L  # noqa: E402


def test_poweroff_port():
    seen = []
    d = L.PowerOff(seen.append)
    d.write(0, b"\0")
    assert seen == [0]
    assert d.read(0, 1) == b"\0"


def test_i8042_reset_and_probe():
    resets = []
    k = L.I8042(lambda: resets.append(1))
    assert k.read(L.I8042_STATUS, 1)[0] & 0x02 == 0          # input buffer empty
    k.write(L.I8042_STATUS, bytes([L.CMD_SELF_TEST]))
    assert k.read(L.I8042_STATUS, 1)[0] & L.STATUS_OBF
    assert k.read(L.I8042_DATA, 1) == b"\x55"
    assert not k.read(L.I8042_STATUS, 1)[0] & L.STATUS_OBF
    k.write(L.I8042_STATUS, bytes([L.CMD_WRITE_CTR]))
    k.write(L.I8042_DATA, b"\x47")
    k.write(L.I8042_STATUS, bytes([L.CMD_READ_CTR]))
    assert k.read(L.I8042_DATA, 1) == b"\x47"
    state = k.save()
    k2 = L.I8042(lambda: None)
    k2.restore(state)
    assert k2.save() == state
    assert not resets
    k.write(L.I8042_STATUS, bytes([L.CMD_RESET_CPU]))
    assert resets == [1]
    k.write(L.I8042_STATUS, bytes([L.CMD_WRITE_OUTPORT]))
    k.write(L.I8042_DATA, b"\xfe")                            # bit 0 low: reset
    assert resets == [1, 1]


def test_post_port():
    d = L.PostCode()
    d.write(0, b"\x42")
    assert d.last == 0x42 and d.read(0, 1) == b"\0"
