"""A 16550A UART (the PC's COM1 at port 0x3f8, IRQ 4).

Transmit is instantaneous: every byte written to THR goes to the listeners
(the console) at once, so THR and the shift register are always empty and a
THRE interrupt follows every write when enabled. Receive has a FIFO fed by
enqueue() (the terminal); RDA is raised while it holds data. Loopback (MCR
bit 4) turns transmitted bytes into received ones and the modem control
outputs into the modem status inputs, as Linux's autoconfig probe expects.

The interrupt line follows "an interrupt is pending" (IIR bit 0 clear), as
QEMU's serial does.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from . import Device, DeviceStateError, IrqLine, checked_state

COM1_BASE = 0x3f8
COM1_IRQ = 4
NUM_REGS = 8

# register offsets
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01
IER_THRE = 0x02
IER_RLS = 0x04
IER_MSI = 0x08
IER_MASK = 0x0f

IIR_NONE = 0x01
IIR_MSI = 0x00
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_RLS = 0x06
IIR_FIFO_ENABLED = 0xc0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1f

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DEFAULT = MSR_DCD | MSR_DSR | MSR_CTS

RX_CAPACITY = 4096          # bytes buffered from the terminal
DEFAULT_DIVISOR = 12        # 9600 baud


class NullIrq(IrqLine):
    gsi = -1

    def set_level(self, level: bool) -> None:
        pass


class Serial(Device):
    """16550A register model."""

    def __init__(self, irq: IrqLine | None = None, name: str = "serial0"):
        self.name = name
        self.irq = irq or NullIrq()
        self.listeners: list[Callable[[bytes], None]] = []
        self.lock = threading.RLock()
        self._line = False
        #: paused machine: typed bytes wait in _held (the terminal's side, not
        #: device state) and reach the FIFO at unquiesce()
        self.quiesced = False
        self._held = bytearray()
        self.reset()

    def reset(self) -> None:
        self.ier = 0
        self.lcr = 0x03
        self.mcr = MCR_OUT2
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = MSR_DEFAULT
        self.scr = 0
        self.fcr = 0
        self.divisor = DEFAULT_DIVISOR
        self.thre_pending = False
        self.rx: deque[int] = deque()

    # -- the terminal side ---------------------------------------------------------
    def enqueue(self, data: bytes) -> int:
        """Bytes typed on the terminal; returns how many were accepted."""
        with self.lock:
            if self.mcr & MCR_LOOP:
                return 0
            if self.quiesced:
                taken = data[:max(RX_CAPACITY - len(self.rx) - len(self._held), 0)]
                self._held += taken
                return len(taken)
            room = RX_CAPACITY - len(self.rx)
            taken = data[:max(room, 0)]
            self.rx.extend(taken)
            if len(taken) < len(data):
                self.lsr |= LSR_OE
            self._update_irq()
            return len(taken)

    def rx_room(self) -> int:
        """How many bytes enqueue() would take now without an overrun."""
        with self.lock:
            if self.mcr & MCR_LOOP:
                return 0
            return max(RX_CAPACITY - len(self.rx) - len(self._held), 0)

    def quiesce(self) -> None:
        with self.lock:
            self.quiesced = True

    def unquiesce(self) -> None:
        with self.lock:
            self.quiesced = False
            held, self._held = bytes(self._held), bytearray()
            if held:
                self.enqueue(held)

    def _emit(self, byte: int) -> None:
        data = bytes([byte])
        for listener in list(self.listeners):
            listener(data)

    # -- interrupts -------------------------------------------------------------------
    def _iir(self) -> int:
        if self.ier & IER_RLS and self.lsr & LSR_OE:
            iid = IIR_RLS
        elif self.ier & IER_RDA and self.rx:
            iid = IIR_RDA
        elif self.ier & IER_THRE and self.thre_pending:
            iid = IIR_THRE
        elif self.ier & IER_MSI and self.msr & 0x0f:
            iid = IIR_MSI
        else:
            iid = IIR_NONE
        return iid | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0)

    def _update_irq(self) -> None:
        level = not (self._iir() & IIR_NONE)
        if level != self._line:
            self._line = level
            self.irq.set_level(level)

    # -- registers -------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            value = self._read_reg(offset)
            self._update_irq()
        return bytes([value]) + b"\0" * (size - 1)

    def _read_reg(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR:
            if dlab:
                return self.divisor & 0xff
            if self.rx:
                return self.rx.popleft()
            return 0
        if offset == IER:
            return (self.divisor >> 8) & 0xff if dlab else self.ier
        if offset == IIR:
            iir = self._iir()
            if iir & 0x0f == IIR_THRE:
                self.thre_pending = False
            return iir
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            v = self.lsr | (LSR_DR if self.rx else 0)
            self.lsr &= ~LSR_OE
            return v
        if offset == MSR:
            if self.mcr & MCR_LOOP:
                m = self.mcr
                v = ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                     | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
                return v | (self.msr & 0x0f)
            v = self.msr
            self.msr &= 0xf0
            return v
        if offset == SCR:
            return self.scr
        return 0xff

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        with self.lock:
            self._write_reg(offset, data[0])
            self._update_irq()

    def _write_reg(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self.divisor = (self.divisor & 0xff00) | value
                return
            if self.mcr & MCR_LOOP:
                if len(self.rx) < RX_CAPACITY:
                    self.rx.append(value)
                else:
                    self.lsr |= LSR_OE
            else:
                self._emit(value)
            self.thre_pending = True
        elif offset == IER:
            if dlab:
                self.divisor = (self.divisor & 0xff) | (value << 8)
                return
            enabling_thre = (value & IER_THRE) and not (self.ier & IER_THRE)
            self.ier = value & IER_MASK
            if enabling_thre:
                self.thre_pending = True     # THR is empty
        elif offset == FCR:
            if value & FCR_CLEAR_RX:
                self.rx.clear()
            self.fcr = value & 0xc9
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            old = self.mcr
            self.mcr = value & MCR_MASK
            if (old ^ self.mcr) & MCR_LOOP:
                self.msr &= 0xf0
        elif offset == SCR:
            self.scr = value

    # -- state -------------------------------------------------------------------------
    def save(self) -> dict:
        with self.lock:
            return {"ier": self.ier, "lcr": self.lcr, "mcr": self.mcr, "lsr": self.lsr,
                    "msr": self.msr, "scr": self.scr, "fcr": self.fcr,
                    "divisor": self.divisor, "thre_pending": int(self.thre_pending),
                    "rx": bytes(self.rx)}

    def restore(self, state: dict) -> None:
        byte = (0, 0xFF)
        state = checked_state(self.name, state, {
            "ier": byte, "lcr": byte, "mcr": byte, "lsr": byte, "msr": byte, "scr": byte,
            "fcr": byte, "divisor": (0, 0xFFFF), "thre_pending": (0, 1), "rx": bytes})
        if len(state["rx"]) > RX_CAPACITY:
            raise DeviceStateError(f"{self.name}: {len(state['rx'])} bytes waiting, more "
                                   f"than the {RX_CAPACITY} the FIFO holds")
        with self.lock:
            self.ier, self.lcr, self.mcr = state["ier"], state["lcr"], state["mcr"]
            self.lsr, self.msr, self.scr = state["lsr"], state["msr"], state["scr"]
            self.fcr, self.divisor = state["fcr"], state["divisor"]
            self.thre_pending = bool(state["thre_pending"])
            self.rx = deque(state["rx"])
            self._line = False
            self._update_irq()
