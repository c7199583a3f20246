"""Kernel loading: an ELF vmlinux through the PVH entry, or a bzImage through
the 64-bit boot protocol; the e820 map and the kernel command line.

    cmdline = Cmdline(); cmdline.add("console=ttyS0"); cmdline.add_param("k", "v")
    result = load_kernel(memory, path, cmdline, initrd=path)   -> BootResult
    setup_vcpu(vcpu, result)                                  registers, segments

Guest physical layout of what the loader writes (below 1 MiB):
    0x0500   GDT                  0x6000  hvm_start_info (PVH)
    0x6040   hvm_modlist_entry    0x6100  hvm_memmap_table_entry[] (PVH)
    0x7000   boot_params (bzImage)
    0x8ff0   initial stack (bzImage)
    0x9000   identity page tables, 1 GiB with 2 MiB pages (bzImage)
    0x20000  command line         0x9fc00 MP table (hv.mptable)
The kernel goes where its ELF program headers say (p_paddr), or at 1 MiB for
a bzImage; the initrd as high as it fits, page aligned, below the end of RAM.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from .errors import HvError
from .memory import PAGE_SIZE, GuestMemory
from . import mptable

GDT_ADDR = 0x500
IDT_ADDR = 0x520
PVH_INFO_ADDR = 0x6000
PVH_MODLIST_ADDR = 0x6040
PVH_MEMMAP_ADDR = 0x6100
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK = 0x8ff0
PML4_ADDR = 0x9000
PDPTE_ADDR = 0xa000
PDE_ADDR = 0xb000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 2048          # Linux's COMMAND_LINE_SIZE on x86, with the NUL
HIMEM_START = 0x100000
INITRD_ALIGN = PAGE_SIZE
#: the initrd must stay below this (Linux's default initrd_addr_max)
INITRD_ADDR_MAX = 0x37ffffff

XEN_HVM_START_MAGIC = 0x336ec578
XEN_ELFNOTE_PHYS32_ENTRY = 18

X86_CR0_PE = 0x1
X86_CR0_ET = 0x10
X86_CR0_PG = 0x80000000
X86_CR4_PAE = 0x20
EFER_LME = 0x100
EFER_LMA = 0x400

PROTOCOL_PVH = "pvh"
PROTOCOL_LINUX64 = "linux64"


class BootError(HvError):
    """The kernel or initrd cannot be loaded; the message says why."""


@dataclass
class BootResult:
    """What load_kernel() put in guest memory and how to enter it."""
    protocol: str             # PROTOCOL_PVH or PROTOCOL_LINUX64
    entry: int                # guest physical entry point
    kernel_start: int
    kernel_end: int           # first byte after the loaded image
    boot_info: int            # hvm_start_info (PVH) or boot_params address
    cmdline: bytes
    initrd_addr: int = 0
    initrd_size: int = 0
    e820: list = field(default_factory=list)
    #: (guest physical start, length) of the image's parts the guest keeps for
    #: good: every PT_LOAD segment of a vmlinux but the writable and executable
    #: one (Linux's .init and .bss, freed or zeroed at boot); [] for a bzImage
    resident: list = field(default_factory=list)


# -- command line -------------------------------------------------------------

class Cmdline:
    """A validated kernel command line: words joined by single spaces, no NUL,
    at most `capacity` bytes including the terminating NUL."""

    def __init__(self, capacity: int = CMDLINE_MAX):
        self.capacity = capacity
        self._words: list[str] = []

    def _check(self, word: str) -> None:
        if "\0" in word:
            raise BootError(f"kernel command line piece {word!r} contains a NUL byte")
        if "\n" in word:
            raise BootError(f"kernel command line piece {word!r} contains a newline")
        new_len = len(str(self).encode()) + (1 if self._words else 0) + len(word.encode()) + 1
        if new_len > self.capacity:
            raise BootError(f"kernel command line too long: {new_len} bytes with "
                            f"{word[:40]!r}..., the limit is {self.capacity}")

    def add(self, text: str) -> "Cmdline":
        """Append raw text (already shell-split the way the kernel will)."""
        text = text.strip()
        if text:
            self._check(text)
            self._words.append(text)
        return self

    def add_param(self, key: str, value: str | None = None) -> "Cmdline":
        """Append key or key=value, quoting a value with spaces as Linux expects."""
        if not key or any(c in key for c in ' ="'):
            raise BootError(f"bad kernel parameter name {key!r}")
        if value is None:
            return self.add(key)
        if '"' in value:
            raise BootError(f"kernel parameter {key} has a double quote in its value")
        if " " in value or "\t" in value:
            value = f'"{value}"'
        word = f"{key}={value}"
        self._check(word)
        self._words.append(word)
        return self

    def __str__(self) -> str:
        return " ".join(self._words)

    def as_bytes(self) -> bytes:
        """The NUL-terminated bytes written to guest memory."""
        return str(self).encode() + b"\0"


# -- helpers --------------------------------------------------------------------

def gdt_entry(flags: int, base: int, limit: int) -> int:
    return (((base & 0xff000000) << 32) | ((base & 0x00ffffff) << 16) | (limit & 0xffff)
            | ((limit & 0xf0000) << 32) | ((flags & 0xf0ff) << 40))


def segment_from_flags(selector: int, flags: int, base: int = 0, limit: int = 0xfffff) -> dict:
    """A kvm_segment (as get_sregs() data) for a GDT descriptor's flags."""
    g = (flags >> 15) & 1
    return {
        "base": base,
        "limit": ((limit << 12) | 0xfff) if g else limit,
        "selector": selector,
        "type": flags & 0xf,
        "present": (flags >> 7) & 1,
        "dpl": (flags >> 5) & 3,
        "db": (flags >> 14) & 1,
        "s": (flags >> 4) & 1,
        "l": (flags >> 13) & 1,
        "g": g,
        "avl": (flags >> 12) & 1,
        "unusable": 0 if (flags >> 7) & 1 else 1,
    }


GDT_PVH = [(0, 0, 0), (0xc09b, 0, 0xfffff), (0xc093, 0, 0xfffff), (0x008b, 0, 0x67)]
GDT_LONG = [(0, 0, 0), (0xa09b, 0, 0xfffff), (0xc093, 0, 0xfffff), (0x808b, 0, 0xfffff)]


def _write_gdt(mem: GuestMemory, table) -> None:
    for i, (flags, base, limit) in enumerate(table):
        mem.write_u64(GDT_ADDR + 8 * i, gdt_entry(flags, base, limit))
    mem.write_u64(IDT_ADDR, 0)


def _read_file(path: str, what: str, limit: int = -1) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except FileNotFoundError:
        raise BootError(f"{what} {path!r} not found") from None
    except IsADirectoryError:
        raise BootError(f"{what} {path!r} is a directory") from None
    except PermissionError:
        raise BootError(f"{what} {path!r} is not readable") from None


# -- initramfs ------------------------------------------------------------------

#: How an initramfs starts: a cpio archive (newc, newc with CRC, odc) or one of
#: the compressions Linux can unpack (lib/decompress.c; whether this kernel
#: can is up to its CONFIG_RD_*). hv loads the file as it is.
INITRD_MAGICS = {
    b"070701": "cpio", b"070702": "cpio", b"070707": "cpio",
    b"\x1f\x8b": "gzip", b"\x1f\x9e": "gzip", b"BZh": "bzip2", b"\x5d\x00\x00": "lzma",
    b"\xfd7zXZ\x00": "xz", b"\x89LZO": "lzo", b"\x02\x21\x4c\x18": "lz4",
    b"\x28\xb5\x2f\xfd": "zstd",
}


def check_initrd(path: str) -> str:
    """The format of the initramfs at path ("cpio", "gzip", ...). BootError
    when it is none: the kernel would find no init and panic."""
    head = _read_file(path, "initrd", 4096)
    start = head.lstrip(b"\0")             # Linux skips zero padding, so do we
    for magic, kind in INITRD_MAGICS.items():
        if start.startswith(magic):
            return kind
    what = "is empty" if not head else f"starts with {head[:8]!r}"
    raise BootError(f"initrd {path!r} is not an initramfs (it {what}): expected a cpio "
                    f"archive (newc 070701/070702 or odc 070707), possibly compressed with "
                    f"gzip, bzip2, lzma, xz, lzo, lz4 or zstd; --initrd '' boots without one")


# -- ELF (PVH) ------------------------------------------------------------------

PT_LOAD = 1
PT_NOTE = 4


def elf_program_headers(data: bytes, path: str) -> list[tuple]:
    """The program headers of an x86-64 little-endian ELF64 file (BootError
    for anything else)."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BootError(f"{path!r}: only 64-bit little-endian ELF kernels are supported")
    (e_type, e_machine, _, _, e_phoff, _, _, _, e_phentsize, e_phnum) = struct.unpack_from(
        "<HHIQQQIHHH", data, 16)
    if e_machine != 62:
        raise BootError(f"{path!r}: not an x86-64 ELF (e_machine {e_machine})")
    phdrs = []
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        if off + 56 > len(data):
            raise BootError(f"{path!r}: truncated ELF program headers")
        phdrs.append(struct.unpack_from("<IIQQQQQQ", data, off))
    return phdrs


def pvh_entry(data: bytes, path: str = "kernel", phdrs=None) -> int | None:
    """The PVH entry point (the XEN_ELFNOTE_PHYS32_ENTRY note) of an ELF
    kernel, or None."""
    for p_type, p_offset, p_filesz in ((p[0], p[2], p[5])
                                       for p in phdrs or elf_program_headers(data, path)):
        if p_type != PT_NOTE:
            continue
        off, end = p_offset, min(p_offset + p_filesz, len(data))
        while off + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, off)
            name_off = off + 12
            desc_off = name_off + ((namesz + 3) & ~3)
            name = data[name_off:name_off + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and desc_off + 4 <= end:
                if descsz >= 8 and desc_off + 8 <= end:
                    return struct.unpack_from("<Q", data, desc_off)[0] & 0xffffffff
                return struct.unpack_from("<I", data, desc_off)[0]
            off = desc_off + ((descsz + 3) & ~3)
    return None


PF_X, PF_W = 1, 2


def _load_elf(mem: GuestMemory, data: bytes, path: str) -> tuple[int, int, int, list]:
    """Copy PT_LOAD segments to p_paddr; returns (pvh entry, start, end,
    resident ranges)."""
    phdrs = elf_program_headers(data, path)
    entry = pvh_entry(data, path, phdrs)
    if entry is None:
        raise BootError(f"{path!r}: no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY): build "
                        "the kernel with CONFIG_PVH=y")
    start, end, resident = None, 0, []
    for p_type, p_flags, p_offset, _, p_paddr, p_filesz, p_memsz, _ in phdrs:
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_offset + p_filesz > len(data):
            raise BootError(f"{path!r}: truncated ELF segment")
        if not mem.contains(p_paddr, p_memsz):
            raise BootError(f"{path!r}: segment at {p_paddr:#x}+{p_memsz:#x} does not fit "
                            f"in {mem.size >> 20} MiB of guest RAM")
        mem.write(p_paddr, data[p_offset:p_offset + p_filesz])
        if p_memsz > p_filesz:
            mem.fill(p_paddr + p_filesz, p_memsz - p_filesz, 0)
        start = p_paddr if start is None else min(start, p_paddr)
        end = max(end, p_paddr + p_memsz)
        if p_flags & (PF_X | PF_W) != PF_X | PF_W:
            resident.append((p_paddr, p_memsz))
    if start is None:
        raise BootError(f"{path!r}: ELF without loadable segments")
    return entry, start, end, resident


# -- bzImage --------------------------------------------------------------------

HDR_MAGIC = b"HdrS"
LOADFLAG_LOADED_HIGH = 0x01
LOADFLAG_CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x1


def _load_bzimage(mem: GuestMemory, data: bytes, path: str):
    """Copy the protected-mode kernel to 1 MiB; returns (setup header, start, end)."""
    if len(data) < 0x264 or data[0x202:0x206] != HDR_MAGIC:
        raise BootError(f"{path!r} is not a kernel image (neither an ELF vmlinux nor a bzImage)")
    version = struct.unpack_from("<H", data, 0x206)[0]
    if version < 0x20c:
        raise BootError(f"{path!r}: boot protocol {version >> 8}.{version & 0xff} is older "
                        "than 2.12 (no 64-bit entry)")
    xloadflags = struct.unpack_from("<H", data, 0x236)[0]
    if not xloadflags & XLF_KERNEL_64:
        raise BootError(f"{path!r}: the bzImage has no 64-bit entry point")
    setup_sects = data[0x1f1] or 4
    kernel_off = (setup_sects + 1) * 512
    kernel = data[kernel_off:]
    if not mem.contains(HIMEM_START, len(kernel)):
        raise BootError(f"{path!r} ({len(kernel)} bytes) does not fit in guest RAM")
    mem.write(HIMEM_START, kernel)
    hdr_end = 0x202 + data[0x201]
    return data[0x1f1:hdr_end], HIMEM_START, HIMEM_START + len(kernel)


def _write_identity_page_tables(mem: GuestMemory) -> None:
    mem.write_u64(PML4_ADDR, PDPTE_ADDR | 0x3)
    mem.write_u64(PDPTE_ADDR, PDE_ADDR | 0x3)
    mem.write(PDE_ADDR, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(512)))


# -- the loader -----------------------------------------------------------------

def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def load_kernel(mem: GuestMemory, kernel_path: str, cmdline: Cmdline | str,
                initrd_path: str | None = None,
                e820: list[tuple[int, int, int]] | None = None) -> BootResult:
    """Load kernel (and initrd) into mem and write the boot structures."""
    data = _read_file(kernel_path, "kernel")
    if isinstance(cmdline, str):
        cmdline = Cmdline().add(cmdline)
    cmd = cmdline.as_bytes()
    if len(cmd) > CMDLINE_MAX:
        raise BootError(f"kernel command line too long ({len(cmd)} bytes)")
    if e820 is None:
        e820 = mptable.e820_map(getattr(mem, "regions", mem.size))
    if is_elf(data):
        entry, start, end, resident = _load_elf(mem, data, kernel_path)
        protocol = PROTOCOL_PVH
        setup_header = None
    elif len(data) > 0x206 and data[0x202:0x206] == HDR_MAGIC:
        setup_header, start, end = _load_bzimage(mem, data, kernel_path)
        resident = []
        entry = HIMEM_START + 0x200
        protocol = PROTOCOL_LINUX64
    else:
        raise BootError(f"{kernel_path!r} is not a kernel image (neither an ELF vmlinux "
                        "nor a bzImage)")

    initrd_addr = initrd_size = 0
    if initrd_path:
        initrd = _read_file(initrd_path, "initrd")
        initrd_size = len(initrd)
        # below 4 GiB, in the first RAM region
        low_end = mem.regions[0][1] if hasattr(mem, "regions") else mem.size
        top = min(low_end, INITRD_ADDR_MAX + 1)
        initrd_addr = (top - initrd_size) & ~(INITRD_ALIGN - 1)
        if initrd_addr < end:
            raise BootError(
                f"guest RAM of {mem.size >> 20} MiB is too small for the kernel (ends at "
                f"{end >> 20} MiB) and the {initrd_size >> 10} KiB initrd: give it more memory")
        mem.write(initrd_addr, initrd)

    mem.write(CMDLINE_ADDR, cmd)
    if protocol == PROTOCOL_PVH:
        _write_gdt(mem, GDT_PVH)
        boot_info = _write_pvh_start_info(mem, initrd_addr, initrd_size, e820)
    else:
        _write_gdt(mem, GDT_LONG)
        _write_identity_page_tables(mem)
        boot_info = _write_boot_params(mem, setup_header, len(cmd), initrd_addr,
                                       initrd_size, e820)
    return BootResult(protocol, entry, start, end, boot_info, cmd, initrd_addr, initrd_size,
                      list(e820), resident)


def _write_pvh_start_info(mem: GuestMemory, initrd_addr: int, initrd_size: int,
                          e820) -> int:
    nr_modules = 0
    if initrd_size:
        mem.write(PVH_MODLIST_ADDR, struct.pack("<QQQQ", initrd_addr, initrd_size, 0, 0))
        nr_modules = 1
    memmap = b"".join(struct.pack("<QQII", a, s, t, 0) for a, s, t in e820)
    mem.write(PVH_MEMMAP_ADDR, memmap)
    # struct hvm_start_info: magic, version, flags, nr_modules, modlist_paddr,
    # cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries, reserved
    info = struct.pack("<IIIIQQQQII", XEN_HVM_START_MAGIC, 1, 0, nr_modules,
                       PVH_MODLIST_ADDR if nr_modules else 0, CMDLINE_ADDR, 0,
                       PVH_MEMMAP_ADDR, len(e820), 0)
    mem.write(PVH_INFO_ADDR, info)
    return PVH_INFO_ADDR


def _write_boot_params(mem: GuestMemory, setup_header: bytes, cmd_len: int,
                       initrd_addr: int, initrd_size: int, e820) -> int:
    bp = bytearray(4096)
    bp[0x1f1:0x1f1 + len(setup_header)] = setup_header
    bp[0x210] = 0xff                                         # type_of_loader: undefined
    bp[0x211] |= LOADFLAG_CAN_USE_HEAP | LOADFLAG_LOADED_HIGH
    struct.pack_into("<H", bp, 0x224, 0xfe00)                # heap_end_ptr
    struct.pack_into("<I", bp, 0x228, CMDLINE_ADDR)          # cmd_line_ptr
    struct.pack_into("<I", bp, 0x238, cmd_len - 1)           # cmdline_size
    struct.pack_into("<I", bp, 0x218, initrd_addr)           # ramdisk_image
    struct.pack_into("<I", bp, 0x21c, initrd_size)           # ramdisk_size
    struct.pack_into("<H", bp, 0x1fe, 0xaa55)                # boot_flag
    bp[0x1e8] = len(e820)                                    # e820_entries
    for i, (a, s, t) in enumerate(e820[:128]):
        struct.pack_into("<QQI", bp, 0x2d0 + 20 * i, a, s, t)
    mem.write(ZERO_PAGE_ADDR, bytes(bp))
    return ZERO_PAGE_ADDR


def setup_vcpu(vcpu, result: BootResult) -> None:
    """Set registers and segments for the entry the loader chose."""
    sregs = vcpu.get_sregs()
    if result.protocol == PROTOCOL_PVH:
        code = segment_from_flags(0x08, 0xc09b)
        data = segment_from_flags(0x10, 0xc093)
        tss = segment_from_flags(0x18, 0x008b, limit=0x67)
        sregs["cr0"] = X86_CR0_PE | X86_CR0_ET
        sregs["cr4"] = 0
        sregs["efer"] = 0
        regs = {"rip": result.entry, "rbx": result.boot_info, "rflags": 0x2}
    else:
        code = segment_from_flags(0x08, 0xa09b)
        data = segment_from_flags(0x10, 0xc093)
        tss = segment_from_flags(0x18, 0x808b)
        sregs["cr3"] = PML4_ADDR
        sregs["cr4"] = X86_CR4_PAE
        sregs["cr0"] = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG
        sregs["efer"] = EFER_LME | EFER_LMA
        regs = {"rip": result.entry, "rsi": result.boot_info, "rflags": 0x2,
                "rsp": BOOT_STACK, "rbp": BOOT_STACK}
    sregs["cs"] = code
    for s in ("ds", "es", "fs", "gs", "ss"):
        sregs[s] = dict(data)
    sregs["tr"] = tss
    sregs["gdt"] = {"base": GDT_ADDR, "limit": 8 * 4 - 1}
    sregs["idt"] = {"base": IDT_ADDR, "limit": 7}
    vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)


def kernel_size(path: str) -> int:
    return os.path.getsize(path)
