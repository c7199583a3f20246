"""Legacy PC ports a Linux guest touches, besides the UART.

    PowerOff     port 0xf4: any write powers the guest off (the guest kernel
                 writes 0 there with hv_poweroff=0xf4, like QEMU's
                 isa-debug-exit)
    I8042        ports 0x60/0x64: a keyboard controller without devices;
                 command 0xfe (pulse the reset line) reboots the guest
                 (Linux reboot=k)
    PostCode     port 0x80: POST codes and I/O delays, ignored
The PIT (0x40-0x43) and the speaker port (0x61) are emulated in the kernel
(KVM_CREATE_PIT2), the PICs and the IOAPIC too (KVM_CREATE_IRQCHIP).
"""

from __future__ import annotations

from typing import Callable

from . import Device, checked_state

POWEROFF_PORT = 0xf4
I8042_BASE = 0x60
I8042_LEN = 5               # 0x60 data .. 0x64 status/command
POST_PORT = 0x80

I8042_DATA = 0
I8042_STATUS = 4

STATUS_OBF = 0x01           # output buffer full: data for the guest at 0x60
STATUS_SYS = 0x04           # system flag: POST passed
STATUS_CMD = 0x08           # last write was a command

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_DISABLE_AUX = 0xa7
CMD_ENABLE_AUX = 0xa8
CMD_AUX_TEST = 0xa9
CMD_SELF_TEST = 0xaa
CMD_KBD_TEST = 0xab
CMD_DISABLE_KBD = 0xad
CMD_ENABLE_KBD = 0xae
CMD_READ_OUTPORT = 0xd0
CMD_WRITE_OUTPORT = 0xd1
CMD_RESET_CPU = 0xfe


class PowerOff(Device):
    """Port 0xf4: a write powers the guest off."""

    name = "poweroff"

    def __init__(self, on_poweroff: Callable[[int], None]):
        self.on_poweroff = on_poweroff

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        self.on_poweroff(data[0] if data else 0)


class I8042(Device):
    """A keyboard controller with no keyboard: enough for Linux's probe and
    for the reset line (command 0xfe to port 0x64)."""

    name = "i8042"

    def __init__(self, on_reset: Callable[[], None]):
        self.on_reset = on_reset
        self.ctr = 0x61          # IRQ1 enabled, system flag, translation
        self.status = STATUS_SYS
        self.outbuf: int | None = None
        self.pending: int | None = None    # command waiting for its data byte

    def _put(self, value: int) -> None:
        self.outbuf = value
        self.status |= STATUS_OBF

    def read(self, offset: int, size: int) -> bytes:
        if offset == I8042_STATUS:
            value = self.status
        elif offset == I8042_DATA:
            value = self.outbuf if self.outbuf is not None else 0
            self.outbuf = None
            self.status &= ~STATUS_OBF
        else:
            value = 0xff
        return bytes([value]) + b"\0" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        value = data[0]
        if offset == I8042_STATUS:
            self.status |= STATUS_CMD
            self._command(value)
        elif offset == I8042_DATA:
            self.status &= ~STATUS_CMD
            cmd, self.pending = self.pending, None
            if cmd == CMD_WRITE_CTR:
                self.ctr = value
            elif cmd == CMD_WRITE_OUTPORT:
                if not value & 1:        # bit 0 low: reset the CPU
                    self.on_reset()
            # data for the (absent) keyboard: answer "no device"

    def _command(self, cmd: int) -> None:
        if cmd == CMD_READ_CTR:
            self._put(self.ctr)
        elif cmd in (CMD_WRITE_CTR, CMD_WRITE_OUTPORT):
            self.pending = cmd
        elif cmd == CMD_SELF_TEST:
            self._put(0x55)
        elif cmd in (CMD_KBD_TEST, CMD_AUX_TEST):
            self._put(0x00)
        elif cmd == CMD_READ_OUTPORT:
            self._put(0x01)
        elif cmd == CMD_RESET_CPU:
            self.on_reset()

    def save(self) -> dict:
        return {"ctr": self.ctr, "status": self.status,
                "outbuf": -1 if self.outbuf is None else self.outbuf,
                "pending": -1 if self.pending is None else self.pending}

    def restore(self, state: dict) -> None:
        checked_state(self.name, state, {"ctr": (0, 0xFF), "status": (0, 0xFF),
                                         "outbuf": (-1, 0xFF), "pending": (-1, 0xFF)})
        self.ctr = state["ctr"]
        self.status = state["status"]
        self.outbuf = None if state["outbuf"] < 0 else state["outbuf"]
        self.pending = None if state["pending"] < 0 else state["pending"]


class PostCode(Device):
    """Port 0x80: written for POST codes and I/O delays; reads as 0."""

    name = "post"

    def __init__(self):
        self.last = 0

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self.last = data[0]
