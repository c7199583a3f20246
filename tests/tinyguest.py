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
