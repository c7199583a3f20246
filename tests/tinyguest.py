"""Helpers for the tiny hand-made test guests (tests/guests/)."""

LOAD = 0x1000


def flat32(vcpu, rip: int = LOAD, rsp: int = 0x8000) -> None:
    """32-bit protected mode, flat 4 GiB segments, paging off, start at rip."""
    s = vcpu.get_sregs()
    code = dict(base=0, limit=0xffffffff, selector=0x10, type=11, present=1, dpl=0,
                db=1, s=1, l=0, g=1, avl=0, unusable=0)
    data = dict(code, selector=0x18, type=3)
    s["cs"] = code
    for seg in ("ds", "es", "fs", "gs", "ss"):
        s[seg] = dict(data)
    s["cr0"] |= 1
    vcpu.set_sregs(s)
    vcpu.set_regs({"rip": rip, "rflags": 2, "rsp": rsp})


#: where long64() puts its page tables (PML4, PDPT, then one PD per GiB)
PAGE_TABLES = 0x10000


def long64(vcpu, memory, rip: int = LOAD, rsp: int = 0x8000, gib: int = 8) -> None:
    """64-bit long mode, the first `gib` GiB identity-mapped with 2 MiB pages
    (tables written into memory at PAGE_TABLES), start at rip."""
    from hv.boot import segment_from_flags
    pml4, pdpt = PAGE_TABLES, PAGE_TABLES + 0x1000
    memory.write_u64(pml4, pdpt | 0x3)
    for g in range(gib):
        pd = PAGE_TABLES + 0x2000 + 0x1000 * g
        memory.write_u64(pdpt + 8 * g, pd | 0x3)
        memory.write(pd, b"".join(((g << 30) + (i << 21) | 0x83).to_bytes(8, "little")
                                  for i in range(512)))
    s = vcpu.get_sregs()
    s["cs"] = segment_from_flags(0x08, 0xa09b)
    for seg in ("ds", "es", "fs", "gs", "ss"):
        s[seg] = segment_from_flags(0x10, 0xc093)
    s["cr3"], s["cr4"] = pml4, 0x20                    # PAE
    s["cr0"] = 0x80000011                             # PG | ET | PE
    s["efer"] = 0x500                                 # LMA | LME
    vcpu.set_sregs(s)
    vcpu.set_regs({"rip": rip, "rflags": 2, "rsp": rsp})
