"""The interface between a virtio transport and a virtio device.

The transport (hv.devices.virtio.mmio) owns the registers, the feature
negotiation, the virtqueues and the interrupt line; a VirtioDevice only says
what it offers and handles the buffers. The transport calls, in this order
for a driver's probe:

    features()                  offered feature bits (incl. VIRTIO_F_VERSION_1)
    queue_sizes(features)       max size of each queue, for the features the
                                driver wrote (a device whose queue set depends
                                on features, like the balloon, answers densely)
    read_config / write_config  device configuration space, any time
    activate(features, queues)  on DRIVER_OK, with the Virtqueue objects
    process(queue_index)        on every notify after activation (vCPU thread)
    reset()                     when the driver writes 0 to Status

process() raises VirtioError for a malformed request: the transport then sets
DEVICE_NEEDS_RESET, logs the reason and ignores the device's queues until the
driver resets it. A device calls self.signal_used(i) after adding used
buffers to queue i and self.config_changed() after changing its config.

All calls from the transport hold transport.lock (an RLock); a device that
acts from another thread (a control command) takes self.lock as well.
"""

from __future__ import annotations

import threading

from .. import DeviceModel
from .queue import Virtqueue, VirtioError

__all__ = ["VirtioDevice", "Virtqueue", "VirtioError", "VIRTIO_F_VERSION_1"]

VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34


class VirtioDevice(DeviceModel):
    device_id = 0
    vendor_id = 0x554D4551  # "QEMU", what Linux and most VMMs show
    name = "virtio"

    def __init__(self):
        self.transport = None
        self.lock = threading.RLock()
        self.acked_features = 0
        self.queues: list[Virtqueue] = []
        self.active = False

    # -- what the transport calls ---------------------------------------------
    def attach(self, transport) -> None:
        self.transport = transport
        self.lock = transport.lock

    def features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1

    def queue_sizes(self, features: int) -> list[int]:
        return []

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    def activate(self, features: int, queues: list[Virtqueue]) -> None:
        self.acked_features = features
        self.queues = queues
        self.active = True

    def process(self, queue_index: int) -> None:
        pass

    def reset(self) -> None:
        self.acked_features = 0
        self.queues = []
        self.active = False

    # -- what the device calls ------------------------------------------------
    @property
    def quiesced(self) -> bool:
        """The machine is paused: no guest memory writes from other threads now."""
        return self.transport is not None and self.transport.quiesced

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def signal_used(self, queue_index: int) -> None:
        if self.transport is not None:
            self.transport.signal_used(queue_index)

    def config_changed(self) -> None:
        if self.transport is not None:
            self.transport.config_changed()
