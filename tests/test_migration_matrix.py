"""A migrated Linux guest is healthy, whatever the dirty log, the free page
mode and verify, and whatever a control client does meanwhile.

For each dirty log (KVM's bitmap, the dirty ring) one guest is booted; its
shell runs `hvmem hold` and `hvmem dirty` in the background. It then
ping-pongs between machines, once per (free pages, verify) pair and repeat,
with a bandwidth limit so that every phase lasts. Throughout each migration a
client storms the source with stop and cont. After each hop:

- the migration completed, or failed with the source still able to run;
- the destination's console shows no Oops, BUG: or panic;
- hold re-checks every byte it holds, and the writer is alive;
- the source never runs again: postmigrate, cont refused, its vCPUs idle.
"""

import itertools
import threading
import time

import pytest

from conftest import Console
from loopback import migrate_over_loopback
from hv.vmm import MachineError

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

MEM_MIB = 128
KEEP_MIB, DIRTY_MIB, DIRTY_RATE = 8, 8, 2000
BANDWIDTH_MIB = 24
REPEATS = 2
RING_BYTES = 64 * 1024
BROKEN = ("Oops", "BUG:", "Kernel panic", "general protection fault", "Bad rss-counter",
          "applet not found", "Segmentation fault")
HOPS = list(itertools.product(("bitmap", "off"), (True, False), range(REPEATS)))


def new_machine(images, console, ring: bool, boot=False):
    from hv.vmm import Machine, MachineConfig
    kernel, initrd = images
    m = Machine(MachineConfig(mem_mib=MEM_MIB, kernel=kernel, initrd=initrd, balloon=True,
                              dirty_ring_bytes=RING_BYTES if ring else 0))
    m.console_listeners.append(console)
    if boot:
        m.boot()
        m.start()
    return m


def shell(state, command: str, answer: str, timeout=300) -> str:
    c = state["console"]
    mark = c.mark()
    state["machine"].console_input(command.encode() + b"\n")
    return c.wait_line(answer, timeout, mark)


@pytest.fixture(scope="module", params=["bitmap", "ring"])
def storm_guest(request, linux_images):
    ring = request.param == "ring"
    console = Console()
    m = new_machine(linux_images, console, ring, boot=True)
    state = {"machine": m, "console": console, "ring": ring, "images": linux_images,
             "old": [], "dirty_log": request.param}
    try:
        console.wait_for("hv-guest: ready", timeout=900)
        shell(state, f"hvmem hold {KEEP_MIB} </dev/null & HOLD=$!",
              f"hvmem: hold {KEEP_MIB} MiB checksum=")
        shell(state, f"hvmem dirty {DIRTY_MIB} {DIRTY_RATE} </dev/null & DIRTY=$!",
              f"hvmem: dirtying {DIRTY_MIB} MiB")
        time.sleep(1)
        yield state
    finally:
        for x in state["old"] + [state["machine"]]:
            try:
                x.close()
            except Exception:
                pass


class Storm:
    """stop / cont on the source every few milliseconds, as a client would."""

    def __init__(self, machine):
        self.machine = machine
        self.refused = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for cmd in itertools.cycle(("stop", "cont")):
            if self.done.wait(0.015):
                return
            try:
                self.machine.commands[cmd]({})
            except MachineError:
                self.refused += 1

    def end(self):
        self.done.set()
        self.thread.join(5)


@pytest.mark.parametrize("free_pages,verify,repeat", HOPS,
                         ids=[f"{f}-{'verify' if v else 'noverify'}-{r}" for f, v, r in HOPS])
def test_migrated_guest_is_healthy(storm_guest, free_pages, verify, repeat):
    g = storm_guest
    src = g["machine"]
    dst = new_machine(g["images"], g["console"], g["ring"])
    console = g["console"]
    mark = console.mark()
    storm = Storm(src)
    try:
        q, res = migrate_over_loopback(
            src, dst, timeout=120, free_pages=free_pages, verify=verify,
            dirty_log="auto", max_bandwidth_mib=BANDWIDTH_MIB, downtime_ms=300,
            downtime_strategy="force", max_rounds=8, shutdown_source=False)
    finally:
        storm.end()
    print(f"\n{g['dirty_log']} {free_pages} verify={verify}: {q['status']} "
          f"rounds {[r['pages'] for r in q['rounds']]} downtime {q['downtime_ms']} ms "
          f"({q.get('downtime_parts')}), storm refused {storm.refused}, "
          f"error {q.get('error')}")
    if q["status"] != "completed":
        # a failed migration leaves the source able to run
        g["old"].append(dst)
        assert src.status in ("running", "paused"), q
        if src.status == "paused":
            src.commands["cont"]({})
        pytest.fail(f"migration failed: {q['error']}")
    # the guest runs on dst from here: later hops start there, whatever fails below
    g["old"].append(src)
    g["machine"] = dst
    assert "error" not in res, res.get("error")
    assert q["dirty_log"] == g["dirty_log"]
    if verify:
        assert res["rx"].verified
    if free_pages == "bitmap":
        assert not (q.get("free_page_info") or {}).get("warning"), q["free_page_info"]

    # The source never runs again.
    assert src.status == "postmigrate"
    with pytest.raises(MachineError, match="postmigrate"):
        src.commands["cont"]({})
    exits = sum(src.exit_counts.values())

    # The destination runs a healthy guest.
    assert shell(g, "kill -0 $DIRTY && echo alive-$((6*7))", "alive-42", 120) == "alive-42"
    assert shell(g, "kill -USR1 $HOLD", "hvmem: verify ", 120) == "hvmem: verify ok"
    text = console.since(mark)
    broken = [b for b in BROKEN if b in text]
    assert not broken, f"destination console shows {broken}:\n{text[-3000:]}"
    assert sum(src.exit_counts.values()) == exits, "the source ran after the migration"
