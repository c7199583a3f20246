"""Shared fixtures.

kvm_required     skip marker (with the reason) where /dev/kvm is missing or
                 not accessible
tiny_guest       path to a hand-made test guest under tests/guests/
linux_images     (kernel, initrd) of the Linux guest, or skip
linux_snapshot   the path of a snapshot of ONE Linux guest (64 MiB) booted
                 once per session, taken once it printed "hv-guest: ready"
linux_guest      a Linux guest of the test's own, restored from linux_snapshot
                 (mapped copy-on-write: milliseconds, and no test sees what
                 another did): a hv.vmm.Machine whose .console is a Console
                 (below) holding the boot output and collecting what follows;
                 it runs an interactive shell on ttyS0 (type with
                 m.serial.enqueue(b"cmd\n")).
Console          collects a guest's console bytes; wait_for(needle, timeout,
                 start=mark()) returns the text once needle has appeared
                 (later bytes of the same line may still be arriving);
                 wait_line(prefix, timeout, start) waits for the whole line.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

# scripts/harness.py: the process harness shared by the scripts and the tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

GUESTS = os.path.join(os.path.dirname(__file__), "guests")


def kvm_unavailable_reason() -> str | None:
    path = "/dev/kvm"
    if not os.path.exists(path):
        return f"{path} not found: no KVM on this host"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not accessible: add the user to the kvm group"
    return None


_reason = kvm_unavailable_reason()
kvm_required = pytest.mark.skipif(_reason is not None, reason=_reason or "")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "kvm" in item.keywords and _reason is not None:
            item.add_marker(pytest.mark.skip(reason=_reason))


@pytest.fixture
def tiny_guest():
    def path(name: str) -> str:
        return os.path.join(GUESTS, name)
    return path


class Console:
    """Collects everything a guest prints; wait_for() with a timeout."""

    def __init__(self, initial: bytes = b""):
        self._buf = bytearray(initial)
        self._cond = threading.Condition()

    def __call__(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return self._buf.decode(errors="replace")

    def mark(self) -> int:
        with self._cond:
            return len(self._buf)

    def since(self, start: int) -> str:
        """What the guest printed after byte offset start."""
        with self._cond:
            return self._buf[start:].decode(errors="replace")

    def wait_for(self, needle: str, timeout: float, start: int = 0) -> str:
        """Wait until needle appears after byte offset start; return the text."""
        deadline = time.monotonic() + timeout
        raw = needle.encode()
        with self._cond:
            while raw not in self._buf[start:]:
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = self._buf[-2000:].decode(errors="replace")
                    raise TimeoutError(f"{needle!r} not seen in {timeout} s; console tail:\n{tail}")
                self._cond.wait(left)
            return self._buf[start:].decode(errors="replace")

    def wait_line(self, prefix: str, timeout: float, start: int = 0) -> str:
        """Wait for a whole line starting with prefix after byte offset start
        (its end of line included); return it without the line end."""
        deadline = time.monotonic() + timeout
        raw = prefix.encode()
        with self._cond:
            while True:
                i = self._buf.find(raw, start)
                end = self._buf.find(b"\n", i) if i >= 0 else -1
                if end >= 0:
                    return self._buf[i:end].decode(errors="replace").rstrip("\r")
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = self._buf[-2000:].decode(errors="replace")
                    raise TimeoutError(f"no whole line {prefix!r}... in {timeout} s; "
                                       f"console tail:\n{tail}")
                self._cond.wait(left)


@pytest.fixture(scope="session")
def linux_images():
    if _reason is not None:
        pytest.skip(_reason)
    try:
        from hv import images
        kernel, initrd = images.paths()
    except Exception as e:  # the image module or its output is missing
        pytest.skip(f"Linux guest images not available: {e}")
    for p in (kernel, initrd):
        if not p or not os.path.exists(p):
            pytest.skip(f"Linux guest image {p} not built (python -m hv.images build)")
    return kernel, initrd


@pytest.fixture(scope="session")
def linux_snapshot(linux_images, tmp_path_factory):
    """Boot the 64 MiB Linux guest once; save it when it is ready."""
    from hv.migration.snapshot import save
    from hv.vmm import Machine, MachineConfig
    kernel, initrd = linux_images
    console = Console()
    m = Machine(MachineConfig(mem_mib=64, kernel=kernel, initrd=initrd))
    m.console_listeners.append(console)
    try:
        m.boot()
        m.start()
        console.wait_for("hv-guest: ready", timeout=900)
        path = str(tmp_path_factory.mktemp("snap") / "linux.snap")
        save(m, path, resume=False)
    finally:
        m.close()
    return path, kernel, initrd, console.text.encode()


@pytest.fixture
def linux_guest(linux_snapshot):
    """A booted 64 MiB Linux guest of this test's own (restored)."""
    from hv.migration.snapshot import restore
    from hv.vmm import Machine, MachineConfig
    path, kernel, initrd, boot_output = linux_snapshot
    console = Console(boot_output)
    m = Machine(MachineConfig(mem_mib=64, kernel=kernel, initrd=initrd))
    m.console_listeners.append(console)
    m.console = console
    try:
        restore(m, path)
        yield m
    finally:
        m.close()
