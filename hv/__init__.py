"""hv: a small KVM hypervisor that runs Linux guests and live-migrates them.

Layers, data flowing one way:
    hv.kvm        thin wrapper over /dev/kvm (cffi, ioctls from <linux/kvm.h>)
    hv.memory     guest RAM: one anonymous mapping, bounds-checked access,
                  the VMM's own dirty bitmap
    hv.boot       kernel loading (ELF vmlinux via PVH, bzImage), e820, cmdline
    hv.cpu        CPUID filtering and MSR setup
    hv.devices    UART, virtio-mmio transport, virtio-balloon
    hv.vmm        the VMM core: machine assembly, vCPU threads, run state and
                  pause owners, save/restore
    hv.qmp        QMP server; hv.qmp_commands QEMU's commands over hv;
                  hv.control the QMP client
    hv.migration  protocol, sender, receiver (per-page work in hv._pages)
    hv.cli        run-guest
    hv.images     builds the guest kernel and initramfs
"""

__version__ = "0.1.0"
