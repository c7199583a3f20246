"""The split virtqueue (virtio 1.x, 2.7) read from and written to GuestMemory.

Everything the driver put in guest memory is untrusted: every ring, table and
buffer address is checked against guest RAM before it is touched, and a
malformed chain (a loop, more descriptors than the queue size, a buffer
outside guest RAM, a device-readable descriptor after a device-writable one,
a nested or misused indirect table) raises VirtioError with the reason. The
transport then sets NEEDS_RESET and the VMM keeps running.

Every write the device makes (used ring, avail_event, device-writable
buffers) goes through GuestMemory.write() so that it lands in the VMM's own
dirty bitmap, which migration merges with KVM's.

Layout (little-endian):
    desc[i]:  u64 addr, u32 len, u16 flags, u16 next            (16 bytes)
    avail:    u16 flags, u16 idx, u16 ring[size], u16 used_event
    used:     u16 flags, u16 idx, {u32 id, u32 len} ring[size], u16 avail_event
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ...memory import GuestMemory

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# Transport-independent feature bits the queue cares about.
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768


class VirtioError(Exception):
    """The driver broke the virtio protocol; the reason says how."""


@dataclass
class Descriptor:
    addr: int
    length: int
    write: bool


@dataclass
class DescChain:
    """One available buffer: its head index and its descriptors in order,
    device-readable ones first, then device-writable ones."""

    head: int
    readable: list[Descriptor] = field(default_factory=list)
    writable: list[Descriptor] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(d.length for d in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(d.length for d in self.writable)

    def read_all(self, memory: GuestMemory, limit: int | None = None) -> bytes:
        """The device-readable bytes of the chain, concatenated (at most limit)."""
        out = bytearray()
        for d in self.readable:
            if limit is not None and len(out) >= limit:
                break
            n = d.length if limit is None else min(d.length, limit - len(out))
            if n:       # a zero-length buffer holds nothing, and ends nothing
                out += memory.read(d.addr, n)
        return bytes(out)

    def write_all(self, memory: GuestMemory, data: bytes) -> int:
        """Copy data into the device-writable buffers; returns bytes written."""
        done = 0
        for d in self.writable:
            if done >= len(data):
                break
            n = min(d.length, len(data) - done)
            memory.write(d.addr, data[done:done + n])
            done += n
        return done


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


class Virtqueue:
    """One split virtqueue as the transport configured it."""

    def __init__(self, memory: GuestMemory, index: int, max_size: int):
        self.memory = memory
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc = 0
        self.avail = 0
        self.used = 0
        self.last_avail_idx = 0     # next avail ring entry the device will take
        self.used_idx = 0           # the device's copy of used->idx
        self.signalled_used = 0     # used_idx at the last interrupt (event idx)
        self.signalled_valid = False
        self.event_idx = False
        self.indirect = False

    # -- configuration ---------------------------------------------------
    def set_features(self, features: int) -> None:
        self.event_idx = bool(features >> VIRTIO_F_EVENT_IDX & 1)
        self.indirect = bool(features >> VIRTIO_F_INDIRECT_DESC & 1)

    def validate(self) -> None:
        """Check the rings the driver configured; raise VirtioError if unusable."""
        if not _is_pow2(self.size) or self.size > self.max_size:
            raise VirtioError(f"queue {self.index}: size {self.size} is not a power of 2 "
                              f"<= {self.max_size}")
        for name, addr, align, length in (
                ("descriptor table", self.desc, 16, DESC_SIZE * self.size),
                ("available ring", self.avail, 2, 6 + 2 * self.size),
                ("used ring", self.used, 4, 6 + 8 * self.size)):
            if addr % align:
                raise VirtioError(f"queue {self.index}: {name} at {addr:#x} is not "
                                  f"{align}-byte aligned")
            if not self.memory.contains(addr, length):
                raise VirtioError(f"queue {self.index}: {name} [{addr:#x}, "
                                  f"{addr + length:#x}) is outside guest RAM")

    # -- ring access -------------------------------------------------------
    def avail_idx(self) -> int:
        return self.memory.read_u16(self.avail + 2)

    def avail_flags(self) -> int:
        return self.memory.read_u16(self.avail)

    def used_event(self) -> int:
        return self.memory.read_u16(self.avail + 4 + 2 * self.size)

    def pending(self) -> int:
        """How many chains the driver made available that the device has not taken."""
        n = (self.avail_idx() - self.last_avail_idx) & 0xFFFF
        if n > self.size:
            raise VirtioError(f"queue {self.index}: available index moved by {n}, "
                              f"more than the queue size {self.size}")
        return n

    def pop(self) -> DescChain | None:
        """Take the next available chain, or None when there is none."""
        if not self.ready or self.pending() == 0:
            return None
        slot = self.last_avail_idx % self.size
        head = self.memory.read_u16(self.avail + 4 + 2 * slot)
        chain = self.parse_chain(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            # Tell the driver we want a kick for the next entry only.
            self.memory.write_u16(self.used + 4 + 8 * self.size, self.last_avail_idx)
        return chain

    def undo_pop(self) -> None:
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF

    def _read_desc(self, table: int, i: int) -> tuple[int, int, int, int]:
        return struct.unpack("<QIHH", self.memory.read(table + DESC_SIZE * i, DESC_SIZE))

    def parse_chain(self, head: int) -> DescChain:
        """Walk the chain starting at head with every check the spec asks for."""
        q = self.index
        if head >= self.size:
            raise VirtioError(f"queue {q}: head index {head} >= queue size {self.size}")
        chain = DescChain(head)
        total = 0
        table, table_len, i = self.desc, self.size, head
        in_indirect = False
        visited: set[tuple[bool, int]] = set()
        while True:
            if (in_indirect, i) in visited:
                raise VirtioError(f"queue {q}: descriptor chain from head {head} loops "
                                  f"at descriptor {i}")
            visited.add((in_indirect, i))
            total += 1
            if total > self.size:
                raise VirtioError(f"queue {q}: descriptor chain from head {head} is longer "
                                  f"than the queue size {self.size}")
            addr, length, flags, nxt = self._read_desc(table, i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtioError(f"queue {q}: indirect descriptor {i} but "
                                      "VIRTIO_F_INDIRECT_DESC was not negotiated")
                if in_indirect:
                    raise VirtioError(f"queue {q}: nested indirect table at descriptor {i}")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtioError(f"queue {q}: descriptor {i} has both INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise VirtioError(f"queue {q}: indirect table length {length} is not a "
                                      f"non-zero multiple of {DESC_SIZE}")
                if not self.memory.contains(addr, length):
                    raise VirtioError(f"queue {q}: indirect table [{addr:#x}, "
                                      f"{addr + length:#x}) is outside guest RAM")
                table, table_len, i = addr, length // DESC_SIZE, 0
                in_indirect = True
                total -= 1  # the indirect descriptor itself carries no buffer
                continue
            if not self.memory.contains(addr, length):
                raise VirtioError(f"queue {q}: descriptor {i} buffer [{addr:#x}, "
                                  f"{addr + length:#x}) is outside guest RAM")
            if flags & VIRTQ_DESC_F_WRITE:
                chain.writable.append(Descriptor(addr, length, True))
            else:
                if chain.writable:
                    raise VirtioError(f"queue {q}: device-readable descriptor {i} after a "
                                      "device-writable one")
                chain.readable.append(Descriptor(addr, length, False))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= table_len:
                raise VirtioError(f"queue {q}: next index {nxt} of descriptor {i} is outside "
                                  f"its table of {table_len}")
            i = nxt

    def add_used(self, head: int, length: int) -> None:
        """Return a chain to the driver with length bytes written by the device."""
        slot = self.used_idx % self.size
        self.memory.write(self.used + 4 + 8 * slot, struct.pack("<II", head, length))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.memory.write_u16(self.used + 2, self.used_idx)

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for the used entries added so far."""
        if not self.event_idx:
            return not (self.avail_flags() & VIRTQ_AVAIL_F_NO_INTERRUPT)
        old, new = self.signalled_used, self.used_idx
        valid = self.signalled_valid
        self.signalled_used, self.signalled_valid = new, True
        if not valid:
            return True
        event = self.used_event()
        # vring_need_event(event, new, old)
        return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    # -- saved state ---------------------------------------------------------
    def save(self) -> dict:
        return {"size": self.size, "ready": self.ready, "desc": self.desc,
                "avail": self.avail, "used": self.used,
                "last_avail_idx": self.last_avail_idx, "used_idx": self.used_idx,
                "signalled_used": self.signalled_used,
                "signalled_valid": self.signalled_valid,
                "event_idx": self.event_idx, "indirect": self.indirect}

    def restore(self, state: dict) -> None:
        """Take saved state (from the wire): every field checked, and the
        rings of a ready queue inside guest RAM (VirtioError otherwise, the
        queue then reset)."""
        from .. import DeviceStateError, checked_state
        u16, u64 = (0, 0xFFFF), (0, (1 << 64) - 1)
        try:
            state = checked_state(f"queue {self.index}", state, {
                "size": (0, 0xFFFFFFFF), "ready": bool, "desc": u64, "avail": u64,
                "used": u64, "last_avail_idx": u16, "used_idx": u16, "signalled_used": u16,
                "signalled_valid": bool, "event_idx": bool, "indirect": bool})
        except DeviceStateError as e:
            raise VirtioError(str(e)) from None
        for k, v in state.items():
            setattr(self, k, v)
        if self.ready:
            try:
                self.validate()
            except VirtioError:
                self.reset()
                raise
