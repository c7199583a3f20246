"""hv.cpu: CPUID filtering as a pure function (no /dev/kvm needed)."""

import struct

from hv import cpu
from hv.kvm import CpuidEntry


def supported():
    return [
        CpuidEntry(0, 0, 0, 0x1f, *struct.unpack("<III", b"AuthcAMDenti")),
        CpuidEntry(1, 0, 0, 0xa0671, 0x00ff0800, 0xffffffff, 0xffffffff),
        CpuidEntry(7, 0, 1, 2, 0xffffffff, 0xffffffff, 0xffffffff),
        CpuidEntry(7, 1, 1, 0x30, 0, 0, 0),
        CpuidEntry(0xb, 0, 1, 0, 1, 0x100, 5),
        CpuidEntry(0xd, 0, 1, 0xe7, 0xa80, 0xa80, 0),
        CpuidEntry(0xd, 1, 1, 0xf, 0, 0, 0),
        CpuidEntry(0x80000001, 0, 0, 0, 0, 0xffffffff, 0xffffffff),
        CpuidEntry(0x40000000, 0, 0, 0x40000001, 0x4b4d564b, 0x564b4d56, 0x4d),
        CpuidEntry(0x40000001, 0, 0, 0x1007efb, 0, 0, 0),
    ]


def get(entries, fn, idx=0):
    found = [e for e in entries if e.function == fn and e.index == idx]
    assert len(found) <= 1
    return found[0] if found else None


def test_vendor_is_intel():
    out = cpu.guest_cpuid(supported())
    e = get(out, 0)
    assert struct.pack("<III", e.ebx, e.edx, e.ecx) == b"GenuineIntel"
    assert e.eax == 0x1f


def test_hidden_leaf1_bits():
    e = get(cpu.guest_cpuid(supported()), 1)
    for name in ("cx16", "xsave", "osxsave", "avx", "popcnt", "pcid", "rdrand", "vmx",
                 "monitor", "f16c", "fma"):
        assert not e.ecx & (1 << cpu.F1_ECX_HIDE[name]), name
    assert e.ecx & (1 << 31)          # hypervisor
    assert e.ecx & (1 << 0)           # SSE3 stays
    assert e.ecx & (1 << 21)          # x2APIC stays
    assert e.edx & (1 << 25)          # SSE stays
    assert e.ebx >> 24 == 0 and (e.ebx >> 16) & 0xff == 1


def test_leaf7_and_extended():
    out = cpu.guest_cpuid(supported())
    e = get(out, 7)
    for bitno in (cpu.F7_EBX_HIDE["smep"], cpu.F7_EBX_HIDE["smap"], cpu.F7_EBX_HIDE["mpx"],
                  cpu.F7_EBX_HIDE["avx2"], cpu.F7_EBX_HIDE["invpcid"], cpu.F7_EBX_HIDE["rdseed"],
                  cpu.F7_EBX_HIDE["fsgsbase"]):
        assert not e.ebx & (1 << bitno)
    assert not e.ecx & (1 << cpu.F7_ECX_HIDE["pku"])
    assert not e.ecx & (1 << cpu.F7_ECX_HIDE["la57"])
    assert e.eax == 0
    assert get(out, 7, 1) is None
    assert not [x for x in out if x.function == 0xd]
    ext = get(out, 0x80000001)
    assert not ext.edx & (1 << cpu.F81_EDX_HIDE["pdpe1gb"])
    assert ext.edx & (1 << 29)        # long mode stays


def test_apic_ids():
    out = cpu.guest_cpuid(supported(), vcpu_id=3, nr_vcpus=4)
    assert get(out, 1).ebx >> 24 == 3
    assert get(out, 0xb).edx == 3


def test_kvm_leaves():
    out = cpu.guest_cpuid(supported())
    f = get(out, 0x40000001).eax
    assert f & (1 << cpu.KVM_FEATURE_CLOCKSOURCE2)
    assert f & (1 << cpu.KVM_FEATURE_CLOCKSOURCE_STABLE_BIT)
    assert not f & (1 << 4)           # async page faults off
    # KVM without the leaves: hv adds them
    bare = [e for e in supported() if e.function < 0x40000000 or e.function > 0x4fffffff]
    out = cpu.guest_cpuid(bare)
    sig = get(out, 0x40000000)
    assert struct.pack("<III", sig.ebx, sig.ecx, sig.edx) == b"KVMKVMKVM\0\0\0"


def test_tsc_timing_leaf():
    out = cpu.guest_cpuid(supported(), tsc_khz=2_600_000)
    assert get(out, 0x40000010).eax == 2_600_000
    assert get(out, 0x40000000).eax == 0x40000010


def test_input_not_modified():
    sup = supported()
    before = [vars(e).copy() for e in sup]
    cpu.guest_cpuid(sup)
    assert [vars(e) for e in sup] == before


def test_kernel_workarounds_for_forced_bits():
    wanted = cpu.guest_cpuid(supported())
    actual = [CpuidEntry(**vars(e)) for e in wanted]
    get(actual, 1).ecx |= (1 << 26) | (1 << 23) | (1 << 13) | (1 << 27) | (1 << 0)
    get(actual, 7).ebx |= (1 << 20) | (1 << 7)
    words = cpu.kernel_workarounds(wanted, actual)
    assert "noxsave" in words
    clear = [w for w in words if w.startswith("clearcpuid=")][0]
    nums = set(map(int, clear.split("=")[1].split(",")))
    assert nums == {141, 151, 295, 308}
    assert cpu.kernel_workarounds(wanted, wanted) == []


def test_merge_cmdline():
    base = "console=ttyS0 noxsave clearcpuid=141,151"
    out = cpu.merge_cmdline(base, ["noxsave", "clearcpuid=151,295"])
    assert out == "console=ttyS0 noxsave clearcpuid=141,151,295"
    assert cpu.merge_cmdline("a", ["clearcpuid=1"]) == "a clearcpuid=1"


def test_boot_msrs():
    msrs = cpu.boot_msrs()
    assert msrs[cpu.MSR_IA32_MISC_ENABLE] & cpu.MISC_ENABLE_FAST_STRING
    assert msrs[cpu.MSR_MTRR_DEF_TYPE] == (1 << 11) | 6
