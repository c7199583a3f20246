"""A thin, honest wrapper over /dev/kvm (the shape of rust-vmm's kvm-ioctls).

    Kvm()            /dev/kvm: API version, capabilities, supported CPUID,
                     MSR index list; create_vm()
    Vm               a VM fd: memory slots, irqchip, PIT, irqfd/ioeventfd,
                     clock, dirty logging (bitmap, manual protect, rings);
                     create_vcpu()
    Vcpu             a vCPU fd and its mmapped kvm_run: run() -> typed exit,
                     register/state getters and setters, dirty ring harvest

Every method names the KVM ioctl it wraps; a failing ioctl raises KvmError
(an OSError carrying errno and the ioctl's name). The wrapper adds no policy:
hv.vmm decides what to do with the exits and the state.

Struct layouts and ioctl numbers come from <linux/kvm.h> through the cffi
module hv._kvm. Opaque state (FPU, LAPIC, vCPU events, irqchip, PIT) travels
as the raw bytes of the KVM struct: plain data, valid between hosts with the
same KVM ABI.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ._kvm import ffi, lib
from .errors import HvError

KVM_PATH = "/dev/kvm"
PAGE_SIZE = 4096

#: The signal hv sends a vCPU thread to take it out of KVM_RUN.
KICK_SIGNAL = signal.SIGRTMIN + 2


class KvmError(OSError):
    """A KVM ioctl failed: carries errno and the ioctl's name."""

    def __init__(self, ioctl: str, err: int, detail: str = ""):
        msg = f"{ioctl} failed: {os.strerror(err)}"
        if detail:
            msg += f" ({detail})"
        super().__init__(err, msg)
        self.ioctl = ioctl

    def __str__(self) -> str:
        return self.strerror


class KvmUnavailable(HvError):
    """/dev/kvm cannot be used; the message says what to do."""


def _check(rc: int, name: str, detail: str = "") -> int:
    if rc < 0:
        raise KvmError(name, ffi.errno, detail)
    return rc


def install_kick_handler(signo: int = KICK_SIGNAL) -> None:
    """Install a no-op handler for signo without SA_RESTART (KVM_RUN -> EINTR)."""
    if lib.hv_install_kick_handler(signo) != 0:
        raise OSError(ffi.errno, "sigaction for the vCPU kick signal failed")


# --------------------------------------------------------------------------
# Exits
# --------------------------------------------------------------------------

class VcpuExit:
    """Base of the typed KVM_RUN exits."""


@dataclass
class IoOut(VcpuExit):
    """KVM_EXIT_IO, direction out: data holds size*count bytes."""
    port: int
    size: int
    count: int
    data: bytes


@dataclass
class IoIn(VcpuExit):
    """KVM_EXIT_IO, direction in: fill buf (size*count bytes) before the next run()."""
    port: int
    size: int
    count: int
    buf: object = field(repr=False)


@dataclass
class MmioWrite(VcpuExit):
    """KVM_EXIT_MMIO, is_write=1."""
    addr: int
    data: bytes


@dataclass
class MmioRead(VcpuExit):
    """KVM_EXIT_MMIO, is_write=0: fill buf (len bytes) before the next run()."""
    addr: int
    size: int
    buf: object = field(repr=False)


@dataclass
class Hlt(VcpuExit):
    """KVM_EXIT_HLT (only without an in-kernel LAPIC)."""


@dataclass
class Shutdown(VcpuExit):
    """KVM_EXIT_SHUTDOWN: triple fault."""


@dataclass
class InternalError(VcpuExit):
    """KVM_EXIT_INTERNAL_ERROR; suberror 1 is an emulation failure."""
    suberror: int
    data: list


@dataclass
class FailEntry(VcpuExit):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused VM entry."""
    reason: int
    cpu: int


@dataclass
class SystemEvent(VcpuExit):
    """KVM_EXIT_SYSTEM_EVENT (shutdown, reset, crash)."""
    type: int
    data: list


@dataclass
class DirtyRingFull(VcpuExit):
    """KVM_EXIT_DIRTY_RING_FULL: harvest the ring and reset it, then run again."""


@dataclass
class Intr(VcpuExit):
    """KVM_RUN returned EINTR (kicked by a signal / immediate_exit) or KVM_EXIT_INTR."""


@dataclass
class Unknown(VcpuExit):
    """Any other exit reason."""
    reason: int
    hardware_exit_reason: int = 0


# --------------------------------------------------------------------------
# Plain-data conversions
# --------------------------------------------------------------------------

REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9",
             "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
SEGMENT_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db",
                  "s", "l", "g", "avl", "unusable")
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
SREG_SCALARS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


@dataclass
class CpuidEntry:
    """One struct kvm_cpuid_entry2."""
    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


def _raw(ptr, ctype: str) -> bytes:
    return bytes(ffi.buffer(ptr, ffi.sizeof(ctype)))


def _from_raw(ctype: str, data: bytes, what: str):
    size = ffi.sizeof(ctype)
    if len(data) != size:
        raise ValueError(f"{what}: expected {size} bytes of {ctype}, got {len(data)}")
    p = ffi.new(ctype + " *")
    ffi.memmove(p, data, size)
    return p


def _cpuid2(entries) -> object:
    c = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    c.nent = len(entries)
    for i, e in enumerate(entries):
        d = c.entries[i]
        d.function, d.index, d.flags = e.function, e.index, e.flags
        d.eax, d.ebx, d.ecx, d.edx = e.eax, e.ebx, e.ecx, e.edx
    return c


def _cpuid_list(c) -> list[CpuidEntry]:
    return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (c.entries[i] for i in range(c.nent))]


# --------------------------------------------------------------------------
# /dev/kvm
# --------------------------------------------------------------------------

class Kvm:
    """The /dev/kvm system fd."""

    def __init__(self, path: str | None = None):
        path = path or KVM_PATH
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"'{path}' not found: load the kvm module (CONFIG_KVM) or run on a "
                "host with virtualization") from None
        except PermissionError:
            raise KvmUnavailable(
                f"permission denied opening '{path}': add your user to the 'kvm' "
                "group (then log in again) or run as root") from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open '{path}': {e.strerror}") from None
        version = self.api_version()
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"KVM API version {version} is not the supported "
                                 f"version {lib.KVM_API_VERSION}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def api_version(self) -> int:
        """KVM_GET_API_VERSION."""
        return _check(lib.hv_ioctl_val(self.fd, lib.KVM_GET_API_VERSION, 0),
                      "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 if cap is absent, else its value."""
        rc = lib.hv_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap)
        return max(rc, 0)

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap from a vCPU fd (kvm_run and more)."""
        return _check(lib.hv_ioctl_val(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0),
                      "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID."""
        n = 256
        while True:
            c = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
            c.nent = n
            rc = lib.hv_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, c)
            if rc < 0 and ffi.errno == errno.E2BIG and n < 8192:
                n *= 2
                continue
            _check(rc, "KVM_GET_SUPPORTED_CPUID")
            return _cpuid_list(c)

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores."""
        return self._msr_list(lib.KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST")

    def msr_feature_index_list(self) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST."""
        return self._msr_list(lib.KVM_GET_MSR_FEATURE_INDEX_LIST,
                              "KVM_GET_MSR_FEATURE_INDEX_LIST")

    def _msr_list(self, req: int, name: str) -> list[int]:
        n = 256
        while True:
            c = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
            c.nmsrs = n
            rc = lib.hv_ioctl(self.fd, req, c)
            if rc < 0 and ffi.errno == errno.E2BIG:
                n = max(c.nmsrs, n * 2)
                continue
            _check(rc, name)
            return [c.indices[i] for i in range(c.nmsrs)]

    def create_vm(self) -> "Vm":
        """KVM_CREATE_VM."""
        fd = _check(lib.hv_ioctl_val(self.fd, lib.KVM_CREATE_VM, 0), "KVM_CREATE_VM")
        return Vm(self, fd)


# --------------------------------------------------------------------------
# VM
# --------------------------------------------------------------------------

class Vm:
    """A VM fd."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list[Vcpu] = []
        self.dirty_ring_bytes = 0
        self.manual_dirty_log_protect = False

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _ioctl(self, req: int, arg, name: str, detail: str = "") -> int:
        return _check(lib.hv_ioctl(self.fd, req, arg), name, detail)

    def _ioctl_val(self, req: int, arg: int, name: str, detail: str = "") -> int:
        return _check(lib.hv_ioctl_val(self.fd, req, arg), name, detail)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd."""
        return max(lib.hv_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap), 0)

    # -- memory -------------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION (flags: KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY)."""
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot, r.flags = slot, flags
        r.guest_phys_addr, r.memory_size, r.userspace_addr = (
            guest_phys_addr, memory_size, userspace_addr)
        self._ioctl(lib.KVM_SET_USER_MEMORY_REGION, r, "KVM_SET_USER_MEMORY_REGION",
                    f"slot {slot} at {guest_phys_addr:#x} size {memory_size:#x}")

    # -- interrupt controllers and timers -------------------------------------
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC pair, IOAPIC and LAPICs."""
        self._ioctl_val(lib.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = lib.KVM_PIT_SPEAKER_DUMMY) -> None:
        """KVM_CREATE_PIT2 (KVM_PIT_SPEAKER_DUMMY: port 0x61 handled in the kernel)."""
        c = ffi.new("struct kvm_pit_config *")
        c.flags = flags
        self._ioctl(lib.KVM_CREATE_PIT2, c, "KVM_CREATE_PIT2")

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages the VMX real-mode emulation may use."""
        self._ioctl_val(lib.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page for the EPT identity map."""
        a = ffi.new("uint64_t *", addr)
        self._ioctl(lib.KVM_SET_IDENTITY_MAP_ADDR, a, "KVM_SET_IDENTITY_MAP_ADDR")

    def irq_line(self, irq: int, level: bool) -> None:
        """KVM_IRQ_LINE: set GSI irq to level."""
        lvl = ffi.new("struct kvm_irq_level *")
        lvl.irq, lvl.level = irq, 1 if level else 0
        self._ioctl(lib.KVM_IRQ_LINE, lvl, "KVM_IRQ_LINE", f"gsi {irq}")

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        """KVM_IRQFD: writing to eventfd fd raises (edge) GSI gsi."""
        c = ffi.new("struct kvm_irqfd *")
        c.fd, c.gsi = fd, gsi
        c.flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        self._ioctl(lib.KVM_IRQFD, c, "KVM_IRQFD", f"gsi {gsi}")

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        """KVM_IOEVENTFD: guest writes of length bytes at addr signal eventfd fd."""
        c = ffi.new("struct kvm_ioeventfd *")
        c.addr, c.len, c.fd = addr, length, fd
        flags = 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
            c.datamatch = datamatch
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        c.flags = flags
        self._ioctl(lib.KVM_IOEVENTFD, c, "KVM_IOEVENTFD", f"addr {addr:#x}")

    def get_irqchip(self, chip_id: int) -> bytes:
        """KVM_GET_IRQCHIP: raw struct kvm_irqchip of chip_id
        (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC)."""
        c = ffi.new("struct kvm_irqchip *")
        c.chip_id = chip_id
        self._ioctl(lib.KVM_GET_IRQCHIP, c, "KVM_GET_IRQCHIP", f"chip {chip_id}")
        return _raw(c, "struct kvm_irqchip")

    def set_irqchip(self, data: bytes) -> None:
        """KVM_SET_IRQCHIP from bytes returned by get_irqchip()."""
        c = _from_raw("struct kvm_irqchip", data, "KVM_SET_IRQCHIP")
        self._ioctl(lib.KVM_SET_IRQCHIP, c, "KVM_SET_IRQCHIP", f"chip {c.chip_id}")

    def get_pit2(self) -> bytes:
        """KVM_GET_PIT2: raw struct kvm_pit_state2."""
        c = ffi.new("struct kvm_pit_state2 *")
        self._ioctl(lib.KVM_GET_PIT2, c, "KVM_GET_PIT2")
        return _raw(c, "struct kvm_pit_state2")

    def set_pit2(self, data: bytes) -> None:
        """KVM_SET_PIT2."""
        self._ioctl(lib.KVM_SET_PIT2, _from_raw("struct kvm_pit_state2", data, "KVM_SET_PIT2"),
                    "KVM_SET_PIT2")

    def get_clock(self) -> dict:
        """KVM_GET_CLOCK: {'clock': ns, 'flags': ...}."""
        c = ffi.new("struct kvm_clock_data *")
        self._ioctl(lib.KVM_GET_CLOCK, c, "KVM_GET_CLOCK")
        return {"clock": c.clock, "flags": c.flags}

    def set_clock(self, clock: int, flags: int = 0) -> None:
        """KVM_SET_CLOCK: the kvmclock value in ns."""
        c = ffi.new("struct kvm_clock_data *")
        c.clock = clock
        c.flags = flags
        self._ioctl(lib.KVM_SET_CLOCK, c, "KVM_SET_CLOCK")

    # -- capabilities --------------------------------------------------------
    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM fd."""
        c = ffi.new("struct kvm_enable_cap *")
        c.cap, c.flags = cap, flags
        for i, a in enumerate(args):
            c.args[i] = a
        self._ioctl(lib.KVM_ENABLE_CAP, c, "KVM_ENABLE_CAP", f"cap {cap}")

    def enable_manual_dirty_log_protect(self, initially_set: bool = True) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): KVM_GET_DIRTY_LOG no
        longer write-protects; the VMM re-protects with clear_dirty_log()."""
        mode = lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if initially_set:
            mode |= lib.KVM_DIRTY_LOG_INITIALLY_SET
        self.enable_cap(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, mode)
        self.manual_dirty_log_protect = True

    def enable_dirty_ring(self, size_bytes: int) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING[_ACQ_REL], size): per-vCPU
        dirty rings of size_bytes; must come before any vCPU is created."""
        if self.vcpus:
            raise ValueError("the dirty ring must be enabled before creating vCPUs")
        cap = lib.KVM_CAP_DIRTY_LOG_RING
        if not self.check_extension(cap):
            cap = lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
        self.enable_cap(cap, size_bytes)
        self.dirty_ring_bytes = size_bytes

    # -- dirty log -------------------------------------------------------------
    def get_dirty_log(self, slot: int, npages: int) -> np.ndarray:
        """KVM_GET_DIRTY_LOG: the slot's dirty bitmap as uint64 words (KVM layout)."""
        words = np.zeros((npages + 63) // 64, dtype="<u8")
        _check(lib.hv_get_dirty_log(self.fd, slot, ffi.from_buffer(words)),
               "KVM_GET_DIRTY_LOG", f"slot {slot}")
        return words

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: np.ndarray) -> None:
        """KVM_CLEAR_DIRTY_LOG: write-protect again the pages whose bits are set in
        bitmap (bit 0 = first_page; first_page a multiple of 64)."""
        b = np.ascontiguousarray(bitmap, dtype="<u8")
        _check(lib.hv_clear_dirty_log(self.fd, slot, first_page, num_pages,
                                      ffi.from_buffer(b)),
               "KVM_CLEAR_DIRTY_LOG", f"slot {slot} pages {first_page}+{num_pages}")

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect harvested ring entries; returns their count."""
        return self._ioctl_val(lib.KVM_RESET_DIRTY_RINGS, 0, "KVM_RESET_DIRTY_RINGS")

    # -- vCPUs ---------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int = 0) -> "Vcpu":
        """KVM_CREATE_VCPU, then mmap its kvm_run (and dirty ring, if enabled)."""
        fd = self._ioctl_val(lib.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        v = Vcpu(self, fd, vcpu_id)
        self.vcpus.append(v)
        return v


# --------------------------------------------------------------------------
# vCPU
# --------------------------------------------------------------------------

DIRTY_GFN_DTYPE = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])


class Vcpu:
    """A vCPU fd with its kvm_run mapping."""

    def __init__(self, vm: Vm, fd: int, vcpu_id: int):
        self.vm = vm
        self.fd = fd
        self.id = vcpu_id
        self._run_size = vm.kvm.vcpu_mmap_size()
        p = lib.mmap(ffi.NULL, self._run_size, lib.PROT_READ | lib.PROT_WRITE,
                     lib.MAP_SHARED, fd, 0)
        if int(ffi.cast("intptr_t", p)) == -1:
            err = ffi.errno
            os.close(fd)
            raise KvmError("mmap(kvm_run)", err)
        self._run_map = p
        self.run_struct = ffi.cast("struct kvm_run *", p)
        self._ring_map = None
        self.dirty_ring = None
        # the stuck-ring recovery of drain_full_dirty_ring()
        self._ring_taken = 0
        self._empty_full_since: int | None = None
        self._stuck_reset_pos: int | None = None
        if vm.dirty_ring_bytes:
            size = vm.dirty_ring_bytes
            q = lib.mmap(ffi.NULL, size, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED,
                         fd, lib.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
            if int(ffi.cast("intptr_t", q)) == -1:
                raise KvmError("mmap(dirty ring)", ffi.errno)
            self._ring_map = (q, size)
            self.dirty_ring = np.frombuffer(ffi.buffer(q, size), dtype=DIRTY_GFN_DTYPE)

    def close(self) -> None:
        if self._ring_map is not None:
            self.dirty_ring = None
            lib.munmap(self._ring_map[0], self._ring_map[1])
            self._ring_map = None
        if self._run_map is not None:
            self.run_struct = None
            lib.munmap(self._run_map, self._run_size)
            self._run_map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _ioctl(self, req: int, arg, name: str, detail: str = "") -> int:
        return _check(lib.hv_ioctl(self.fd, req, arg), name, detail)

    # -- running -------------------------------------------------------------
    def set_immediate_exit(self, value: bool) -> None:
        """kvm_run->immediate_exit: KVM_RUN returns EINTR at once while set."""
        self.run_struct.immediate_exit = 1 if value else 0

    def run(self) -> VcpuExit:
        """KVM_RUN, the exit decoded. The GIL is released while the guest runs."""
        rc = lib.hv_ioctl_val(self.fd, lib.KVM_RUN, 0)
        if rc < 0:
            err = ffi.errno
            if err in (errno.EINTR, errno.EAGAIN):
                return Intr()
            raise KvmError("KVM_RUN", err)
        run = self.run_struct
        reason = run.exit_reason
        if reason == lib.KVM_EXIT_IO:
            io = lib.hv_run_io(run)
            n = io.size * io.count
            buf = ffi.buffer(ffi.cast("char *", run) + io.data_offset, n)
            if io.direction == lib.KVM_EXIT_IO_OUT:
                return IoOut(io.port, io.size, io.count, bytes(buf))
            return IoIn(io.port, io.size, io.count, buf)
        if reason == lib.KVM_EXIT_MMIO:
            m = lib.hv_run_mmio(run)
            if m.is_write:
                return MmioWrite(m.phys_addr, bytes(ffi.buffer(m.data, m.len)))
            return MmioRead(m.phys_addr, m.len, ffi.buffer(m.data, m.len))
        if reason == lib.KVM_EXIT_HLT:
            return Hlt()
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return Shutdown()
        if reason == lib.KVM_EXIT_INTR:
            return Intr()
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            ie = lib.hv_run_internal(run)
            return InternalError(ie.suberror, [ie.data[i] for i in range(min(ie.ndata, 16))])
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            fe = lib.hv_run_fail_entry(run)
            return FailEntry(fe.hardware_entry_failure_reason, fe.cpu)
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            se = lib.hv_run_system_event(run)
            return SystemEvent(se.type, [se.data[i] for i in range(min(se.ndata, 16))])
        if reason == lib.KVM_EXIT_DIRTY_RING_FULL:
            return DirtyRingFull()
        return Unknown(reason, lib.hv_run_hw_exit_reason(run))

    # -- registers -------------------------------------------------------------
    def get_regs(self) -> dict:
        """KVM_GET_REGS as {name: value}."""
        r = ffi.new("struct kvm_regs *")
        self._ioctl(lib.KVM_GET_REGS, r, "KVM_GET_REGS")
        return {n: getattr(r, n) for n in REG_NAMES}

    def set_regs(self, regs: dict) -> None:
        """KVM_SET_REGS; names missing from regs are zero."""
        r = ffi.new("struct kvm_regs *")
        for n in REG_NAMES:
            setattr(r, n, regs.get(n, 0))
        self._ioctl(lib.KVM_SET_REGS, r, "KVM_SET_REGS")

    def get_sregs(self) -> dict:
        """KVM_GET_SREGS as nested plain data."""
        s = ffi.new("struct kvm_sregs *")
        self._ioctl(lib.KVM_GET_SREGS, s, "KVM_GET_SREGS")
        out: dict = {}
        for seg in SEGMENTS:
            sp = getattr(s, seg)
            out[seg] = {f: getattr(sp, f) for f in SEGMENT_FIELDS}
        for dt in ("gdt", "idt"):
            d = getattr(s, dt)
            out[dt] = {"base": d.base, "limit": d.limit}
        for n in SREG_SCALARS:
            out[n] = getattr(s, n)
        out["interrupt_bitmap"] = list(s.interrupt_bitmap)
        return out

    def set_sregs(self, sregs: dict) -> None:
        """KVM_SET_SREGS from get_sregs()-shaped data."""
        s = ffi.new("struct kvm_sregs *")
        for seg in SEGMENTS:
            sp = getattr(s, seg)
            for f in SEGMENT_FIELDS:
                setattr(sp, f, sregs[seg].get(f, 0))
        for dt in ("gdt", "idt"):
            d = getattr(s, dt)
            d.base, d.limit = sregs[dt]["base"], sregs[dt]["limit"]
        for n in SREG_SCALARS:
            setattr(s, n, sregs[n])
        for i, w in enumerate(sregs.get("interrupt_bitmap", [])):
            s.interrupt_bitmap[i] = w
        self._ioctl(lib.KVM_SET_SREGS, s, "KVM_SET_SREGS")

    def _get_raw(self, ctype: str, req: int, name: str) -> bytes:
        p = ffi.new(ctype + " *")
        self._ioctl(req, p, name)
        return _raw(p, ctype)

    def _set_raw(self, ctype: str, req: int, name: str, data: bytes) -> None:
        self._ioctl(req, _from_raw(ctype, data, name), name)

    def get_fpu(self) -> bytes:
        """KVM_GET_FPU: raw struct kvm_fpu."""
        return self._get_raw("struct kvm_fpu", lib.KVM_GET_FPU, "KVM_GET_FPU")

    def set_fpu(self, data: bytes) -> None:
        """KVM_SET_FPU."""
        self._set_raw("struct kvm_fpu", lib.KVM_SET_FPU, "KVM_SET_FPU", data)

    def get_lapic(self) -> bytes:
        """KVM_GET_LAPIC: the 1 KiB LAPIC register page."""
        return self._get_raw("struct kvm_lapic_state", lib.KVM_GET_LAPIC, "KVM_GET_LAPIC")

    def set_lapic(self, data: bytes) -> None:
        """KVM_SET_LAPIC."""
        self._set_raw("struct kvm_lapic_state", lib.KVM_SET_LAPIC, "KVM_SET_LAPIC", data)

    def get_vcpu_events(self) -> bytes:
        """KVM_GET_VCPU_EVENTS: raw struct kvm_vcpu_events."""
        return self._get_raw("struct kvm_vcpu_events", lib.KVM_GET_VCPU_EVENTS,
                             "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, data: bytes) -> None:
        """KVM_SET_VCPU_EVENTS."""
        self._set_raw("struct kvm_vcpu_events", lib.KVM_SET_VCPU_EVENTS,
                      "KVM_SET_VCPU_EVENTS", data)

    def get_debugregs(self) -> bytes:
        """KVM_GET_DEBUGREGS: raw struct kvm_debugregs."""
        return self._get_raw("struct kvm_debugregs", lib.KVM_GET_DEBUGREGS,
                             "KVM_GET_DEBUGREGS")

    def set_debugregs(self, data: bytes) -> None:
        """KVM_SET_DEBUGREGS."""
        self._set_raw("struct kvm_debugregs", lib.KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS", data)

    def get_xcrs(self) -> bytes:
        """KVM_GET_XCRS: raw struct kvm_xcrs."""
        return self._get_raw("struct kvm_xcrs", lib.KVM_GET_XCRS, "KVM_GET_XCRS")

    def set_xcrs(self, data: bytes) -> None:
        """KVM_SET_XCRS."""
        self._set_raw("struct kvm_xcrs", lib.KVM_SET_XCRS, "KVM_SET_XCRS", data)

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE."""
        p = ffi.new("struct kvm_mp_state *")
        self._ioctl(lib.KVM_GET_MP_STATE, p, "KVM_GET_MP_STATE")
        return p.mp_state

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE."""
        p = ffi.new("struct kvm_mp_state *")
        p.mp_state = state
        self._ioctl(lib.KVM_SET_MP_STATE, p, "KVM_SET_MP_STATE")

    def get_msrs(self, indices) -> dict[int, int]:
        """KVM_GET_MSRS for indices; MSRs KVM refuses are left out of the result
        (the ioctl stops at the first one it cannot read; hv retries past it)."""
        indices = list(indices)
        out: dict[int, int] = {}
        while indices:
            n = len(indices)
            m = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
            m.nmsrs = n
            for i, idx in enumerate(indices):
                m.entries[i].index = idx
            done = self._ioctl(lib.KVM_GET_MSRS, m, "KVM_GET_MSRS")
            for i in range(done):
                out[m.entries[i].index] = m.entries[i].data
            indices = indices[done + 1:]
        return out

    def set_msrs(self, msrs: dict[int, int]) -> int:
        """KVM_SET_MSRS; returns how many were set (it stops at the first refused)."""
        items = list(msrs.items())
        n = len(items)
        m = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        m.nmsrs = n
        for i, (idx, val) in enumerate(items):
            m.entries[i].index = idx
            m.entries[i].data = val
        return self._ioctl(lib.KVM_SET_MSRS, m, "KVM_SET_MSRS")

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        """KVM_SET_CPUID2."""
        self._ioctl(lib.KVM_SET_CPUID2, _cpuid2(entries), "KVM_SET_CPUID2")

    def get_cpuid2(self) -> list[CpuidEntry]:
        """KVM_GET_CPUID2."""
        n = 256
        c = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
        c.nent = n
        self._ioctl(lib.KVM_GET_CPUID2, c, "KVM_GET_CPUID2")
        return _cpuid_list(c)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ."""
        return _check(lib.hv_ioctl_val(self.fd, lib.KVM_GET_TSC_KHZ, 0), "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ."""
        _check(lib.hv_ioctl_val(self.fd, lib.KVM_SET_TSC_KHZ, khz), "KVM_SET_TSC_KHZ")

    def kvmclock_ctrl(self) -> None:
        """KVM_KVMCLOCK_CTRL: tell the guest it was paused (no soft-lockup warnings)."""
        _check(lib.hv_ioctl_val(self.fd, lib.KVM_KVMCLOCK_CTRL, 0), "KVM_KVMCLOCK_CTRL")

    # -- dirty ring ------------------------------------------------------------
    # KVM's ring keeps two counters: dirty_index (next push) and reset_index
    # (next entry KVM_RESET_DIRTY_RINGS re-protects). The reset walks on while
    # entries are marked harvested, with no bound at dirty_index; the vCPU
    # exits DIRTY_RING_FULL while dirty_index - reset_index (u32) is at or
    # above the soft limit. So only entries KVM published may be marked
    # harvested: one marked ahead of dirty_index drives reset_index past it,
    # the difference underflows and the ring stays full for good.

    def harvest_dirty_ring_arrays(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """Take every entry KVM published to this vCPU's ring, wherever it
        stands, and mark it harvested; call Vm.reset_dirty_rings() afterwards
        to let KVM reuse the entries and write-protect the pages again.
        Returns (slots, offsets, overflowed). Safe while the vCPU runs: KVM
        writes slot and offset before the DIRTY flag, and x86 keeps loads in
        order. overflowed says every entry was published: a KVM that pushes
        past the soft limit (this nested one does, for writes its instruction
        emulator makes) may have overwritten entries, so the caller must take
        every page as dirty."""
        ring = self.dirty_ring
        if ring is None:
            return np.zeros(0, np.uint32), np.zeros(0, np.uint64), False
        flags = ring["flags"]
        idx = np.flatnonzero((flags & lib.KVM_DIRTY_GFN_F_DIRTY) != 0)
        slots = ring["slot"][idx].copy()
        offsets = ring["offset"][idx].copy()
        flags[idx] = lib.KVM_DIRTY_GFN_F_RESET
        self._ring_taken += len(idx)
        return slots, offsets, len(idx) == len(ring)

    def harvest_dirty_ring(self) -> list[tuple[int, int]]:
        """harvest_dirty_ring_arrays() as a list of (slot, page offset)."""
        slots, offsets, _ = self.harvest_dirty_ring_arrays()
        return list(zip(slots.tolist(), offsets.tolist()))

    def drain_full_dirty_ring(self, reset: Callable[[], int]) -> tuple[np.ndarray, np.ndarray, bool]:
        """On this vCPU's DIRTY_RING_FULL exit (its own thread, out of
        KVM_RUN): harvest, call reset (Vm.reset_dirty_rings), and return
        (slots, offsets, lost). lost says entries were overwritten before
        anyone could read them: take every page as dirty.

        A KVM that overfilled its ring can also leave reset_index on an
        entry it already reset, with the ring still soft-full: nothing is
        published, nothing can be reset, the vCPU exits full forever. A
        second full exit with nothing published, with no harvest having taken
        an entry of this ring since the first (which may have raced with a
        harvester's reset), is that state: the vCPU ran nothing in between.
        reset_index is then found by marking one entry at a time until a
        reset takes it, and stepped on by small blocks, one block per full
        exit, so that it stops short of dirty_index, never past it. Once the
        vCPU runs and pushes again, the rest of the emptied entries up to the
        first it pushed are marked too, and the reset catches up. The
        entries stepped over are lost."""
        slots, offsets, lost = self.harvest_dirty_ring_arrays()
        if self._stuck_reset_pos is not None and self._mark_stepped_holes():
            lost = True
        reset()
        if len(offsets):
            self._empty_full_since = None
            self._stuck_reset_pos = None
            return slots, offsets, lost
        if self._empty_full_since == self._ring_taken:
            # empty twice, and no harvest took anything of this ring between
            self._step_stuck_reset_index(reset)
            return slots, offsets, True
        self._empty_full_since = self._ring_taken
        self._stuck_reset_pos = None
        return slots, offsets, lost

    RING_STEP_ENTRIES = 16

    def _mark_stepped_holes(self) -> bool:
        """Mark harvested the emptied entries between the stepped reset_index
        and the first entry KVM pushed since; False if it pushed none yet."""
        flags = self.dirty_ring["flags"]
        n = len(flags)
        order = (self._stuck_reset_pos + np.arange(n)) % n
        pushed = np.flatnonzero(flags[order] != 0)
        if not len(pushed):
            return False
        flags[order[:pushed[0]]] = lib.KVM_DIRTY_GFN_F_RESET
        self._stuck_reset_pos = None
        return True

    def _step_stuck_reset_index(self, reset: Callable[[], int]) -> None:
        ring = self.dirty_ring
        n = len(ring)
        flags = ring["flags"]
        if self._stuck_reset_pos is None:
            for i in range(n):
                flags[i] = lib.KVM_DIRTY_GFN_F_RESET
                reset()
                if flags[i] == 0:
                    self._stuck_reset_pos = (i + 1) % n
                    return
                flags[i] = 0
            return              # no entry was taken: nothing stepped, nothing lost
        pos = self._stuck_reset_pos
        block = (pos + np.arange(min(self.RING_STEP_ENTRIES, n))) % n
        flags[block] = lib.KVM_DIRTY_GFN_F_RESET
        reset()
        taken = block[flags[block] == 0]
        flags[block] = 0        # what the reset did not take stays unpublished
        self._stuck_reset_pos = (pos + len(taken)) % n
