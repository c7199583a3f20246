"""A Linux guest with two vCPUs: both CPUs come up (INIT/SIPI through the
in-kernel LAPIC), user work pinned to each runs there, and the guest
migrates with a writer on each CPU, with KVM's bitmap and with per-vCPU
dirty rings, verified."""

import bisect
import functools
import re
import subprocess
import time

import pytest

from conftest import Console
from loopback import migrate_over_loopback

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

MEM_MIB = 128
KEEP_MIB, DIRTY_MIB, DIRTY_RATE = 4, 4, 1000
RING_BYTES = 64 * 1024
CPUS = 'echo "cp""us=$(grep -c ^processor /proc/cpuinfo)"'
ON_CPU = "awk '{print \"on-\" \"cpu-\" $39}' /proc/self/stat"


def new_machine(images, console, ring: bool, boot=False):
    from hv.vmm import Machine, MachineConfig
    kernel, initrd = images
    m = Machine(MachineConfig(mem_mib=MEM_MIB, cpus=2, kernel=kernel, initrd=initrd,
                              balloon=True, dirty_ring_bytes=RING_BYTES if ring else 0))
    m.console_listeners.append(console)
    if boot:
        m.boot()
        m.start()
    return m


@functools.lru_cache(maxsize=None)
def kernel_functions(kernel: str) -> tuple[list[int], list[str]]:
    """The guest kernel's function addresses (sorted) and names, from nm."""
    out = subprocess.run(["nm", "-n", kernel], capture_output=True, text=True).stdout
    syms = [(int(a, 16), name) for a, kind, name in
            (line.split() for line in out.splitlines() if line.count(" ") == 2)
            if kind in "tTwW"]
    return [a for a, _ in syms], [name for _, name in syms]


def kernel_symbol(kernel: str, addr: int) -> str:
    """The function of the guest kernel that holds addr."""
    addrs, names = kernel_functions(kernel)
    i = bisect.bisect_right(addrs, addr) - 1
    return f"{names[i]}+{addr - addrs[i]:#x}" if i >= 0 else hex(addr)


def where_vcpus_run(g, samples=5) -> list[str]:
    """Where each vCPU is, a few times 0.2 s apart (paused and resumed around
    each look): a guest that stopped answering shows whether its CPUs are
    idle, spinning, or stuck in one place."""
    m, kernel = g["machine"], g["images"][0]
    seen = []
    for _ in range(samples):
        m.pause()
        try:
            regs = m.on_each_vcpu(lambda v: v.get_regs())
        finally:
            m.resume()
        seen.append(", ".join(f"cpu{i} {kernel_symbol(kernel, r['rip'])} if={r['rflags'] >> 9 & 1}"
                              for i, r in enumerate(regs)))
        time.sleep(0.2)
    return seen


def machine_said(g) -> str:
    """What a failed wait shows: the machine's run state, why it ended, where
    its vCPUs run, and the end of the console."""
    m = g["machine"]
    where = ""
    if m.status == "running":
        try:
            where = "; vCPUs at: " + " | ".join(where_vcpus_run(g))
        except Exception as e:      # the diagnosis must not hide the failure
            where = f"; vCPUs not sampled: {e}"
    return (f"machine {m.status} (shutdown reason {m.shutdown_reason!r}, error {m.error!r}, "
            f"exits {dict(m.exit_counts)}){where}; console tail:\n{g['console'].text[-3000:]}")


def type_line(g, command: str) -> int:
    """Type command and a newline on the console; returns the console mark
    from before it."""
    mark = g["console"].mark()
    try:
        g["machine"].console_input(command.encode() + b"\n")
    except Exception as e:
        raise AssertionError(f"typing {command!r}: {e}; {machine_said(g)}") from e
    return mark


def shell(g, command: str, answer: str, timeout=300) -> str:
    """Type command; the first whole line starting with answer (split the
    answer in the command, "ans""wer", so that its echo does not match)."""
    mark = type_line(g, command)
    try:
        return g["console"].wait_line(answer, timeout, mark)
    except TimeoutError:
        raise AssertionError(f"no line {answer!r}... within {timeout} s; {machine_said(g)}")


def shell_number(g, command: str, prefix: str, timeout=300) -> int:
    """Type command; the number the guest prints right after prefix. A line
    without it ("cpus=" alone, seen once after a 2-vCPU ring migration: the
    typed line reached the shell damaged) gets the command typed again, once,
    and says so on stdout."""
    pattern = re.compile(re.escape(prefix) + r"(\d*)\r?\n")
    for attempt in range(2):
        mark = type_line(g, command)
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(g["console"].text[mark:])
            if m and m.group(1):
                return int(m.group(1))
            if m:
                print(f"\n{command!r} answered {m.group(0)!r}; console since: "
                      f"{g['console'].text[mark:][-400:]!r}")
                break
            assert time.monotonic() < deadline, \
                f"no {prefix}N within {timeout} s; {machine_said(g)}"
            time.sleep(0.05)
    raise AssertionError(f"{command!r}: no {prefix}N, twice")


@pytest.fixture(scope="module", params=["bitmap", "ring"])
def smp_guest(request, linux_images):
    console = Console()
    ring = request.param == "ring"
    m = new_machine(linux_images, console, ring, boot=True)
    g = {"machine": m, "console": console, "ring": ring, "images": linux_images, "old": []}
    try:
        console.wait_for("hv-guest: ready", timeout=900)
        yield g
    finally:
        for x in g["old"] + [g["machine"]]:
            try:
                x.close()
            except Exception:
                pass


def test_both_cpus_run_pinned_work(smp_guest):
    g = smp_guest
    assert shell_number(g, CPUS, "cpus=") == 2
    # field 39 of /proc/self/stat: the CPU the reading process runs on
    for mask, cpu in (("1", 0), ("2", 1)):
        assert shell_number(g, f"taskset {mask} {ON_CPU}", "on-cpu-") == cpu


def test_migrates_with_a_writer_on_each_cpu(smp_guest):
    g = smp_guest
    if "HOLD" not in g:
        shell(g, f"taskset 1 hvmem hold {KEEP_MIB} </dev/null & HOLD=$!",
              f"hvmem: hold {KEEP_MIB} MiB checksum=")
        for mask in ("1", "2"):
            shell(g, f"taskset {mask} hvmem dirty {DIRTY_MIB} {DIRTY_RATE} </dev/null &",
                  f"hvmem: dirtying {DIRTY_MIB} MiB")
        g["HOLD"] = True
        time.sleep(1)
    src = g["machine"]
    dst = new_machine(g["images"], g["console"], g["ring"])
    q, res = migrate_over_loopback(src, dst, timeout=120, free_pages="bitmap", verify=True,
                                   downtime_ms=300, downtime_strategy="force")
    print(f"\n2 vCPUs, {q['dirty_log']}: {q['status']} rounds "
          f"{[r['pages'] for r in q['rounds']]} downtime {q['downtime_ms']} ms")
    if q["status"] != "completed":
        g["old"].append(dst)
        pytest.fail(f"migration failed: {q['error']}")
    g["old"].append(src)
    g["machine"] = dst
    assert res["rx"].verified and q["dirty_log"] == ("ring" if g["ring"] else "bitmap")
    assert len(res["rx"].machine_state["vcpus"]) == 2
    assert shell(g, "kill -USR1 $HOLD", "hvmem: verify ", 120) == "hvmem: verify ok"
    assert shell_number(g, CPUS, "cpus=") == 2
    assert shell_number(g, f"taskset 2 {ON_CPU}", "on-cpu-") == 1
