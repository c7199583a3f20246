"""What a machine is made of and where things sit in guest physical memory:
MachineConfig, the layout constants, the kernel command line hv adds, and
the checks of a configuration that need no KVM.

Guest physical layout: RAM from 0 up to 0xd0000000 at most (slot 0), the
rest of it from 4 GiB (slot 1, hv.memory.ram_layout); in the 32-bit hole
between, the virtio-mmio windows from 0xd0000000 (4 KiB each, GSI 5, 6, ...),
IOAPIC 0xfec00000, LAPIC 0xfee00000, the TSS and identity map pages KVM
needs just below 4 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import kvm as K
from ..devices.legacy import POWEROFF_PORT
from ..memory import LOW_RAM_END
from .runstate import MachineError

MIB = 1 << 20
MIN_MEM_MIB = 16
VIRTIO_MMIO_BASE = LOW_RAM_END     # the 32-bit hole starts with the virtio windows
VIRTIO_MMIO_SIZE = 0x1000
VIRTIO_FIRST_GSI = 5
VIRTIO_MAX_DEVICES = 11     # GSIs 5..15
KVM_TSS_ADDR = 0xfffbd000
KVM_IDENTITY_MAP_ADDR = 0xfffbc000

#: What hv itself puts on every kernel command line.
HV_CMDLINE = f"console=ttyS0 hv_poweroff={POWEROFF_PORT:#x} reboot=k panic=-1"
#: Extra boot-speed settings used when hv.images offers no base command line.
FALLBACK_CMDLINE = "no_timer_check tsc=reliable i8042.noaux i8042.nokbd"


def max_mem_mib() -> int:
    """The most guest RAM this host can back: its own RAM (MemTotal)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return LOW_RAM_END >> 20


def base_cmdline() -> str:
    try:
        from .. import images
        extra = images.base_cmdline()
    except Exception:
        extra = FALLBACK_CMDLINE
    words = HV_CMDLINE.split()
    for w in extra.split():
        if w not in words:
            words.append(w)
    return " ".join(words)


@dataclass
class MachineConfig:
    mem_mib: int = 128
    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    balloon: bool = False
    #: binary stream receiving the guest's console output (None: listeners only)
    console: object = None
    #: vCPUs (1 up to what KVM allows, KVM_CAP_MAX_VCPUS)
    cpus: int = 1
    #: per-vCPU dirty ring size in bytes (0: no ring, use KVM_GET_DIRTY_LOG); a
    #: power of two from a page to KVM's maximum (migrate with "dirty_log": "ring")
    dirty_ring_bytes: int = 0
    #: the kernel command line without the devices' entries (None: the default)
    cmdline: str | None = None
    #: Balloon(...) keyword arguments, by name or alias with typed or string
    #: values: {"reporting": "off", "hint": False, "stats_interval_s": 5}
    balloon_options: dict = field(default_factory=dict)
    #: virtio-blk disks: paths, {"path", "readonly", "serial"} dicts or
    #: "path=FILE[,readonly=on]" strings (hv.devices.virtio.blk.disk_options)
    disks: list = field(default_factory=list)
    #: virtio-net devices: [{"tap": NAME, "mac": "52:54:00:.." (optional)}]
    nets: list = field(default_factory=list)


#: the smallest dirty ring KVM takes: one page (and at least its reserved entries)
DIRTY_RING_MIN_BYTES = 4096


def check_dirty_ring_size(size: int, limit: int) -> bool:
    """Whether size bytes is a per-vCPU dirty ring KVM can take: a power of two
    (so a whole number of kvm_dirty_gfn entries), at least a page, at most
    limit (KVM_CHECK_EXTENSION(KVM_CAP_DIRTY_LOG_RING))."""
    return (isinstance(size, int) and DIRTY_RING_MIN_BYTES <= size <= limit
            and size & (size - 1) == 0 and size % K.DIRTY_GFN_DTYPE.itemsize == 0)


def balloon_kwargs(config: MachineConfig) -> dict:
    """config.balloon_options checked and typed (MachineError names a bad one)."""
    try:
        from ..devices.virtio.balloon import balloon_options
        from ..devices.virtio.balloon_defs import BalloonError
    except ImportError:
        return {}
    try:
        return balloon_options(config.balloon_options)
    except BalloonError as e:
        raise MachineError(str(e)) from None
