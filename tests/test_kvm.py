"""hv.kvm against the real /dev/kvm with the tiny guests in tests/guests/."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hv import kvm as K
from hv._kvm import lib
from hv.memory import GuestMemory

from tinyguest import flat32  # noqa: E402

pytestmark = pytest.mark.kvm

MEM = 4 << 20
LOAD = 0x1000




@pytest.fixture
def vm_setup(tiny_guest):
    def make(name, irqchip=False, slot_flags=0, manual=False, ring=0):
        k = K.Kvm()
        vm = k.create_vm()
        if manual:
            vm.enable_manual_dirty_log_protect(initially_set=True)
        if ring:
            vm.enable_dirty_ring(ring)
        mem = GuestMemory(MEM)
        vm.set_user_memory_region(0, 0, MEM, mem.host_addr, slot_flags)
        if irqchip:
            vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        with open(tiny_guest(name), "rb") as f:
            mem.write(LOAD, f.read())
        return k, vm, vcpu, mem
    return make


def test_open_and_caps():
    k = K.Kvm()
    assert k.api_version() == 12
    assert k.check_extension(lib.KVM_CAP_USER_MEMORY)
    assert k.check_extension(lib.KVM_CAP_IMMEDIATE_EXIT)
    cpuid = k.supported_cpuid()
    assert any(e.function == 0 for e in cpuid)
    msrs = k.msr_index_list()
    assert 0x10 in msrs  # IA32_TSC


def test_missing_device_message():
    with pytest.raises(K.KvmUnavailable, match="not found: load the kvm module"):
        K.Kvm("/dev/no-such-kvm")


def test_error_names_ioctl():
    k = K.Kvm()
    vm = k.create_vm()
    with pytest.raises(K.KvmError) as e:
        vm.set_user_memory_region(0, 0x1001, 4096, 0)   # unaligned GPA
    assert "KVM_SET_USER_MEMORY_REGION" in str(e.value)
    assert e.value.errno is not None


def test_real_mode_out_and_hlt(vm_setup):
    k, vm, vcpu, mem = vm_setup("real16.bin")
    s = vcpu.get_sregs()
    s["cs"]["base"], s["cs"]["selector"] = 0, 0
    vcpu.set_sregs(s)
    vcpu.set_regs({"rip": LOAD, "rflags": 2})
    out = b""
    while True:
        e = vcpu.run()
        if isinstance(e, K.IoOut):
            assert e.port == 0x10 and e.size == 1
            out += e.data
        else:
            break
    assert out == b"hi"
    assert isinstance(e, K.Hlt)


def run_pm32_prologue(vcpu):
    """Drive pm32.bin through its I/O and MMIO part; returns the exits seen."""
    flat32(vcpu)
    seen = []
    e = vcpu.run()
    assert e == K.IoOut(0x10, 1, 1, b"A")
    e = vcpu.run()
    assert isinstance(e, K.IoIn) and e.port == 0x11 and e.size == 1
    e.buf[:] = b"z"
    assert vcpu.run() == K.IoOut(0x12, 1, 1, b"z")
    assert vcpu.run() == K.IoOut(0x14, 4, 1, (0x12345678).to_bytes(4, "little"))
    e = vcpu.run()
    assert e == K.MmioWrite(0xd0000000, (0xcafef00d).to_bytes(4, "little"))
    e = vcpu.run()
    assert isinstance(e, K.MmioRead) and e.addr == 0xd0000008 and e.size == 4
    e.buf[:] = (0x600dcafe).to_bytes(4, "little")
    assert vcpu.run() == K.IoOut(0x14, 4, 1, (0x600dcafe).to_bytes(4, "little"))
    return seen


def write_pages(vcpu, addrs):
    """Feed addresses to the guest's write loop (port 0x15); 0 ends it."""
    for a in list(addrs) + [None]:
        e = vcpu.run()
        assert isinstance(e, K.IoIn) and e.port == 0x15, e
        if a is None:
            e.buf[:] = bytes(4)
            return
        e.buf[:] = a.to_bytes(4, "little")


def dirty_pages(words, npages):
    return set(np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:npages]))


def test_pm32_io_mmio_hlt(vm_setup):
    k, vm, vcpu, mem = vm_setup("pm32.bin")
    run_pm32_prologue(vcpu)
    write_pages(vcpu, [0x20000, 0x22000])
    assert isinstance(vcpu.run(), K.Hlt)
    assert mem.read_u32(0x20000) == 0xdeadbeef
    assert mem.read_u32(0x22000) == 0xdeadbeef
    regs = vcpu.get_regs()
    assert LOAD <= regs["rip"] < LOAD + 0x100


def test_dirty_log_bitmap(vm_setup):
    k, vm, vcpu, mem = vm_setup("pm32.bin", slot_flags=lib.KVM_MEM_LOG_DIRTY_PAGES)
    npages = MEM // 4096
    run_pm32_prologue(vcpu)
    vm.get_dirty_log(0, npages)   # forget what the prologue dirtied
    # the loop: [0x30000] and [0x35000]; the code page and the stack are
    # untouched by the loop itself
    e = vcpu.run()
    assert isinstance(e, K.IoIn)
    e.buf[:] = (0x30000).to_bytes(4, "little")
    write_pages(vcpu, [0x35000])
    words = vm.get_dirty_log(0, npages)
    assert words.dtype == np.dtype("<u8") and len(words) == npages // 64
    assert {0x30, 0x35} <= dirty_pages(words, npages)
    assert dirty_pages(words, npages) <= {0x30, 0x35, 0x1, 0x7}
    assert not dirty_pages(vm.get_dirty_log(0, npages), npages) - {0x1, 0x7}


def test_dirty_log_manual_protect(vm_setup):
    k, vm, vcpu, mem = vm_setup("pm32.bin", slot_flags=lib.KVM_MEM_LOG_DIRTY_PAGES,
                                manual=True)
    npages = MEM // 4096
    # INITIALLY_SET: everything reads dirty until cleared
    words = vm.get_dirty_log(0, npages)
    assert len(dirty_pages(words, npages)) == npages
    vm.clear_dirty_log(0, 0, npages, words)
    run_pm32_prologue(vcpu)
    e = vcpu.run()
    e.buf[:] = (0x40000).to_bytes(4, "little")
    write_pages(vcpu, [0x41000])
    words = vm.get_dirty_log(0, npages)
    assert {0x40, 0x41} <= dirty_pages(words, npages)
    # without a clear the bits stay set
    again = vm.get_dirty_log(0, npages)
    assert {0x40, 0x41} <= dirty_pages(again, npages)
    vm.clear_dirty_log(0, 0, npages, again)
    assert not {0x40, 0x41} & dirty_pages(vm.get_dirty_log(0, npages), npages)
    # the page is write-protected again: a new write is seen
    assert isinstance(vcpu.run(), K.Hlt)


def test_dirty_ring(vm_setup):
    k = K.Kvm()
    if not k.check_extension(lib.KVM_CAP_DIRTY_LOG_RING) and \
            not k.check_extension(lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
        pytest.skip("KVM has no dirty ring")
    k, vm, vcpu, mem = vm_setup("pm32.bin", slot_flags=lib.KVM_MEM_LOG_DIRTY_PAGES,
                                ring=64 * 1024)
    assert vcpu.dirty_ring is not None
    run_pm32_prologue(vcpu)
    vcpu.harvest_dirty_ring()
    vm.reset_dirty_rings()
    e = vcpu.run()
    e.buf[:] = (0x50000).to_bytes(4, "little")
    write_pages(vcpu, [0x52000])
    got = vcpu.harvest_dirty_ring()
    assert (0, 0x50) in got and (0, 0x52) in got
    assert vcpu.harvest_dirty_ring() == []
    vm.reset_dirty_rings()


def test_immediate_exit():
    k = K.Kvm()
    vm = k.create_vm()
    mem = GuestMemory(MEM)
    vm.set_user_memory_region(0, 0, MEM, mem.host_addr)
    vcpu = vm.create_vcpu(0)
    vcpu.set_immediate_exit(True)
    assert isinstance(vcpu.run(), K.Intr)
    vcpu.set_immediate_exit(False)


def test_state_roundtrip(vm_setup):
    k, vm, vcpu, mem = vm_setup("pm32.bin", irqchip=True)
    vm.create_pit2()
    for getter, setter in ((vcpu.get_fpu, vcpu.set_fpu), (vcpu.get_lapic, vcpu.set_lapic),
                           (vcpu.get_vcpu_events, vcpu.set_vcpu_events),
                           (vcpu.get_regs, vcpu.set_regs), (vcpu.get_sregs, vcpu.set_sregs)):
        v = getter()
        setter(v)
        assert getter() == v
    for chip in (lib.KVM_IRQCHIP_PIC_MASTER, lib.KVM_IRQCHIP_PIC_SLAVE, lib.KVM_IRQCHIP_IOAPIC):
        raw = vm.get_irqchip(chip)
        vm.set_irqchip(raw)
        assert vm.get_irqchip(chip) == raw
    pit = vm.get_pit2()
    vm.set_pit2(pit)
    clock = vm.get_clock()
    vm.set_clock(clock["clock"])
    msrs = vcpu.get_msrs(k.msr_index_list())
    assert 0x10 in msrs
    vcpu.set_mp_state(vcpu.get_mp_state())
    vm.irq_line(4, True)
    vm.irq_line(4, False)
    efd = os.eventfd(0)
    vm.irqfd(efd, 5)
    vm.irqfd(efd, 5, deassign=True)
    vm.ioeventfd(efd, 0xd0000050, 4)
    vm.ioeventfd(efd, 0xd0000050, 4, deassign=True)
    os.close(efd)


def test_dirty_ring_full_and_wraparound(tiny_guest):
    k = K.Kvm()
    if not k.check_extension(lib.KVM_CAP_DIRTY_LOG_RING) and \
            not k.check_extension(lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
        pytest.skip("KVM has no dirty ring")
    size = 32 << 20
    vm = k.create_vm()
    vm.enable_dirty_ring(4096 * 16)          # 4096 entries
    mem = GuestMemory(size)
    vm.set_user_memory_region(0, 0, size, mem.host_addr, lib.KVM_MEM_LOG_DIRTY_PAGES)
    vcpu = vm.create_vcpu(0)
    with open(tiny_guest("pm32.bin"), "rb") as f:
        mem.write(LOAD, f.read())
    run_pm32_prologue(vcpu)
    vcpu.harvest_dirty_ring()
    vm.reset_dirty_rings()
    targets = [0x100000 + 4096 * i for i in range(6000)]
    seen: set[int] = set()
    fulls = 0
    it = iter(targets + [0])
    while True:
        e = vcpu.run()
        if isinstance(e, K.DirtyRingFull):
            fulls += 1
            seen.update(off for _, off in vcpu.harvest_dirty_ring())
            vm.reset_dirty_rings()
            continue
        if isinstance(e, K.Hlt):
            break
        assert isinstance(e, K.IoIn) and e.port == 0x15, e
        e.buf[:] = next(it).to_bytes(4, "little")
    seen.update(off for _, off in vcpu.harvest_dirty_ring())
    assert fulls >= 1
    assert {t >> 12 for t in targets} <= seen
