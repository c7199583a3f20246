"""virtio-net over virtio-mmio with a TAP backend.

Features: VERSION_1, MAC, STATUS, CTRL_VQ, GUEST_ANNOUNCE, EVENT_IDX,
INDIRECT_DESC, and the transmit offloads CSUM, HOST_TSO4, HOST_TSO6,
HOST_ECN: the guest hands over frames of up to 64 KiB with their checksum
left to do, and the tap (IFF_VNET_HDR) checksums and segments them in the
host kernel. A guest kernel run by an instruction emulator spends most of
its sending time on exactly that work. No receive offloads and no
MRG_RXBUF, so the guest posts one 1530-byte descriptor per rx buffer (see
/work/shared/GUEST-IO.md, section 1).

Queues: 0 rx, 1 tx, 2 ctrl. Config: mac[6], le16 status (LINK_UP, ANNOUNCE).

rx runs on an I/O thread: it polls the tap and a wakeup pipe, and reads the
tap only while the device is active, not quiesced, released (a migration
destination reads nothing before its guest runs) and the guest has posted a
buffer. Each frame goes into ONE rx chain under the transport lock, so a
quiesce waits for the chain in progress and never sees half of one. tx and
ctrl are processed on the vCPU thread at notify.

After a migration restore, announce() sets ANNOUNCE (the guest sends its
gratuitous ARPs) and a timer thread writes RARP frames for the guest's MAC
into the tap, as QEMU's qemu_announce_self does.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import select
import socket
import struct
import threading

from ...errors import HvError
from ...memory import GuestMemory
from .. import DeviceStateError, checked_state
from .device import VirtioDevice
from .queue import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, Virtqueue, VirtioError

log = logging.getLogger("hv.virtio.net")

VIRTIO_ID_NET = 1
F_CSUM = 0
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_HOST_ECN = 13
F_MAC = 5
F_STATUS = 16
F_CTRL_VQ = 17
F_GUEST_ANNOUNCE = 21

S_LINK_UP = 1
S_ANNOUNCE = 2

HDR_LEN = 12
CONFIG_SIZE = 12
#: the smallest rx buffer that holds a header and a full 1514-byte frame
MIN_RX_BUF = HDR_LEN + 1514
#: a TSO frame: a 64 KiB IP packet behind an Ethernet header and a VLAN tag
MAX_FRAME = HDR_LEN + 18 + 65535
#: the tx header's flags and gso_type (struct virtio_net_hdr)
HDR_F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN = 0, 1, 4, 0x80
RX, TX, CTRL = 0, 1, 2
QUEUE_SIZES = [256, 256, 64]

CTRL_CLASS_ANNOUNCE = 3
CTRL_ANNOUNCE_ACK = 0
CTRL_OK, CTRL_ERR = 0, 1

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

#: delays (s) before each RARP frame after a migration (QEMU sends 5 from 50 ms)
RARP_DELAYS = (0.05, 0.1, 0.15)


class NetError(HvError):
    """A tap that cannot be used, or a bad MAC address."""


def parse_mac(text: str) -> bytes:
    parts = str(text).split(":")
    try:
        mac = bytes(int(p, 16) for p in parts if len(p) in (1, 2))
    except ValueError:
        mac = b""
    if len(parts) != 6 or len(mac) != 6:
        raise NetError(f"{text!r} is not a MAC address (like 52:54:00:12:34:56)")
    if mac[0] & 1:
        raise NetError(f"MAC {text} is a multicast address: the guest needs a unicast one")
    if mac == bytes(6):
        raise NetError("MAC 00:00:00:00:00:00 is not a usable address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def default_mac(tap: str) -> bytes:
    """52:54:00 and three bytes from the tap's name: the same on both ends of a
    migration whose taps share a name."""
    return b"\x52\x54\x00" + hashlib.sha256(tap.encode()).digest()[:3]


def open_tap(name: str) -> int:
    """A nonblocking fd on the existing tap `name` (in this process's network
    namespace), with a 12-byte vnet header and no offloads; NetError says why not."""
    if not name or len(name.encode()) > 15 or "/" in name:
        raise NetError(f"tap name {name!r} is not an interface name (1 to 15 bytes)")
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise NetError(f"tap {name}: no such interface; create it first "
                       f"(ip tuntap add dev {name} mode tap)") from None
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise NetError(f"tap {name}: cannot open /dev/net/tun: {e.strerror}") from None
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", HDR_LEN))
        # Offloads survive on a persistent tap from one opener to the next: set them.
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    except OSError as e:
        os.close(fd)
        why = {errno.EBUSY: "is busy (another process has it open)",
               errno.EINVAL: "is not a tap device",
               errno.EPERM: "may not be opened by this user (CAP_NET_ADMIN or the "
                            "tap's owner needed)"}.get(e.errno, f"cannot be opened: {e.strerror}")
        raise NetError(f"tap {name} {why}") from None
    return fd


def rarp_frame(mac: bytes) -> bytes:
    """QEMU's announce_self_create: a 60-byte RARP reverse request for mac."""
    frame = (b"\xff" * 6 + mac + struct.pack(">HHHBBH", 0x8035, 1, 0x0800, 6, 4, 3)
             + mac + bytes(4) + mac + bytes(4))
    return frame.ljust(60, b"\0")


class Net(VirtioDevice):
    device_id = VIRTIO_ID_NET
    name = "net"

    def __init__(self, memory: GuestMemory, fd: int, mac: bytes, *, tap: str = "",
                 held: bool = False):
        """fd: an open tap fd (open_tap) or, in tests, any nonblocking datagram
        fd that carries vnet-header frames. held: read nothing until release()."""
        super().__init__()
        self.memory = memory
        self.fd = fd
        self.tap = tap
        self.mac = bytes(mac)
        self.status = S_LINK_UP
        self.rx_blocked = False
        self.held = held
        self.counters = {"rx_frames": 0, "tx_frames": 0, "rx_dropped": 0, "tx_dropped": 0,
                         "rarp_sent": 0}
        self._stop = False
        self._paused = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._rx_loop, name=f"hv-net-{tap or fd}",
                                        daemon=True)
        self._thread.start()

    # -- VirtioDevice -------------------------------------------------------------
    def features(self) -> int:
        return (super().features() | 1 << F_MAC | 1 << F_STATUS | 1 << F_CTRL_VQ
                | 1 << F_GUEST_ANNOUNCE | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_F_INDIRECT_DESC
                | 1 << F_CSUM | 1 << F_HOST_TSO4 | 1 << F_HOST_TSO6 | 1 << F_HOST_ECN)

    def queue_sizes(self, features: int) -> list[int]:
        return list(QUEUE_SIZES)

    def _config(self) -> bytes:
        return self.mac + struct.pack("<HH", self.status, 0)

    def read_config(self, offset: int, size: int) -> bytes:
        with self.lock:
            cfg = self._config()
        return bytes(cfg[offset:offset + size]).ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        log.debug("net: config write at %d ignored (no CTRL_MAC_ADDR)", offset)

    def activate(self, features: int, queues: list[Virtqueue]) -> None:
        with self.lock:
            super().activate(features, queues)
            self.rx_blocked = False
        self._wake()

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self.status &= S_LINK_UP
            self.rx_blocked = False

    def process(self, queue_index: int) -> None:
        if queue_index == RX:
            self.rx_blocked = False
            self._wake()
        elif queue_index == TX:
            self._process_tx()
        elif queue_index == CTRL:
            self._process_ctrl()

    # -- tx and ctrl (vCPU thread, transport lock held) -------------------------------
    def _process_tx(self) -> None:
        q = self.queues[TX]
        used = False
        try:
            while (chain := q.pop()) is not None:
                if chain.writable:
                    raise VirtioError(f"net tx: chain {chain.head} has device-writable buffers")
                if chain.readable_len < HDR_LEN or chain.readable_len > MAX_FRAME:
                    raise VirtioError(f"net tx: chain {chain.head} of {chain.readable_len} "
                                      f"bytes is not a header and a frame")
                # The header goes to the tap verbatim, which checks its fields
                # against the frame; what the guest did not negotiate is dropped.
                data = chain.read_all(self.memory)
                if self._tx_header_ok(data):
                    self._tap_write(data, "tx_frames", "tx_dropped")
                else:
                    self.counters["tx_dropped"] += 1
                q.add_used(chain.head, 0)
                used = True
        finally:
            if used:
                self.signal_used(TX)

    def _tx_header_ok(self, data: bytes) -> bool:
        """A tx header asks only for the offloads the guest negotiated (the
        driver must not set DATA_VALID or RSC_INFO on transmit)."""
        flags, gso = data[0], data[1]
        if flags & ~HDR_F_NEEDS_CSUM or (flags and not self.has_feature(F_CSUM)):
            return False
        if gso & GSO_ECN and not self.has_feature(F_HOST_ECN):
            return False
        kind = gso & ~GSO_ECN
        return (kind == GSO_NONE and not gso & GSO_ECN
                or kind == GSO_TCPV4 and self.has_feature(F_HOST_TSO4)
                or kind == GSO_TCPV6 and self.has_feature(F_HOST_TSO6))

    def _process_ctrl(self) -> None:
        q = self.queues[CTRL]
        used = False
        try:
            while (chain := q.pop()) is not None:
                if len(chain.writable) != 1 or chain.writable[0].length < 1 or \
                        chain.readable_len < 2:
                    raise VirtioError(f"net ctrl: chain {chain.head} is not a command and "
                                      f"a one-byte ack")
                data = chain.read_all(self.memory, 4096)
                cls, cmd = data[0], data[1]
                ack = CTRL_ERR
                if cls == CTRL_CLASS_ANNOUNCE and cmd == CTRL_ANNOUNCE_ACK:
                    if chain.readable_len != 2:
                        raise VirtioError(f"net ctrl: announce ack of {chain.readable_len} "
                                          f"bytes, expected 2")
                    # Cleared before the buffer is used (virtio spec, 5.1.6.5.4).
                    self.status &= ~S_ANNOUNCE
                    ack = CTRL_OK
                else:
                    log.debug("net: ctrl class %d cmd %d not supported", cls, cmd)
                chain.write_all(self.memory, bytes([ack]))
                q.add_used(chain.head, 1)
                used = True
        finally:
            if used:
                self.signal_used(CTRL)

    # -- the tap ------------------------------------------------------------------------
    def _tap_write(self, data: bytes, ok: str, dropped: str) -> None:
        if self.fd < 0 or not self.status & S_LINK_UP:
            self.counters[dropped] += 1
            return
        try:
            os.writev(self.fd, [data])
            self.counters[ok] += 1
        except BlockingIOError:
            self.counters[dropped] += 1  # the tap's queue is full: drop, as a NIC would
        except OSError as e:
            self._tap_failed(e)
            self.counters[dropped] += 1

    def _tap_failed(self, e: OSError) -> None:
        if e.errno in (errno.EIO, errno.EBADFD, errno.EBADF, errno.ENXIO):
            with self.lock:
                if self.status & S_LINK_UP:
                    log.warning("net %s: the tap is gone (%s): link down", self.tap,
                                e.strerror)
                    self.status &= ~S_LINK_UP
                    self.config_changed()
        else:
            log.warning("net %s: tap error: %s", self.tap, e)

    # -- rx (the I/O thread) --------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _may_read(self) -> bool:
        return (self.active and not self.held and not self._paused and not self.rx_blocked
                and self.status & S_LINK_UP and self.fd >= 0
                and not (self.transport is not None and self.transport.broken))

    def _rx_loop(self) -> None:
        while not self._stop:
            fds = [self._wake_r] + ([self.fd] if self._may_read() else [])
            try:
                ready, _, _ = select.select(fds, [], [], 1.0)
            except (OSError, ValueError):
                return
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
            if self.fd in ready and len(fds) > 1:
                try:
                    self._rx_some()
                except Exception as e:  # never let the thread die silently
                    log.exception("net: rx")
                    if self.transport is not None:
                        self.transport.set_needs_reset(f"internal error in rx: {e}")

    def _rx_some(self, budget: int = 64) -> None:
        with self.lock:
            for _ in range(budget):
                if not self._may_read():
                    return
                q = self.queues[RX]
                try:
                    if not q.ready or q.pending() == 0:
                        self.rx_blocked = True  # until the guest posts buffers (notify 0)
                        return
                    chain = q.pop()
                    if chain.readable or chain.writable_len < MIN_RX_BUF:
                        raise VirtioError(f"net rx: chain {chain.head} is not one writable "
                                          f"buffer of at least {MIN_RX_BUF} bytes")
                except VirtioError as e:
                    self.transport.set_needs_reset(str(e))
                    return
                try:
                    frame = os.read(self.fd, MAX_FRAME)
                except BlockingIOError:
                    q.undo_pop()
                    return
                except OSError as e:
                    q.undo_pop()
                    self._tap_failed(e)
                    return
                if len(frame) <= HDR_LEN or len(frame) > chain.writable_len:
                    # A frame from the host larger than the guest's buffer: drop it.
                    q.undo_pop()
                    self.counters["rx_dropped"] += 1
                    continue
                # flags=0, gso_type=0 (tun may set DATA_VALID), num_buffers=1.
                hdr = bytes(2) + frame[2:10] + struct.pack("<H", 1)
                chain.write_all(self.memory, hdr + frame[HDR_LEN:])
                q.add_used(chain.head, len(frame))
                self.counters["rx_frames"] += 1
                self.signal_used(RX)

    # -- machine hooks ------------------------------------------------------------------------
    def release(self) -> None:
        """The guest runs: start reading the tap."""
        self.held = False
        self._wake()

    def quiesce(self) -> None:
        # Called with the transport lock held: the rx chain in progress (under
        # that lock) is complete, and no new one starts until unquiesce().
        self._paused = True

    def unquiesce(self) -> None:
        self._paused = False
        self._wake()

    def announce(self) -> None:
        """After a migration: ask the guest for gratuitous ARPs and send RARPs
        for its MAC from a timer thread (the resume does not wait)."""
        with self.lock:
            if self.active and self.has_feature(F_GUEST_ANNOUNCE) and \
                    self.has_feature(F_CTRL_VQ):
                self.status |= S_ANNOUNCE
                self.config_changed()
        threading.Thread(target=self._send_rarps, name="hv-net-announce", daemon=True).start()

    def _send_rarps(self) -> None:
        ev = threading.Event()
        frame = bytes(HDR_LEN) + rarp_frame(self.mac)
        for delay in RARP_DELAYS:
            if ev.wait(delay) or self._stop:
                return
            self._tap_write(frame, "rarp_sent", "tx_dropped")

    def close(self) -> None:
        self._stop = True
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2)
        with self.lock:
            for fd in (self.fd, self._wake_r, self._wake_w):
                try:
                    if fd >= 0:
                        os.close(fd)
                except OSError:
                    pass
            self.fd = -1

    def commands(self):
        return {}

    # -- saved state ----------------------------------------------------------------------------
    def save(self) -> dict:
        with self.lock:
            return {"mac": self.mac, "status": self.status,
                    "features": self.acked_features}

    def restore(self, state: dict) -> None:
        checked_state(self.name, state, {"mac": bytes, "status": (0, S_LINK_UP | S_ANNOUNCE),
                                         "features": (0, (1 << 64) - 1)})
        mac = state["mac"]
        if len(mac) != 6 or mac[0] & 1:
            raise DeviceStateError(f"{self.name}: saved MAC {mac.hex()} is not a unicast MAC")
        if state["features"] & ~self.features():
            raise DeviceStateError(f"{self.name}: saved features {state['features']:#x} "
                                   f"include some this device does not offer")
        with self.lock:
            if mac != self.mac:
                # The guest knows its MAC: keep it, whatever this side was given.
                log.info("net %s: the guest's MAC %s replaces %s", self.tap, format_mac(mac),
                         format_mac(self.mac))
            self.mac = mac
            # The link is this host's tap: up if it is open.
            self.status = (state["status"] & S_ANNOUNCE) | (S_LINK_UP if self.fd >= 0 else 0)
            if self.active and state["features"] != self.acked_features:
                raise DeviceStateError(f"{self.name}: saved features {state['features']:#x} "
                                       f"differ from the transport's {self.acked_features:#x}")
