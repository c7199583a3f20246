"""virtio devices on the virtio-mmio transport (version 2).

    queue.py         split virtqueue parsing with every address checked
    device.py        VirtioDevice: what a transport needs from a device
    mmio.py          VirtioMmioTransport: the registers, interrupts, NEEDS_RESET
    balloon_defs.py  virtio-balloon constants, wire layouts, errors
    balloon.py       Balloon: inflate/deflate, stats, hint, reporting, poison,
                     hv's free page bitmap
    driver_model.py  the driver side, modelled on Linux, for tests
"""
