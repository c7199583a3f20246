"""Intel MultiProcessor table (MP spec 1.4) and the e820 map, for guests
without ACPI (the shape of Firecracker's mptable.rs).

The floating pointer and its configuration table sit in the last KiB of base
RAM (0x9fc00), one of the places Linux scans (mpparse: smp_scan_config). The
table names each CPU, one ISA bus, the IOAPIC at 0xfec00000 and an interrupt
entry for every IOAPIC pin (ISA IRQ n -> pin n, so the serial port's IRQ 4
and the virtio-mmio GSIs 5.. reach the guest), plus the local interrupts
(ExtINT on LINT0, NMI on LINT1).
"""

from __future__ import annotations

import struct

MPTABLE_START = 0x9fc00
EBDA_START = 0x9fc00
HIMEM_START = 0x100000
APIC_DEFAULT_PHYS_BASE = 0xfee00000
IO_APIC_DEFAULT_PHYS_BASE = 0xfec00000
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
IOAPIC_PINS = 24
MP_SPEC_REV = 4

MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4
MP_INT, MP_NMI, MP_SMI, MP_EXTINT = 0, 1, 2, 3
CPU_ENABLED, CPU_BOOTPROCESSOR = 1, 2
MPC_APIC_USABLE = 1
BUS_ID_ISA = 0
CPU_STEPPING = 0x600
CPU_FEATURE_APIC = 0x200
CPU_FEATURE_FPU = 0x001

E820_RAM = 1
E820_RESERVED = 2


class MpTableError(ValueError):
    pass


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xff


#: processor entries an MP table can hold (8-bit APIC IDs; one is the IOAPIC's)
MAX_CPUS = 254


def build(num_cpus: int = 1, base: int = MPTABLE_START) -> bytes:
    """The floating pointer followed by the configuration table, for GPA base."""
    if not 1 <= num_cpus <= MAX_CPUS:
        raise MpTableError(f"{num_cpus} CPUs do not fit an MP table")
    ioapic_id = num_cpus + 1
    entries = b""
    for cpu in range(num_cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries += struct.pack("<BBBBII8x", MP_PROCESSOR, cpu, APIC_VERSION, flags,
                               CPU_STEPPING, CPU_FEATURE_APIC | CPU_FEATURE_FPU)
    entries += struct.pack("<BB6s", MP_BUS, BUS_ID_ISA, b"ISA   ")
    entries += struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE,
                           IO_APIC_DEFAULT_PHYS_BASE)
    for irq in range(IOAPIC_PINS):
        entries += struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, 0, BUS_ID_ISA, irq,
                               ioapic_id, irq)
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_EXTINT, 0, BUS_ID_ISA, 0, 0, 0)
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_NMI, 0, BUS_ID_ISA, 0, 0xff, 1)
    count = num_cpus + 1 + 1 + IOAPIC_PINS + 2

    header_len = 44
    table_addr = base + 16
    length = header_len + len(entries)
    header = struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", length, MP_SPEC_REV, 0,
                         b"HV      ", b"000000000000", 0, 0, count,
                         APIC_DEFAULT_PHYS_BASE, 0, 0, 0)
    table = header + entries
    table = table[:7] + bytes([_checksum(table)]) + table[8:]

    mpf = struct.pack("<4sIBBBB4s", b"_MP_", table_addr, 1, MP_SPEC_REV, 0, 0, bytes(4))
    mpf = mpf[:10] + bytes([_checksum(mpf)]) + mpf[11:]
    out = mpf + table
    if base < EBDA_START + 0x400 and base + len(out) > EBDA_START + 0x400:
        raise MpTableError(f"MP table for {num_cpus} CPUs overflows the EBDA KiB")
    return out


def e820_map(regions) -> list[tuple[int, int, int]]:
    """(address, size, type) entries for RAM regions [(address, size)] (or a
    size: one region at 0): base RAM up to the EBDA, the legacy hole reserved
    (MP table, video memory, BIOS area), the rest of the first region above
    1 MiB, then every further region (RAM above 4 GiB)."""
    if isinstance(regions, int):
        regions = [(0, regions)]
    (base, low), rest = regions[0], regions[1:]
    if base != 0 or low <= HIMEM_START:
        raise MpTableError(f"guest RAM of {low} bytes at {base:#x} ends below 1 MiB")
    return [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        (HIMEM_START, low - HIMEM_START, E820_RAM),
    ] + [(addr, size, E820_RAM) for addr, size in rest]


def parse(data: bytes) -> dict:
    """Decode a table built by build() (for tests and debugging)."""
    sig, phys, length, spec, csum = struct.unpack_from("<4sIBBB", data, 0)
    if sig != b"_MP_" or sum(data[:16]) & 0xff:
        raise MpTableError("bad MP floating pointer")
    off = 16
    sig, tlen, spec, csum, oem, prod, _, _, count, lapic = struct.unpack_from(
        "<4sHBB8s12sIHHI", data, off)
    if sig != b"PCMP" or sum(data[off:off + tlen]) & 0xff:
        raise MpTableError("bad MP configuration table")
    p = off + 44
    out = {"lapic": lapic, "cpus": [], "buses": [], "ioapics": [], "intsrc": [], "lintsrc": []}
    for _ in range(count):
        t = data[p]
        if t == MP_PROCESSOR:
            _, apicid, ver, flags = struct.unpack_from("<BBBB", data, p)
            out["cpus"].append({"apicid": apicid, "flags": flags})
            p += 20
        elif t == MP_BUS:
            _, busid, name = struct.unpack_from("<BB6s", data, p)
            out["buses"].append((busid, name))
            p += 8
        elif t == MP_IOAPIC:
            _, apicid, ver, flags, addr = struct.unpack_from("<BBBBI", data, p)
            out["ioapics"].append({"apicid": apicid, "addr": addr})
            p += 8
        else:
            _, irqtype, flag, bus, busirq, dst, dstirq = struct.unpack_from("<BBHBBBB", data, p)
            key = "intsrc" if t == MP_INTSRC else "lintsrc"
            out[key].append((irqtype, busirq, dst, dstirq))
            p += 8
    return out
