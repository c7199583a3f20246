"""The CPU a guest sees: CPUID filtering and the vCPU's initial MSRs.

guest_cpuid() is a pure function over KVM_GET_SUPPORTED_CPUID's entries (no
/dev/kvm needed to test it). It hides what a guest kernel must not use here:
on the nested KVM hv runs on in CI, guest kernel code is emulated instruction
by instruction and the emulator cannot run cmpxchg16b, the xsave family,
clac/stac, popcnt, rdrand/rdseed, the AVX family and other newer instructions,
so the features that make Linux use them (directly or through alternatives)
are cleared. On real hardware the result is a plain, migratable CPU model.

Also: the vendor string is GenuineIntel (the AMD FXSAVE-leak path runs
`fnclex`, which the emulator cannot), the APIC ID is the vCPU index, and the
KVM paravirtual leaves are present so the guest uses kvmclock (which hands it
the TSC frequency: no calibration).
"""

from __future__ import annotations

import struct
from dataclasses import replace

from .kvm import CpuidEntry


def bit(n: int) -> int:
    return 1 << n


# leaf 1 ECX
F1_ECX_HIDE = {
    "pclmulqdq": 1, "dtes64": 2, "monitor": 3, "ds_cpl": 4, "vmx": 5, "smx": 6,
    "est": 7, "tm2": 8, "fma": 12, "cx16": 13, "xtpr": 14, "pdcm": 15,
    "pcid": 17, "dca": 18, "sse4_1": 19, "sse4_2": 20, "movbe": 22, "popcnt": 23,
    "aes": 25, "xsave": 26, "osxsave": 27, "avx": 28, "f16c": 29, "rdrand": 30,
}
F1_ECX_HYPERVISOR = 31
# leaf 1 EDX
F1_EDX_HIDE = {"ds": 21, "acpi": 22, "tm": 29, "pbe": 31}

# leaf 7 subleaf 0 EBX
F7_EBX_HIDE = {
    "fsgsbase": 0, "sgx": 2, "bmi1": 3, "hle": 4, "avx2": 5, "smep": 7, "bmi2": 8,
    "invpcid": 10, "rtm": 11, "pqm": 12, "mpx": 14, "pqe": 15, "avx512f": 16,
    "avx512dq": 17, "rdseed": 18, "adx": 19, "smap": 20, "avx512ifma": 21,
    "pcommit": 22, "clwb": 24, "intel_pt": 25, "avx512pf": 26, "avx512er": 27,
    "avx512cd": 28, "sha": 29, "avx512bw": 30, "avx512vl": 31,
}
# leaf 7 subleaf 0 ECX
F7_ECX_HIDE = {
    "prefetchwt1": 0, "avx512vbmi": 1, "umip": 2, "pku": 3, "ospke": 4,
    "waitpkg": 5, "avx512_vbmi2": 6, "cet_ss": 7, "gfni": 8, "vaes": 9,
    "vpclmulqdq": 10, "avx512_vnni": 11, "avx512_bitalg": 12, "tme": 13,
    "avx512_vpopcntdq": 14, "la57": 16, "rdpid": 22, "kl": 23, "bus_lock_detect": 24,
    "cldemote": 25, "movdiri": 27, "movdir64b": 28, "enqcmd": 29, "sgx_lc": 30,
    "pks": 31,
}
# leaf 7 subleaf 0 EDX
F7_EDX_HIDE = {
    "avx512_4vnniw": 2, "avx512_4fmaps": 3, "fsrm": 4, "uintr": 5,
    "avx512_vp2intersect": 8, "srbds_ctrl": 9, "md_clear": 10, "rtm_always_abort": 11,
    "serialize": 14, "hybrid": 15, "tsxldtrk": 16, "pconfig": 18, "arch_lbr": 19,
    "cet_ibt": 20, "amx_bf16": 22, "avx512_fp16": 23, "amx_tile": 24, "amx_int8": 25,
    "spec_ctrl": 26, "intel_stibp": 27, "flush_l1d": 28, "core_capabilities": 30,
    "spec_ctrl_ssbd": 31,
}
# leaf 0x80000001 ECX / EDX
F81_ECX_HIDE = {"svm": 2, "abm": 5, "sse4a": 6, "misalignsse": 7, "3dnowprefetch": 8,
                "xop": 11, "skinit": 12, "lwp": 15, "fma4": 16, "tbm": 21,
                "topoext": 22, "perfctr_core": 23, "mwaitx": 29}
F81_EDX_HIDE = {"pdpe1gb": 26, "rdtscp": 27, "3dnowext": 30, "3dnow": 31}

#: Leaves dropped entirely: XSAVE state (0xd), SGX (0x12), processor trace
#: (0x14), AMX (0x1d, 0x1e), Key Locker (0x19), and leaf 7 subleaves > 0
#: (AVX-VNNI, AVX512_BF16, ...).
DROP_LEAVES = {0xd, 0x12, 0x14, 0x19, 0x1d, 0x1e}

KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
#: 0x40000010: the timing leaf (TSC and APIC bus frequency in kHz) some
#: guests read instead of calibrating.
HV_CPUID_TIMING = 0x40000010
KVM_FEATURE_CLOCKSOURCE = 0
KVM_FEATURE_CLOCKSOURCE2 = 3
KVM_FEATURE_CLOCKSOURCE_STABLE_BIT = 24
KVM_FEATURE_NOP_IO_DELAY = 1
KVM_FEATURE_PV_EOI = 6
#: The paravirtual features a guest gets: kvmclock and no I/O delays.
#: Async page faults, steal time, PV EOI, PV TLB flush and the rest stay
#: off: each adds guest memory that KVM writes behind the VMM's back and
#: state a save/restore must carry, for little gain with one vCPU.
KVM_FEATURES_KEPT = bit(KVM_FEATURE_NOP_IO_DELAY)
LEAF7_EAX_MAX_SUBLEAF = 0

VENDOR = b"GenuineIntel"


def _mask(bits: dict[str, int]) -> int:
    m = 0
    for b in bits.values():
        m |= bit(b)
    return m


def vendor_regs(vendor: bytes = VENDOR) -> tuple[int, int, int]:
    """(ebx, edx, ecx) of CPUID leaf 0 for a 12-byte vendor string."""
    ebx, edx, ecx = struct.unpack("<III", vendor)
    return ebx, edx, ecx


def guest_cpuid(supported: list[CpuidEntry], vcpu_id: int = 0, nr_vcpus: int = 1,
                tsc_khz: int | None = None) -> list[CpuidEntry]:
    """The CPUID table for vCPU vcpu_id, from KVM's supported entries."""
    out: list[CpuidEntry] = []
    have_kvm_leaves = False
    for e in supported:
        f = e.function
        if f in DROP_LEAVES:
            continue
        e = replace(e)
        if f == 0:
            e.ebx, e.edx, e.ecx = vendor_regs()
        elif f == 1:
            e.ecx &= ~_mask(F1_ECX_HIDE)
            e.ecx |= bit(F1_ECX_HYPERVISOR)
            e.edx &= ~_mask(F1_EDX_HIDE)
            # EBX: APIC ID [31:24], logical processors [23:16], CLFLUSH size [15:8]
            e.ebx = (vcpu_id << 24) | (max(nr_vcpus, 1) << 16) | (e.ebx & 0xff00)
            if nr_vcpus > 1:
                e.edx |= bit(28)  # HTT: the logical count is valid
        elif f == 6:
            e.eax = e.ebx = e.ecx = e.edx = 0  # no power management
        elif f == 7:
            if e.index != 0:
                continue
            e.eax = LEAF7_EAX_MAX_SUBLEAF
            e.ebx &= ~_mask(F7_EBX_HIDE)
            e.ecx &= ~_mask(F7_ECX_HIDE)
            e.edx &= ~_mask(F7_EDX_HIDE)
        elif f == 0xb or f == 0x1f:
            e.edx = vcpu_id  # x2APIC ID
        elif f == 0x80000001:
            e.ecx &= ~_mask(F81_ECX_HIDE)
            e.edx &= ~_mask(F81_EDX_HIDE)
        elif f == 0x80000008:
            e.ebx = 0  # no WBNOINVD, XSAVEERPTR, IBPB, ... extensions
        elif f == KVM_CPUID_SIGNATURE:
            have_kvm_leaves = True
            e.eax = max(e.eax, KVM_CPUID_FEATURES if tsc_khz is None else HV_CPUID_TIMING)
        elif f == KVM_CPUID_FEATURES:
            e.eax = (e.eax & KVM_FEATURES_KEPT) | bit(KVM_FEATURE_CLOCKSOURCE) | \
                bit(KVM_FEATURE_CLOCKSOURCE2) | bit(KVM_FEATURE_CLOCKSOURCE_STABLE_BIT)
            e.edx = 0
        out.append(e)
    if not have_kvm_leaves:
        ebx, ecx, edx = struct.unpack("<III", b"KVMKVMKVM\0\0\0")
        out.append(CpuidEntry(KVM_CPUID_SIGNATURE, 0, 0, KVM_CPUID_FEATURES, ebx, ecx, edx))
        out.append(CpuidEntry(KVM_CPUID_FEATURES, 0, 0,
                              bit(KVM_FEATURE_CLOCKSOURCE) | bit(KVM_FEATURE_CLOCKSOURCE2) |
                              bit(KVM_FEATURE_CLOCKSOURCE_STABLE_BIT)))
    if tsc_khz is not None:
        # TSC and (nominal 1 GHz) APIC bus frequency in kHz
        out.append(CpuidEntry(HV_CPUID_TIMING, 0, 0, tsc_khz, 1_000_000))
        for e in out:
            if e.function == KVM_CPUID_SIGNATURE:
                e.eax = max(e.eax, HV_CPUID_TIMING)
    return out


# Linux's cpufeature words for the CPUID registers hv filters
# (arch/x86/include/asm/cpufeatures.h): X86_FEATURE_x = word * 32 + bit.
LINUX_FEATURE_WORDS = {(1, 0, "ecx"): 4, (1, 0, "edx"): 0, (7, 0, "ebx"): 9,
                       (7, 0, "ecx"): 16, (7, 0, "edx"): 18,
                       (0x80000001, 0, "ecx"): 6, (0x80000001, 0, "edx"): 1}
XSAVE_BIT = 26
#: X86_FEATURE numbers of what Linux's own code uses and the emulator of the
#: nested KVM cannot run: cx16, pcid, popcnt, rdrand, fsgsbase, smep, invpcid,
#: rdseed, smap, rdpid.
CLEARCPUID_KERNEL = {141, 145, 151, 158, 288, 295, 298, 306, 308, 534}


def kernel_workarounds(wanted: list[CpuidEntry], actual: list[CpuidEntry]) -> list[str]:
    """Kernel command line words that hide from Linux the features its own
    code would use although hv's CPUID cleared them.

    Some KVMs force bits into the guest's CPUID (on the nested KVM of hv's CI,
    leaf 1 ECX keeps SSE3..AVX, XSAVE, POPCNT and RDRAND whatever
    KVM_SET_CPUID2 says, as guest user mode runs on the real CPU). For the
    few features the kernel itself uses (CLEARCPUID_KERNEL) hv asks Linux not
    to: `noxsave` and `clearcpuid=N,...` (N = X86_FEATURE number). Clearing
    more (SSE and friends) changes code paths for nothing and is avoided.
    """
    words: list[str] = []
    clear: list[int] = []
    for (fn, idx, reg), word in LINUX_FEATURE_WORDS.items():
        w, a = lookup(wanted, fn, idx), lookup(actual, fn, idx)
        if w is None or a is None:
            continue
        forced = getattr(a, reg) & ~getattr(w, reg)
        if (fn, reg) == (1, "ecx") and forced & bit(XSAVE_BIT):
            words.append("noxsave")
        for b in range(32):
            if forced & bit(b) and word * 32 + b in CLEARCPUID_KERNEL:
                clear.append(word * 32 + b)
    if clear:
        words.append("clearcpuid=" + ",".join(str(n) for n in sorted(clear)))
    return words


def merge_cmdline(cmdline: str, extra: list[str]) -> str:
    """Add extra words to cmdline; clearcpuid= lists are merged into one (Linux
    reads a single clearcpuid=) and words already present are skipped."""
    words = cmdline.split()
    for w in extra:
        if w.startswith("clearcpuid="):
            nums = w.split("=", 1)[1].split(",")
            for i, old in enumerate(words):
                if old.startswith("clearcpuid="):
                    have = old.split("=", 1)[1].split(",")
                    words[i] = "clearcpuid=" + ",".join(have + [n for n in nums if n not in have])
                    break
            else:
                words.append(w)
        elif w not in words:
            words.append(w)
    return " ".join(words)


def lookup(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    for e in entries:
        if e.function == function and e.index == index:
            return e
    for e in entries:
        if e.function == function:
            return e
    return None


# -- MSRs ------------------------------------------------------------------------

MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1b
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1a0
MSR_MTRR_DEF_TYPE = 0x2ff
MSR_STAR = 0xc0000081
MSR_LSTAR = 0xc0000082
MSR_CSTAR = 0xc0000083
MSR_SYSCALL_MASK = 0xc0000084
MSR_KERNEL_GS_BASE = 0xc0000102
MSR_KVM_SYSTEM_TIME_NEW = 0x4b564d01
MSR_KVM_WALL_CLOCK_NEW = 0x4b564d00

MISC_ENABLE_FAST_STRING = 1
MTRR_ENABLE = 1 << 11
MTRR_MEM_TYPE_WB = 6


def boot_msrs() -> dict[int, int]:
    """The MSRs a vCPU starts with (as Firecracker sets them)."""
    return {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_MEM_TYPE_WB,
    }
