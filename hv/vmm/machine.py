"""A virtual machine assembled: guest RAM in KVM memory slots, the in-kernel
irqchip and PIT, the vCPUs, the legacy devices and the virtio-mmio devices;
one thread per vCPU that owns it, the run state with its pause owners, and
the control commands a machine answers.

    m = Machine(MachineConfig(mem_mib=128, kernel=..., initrd=..., append=...))
    m.boot(); m.start(); m.wait()

Each vCPU thread runs an explicit state machine (running, parked, ended).
pause() sets kvm_run->immediate_exit and sends KICK_SIGNAL to the vCPU
threads: KVM_RUN returns EINTR (after completing any pending I/O, so the
vCPU state is consistent), each thread parks. Once all are parked, the
devices quiesce (no device writes guest memory or raises an interrupt from
its own thread) and guest memory is frozen against VMM writes; only then
does pause() return, so a migration's last dirty harvest and save_state()
see a still guest. resume() undoes both before the vCPUs run. A parked
vCPU thread runs what other threads ask of its vCPU (on_vcpu()). A pause
that times out is rolled back.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from typing import Callable

from .. import boot as bootmod
from .. import cpu as cpumod
from .. import kvm as K
from .. import mptable
from .. import params
from .._kvm import lib
from ..devices import Device, IrqLine
from ..devices.bus import Bus
from ..devices.legacy import (I8042, I8042_BASE, I8042_LEN, POST_PORT, POWEROFF_PORT,
                              PostCode, PowerOff)
from ..devices.uart import COM1_BASE, COM1_IRQ, NUM_REGS, Serial
from ..memory import GuestMemory
from . import state as statemod
from .config import (DIRTY_RING_MIN_BYTES, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR, MIB,
                     MIN_MEM_MIB, VIRTIO_FIRST_GSI, VIRTIO_MAX_DEVICES, VIRTIO_MMIO_BASE,
                     VIRTIO_MMIO_SIZE, MachineConfig, balloon_kwargs, base_cmdline,
                     check_dirty_ring_size, max_mem_mib)
from .runstate import (MIGRATION_HOLDS_MESSAGE, PAUSE_MIGRATION, PAUSE_POSTCOPY,
                       POSTCOPY_HOLDS_MESSAGE, PAUSE_USER,
                       POSTMIGRATE_MESSAGE, STATUS_PAUSED, STATUS_POSTMIGRATE,
                       STATUS_PRELAUNCH, STATUS_RUNNING, STATUS_SHUTDOWN, MachineError)
from .vcpu import IO_EXITS, describe_failure, handle_exit, on_parked, set_lint

log = logging.getLogger("hv.vmm")

#: the CPU throttle's period (QEMU's CPU_THROTTLE_TIMESLICE_NS) and its maximum
CPU_THROTTLE_TIMESLICE_S = 0.010
MAX_CPU_THROTTLE = 99

#: how long console input waits for the guest to make room in the UART FIFO
CONSOLE_INPUT_TIMEOUT_S = 5.0


def _open_disks(disks) -> list:
    from ..devices.virtio.blk import Blk, disk_options
    if not isinstance(disks, (list, tuple)):
        raise MachineError("disks is not a list")
    opened: list = []
    try:
        for item in disks:
            opened.append(Blk(**disk_options(item)))
    except BaseException:
        for d in opened:
            d.close()
        raise
    return opened


class KvmIrqLine(IrqLine):
    """A GSI of the in-kernel irqchip, driven with KVM_IRQ_LINE."""

    def __init__(self, vm: K.Vm, gsi: int):
        self.vm = vm
        self.gsi = gsi

    def set_level(self, level: bool) -> None:
        self.vm.irq_line(self.gsi, level)


class Machine:
    def __init__(self, config: MachineConfig):
        self.config = config
        most = max_mem_mib()
        if isinstance(config.mem_mib, bool) or not isinstance(config.mem_mib, int) or \
                not MIN_MEM_MIB <= config.mem_mib <= most:
            raise MachineError(f"guest memory of {config.mem_mib} MiB is out of range: give "
                               f"between {MIN_MEM_MIB} and {most} MiB (this host's RAM)")
        self._balloon_kwargs = balloon_kwargs(config) if config.balloon else {}
        #: virtio-blk devices; their images are opened first so a bad one fails early
        self.disks = _open_disks(config.disks)
        try:
            self.kvm = K.Kvm()
        except BaseException:
            for d in self.disks:
                d.close()
            raise
        max_cpus = min(self.kvm.check_extension(lib.KVM_CAP_MAX_VCPUS)
                       or self.kvm.check_extension(lib.KVM_CAP_NR_VCPUS) or 1,
                       mptable.MAX_CPUS)
        if isinstance(config.cpus, bool) or not isinstance(config.cpus, int) or \
                not 1 <= config.cpus <= max_cpus:
            self.kvm.close()
            raise MachineError(f"{config.cpus!r} vCPUs: this KVM runs 1 to {max_cpus} vCPUs "
                               f"per guest (KVM_CAP_MAX_VCPUS)")
        K.install_kick_handler()
        self.memory = GuestMemory(config.mem_mib * MIB)
        self.vm = self.kvm.create_vm()
        self.dirty_logging = False
        for slot, gpa, size in self.memory_slots():
            self.vm.set_user_memory_region(slot, gpa, size, self.memory.host_addr + gpa)
        self.vm.set_tss_addr(KVM_TSS_ADDR)
        self.vm.set_identity_map_addr(KVM_IDENTITY_MAP_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        if config.dirty_ring_bytes:
            try:
                self._enable_dirty_ring(config.dirty_ring_bytes)
            except BaseException:
                self.vm.close()
                self.kvm.close()
                raise
        self.supported_cpuid = self.kvm.supported_cpuid()
        self.vcpus: list[K.Vcpu] = []
        self.cpuid_workarounds: list[str] = []
        for i in range(config.cpus):
            v = self.vm.create_vcpu(i)
            wanted = cpumod.guest_cpuid(self.supported_cpuid, i, config.cpus)
            v.set_cpuid2(wanted)
            if i == 0:
                self.cpuid_workarounds = cpumod.kernel_workarounds(wanted, v.get_cpuid2())
            set_lint(v)
            self.vcpus.append(v)
        self.has_xcrs = bool(self.kvm.check_extension(lib.KVM_CAP_XCRS))
        self.msr_indices = self._saved_msr_indices()

        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self._irq_lines: dict[int, KvmIrqLine] = {}
        self.console_listeners: list[Callable[[bytes], None]] = []
        self.serial = Serial(self.irq_line(COM1_IRQ))
        self.serial.listeners.append(self._console_out)
        self.pio.register(COM1_BASE, NUM_REGS, self.serial)
        self.pio.register(I8042_BASE, I8042_LEN, I8042(self._on_reset))
        self.pio.register(POWEROFF_PORT, 1, PowerOff(self._on_poweroff))
        self.pio.register(POST_PORT, 1, PostCode())
        self.virtio: list = []
        self._virtio_cmdline: list[str] = []
        self.balloon = None

        self.commands: dict[str, Callable[[dict], object]] = {
            "query-status": self._cmd_query_status,
            "stop": self._cmd_stop,
            "cont": self._cmd_cont,
            "quit": self._cmd_quit,
            "query-exits": lambda args: self.exit_summary(),
            "console-input": self._cmd_console_input,
        }
        self.commands.update(self.serial.commands())

        # vCPU loop state
        self._cond = threading.Condition()
        #: serialises pause/resume/postmigrate (they quiesce devices outside _cond)
        self._lifecycle = threading.RLock()
        self._status = STATUS_PRELAUNCH
        self._want = STATUS_RUNNING
        self._holds: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._in_run = [False] * len(self.vcpus)
        self._parked = [False] * len(self.vcpus)
        #: work for a parked vCPU thread: [(fn(vcpu), result box)] per vCPU
        self._requests: list[list] = [[] for _ in self.vcpus]
        #: fn(new_status, reason) after every run-state change (any thread)
        self.status_listeners: list[Callable[[str, str], None]] = []
        self.shutdown_reason: str | None = None
        self.error: str | None = None
        self.exit_counts: Counter = Counter()
        self.io_counts: Counter = Counter()
        self.started_at: float | None = None
        self.boot_result: bootmod.BootResult | None = None
        #: called on the vCPU's thread with the vCPU on KVM_EXIT_DIRTY_RING_FULL
        #: (migration sets it); the default empties the ring and resets it.
        self.dirty_ring_full_handler: Callable[[K.Vcpu], None] | None = None
        self.on_shutdown: list[Callable[[str], None]] = []
        #: CPU throttle (auto-converge): percent of each timeslice the vCPUs sleep
        self._throttle_pct = 0
        #: per-vCPU throttle (dirty-limit), on top of the machine-wide one
        self._vcpu_throttle = [0] * len(self.vcpus)
        self._throttle_due = [False] * len(self.vcpus)
        self._throttle_thread: threading.Thread | None = None

        if config.balloon:
            self._add_balloon()
        for d in self.disks:
            self.add_virtio_mmio(d)
        self.nets: list = []
        self._restored = False
        try:
            for spec in config.nets:
                self._add_net(spec)
        except BaseException:
            self.close()
            raise

    # -- helpers ---------------------------------------------------------------------
    def irq_line(self, gsi: int) -> KvmIrqLine:
        line = self._irq_lines.get(gsi)
        if line is None:
            line = self._irq_lines[gsi] = KvmIrqLine(self.vm, gsi)
        return line

    def _console_out(self, data: bytes) -> None:
        stream = self.config.console
        if stream is not None:
            try:
                stream.write(data)
                stream.flush()
            except (OSError, ValueError):
                pass
        for listener in list(self.console_listeners):
            listener(data)

    def console_input(self, data: bytes, timeout: float = CONSOLE_INPUT_TIMEOUT_S) -> int:
        """Type data on the guest console: it goes into the UART's receive FIFO
        as if typed on the terminal. When the FIFO is full, waits for the guest
        to read from it; fails when it has taken nothing for timeout seconds.
        Returns the number of bytes (all of data)."""
        if self.status == STATUS_SHUTDOWN:
            raise MachineError("the guest is shut down")
        left = memoryview(data)
        deadline = time.monotonic() + timeout
        while left:
            room = self.serial.rx_room()
            n = self.serial.enqueue(bytes(left[:room])) if room else 0
            if n:
                left = left[n:]
                deadline = time.monotonic() + timeout
                continue
            if time.monotonic() >= deadline:
                raise MachineError(f"console input: the guest has not read its console for "
                                   f"{timeout:g} s; {len(data) - len(left)} of {len(data)} "
                                   f"bytes typed")
            time.sleep(0.01)
        return len(data)

    def _saved_msr_indices(self) -> list[int]:
        wanted = list(dict.fromkeys(self.kvm.msr_index_list() + list(cpumod.boot_msrs())))
        readable = self.vcpus[0].get_msrs(wanted)
        return [i for i in wanted if i in readable]

    def _enable_dirty_ring(self, size: int) -> None:
        entry = K.DIRTY_GFN_DTYPE.itemsize
        limit = max(self.vm.check_extension(lib.KVM_CAP_DIRTY_LOG_RING),
                    self.vm.check_extension(lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL))
        if limit <= 0:
            raise MachineError("this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING); "
                               "leave the dirty ring off (0) and use the dirty bitmap")
        if not check_dirty_ring_size(size, limit):
            raise MachineError(
                f"dirty ring of {size} bytes: give 0 (off) or a power of two from "
                f"{DIRTY_RING_MIN_BYTES} to {limit} bytes (KVM's maximum here), i.e. "
                f"{DIRTY_RING_MIN_BYTES // entry} to {limit // entry} entries of {entry} bytes")
        try:
            self.vm.enable_dirty_ring(size)
        except K.KvmError as e:
            raise MachineError(f"KVM refused a dirty ring of {size} bytes ({e}); try a "
                               f"larger power of two, up to {limit}") from None

    def memory_slots(self) -> list[tuple[int, int, int]]:
        """(KVM slot, guest physical address, size) of each RAM region."""
        return [(slot, gpa, size) for slot, (gpa, size) in enumerate(self.memory.regions)]

    def set_dirty_logging(self, enabled: bool) -> None:
        """Turn KVM_MEM_LOG_DIRTY_PAGES on or off for every RAM slot."""
        flags = lib.KVM_MEM_LOG_DIRTY_PAGES if enabled else 0
        for slot, gpa, size in self.memory_slots():
            self.vm.set_user_memory_region(slot, gpa, size, self.memory.host_addr + gpa, flags)
        self.dirty_logging = enabled

    # -- devices ----------------------------------------------------------------------------
    def add_virtio_mmio(self, device):
        """Put device behind a virtio-mmio transport in the next window; its
        virtio_mmio.device= entry joins the command line (add before boot())."""
        from ..devices.virtio.mmio import VirtioMmioTransport
        i = len(self.virtio)
        if i >= VIRTIO_MAX_DEVICES:
            raise MachineError(f"at most {VIRTIO_MAX_DEVICES} virtio devices")
        base = VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE * i
        gsi = VIRTIO_FIRST_GSI + i
        t = VirtioMmioTransport(device, self.memory, self.irq_line(gsi), f"virtio-mmio.{i}")
        self.mmio.register(base, VIRTIO_MMIO_SIZE, t)
        for hook, arg in (("irqfd", gsi), ("ioeventfd", base)):
            fn = getattr(t, hook, None)
            if callable(fn):
                try:
                    fn(self.vm, arg)
                except Exception as e:  # the transport falls back to exits
                    log.warning("virtio-mmio.%d: %s hook failed: %s", i, hook, e)
        self.virtio.append(t)
        self._virtio_cmdline.append(f"virtio_mmio.device=4K@{base:#x}:{gsi}")
        for name, fn in t.commands().items():
            self.commands.setdefault(name, fn)
        return t

    def _add_balloon(self) -> None:
        try:
            from ..devices.virtio.balloon import Balloon
        except ImportError as e:
            log.warning("no virtio-balloon: %s", e)
            return
        self.balloon = Balloon(self.memory, **self._balloon_kwargs)
        self.add_virtio_mmio(self.balloon)

    def _add_net(self, spec: dict) -> None:
        from ..devices.virtio.net import Net, NetError, default_mac, open_tap, parse_mac
        if not isinstance(spec, dict) or not isinstance(spec.get("tap"), str) or \
                set(spec) - {"tap", "mac"}:
            raise MachineError(f"net {spec!r}: give {{'tap': NAME, 'mac': MAC (optional)}}")
        try:
            mac = parse_mac(spec["mac"]) if spec.get("mac") else default_mac(spec["tap"])
            fd = open_tap(spec["tap"])
        except NetError as e:
            raise MachineError(str(e)) from None
        # held: the tap is read only once the vCPUs run (start())
        net = Net(self.memory, fd, mac, tap=spec["tap"], held=True)
        try:
            self.add_virtio_mmio(net)
        except BaseException:
            net.close()
            raise
        self.nets.append(net)

    def devices(self) -> list[Device]:
        return [d for _, _, d in self.pio.devices()] + [d for _, _, d in self.mmio.devices()]

    # -- boot -------------------------------------------------------------------------------
    def kernel_cmdline(self) -> str:
        c = bootmod.Cmdline()
        base = self.config.cmdline if self.config.cmdline is not None else base_cmdline()
        c.add(cpumod.merge_cmdline(base, self.cpuid_workarounds))
        for entry in self._virtio_cmdline:
            c.add(entry)
        if self.config.append:
            c.add(self.config.append)
        return str(c)

    def boot(self) -> bootmod.BootResult:
        """Load the kernel and initrd, write the MP table, set the vCPU's registers."""
        if not self.config.kernel:
            raise MachineError("no kernel given")
        cmdline = bootmod.Cmdline().add(self.kernel_cmdline())
        self.memory.write(mptable.MPTABLE_START, mptable.build(len(self.vcpus)))
        result = bootmod.load_kernel(self.memory, self.config.kernel, cmdline,
                                     self.config.initrd, mptable.e820_map(self.memory.regions))
        v = self.vcpus[0]
        bootmod.setup_vcpu(v, result)
        v.set_msrs(cpumod.boot_msrs())
        v.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
        self.boot_result = result
        return result

    def resident_ranges(self) -> list[tuple[int, int]]:
        """Guest physical (start, length) ranges that hold what the guest
        keeps for good: the kernel image hv loaded (BootResult.resident); []
        for a machine that did not boot here (migrated in, restored)."""
        return list(self.boot_result.resident) if self.boot_result is not None else []

    # -- the vCPU loop ------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self._status

    @status.setter
    def status(self, value: str) -> None:
        self._set_status(value, "")

    def _set_status(self, value: str, reason: str) -> None:
        with self._cond:
            changed = self._status != value
            self._status = value
            self._cond.notify_all()
        if changed:
            self._notify_status(value, reason)

    def _notify_status(self, value: str, reason: str) -> None:
        for fn in list(self.status_listeners):
            try:
                fn(value, reason)
            except Exception:
                log.exception("status listener failed")

    @property
    def started(self) -> bool:
        """Whether start() has run (the vCPU threads exist)."""
        return bool(self._threads)

    @property
    def pause_holders(self) -> frozenset[str]:
        """Who holds the guest paused now (empty while it runs)."""
        with self._cond:
            return frozenset(self._holds)

    def lock_storage(self) -> None:
        """Take every device's exclusive storage (disk image locks) before the
        guest runs here; raises HvError naming an image another VMM holds."""
        taken = []
        try:
            for d in self.devices():
                d.lock_storage()
                taken.append(d)
        except BaseException:
            for d in taken:
                d.unlock_storage()
            raise

    def unlock_storage(self) -> None:
        """Give the storage locks up (paused: a migration hands them over)."""
        for d in self.devices():
            d.unlock_storage()

    def start(self) -> None:
        """Run the vCPU thread(s); they stay paused while anyone holds a pause."""
        with self._lifecycle:
            if not self._threads:
                self.lock_storage()
            with self._cond:
                if self._threads:
                    raise MachineError("machine already started")
                if self._status == STATUS_SHUTDOWN:
                    raise MachineError("machine is shut down")
                self._want = STATUS_PAUSED if self._holds else STATUS_RUNNING
                self._parked = [bool(self._holds)] * len(self.vcpus)
                self.started_at = time.monotonic()
                for i, v in enumerate(self.vcpus):
                    t = threading.Thread(target=self._vcpu_thread, args=(i, v),
                                         name=f"hv-vcpu{i}", daemon=True)
                    self._threads.append(t)
            if self._holds:
                self._quiesce_devices()
            self._set_status(self._want, "start")
            for t in self._threads:
                t.start()
            for net in self.nets:
                net.release()
                if self._restored:
                    net.announce()  # a migration destination tells the network

    def _kick(self) -> None:
        for v, t in zip(self.vcpus, self._threads):
            v.set_immediate_exit(True)
            if t.ident is not None and t.is_alive():
                try:
                    signal.pthread_kill(t.ident, K.KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    def _all_parked(self) -> bool:
        return all(p or not t.is_alive() for p, t in zip(self._parked, self._threads))

    def pause(self, owner: str = PAUSE_USER, timeout: float = 10.0, keep: bool = False) -> None:
        """Hold the guest paused on behalf of owner. Returns once every vCPU
        is out of KVM_RUN with its pending I/O completed and the devices are
        quiesced. On timeout the hold is rolled back and MachineError raised;
        with keep, the hold stays instead and the machine counts as paused:
        a postcopy destination whose source is gone has vCPUs waiting in
        KVM_RUN on pages that never come (they run no guest code, and park
        if they ever leave it)."""
        with self._lifecycle:
            with self._cond:
                if self._status == STATUS_SHUTDOWN:
                    raise MachineError("the guest is shut down")
                was_paused = bool(self._holds)
                self._holds.add(owner)
                if was_paused:
                    return
                if not self._threads:
                    # before start(): start() leaves the vCPUs paused (QEMU's -S)
                    if self._status == STATUS_PRELAUNCH:
                        self._status = STATUS_PAUSED
                    return
                self._want = STATUS_PAUSED
                self._kick()
                deadline = time.monotonic() + timeout
                while not self._all_parked() and self._status != STATUS_SHUTDOWN:
                    left = deadline - time.monotonic()
                    if left <= 0 and keep:
                        log.warning("pause: %d vCPU(s) still in KVM_RUN after %.0f s; the "
                                    "hold %r stays", sum(not p for p in self._parked),
                                    timeout, owner)
                        break
                    if left <= 0:
                        self._holds.discard(owner)
                        self._want = STATUS_RUNNING
                        self._cond.notify_all()
                        raise MachineError(f"the vCPUs did not stop within {timeout:.0f} s; "
                                           "the guest keeps running")
                    self._cond.wait(min(left, 0.05))
                    self._kick()
                if self._status == STATUS_SHUTDOWN:
                    return
            self._quiesce_devices()
            self._set_status(STATUS_PAUSED, owner)

    def resume(self, owner: str = PAUSE_USER) -> None:
        """Drop owner's hold; the vCPUs run again once nobody holds a pause."""
        with self._lifecycle:
            if self._threads and self.pause_holders <= {owner} and \
                    self._status not in (STATUS_SHUTDOWN, STATUS_POSTMIGRATE):
                # a source whose migration failed after it gave its disks up:
                # it runs only with them back (raises and stays paused otherwise)
                self.lock_storage()
            with self._cond:
                if self._status == STATUS_SHUTDOWN:
                    raise MachineError("the guest is shut down")
                if self._status == STATUS_POSTMIGRATE:
                    raise MachineError(POSTMIGRATE_MESSAGE)
                self._holds.discard(owner)
                if self._holds:
                    return
                self._want = STATUS_RUNNING
                if not self._threads:
                    if self._status == STATUS_PAUSED:
                        self._status = STATUS_PRELAUNCH
                    return
            self._thaw_devices()
            with self._cond:
                self._want = STATUS_RUNNING
                self._cond.notify_all()
            self._set_status(STATUS_RUNNING, owner)

    def enter_postmigrate(self) -> None:
        """The guest now runs on the migration's destination: it stays paused
        here for good (QEMU's postmigrate); only quit is left."""
        with self._lifecycle:
            with self._cond:
                if self._status == STATUS_SHUTDOWN:
                    return
                if not self._holds:
                    raise MachineError("postmigrate needs a paused guest")
                self._holds.add(PAUSE_MIGRATION)
            self._set_status(STATUS_POSTMIGRATE, "migrated")

    # -- CPU throttle (auto-converge, dirty-limit) ---------------------------------
    @property
    def cpu_throttle_percentage(self) -> int:
        return self._throttle_pct

    @property
    def vcpu_throttle_percentages(self) -> list[int]:
        return list(self._vcpu_throttle)

    @staticmethod
    def _check_throttle(percent) -> None:
        if isinstance(percent, bool) or not isinstance(percent, int) or \
                not 0 <= percent <= MAX_CPU_THROTTLE:
            raise MachineError(f"CPU throttle of {percent!r} %: give 0 (off) to "
                               f"{MAX_CPU_THROTTLE}")

    def set_cpu_throttle(self, percent: int) -> None:
        """Let every vCPU run only (100 - percent) % of the time, as QEMU's
        cpu-throttle does for auto-converge: each CPU_THROTTLE_TIMESLICE_S
        the vCPU threads are kicked out of KVM_RUN and sleep
        percent / (100 - percent) timeslices. 0 ends the throttle."""
        self._check_throttle(percent)
        with self._cond:
            self._throttle_pct = percent
            self._start_throttle()

    def set_vcpu_throttle(self, index: int, percent: int) -> None:
        """The same for one vCPU (dirty-limit); a vCPU sleeps the larger of its
        own and the machine's share."""
        self._check_throttle(percent)
        if not 0 <= index < len(self.vcpus):
            raise MachineError(f"no vCPU {index}: the machine has {len(self.vcpus)}")
        with self._cond:
            self._vcpu_throttle[index] = percent
            self._start_throttle()

    def _throttle_of(self, index: int) -> int:
        return max(self._throttle_pct, self._vcpu_throttle[index])

    def _start_throttle(self) -> None:
        """Under _cond: wake the vCPUs, and start the timeslice thread when a
        throttle is on and it is not running."""
        self._cond.notify_all()
        on = self._throttle_pct or any(self._vcpu_throttle)
        start = on and (self._throttle_thread is None or not self._throttle_thread.is_alive())
        if start:
            self._throttle_thread = threading.Thread(target=self._throttle_loop,
                                                     name="hv-cpu-throttle", daemon=True)
            self._throttle_thread.start()

    def _throttle_loop(self) -> None:
        while True:
            time.sleep(CPU_THROTTLE_TIMESLICE_S)
            with self._cond:
                if not (self._throttle_pct or any(self._vcpu_throttle)) \
                        or self._want == STATUS_SHUTDOWN:
                    self._throttle_due = [False] * len(self.vcpus)
                    return
                if self._want != STATUS_RUNNING:
                    continue
                self._throttle_due = [True] * len(self.vcpus)
                self._kick()

    def _quiesce_devices(self) -> None:
        for d in self.devices():
            d.quiesce()
        self.memory.freeze()

    def _thaw_devices(self) -> None:
        self.memory.thaw()
        for d in self.devices():
            d.unquiesce()

    def request_shutdown(self, reason: str) -> None:
        """End the run (from any thread); wait() returns reason."""
        with self._cond:
            if self.shutdown_reason is None:
                self.shutdown_reason = reason
            self._want = STATUS_SHUTDOWN
            ended = not self._threads or not any(t.is_alive() for t in self._threads)
            self._cond.notify_all()
        if ended:
            self._set_status(STATUS_SHUTDOWN, self.shutdown_reason or reason)
        self._kick()

    def _on_poweroff(self, value: int) -> None:
        self.request_shutdown("poweroff")

    def _on_reset(self) -> None:
        self.request_shutdown("reboot")

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the machine down and wait for the vCPU threads."""
        self.request_shutdown("quit")
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    def wait(self, timeout: float | None = None) -> str | None:
        """Block until the guest ends; returns shutdown_reason."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._status != STATUS_SHUTDOWN:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left if left is not None else 1.0)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(5)
        return self.shutdown_reason

    def _vcpu_thread(self, index: int, vcpu: K.Vcpu) -> None:
        try:
            self._vcpu_loop(index, vcpu)
        except Exception as e:  # report, never hang
            log.exception("vCPU %d failed", index)
            self.error = self.error or f"vCPU {index}: {e}"
            self.request_shutdown("error")
        finally:
            with self._cond:
                self._in_run[index] = False
            self._set_status(STATUS_SHUTDOWN, self.shutdown_reason or "")
            for fn in list(self.on_shutdown):
                try:
                    fn(self.shutdown_reason or "")
                except Exception:
                    log.exception("shutdown callback failed")

    def _vcpu_loop(self, index: int, vcpu: K.Vcpu) -> None:
        counts = self.exit_counts
        # KVM finishes an I/O or MMIO instruction only when KVM_RUN is entered
        # again, and that pending part is in no state userspace can save. So
        # before pausing after such an exit, re-enter once with immediate_exit
        # set: KVM completes the access and returns at once, without running
        # guest code, and a saved state never replays the access.
        pending_io = False
        while True:
            with self._cond:
                while True:
                    if self._want == STATUS_SHUTDOWN:
                        return
                    if self._want == STATUS_PAUSED and pending_io:
                        vcpu.set_immediate_exit(True)
                        break
                    if self._want == STATUS_PAUSED:
                        self._in_run[index] = False
                        if not self._parked[index]:
                            self._parked[index] = True
                            on_parked(vcpu)
                            self._cond.notify_all()
                        if self._requests[index]:
                            self._serve_requests(index, vcpu)
                            continue
                        self._cond.wait()
                        continue
                    if self._throttle_due[index] and self._throttle_of(index):
                        # throttled: sleep out this timeslice's share; a pause,
                        # a shutdown or a throttle change ends the sleep early
                        self._throttle_due[index] = False
                        self._in_run[index] = False
                        pct = self._throttle_of(index)
                        self._cond.wait(CPU_THROTTLE_TIMESLICE_S * pct / (100 - pct))
                        continue
                    # running: clear a kick left over from an earlier pause
                    # (under the lock, so a new kick cannot be lost)
                    vcpu.set_immediate_exit(False)
                    break
                self._parked[index] = False
                self._in_run[index] = True
            ex = vcpu.run()
            counts[type(ex).__name__] += 1
            pending_io = type(ex) in IO_EXITS
            handle_exit(self, vcpu, ex)

    def _serve_requests(self, index: int, vcpu: K.Vcpu) -> None:
        """Run what other threads asked of this parked vCPU (under _cond)."""
        while self._requests[index]:
            fn, box = self._requests[index].pop(0)
            try:
                box["result"] = fn(vcpu)
            except BaseException as e:
                box["error"] = e
            box["done"] = True
        self._cond.notify_all()

    def on_vcpu(self, index: int, fn: Callable[[K.Vcpu], object]) -> object:
        """fn(vcpu) run by the thread that owns vCPU index (KVM wants a vCPU's
        ioctls from its own thread), which must be parked; returns fn's
        result. Before start() and after the thread ended, runs here."""
        thread = self._threads[index] if self._threads else None
        if thread is None or thread is threading.current_thread() or \
                thread.ident is None or not thread.is_alive():
            return fn(self.vcpus[index])
        box: dict = {}
        with self._cond:
            if not self._parked[index]:
                raise MachineError(f"vCPU {index} is running: pause the machine first")
            self._requests[index].append((fn, box))
            self._cond.notify_all()
            while "done" not in box:
                if not thread.is_alive():
                    raise MachineError(f"vCPU {index} ended before it answered")
                self._cond.wait(0.1)
        if "error" in box:
            raise box["error"]
        return box["result"]

    def on_each_vcpu(self, fn: Callable[[K.Vcpu], object]) -> list:
        return [self.on_vcpu(i, fn) for i in range(len(self.vcpus))]

    def describe_failure(self, vcpu: K.Vcpu, ex: K.InternalError) -> str:
        return describe_failure(self.memory, vcpu, ex)

    def exit_summary(self) -> dict:
        return {"exits": dict(self.exit_counts),
                "io_ports": {f"{p:#x}": n for p, n in self.io_counts.most_common(12)},
                "unhandled_pio": self.pio.unhandled, "unhandled_mmio": self.mmio.unhandled}

    # -- save / restore (hv.vmm.state) --------------------------------------------------------
    def save_state(self) -> dict:
        """The whole machine state but RAM, as plain data (the vCPUs must be paused)."""
        return statemod.save_state(self)

    def restore_state(self, state: dict) -> None:
        """Load save_state() output into this freshly created, not booted machine."""
        statemod.restore_state(self, state)
        self._restored = True

    # -- control commands -------------------------------------------------------------------------
    def _cmd_query_status(self, args: dict) -> dict:
        return {"status": self.status, "running": self.status == STATUS_RUNNING}

    def _cmd_stop(self, args: dict) -> dict:
        # before start() this makes start() leave the vCPUs paused (QEMU's -S)
        if self.status != STATUS_POSTMIGRATE:
            self.pause(PAUSE_USER)
        return {}

    def _cmd_cont(self, args: dict) -> dict:
        if self.status == STATUS_POSTMIGRATE:
            raise MachineError(POSTMIGRATE_MESSAGE)
        if PAUSE_MIGRATION in self.pause_holders:
            raise MachineError(MIGRATION_HOLDS_MESSAGE)
        if PAUSE_POSTCOPY in self.pause_holders:
            raise MachineError(POSTCOPY_HOLDS_MESSAGE)
        self.resume(PAUSE_USER)
        return {}

    def _cmd_console_input(self, args: dict) -> dict:
        params.refuse_unknown("console-input", args, ("data", "timeout_s"))
        data = params.take(args, "data", params.string)
        timeout = params.take(args, "timeout_s", params.number, 0, 3600,
                              default=CONSOLE_INPUT_TIMEOUT_S)
        return {"bytes": self.console_input(data.encode(), timeout)}

    def _cmd_quit(self, args: dict) -> dict:
        threading.Thread(target=self.request_shutdown, args=("quit",), daemon=True).start()
        return {}

    # -- teardown -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the vCPUs, close the devices, and release KVM and guest RAM;
        a vCPU thread that will not end keeps them mapped (and leaks them)
        rather than fault on an unmapped kvm_run or guest page."""
        if any(t.is_alive() for t in self._threads):
            self.stop()
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            log.error("%s still running: guest memory and the vCPU mappings stay mapped",
                      ", ".join(stuck))
            return
        for d in self.devices():
            try:
                d.close()
            except Exception:
                log.exception("closing %s", d.name)
        self.vm.close()
        self.kvm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
