"""Which pages changed since the last look: the dirty logs a migration reads.

    VmmDirtyLog    the VMM's own writes only (machines without KVM: tests)
    KvmDirtyLog    KVM_GET_DIRTY_LOG over every RAM slot (+ manual protect)
    RingDirtyLog   the per-vCPU KVM dirty rings
    dirty_log_for(machine, "auto" | "bitmap" | "ring" | "vmm")

Every log also ORs in the VMM's own writes (GuestMemory.take_dirty_bitmap).
Bitmaps are guest-physical (hv.memory): bit p stands for the page at p * 4 KiB.
"""

from __future__ import annotations

import threading

import numpy as np

from ..memory import PAGE_SIZE
from . import pages
from .protocol import MigrationError


class VmmDirtyLog:
    """Only the VMM's own writes (GuestMemory.take_dirty_bitmap): for machines
    without KVM, and ORed into the KVM logs below.

    sync() returns the pages dirtied since the last sync."""

    kind = "vmm"

    def __init__(self, machine):
        self.memory = machine.memory
        self.npages = self.memory.npages

    def start(self) -> None:
        self.memory.take_dirty_bitmap()

    def sync(self) -> np.ndarray:
        return pages.as_bitmap(self.memory.take_dirty_bitmap(), self.npages)

    def stop(self) -> None:
        pass


class KvmDirtyLog(VmmDirtyLog):
    """KVM_GET_DIRTY_LOG on every RAM slot, with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    when offered: a sync reads the log, then re-protects exactly those pages
    with KVM_CLEAR_DIRTY_LOG before they are sent. Each slot's log lands in
    the guest-physical bitmap at the slot's first page."""

    kind = "bitmap"

    def __init__(self, machine):
        super().__init__(machine)
        self.machine = machine
        self.vm = machine.vm
        self.manual = False
        if self.vm.dirty_ring_bytes and not isinstance(self, RingDirtyLog):
            raise MigrationError(
                'dirty_log "bitmap": this guest was started with a dirty ring (run-guest '
                '--dirty-ring), and KVM offers no dirty bitmap then; migrate with dirty_log '
                '"ring" or "auto"')

    def _set_logging(self, on: bool) -> None:
        self.machine.set_dirty_logging(on)

    def start(self) -> None:
        from .._kvm import lib
        if getattr(self.vm, "manual_dirty_log_protect", False):
            self.manual = True
        elif self.vm.check_extension(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
            try:
                self.vm.enable_manual_dirty_log_protect(initially_set=False)
                self.manual = True
            except OSError:
                self.manual = False
        self._set_logging(True)
        super().start()

    def _slots(self) -> list[tuple[int, int, int]]:
        """(slot, first pfn, pages) of guest RAM."""
        return [(slot, gpa // PAGE_SIZE, size // PAGE_SIZE)
                for slot, gpa, size in self.machine.memory_slots()]

    def sync(self) -> np.ndarray:
        bm = pages.empty_bitmap(self.npages)
        for slot, first, n in self._slots():
            kvm = pages.as_bitmap(self.vm.get_dirty_log(slot, n), n)
            if self.manual and pages.count(kvm):
                self.vm.clear_dirty_log(slot, 0, n, kvm)
            # slots start on a multiple of 64 pages: whole words
            bm[first // 64:first // 64 + len(kvm)] |= kvm
        pages.or_into(bm, super().sync())
        return bm

    def stop(self) -> None:
        try:
            self._set_logging(False)
        except OSError:
            pass


class RingDirtyLog(KvmDirtyLog):
    """The per-vCPU dirty rings (the machine must have been created with them).

    From before logging goes on until it is off again, every ring is
    harvested into the pending set: on a full ring by the vCPU's own thread
    (machine.dirty_ring_full_handler), every HARVEST_INTERVAL_S by a
    harvester thread so that rings rarely fill, and by sync(). A harvested
    entry is reset (its page write-protected again) before sync() returns,
    so before the page is read for sending. A ring that KVM overfilled may
    have lost entries: the next sync then reports every page dirty."""

    HARVEST_INTERVAL_S = 0.005
    kind = "ring"

    def __init__(self, machine):
        super().__init__(machine)
        # checked here so that the migrate command refuses at once
        if not self.vm.dirty_ring_bytes:
            raise MigrationError("dirty_log \"ring\" needs a machine created with a dirty ring "
                                 "(run-guest --dirty-ring BYTES, MachineConfig.dirty_ring_bytes:"
                                 " KVM_CAP_DIRTY_LOG_RING is enabled before the vCPUs exist)")
        self._pending = np.zeros(self.npages, dtype=bool)
        self._plock = threading.Lock()
        self._slot_list = self._slots()
        self._overflowed = False
        self._stop_harvester = threading.Event()
        self._harvester: threading.Thread | None = None
        self.stats = {"ring_full_exits": 0, "overflows": 0, "harvested": 0}
        #: entries each vCPU's ring published since logging went on: its dirty
        #: rate (hv.migration.dirty_limit), a page counted again after each reset
        self.vcpu_dirtied = [0] * len(machine.vcpus)

    def start(self) -> None:
        # The handler first: no full ring is emptied without us from the
        # moment logging is on.
        self.machine.dirty_ring_full_handler = self._on_full
        self._set_logging(True)
        VmmDirtyLog.start(self)
        self._harvester = threading.Thread(target=self._harvest_loop, name="hv-ring-harvest",
                                           daemon=True)
        self._harvester.start()

    def _take(self, slots: np.ndarray, offsets: np.ndarray, lost: bool,
              index: int | None = None) -> None:
        if index is not None:
            self.vcpu_dirtied[index] += len(slots)
        for slot, first, n in self._slot_list:
            offs = offsets[(slots == slot) & (offsets < n)]
            self._pending[first + offs.astype(np.int64)] = True
            self.stats["harvested"] += len(offs)
        if lost:
            self._overflowed = True
            self.stats["overflows"] += 1

    def _on_full(self, vcpu) -> None:
        """KVM_EXIT_DIRTY_RING_FULL, on the vCPU's own thread."""
        with self._plock:
            self.stats["ring_full_exits"] += 1
            self._take(*vcpu.drain_full_dirty_ring(self.vm.reset_dirty_rings),
                       index=self.machine.vcpus.index(vcpu))

    def _harvest_loop(self) -> None:
        while not self._stop_harvester.wait(self.HARVEST_INTERVAL_S):
            try:
                with self._plock:
                    for i, vcpu in enumerate(self.machine.vcpus):
                        self._take(*vcpu.harvest_dirty_ring_arrays(), index=i)
                    self.vm.reset_dirty_rings()
            except OSError:      # the VM is going away
                return

    def sync(self) -> np.ndarray:
        from ..memory import pack_bitmap
        with self._plock:
            for i, vcpu in enumerate(self.machine.vcpus):
                self._take(*vcpu.harvest_dirty_ring_arrays(), index=i)
            self.vm.reset_dirty_rings()
            bits, self._pending = self._pending, np.zeros(self.npages, dtype=bool)
            overflowed, self._overflowed = self._overflowed, False
        if overflowed:
            return self.memory.ram_bitmap()
        bm = pages.as_bitmap(pack_bitmap(bits), self.npages)
        pages.or_into(bm, VmmDirtyLog.sync(self))
        return bm

    def stop(self) -> None:
        self._stop_harvester.set()
        if self._harvester is not None and self._harvester is not threading.current_thread():
            self._harvester.join(1.0)
        super().stop()
        if self.machine.dirty_ring_full_handler == self._on_full:
            self.machine.dirty_ring_full_handler = None


def dirty_log_for(machine, kind: str):
    """The dirty log a migration of machine uses; MigrationError (before
    anything changes) when that kind cannot work for this machine."""
    vm = machine.vm
    if kind == "vmm" or vm is None:
        return VmmDirtyLog(machine)
    if kind == "ring" or (kind == "auto" and vm.dirty_ring_bytes):
        return RingDirtyLog(machine)
    return KvmDirtyLog(machine)
