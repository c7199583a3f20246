"""The harness of hv's scripts and tests, outside the installed package: a
run-guest (or QEMU) process with its console collected and typed into (hv's
console-input over QMP, or its stdin), the QMP client with retries, one QMP
migration driven the way QEMU is driven, the guest workload command, and
verify_ok(line) for hvmem's check. Used by migrate-between-hosts,
bench-migration and the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from hv.images import exec_arg  # noqa: F401 (the scripts' encoder of hv.exec)

#: hvmem hold's answer to "verify" when every byte it holds is intact (a line)
VERIFY_OK = "hvmem: verify ok"

#: run-guest in this interpreter (hv.cli's extensions register on import).
RUN_GUEST = [sys.executable, "-c", "import sys; from hv.cli import main; sys.exit(main())"]


def dirty_writers(cpus: int, dirty_mib: int, dirty_rate: int = 2000) -> str:
    """A command prefix: with dirty_mib, one `hvmem dirty` writer pinned to
    each of the guest's cpus (rewriting dirty_rate pages a second), in the
    background."""
    return "".join(f"taskset -c {c} hvmem dirty {dirty_mib} {dirty_rate} </dev/null & "
                   for c in range(cpus)) if dirty_mib else ""


def workload(keep_mib: int, fill_mib: int, cpus: int = 1, dirty_mib: int = 0,
             dirty_rate: int = 2000) -> str:
    """The guest command: the dirty_writers, then write FILL MiB and free
    them, then hold KEEP MiB (a "verify" line on the console re-checks every
    byte held)."""
    writers = dirty_writers(cpus, dirty_mib, dirty_rate)
    return f"{writers}hvmem fill {fill_mib} --free && exec hvmem hold {keep_mib}"



def in_netns(ns: str | None):
    def enter():
        # Between fork and exec: the parent's Python signal handlers must not
        # run here (they would run the parent's cleanup in the child).
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        if ns:
            from pyroute2 import netns
            netns.setns(ns)
        os.setsid()
    return enter


class Guest:
    """A run-guest process in a namespace; its console output collected.

    type() goes through the control socket's console-input command when
    control_path (the process's --control socket) is given, else to the
    process's stdin (QEMU's serial on stdio)."""

    def __init__(self, name: str, ns: str | None, argv: list[str], logdir: str,
                 control_path: str | None = None):
        self.name = name
        self.control_path = control_path
        self.out = bytearray()
        self.cond = threading.Condition()
        self.logf = open(os.path.join(logdir, f"{name}.log"), "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, preexec_fn=in_netns(ns))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            data = self.proc.stdout.read1(65536)
            if not data:
                break
            try:
                self.logf.write(data)
                self.logf.flush()
            except ValueError:      # closed by stop()
                pass
            with self.cond:
                self.out += data
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.out)

    def wait_for(self, needle: str, timeout: float, start: int = 0) -> str:
        raw = needle.encode()
        deadline = time.monotonic() + timeout
        with self.cond:
            while raw not in self.out[start:]:
                if self.proc.poll() is not None and raw not in self.out[start:]:
                    raise RuntimeError(f"{self.name}: run-guest exited with status "
                                       f"{self.proc.returncode} before {needle!r}:\n"
                                       + self.tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: {needle!r} not seen within {timeout:.0f} s"
                                       f":\n" + self.tail())
                self.cond.wait(min(left, 1.0))
            return self.out[start:].decode(errors="replace")

    def wait_line(self, prefix: str, timeout: float, start: int = 0) -> str:
        """Wait for a whole console line starting with prefix; return it."""
        text = self.wait_for(prefix, timeout, start)
        i = text.index(prefix)
        deadline = time.monotonic() + timeout
        while "\n" not in text[i:]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
            text = self.wait_for(prefix, timeout, start)
        return text[i:].split("\n", 1)[0].strip()

    def tail(self, n: int = 1500) -> str:
        return bytes(self.out[-n:]).decode(errors="replace")

    def type(self, text: str) -> None:
        if self.control_path is not None:
            from hv.qmp_commands import PREFIX
            with control(self.control_path, 10) as c:
                c.execute(PREFIX + "console-input", data=text)
            return
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)   # its own session (setsid)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.logf.close()


def verify_ok(line: str) -> bool:
    """Whether a console line (Guest.wait_line) is hvmem's verify success,
    the whole line, not a prefix of it."""
    return line.strip() == VERIFY_OK


def control(path: str, timeout: float = 60.0):
    """A QMP client (hv.control.ControlClient) of hv or QEMU at path,
    retrying for timeout s while the socket is not there yet."""
    from hv.control import connect
    return connect(path, timeout)


FINAL_STATUSES = ("completed", "failed", "cancelled")


def qmp_migrate(c, uri: str, parameters: dict | None = None, capabilities: dict | None = None,
                timeout: float = 300.0, poll_s: float = 0.05, on_poll=None) -> dict:
    """Migrate with QEMU's commands only (the same for hv and QEMU):
    migrate-set-capabilities, migrate-set-parameters, migrate, then
    query-migrate until the migration ends (migrate_cancel after timeout s,
    status "timeout"); on_poll(MigrationInfo) sees each answer before the
    end. Returns the last MigrationInfo."""
    if capabilities:
        c.execute("migrate-set-capabilities", capabilities=[
            {"capability": k, "state": v} for k, v in capabilities.items()])
    if parameters:
        c.execute("migrate-set-parameters", parameters)
    c.execute("migrate", uri=uri)
    deadline = time.monotonic() + timeout
    while True:
        q = c.execute("query-migrate")
        if on_poll is not None:
            on_poll(q)
        if q.get("status") in FINAL_STATUSES:
            # QEMU 7.2 says completed a moment before it fills in total-time
            # and downtime (migration_calculate_complete): ask again for them
            for _ in range(20):
                if q.get("status") != "completed" or q.get("total-time"):
                    break
                time.sleep(0.05)
                q = c.execute("query-migrate")
            return q
        if on_poll is not None:
            on_poll(q)
        if time.monotonic() > deadline:
            c.execute("migrate_cancel")
            q = c.execute("query-migrate")
            q["status"] = "timeout"
            return q
        time.sleep(poll_s)
