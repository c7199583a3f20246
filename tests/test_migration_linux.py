"""Live migration of the Linux guest image (slow: one guest is booted for the
whole module and migrated from machine to machine, once per free-page mode).

The guest runs `hvmem fill FILL --free && exec hvmem hold KEEP`; after each
migration "verify" is typed on the new machine's console and hvmem re-checks
every byte it holds.
"""

import base64
import threading
import time

import pytest

from hv.migration.protocol import MigrationError
from hv.migration.receiver import listen, receive
from hv.migration.sender import Migration, MigrationParams

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

MEM_MIB = 128
KEEP_MIB, FILL_MIB = 8, 32


class Console:
    def __init__(self):
        self.buf = bytearray()
        self.cond = threading.Condition()

    def __call__(self, data):
        with self.cond:
            self.buf += data
            self.cond.notify_all()

    def mark(self):
        with self.cond:
            return len(self.buf)

    def wait_for(self, needle, timeout, start=0):
        raw = needle.encode()
        deadline = time.monotonic() + timeout
        with self.cond:
            while raw not in self.buf[start:]:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{needle!r} not seen; tail: "
                                       f"{bytes(self.buf[-800:]).decode(errors='replace')}")
                self.cond.wait(left)
            return self.buf[start:].decode(errors="replace")


def new_machine(images, console, boot=False):
    from hv.machine import Machine, MachineConfig
    kernel, initrd = images
    cmd = f"hvmem fill {FILL_MIB} --free && exec hvmem hold {KEEP_MIB}"
    m = Machine(MachineConfig(mem_mib=MEM_MIB, kernel=kernel, initrd=initrd, balloon=True,
                              append="hv.exec=" + base64.b64encode(cmd.encode()).decode()))
    m.console_listeners.append(console)
    if boot:
        m.boot()
        m.start()
    return m


@pytest.fixture(scope="module")
def guest(linux_images):
    """{"machine": the machine the guest currently runs on, "console": ...}"""
    console = Console()
    m = new_machine(linux_images, console, boot=True)
    try:
        console.wait_for(f"hvmem: hold {KEEP_MIB} MiB", timeout=900)
    except TimeoutError:
        m.stop()
        m.close()
        raise
    state = {"machine": m, "console": console, "images": linux_images, "old": []}
    yield state
    for x in state["old"] + [state["machine"]]:
        try:
            x.close()
        except Exception:
            pass


def migrate(guest, verify=True, **params):
    dst = new_machine(guest["images"], guest["console"])
    lst = listen("tcp:127.0.0.1:0")
    port = lst.getsockname()[1]
    res = {}

    def run():
        try:
            res["rx"] = receive(dst.memory, lst, dst.restore_state, dst.start, timeout=60)
        except Exception as e:
            res["error"] = e
        finally:
            lst.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    src = guest["machine"]
    mig = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", verify=verify,
                                         **params))
    mig.run()
    t.join(60)
    q = mig.query()
    if q["status"] == "completed":
        guest["old"].append(src)
        guest["machine"] = dst
    else:
        guest["old"].append(dst)
    return q, res


def guest_verifies(guest):
    c = guest["console"]
    mark = c.mark()
    guest["machine"].serial.enqueue(b"verify\n")
    out = c.wait_for("hvmem: verify ", 120, mark)
    # the rest of the line may still be on its way
    line = c.wait_for("\n", 30, mark + out.index("hvmem: verify "))
    return line.startswith("hvmem: verify ok")


@pytest.mark.parametrize("mode", ["bitmap", "hint", "off"])
def test_linux_guest_migrates(guest, mode):
    q, res = migrate(guest, free_pages=mode)
    assert q["status"] == "completed", q
    assert "error" not in res, res.get("error")
    assert res["rx"].verified
    assert guest["machine"].status == "running"
    assert guest_verifies(guest)
    if mode == "bitmap" and not (q.get("free_page_info") or {}).get("warning"):
        # the freed FILL MiB (and most of the rest) were not sent
        assert q["pages_skipped_free"] > FILL_MIB * 256 // 2, q
        assert q["pages_sent"] < (MEM_MIB - FILL_MIB // 2) * 256
    if mode == "off":
        assert q["pages_skipped_free"] == 0


def test_cut_migration_leaves_linux_guest_running(guest):
    lst = listen("tcp:127.0.0.1:0")
    port = lst.getsockname()[1]

    def rude():
        c, _ = lst.accept()
        c.recv(1 << 20)
        c.close()
        lst.close()
    threading.Thread(target=rude, daemon=True).start()
    src = guest["machine"]
    mig = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", free_pages="off",
                                         timeout_s=10))
    mig.run()
    q = mig.query()
    assert q["status"] == "failed" and q["error"]
    assert src.status == "running"
    assert guest_verifies(guest)
    with pytest.raises(MigrationError):
        MigrationParams.from_args({"uri": "udp:1"})
