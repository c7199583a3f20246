"""hv.boot and hv.mptable: loading kernels into guest memory (no /dev/kvm)."""

import os
import struct

import pytest

from hv import boot, mptable
from hv.errors import HvError
from hv.memory import GuestMemory

GUESTS = os.path.join(os.path.dirname(__file__), "guests")
PVH = os.path.join(GUESTS, "pvh.elf")
MIB = 1 << 20


def test_cmdline_builder():
    c = boot.Cmdline()
    c.add("console=ttyS0").add_param("quiet").add_param("hv.msg", "a b")
    assert str(c) == 'console=ttyS0 quiet hv.msg="a b"'
    assert c.as_bytes().endswith(b"\0")
    with pytest.raises(boot.BootError, match="NUL"):
        c.add("x\0y")
    with pytest.raises(boot.BootError, match="double quote"):
        c.add_param("k", 'a"b')
    with pytest.raises(boot.BootError, match="parameter name"):
        c.add_param("a b", "c")
    small = boot.Cmdline(capacity=16)
    small.add("0123456789")
    with pytest.raises(boot.BootError, match="too long"):
        small.add("abcdef")
    assert str(small) == "0123456789"


def test_pvh_elf_loads():
    mem = GuestMemory(16 * MIB)
    initrd = os.path.join(GUESTS, "real16.bin")
    r = boot.load_kernel(mem, PVH, "console=ttyS0 x=1", initrd)
    assert r.protocol == boot.PROTOCOL_PVH
    assert r.entry == 0x100000
    assert r.kernel_end > r.entry
    info = mem.read(boot.PVH_INFO_ADDR, 56)
    (magic, version, flags, nmod, modlist, cmdline, rsdp, memmap, nmemmap,
     _) = struct.unpack("<IIIIQQQQII", info)
    assert magic == boot.XEN_HVM_START_MAGIC and version == 1
    assert mem.read(cmdline, 18) == b"console=ttyS0 x=1\0"
    assert nmod == 1
    addr, size = struct.unpack("<QQ", mem.read(modlist, 16))
    assert size == os.path.getsize(initrd)
    assert addr % 4096 == 0 and addr + size <= mem.size and addr + 4096 > mem.size - size
    assert mem.read(addr, size) == open(initrd, "rb").read()
    assert (addr, size) == (r.initrd_addr, r.initrd_size)
    entries = [struct.unpack_from("<QQI", mem.read(memmap + 24 * i, 24)) for i in range(nmemmap)]
    assert entries == mptable.e820_map(mem.size)
    assert rsdp == 0


def test_resident_ranges_are_the_image_but_its_init_and_bss(linux_images):
    """The Linux vmlinux: text, data and per-cpu stay; the segment that is
    writable and executable (.init, .bss, freed or zeroed at boot) does not."""
    kernel, _ = linux_images
    mem = GuestMemory(64 * MIB)
    r = boot.load_kernel(mem, kernel, "console=ttyS0")
    with open(kernel, "rb") as f:
        phdrs = boot.elf_program_headers(f.read(), kernel)
    loads = [(p[4], p[6], p[1]) for p in phdrs if p[0] == boot.PT_LOAD and p[6]]
    rwx = [(a, n) for a, n, flags in loads if flags & 3 == 3]
    assert rwx and r.resident == [(a, n) for a, n, flags in loads if flags & 3 != 3]
    assert all(r.kernel_start <= a and a + n <= r.kernel_end for a, n in r.resident)


def test_not_a_kernel(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"hello" * 200)
    mem = GuestMemory(16 * MIB)
    with pytest.raises(boot.BootError, match="not a kernel image") as e:
        boot.load_kernel(mem, str(p), "")
    assert isinstance(e.value, HvError) and e.value.exit_status == 2
    with pytest.raises(boot.BootError, match="not found"):
        boot.load_kernel(mem, str(tmp_path / "missing"), "")


def test_elf_without_pvh_note(tmp_path):
    data = bytearray(open(PVH, "rb").read())
    i = data.find(b"Xen\0")
    data[i:i + 4] = b"Nope"
    p = tmp_path / "nopvh"
    p.write_bytes(bytes(data))
    with pytest.raises(boot.BootError, match="PVH"):
        boot.load_kernel(GuestMemory(16 * MIB), str(p), "")


def test_initrd_too_big(tmp_path):
    p = tmp_path / "big"
    p.write_bytes(bytes(15 * MIB))
    with pytest.raises(boot.BootError, match="too small"):
        boot.load_kernel(GuestMemory(16 * MIB), PVH, "", str(p))


def fake_bzimage(payload=b"\x90" * 1000):
    setup_sects = 1
    img = bytearray(512 * (setup_sects + 1))
    img[0x1f1] = setup_sects
    img[0x1fe:0x200] = b"\x55\xaa"
    img[0x201] = 0x6a                    # header ends at 0x202 + 0x6a
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, 0x20f)
    struct.pack_into("<H", img, 0x236, 0x1)   # XLF_KERNEL_64
    return bytes(img) + payload


def test_bzimage_64bit_protocol(tmp_path):
    p = tmp_path / "bzImage"
    p.write_bytes(fake_bzimage())
    mem = GuestMemory(32 * MIB)
    r = boot.load_kernel(mem, str(p), "console=ttyS0")
    assert r.protocol == boot.PROTOCOL_LINUX64
    assert r.entry == 0x100200
    assert mem.read(0x100000, 4) == b"\x90" * 4
    bp = boot.ZERO_PAGE_ADDR
    assert mem.read(bp + 0x202, 4) == b"HdrS"
    assert mem.read_u8(bp + 0x210) == 0xff
    assert mem.read_u32(bp + 0x228) == boot.CMDLINE_ADDR
    n = mem.read_u8(bp + 0x1e8)
    assert n == 3
    assert struct.unpack("<QQI", mem.read(bp + 0x2d0, 20)) == (0, mptable.EBDA_START, 1)
    # identity map: PML4 -> PDPT -> 2 MiB pages
    assert mem.read_u64(boot.PML4_ADDR) == boot.PDPTE_ADDR | 3
    assert mem.read_u64(boot.PDE_ADDR + 8 * 5) == (5 << 21) | 0x83


def test_gdt_and_segments():
    e = boot.gdt_entry(0xa09b, 0, 0xfffff)
    assert e == 0x00af9b000000ffff
    seg = boot.segment_from_flags(0x10, 0xa09b)
    assert seg["l"] == 1 and seg["db"] == 0 and seg["type"] == 0xb and seg["limit"] == 0xffffffff
    seg = boot.segment_from_flags(0x10, 0xc093)
    assert seg["db"] == 1 and seg["s"] == 1 and seg["present"] == 1


def test_mptable():
    data = mptable.build(1)
    t = mptable.parse(data)
    assert t["lapic"] == mptable.APIC_DEFAULT_PHYS_BASE
    assert t["cpus"] == [{"apicid": 0, "flags": 3}]
    assert t["ioapics"] == [{"apicid": 2, "addr": 0xfec00000}]
    assert t["buses"] == [(0, b"ISA   ")]
    pins = {busirq: dstirq for _, busirq, _, dstirq in t["intsrc"]}
    assert all(pins[i] == i for i in range(24))     # serial IRQ 4, virtio GSIs 5..
    assert [x[0] for x in t["lintsrc"]] == [mptable.MP_EXTINT, mptable.MP_NMI]
    assert mptable.parse(mptable.build(4))["cpus"][3]["flags"] == 1
    bad = bytearray(data)
    bad[20] ^= 1
    with pytest.raises(mptable.MpTableError):
        mptable.parse(bytes(bad))


def test_e820():
    e = mptable.e820_map(64 * MIB)
    assert e[0] == (0, 0x9fc00, mptable.E820_RAM)
    assert e[-1] == (MIB, 63 * MIB, mptable.E820_RAM)
    with pytest.raises(mptable.MpTableError):
        mptable.e820_map(MIB // 2)


@pytest.mark.kvm
def test_bzimage_long_mode_entry_runs(tmp_path):
    """The 64-bit boot protocol for real: long mode, identity map, %rsi."""
    from conftest import Console, kvm_unavailable_reason
    if kvm_unavailable_reason():
        pytest.skip(kvm_unavailable_reason())
    from hv.vmm import Machine, MachineConfig
    p = tmp_path / "bzImage"
    p.write_bytes(fake_bzimage(open(os.path.join(GUESTS, "long64.bin"), "rb").read()))
    console = Console()
    m = Machine(MachineConfig(mem_mib=32, kernel=str(p), cmdline="console=ttyS0 long=1"))
    m.console_listeners.append(console)
    assert m.boot().protocol == boot.PROTOCOL_LINUX64
    m.start()
    assert m.wait(20) == "poweroff", m.error
    assert "long mode: boot_params ok\nconsole=ttyS0 long=1" in console.text
    m.close()
