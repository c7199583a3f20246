"""An address bus: non-overlapping windows, each owned by one device.

The vCPU loop hands every port I/O or MMIO exit to the matching bus. Accesses
that hit no device read as all-ones and are otherwise ignored, as on a PC;
they are counted so that --verbose can show them.
"""

from __future__ import annotations

import bisect

from . import Device


class Bus:
    def __init__(self, name: str):
        self.name = name
        self._starts: list[int] = []
        self._windows: list[tuple[int, int, Device]] = []
        self.unhandled = 0

    def register(self, base: int, length: int, device: Device) -> None:
        if length <= 0:
            raise ValueError(f"{self.name}: empty window for {device.name}")
        i = bisect.bisect_right(self._starts, base)
        if i > 0:
            pbase, plen, pdev = self._windows[i - 1]
            if pbase + plen > base:
                raise ValueError(f"{self.name}: {device.name} at {base:#x} overlaps {pdev.name}")
        if i < len(self._windows) and base + length > self._windows[i][0]:
            raise ValueError(f"{self.name}: {device.name} at {base:#x} overlaps "
                             f"{self._windows[i][2].name}")
        self._starts.insert(i, base)
        self._windows.insert(i, (base, length, device))

    def find(self, addr: int) -> tuple[Device, int] | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            base, length, device = self._windows[i]
            if addr < base + length:
                return device, addr - base
        return None

    def read(self, addr: int, size: int) -> bytes:
        hit = self.find(addr)
        if hit is None:
            self.unhandled += 1
            return b"\xff" * size
        device, offset = hit
        return device.read(offset, size)

    def write(self, addr: int, data: bytes) -> None:
        hit = self.find(addr)
        if hit is None:
            self.unhandled += 1
            return
        device, offset = hit
        device.write(offset, data)

    def devices(self) -> list[tuple[int, int, Device]]:
        return list(self._windows)
