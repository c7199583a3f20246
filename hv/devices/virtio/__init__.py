"""virtio devices on the virtio-mmio transport (version 2)."""
