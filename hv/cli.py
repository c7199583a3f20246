"""run-guest: boot a Linux guest under hv.

    run-guest                                  interactive console (Ctrl-A X quits)
    run-guest --exec 'uname -a; exit 3'        run a command, exit with its status
    run-guest --mem 256 --balloon --control /tmp/hv.sock --verbose
    run-guest --balloon --balloon-opt reporting=off --balloon-opt stats_interval_s=5

Exit status: the --exec command's status; otherwise 0 when the guest powers
off or reboots, 1 when it fails (KVM internal error, the command's status
line missing), 2 for usage errors (no /dev/kvm, not a kernel image, too
little memory, ...), printed as one line without a traceback.

Live migration's options come from hv.migration.cli: add_arguments(parser)
adds them; setup(args, machine) runs after the machine and its control
socket exist and returns True when it has prepared the guest itself
(restored instead of booted).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import termios
import threading
import time
import tty
from .errors import HvError
from .migration import cli as migration_cli

DEFAULT_MEM_MIB = 128
CTRL_A = 0x01
EXIT_STATUS_RE = re.compile(rb"hv-guest: exit-status (-?\d+)")
READY_MARK = b"hv-guest: ready"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the option and what is wrong), status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="run-guest", description="Run a Linux guest under hv (KVM).",
        epilog="In the interactive console, Ctrl-A X quits and Ctrl-A Ctrl-A sends Ctrl-A.")
    g = p.add_argument_group("guest")
    g.add_argument("--kernel", metavar="PATH",
                   help="ELF vmlinux with a PVH note, or a bzImage (default: the built "
                        "guest image)")
    g.add_argument("--initrd", metavar="PATH", type=_initrd,
                   help="initramfs (default: the built guest image; '' for none)")
    g.add_argument("--mem", metavar="MIB", type=int, default=DEFAULT_MEM_MIB,
                   help=f"guest RAM in MiB (default {DEFAULT_MEM_MIB})")
    g.add_argument("--cpus", metavar="N", type=int, default=1,
                   help="vCPUs (default 1; at most what KVM allows per guest)")
    g.add_argument("--append", metavar="ARGS", default="",
                   help="extra kernel command line arguments")
    g.add_argument("--balloon", action="store_true", help="add a virtio-balloon device")
    g.add_argument("--balloon-opt", metavar="KEY=VALUE", action="append", default=[],
                   type=_balloon_opt, dest="balloon_opts",
                   help="configure the balloon (repeatable; needs --balloon): "
                        "reporting, hint, bitmap, stats, poison, deflate_on_oom, "
                        "must_tell_host = on|off; stats_interval_s = seconds (0: no polling)")
    g.add_argument("--balloon-reporting", choices=["on", "off"], default=None,
                   help="same as --balloon-opt reporting=on|off (default on). Reported "
                        "pages are discarded on the host and read as zero, so a migration "
                        "then finds them as zero pages even with free_pages \"off\"; turn "
                        "it off to compare free-page skipping with a VMM that does not "
                        "report (QEMU's default)")
    g.add_argument("--net", metavar="tap=NAME[,mac=MAC]", action="append", default=[],
                   type=_net, dest="nets",
                   help="add a virtio-net device on an existing tap (repeatable); the "
                        "MAC defaults to one derived from the tap's name")
    g.add_argument("--dirty-ring", metavar="BYTES", type=_bytes, default=0,
                   help="per-vCPU KVM dirty ring of BYTES (a power of two from 4096 to "
                        "KVM's maximum, K/M suffixes allowed; default 0: off) so that "
                        "migrate can use \"dirty_log\": \"ring\"")
    g.add_argument("--disk", metavar="path=FILE[,readonly=on]", action="append", default=[],
                   type=_disk, dest="disks",
                   help="add a virtio-blk disk on a raw image FILE (repeatable; the first "
                        "is /dev/vda); the image is locked against other VMMs")
    r = p.add_argument_group("running")
    r.add_argument("--exec", metavar="CMD", dest="exec_cmd",
                   help="run CMD in the guest with sh -c, print its output, exit with "
                        "its status")
    r.add_argument("--control", metavar="PATH",
                   help="serve QMP (QEMU's machine protocol: qmp-shell, qemu.qmp) on this "
                        "UNIX socket")
    r.add_argument("--verbose", "-v", action="store_true",
                   help="report the boot time and the vCPU exit counts")
    migration_cli.add_arguments(p)
    return p


def _bytes(text: str) -> int:
    """argparse type of a byte count: 65536, 0x10000, 64K, 64KiB, 1M."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20}.get(t[-1:], 1)
    if scale != 1:
        t = t[:-1]
    try:
        value = int(t, 0) * scale
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count (like 65536 or 64K)")
    return value


def _initrd(text: str) -> str:
    """argparse type of --initrd: '' (none) or a file that is an initramfs."""
    if text:
        from .boot import check_initrd
        try:
            check_initrd(text)
        except HvError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _net(text: str) -> dict:
    """argparse type of --net: tap=NAME[,mac=MAC] (key=value, comma-separated)."""
    from .devices.virtio.net import parse_mac
    spec: dict = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("tap", "mac") or key in spec or not value.strip():
            raise argparse.ArgumentTypeError(f"{text!r}: give tap=NAME[,mac=MAC], each once")
        spec[key] = value.strip()
    if "tap" not in spec:
        raise argparse.ArgumentTypeError(f"{text!r}: tap=NAME is required")
    if "mac" in spec:
        try:
            parse_mac(spec["mac"])
        except HvError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def _balloon_opt(text: str) -> tuple[str, object]:
    """argparse type of --balloon-opt: KEY=VALUE, checked against the balloon's options."""
    from .devices.virtio.balloon import balloon_options
    try:
        return next(iter(balloon_options([text]).items()))
    except HvError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _disk(text: str) -> dict:
    """argparse type of --disk: path=FILE[,readonly=on][,serial=ID], FILE readable."""
    from .devices.virtio.blk import disk_options
    try:
        d = disk_options(text if "=" in text else {"path": text})
    except HvError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not os.path.isfile(d["path"]):
        raise argparse.ArgumentTypeError(f"disk image {d['path']} does not exist or is not "
                                         "a file")
    if not os.access(d["path"], os.R_OK if d["readonly"] else os.R_OK | os.W_OK):
        raise argparse.ArgumentTypeError(f"disk image {d['path']} is not "
                                         f"{'readable' if d['readonly'] else 'read-write'} "
                                         "for this user")
    return d


def balloon_options(args) -> dict:
    """MachineConfig.balloon_options from --balloon-reporting and --balloon-opt
    (the later --balloon-opt wins)."""
    options: dict = {}
    if getattr(args, "balloon_reporting", None) is not None:
        options["reporting"] = args.balloon_reporting == "on"
    options.update(getattr(args, "balloon_opts", None) or [])
    return options


def _default_images(args) -> tuple[str, str | None]:
    kernel, initrd = args.kernel, args.initrd
    if kernel is None or initrd is None:
        from . import images
        try:
            dk, di = images.paths()
        except HvError:
            if kernel is None:
                raise
            dk, di = None, None
        kernel = kernel or dk
        if initrd is None:
            initrd = di
    return kernel, (initrd or None)


class Terminal:
    """Raw-mode stdin forwarded to the UART, with QEMU's Ctrl-A escapes."""

    def __init__(self, machine, fd: int = 0):
        self.machine = machine
        self.fd = fd
        self.saved = None
        self.escape = False
        if os.isatty(fd):
            self.saved = termios.tcgetattr(fd)
            tty.setraw(fd)
        self.thread = threading.Thread(target=self._loop, name="hv-stdin", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1024)
            except OSError:
                return
            if not data:
                return
            out = bytearray()
            for b in data:
                if self.escape:
                    self.escape = False
                    if b in (ord("x"), ord("X")):
                        self.machine.request_shutdown("quit")
                        return
                    if b == CTRL_A:
                        out.append(CTRL_A)
                    elif b in (ord("h"), ord("H"), ord("?")):
                        sys.stderr.write("\r\nC-a x  quit\r\nC-a C-a  send C-a\r\n")
                        sys.stderr.flush()
                elif b == CTRL_A and self.saved is not None:
                    self.escape = True
                else:
                    out.append(b)
            while out:
                n = self.machine.serial.enqueue(bytes(out))
                del out[:n]
                if out:
                    time.sleep(0.01)

    def restore(self) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.saved = None


class ConsoleWatch:
    """Scans the console for hv-guest marker lines."""

    def __init__(self):
        self.tail = b""
        self.exit_status: int | None = None
        self.ready_at: float | None = None

    def __call__(self, data: bytes) -> None:
        self.tail = (self.tail + data)[-256:]
        if self.ready_at is None and READY_MARK in self.tail:
            self.ready_at = time.monotonic()
        if self.exit_status is None and b"\n" in data:
            m = EXIT_STATUS_RE.search(self.tail)
            if m:
                self.exit_status = int(m.group(1))


def run(args) -> int:
    from .vmm import Machine, MachineConfig
    from .qmp_commands import serve

    kernel, initrd = _default_images(args)
    append = args.append
    if args.exec_cmd is not None:
        from .images import exec_arg
        append = (append + " " + exec_arg(args.exec_cmd)).strip()
    t0 = time.monotonic()
    m = Machine(MachineConfig(mem_mib=args.mem, cpus=args.cpus, kernel=kernel, initrd=initrd,
                              append=append, balloon=args.balloon, console=sys.stdout.buffer,
                              balloon_options=balloon_options(args) if args.balloon else {},
                              dirty_ring_bytes=args.dirty_ring, disks=args.disks,
                              nets=args.nets))
    watch = ConsoleWatch()
    m.console_listeners.append(watch)
    server = serve(args.control, m) if args.control else None
    term = None
    old_term = signal.signal(signal.SIGTERM, lambda *a: m.request_shutdown("terminated"))
    try:
        if not migration_cli.setup(args, m):
            m.boot()
        # a deferred incoming migration (--incoming defer) starts the guest itself
        if not m.started and m.status not in ("shutdown", "inmigrate"):
            m.start()
        if args.exec_cmd is None:
            term = Terminal(m)
        try:
            reason = m.wait()
        except KeyboardInterrupt:
            m.stop()
            reason = "interrupted"
    finally:
        if term:
            term.restore()
        signal.signal(signal.SIGTERM, old_term)
        if server:
            server.close()
    sys.stdout.flush()
    if args.verbose:
        if watch.ready_at is not None:
            print(f"hv: guest ready {watch.ready_at - t0:.2f} s after start", file=sys.stderr)
        print(f"hv: guest ended ({reason}) after {time.monotonic() - t0:.2f} s",
              file=sys.stderr)
        s = m.exit_summary()
        print("hv: vCPU exits: " + ", ".join(f"{k} {v}" for k, v in
                                            sorted(s["exits"].items(), key=lambda x: -x[1])),
              file=sys.stderr)
        print("hv: busiest ports: " + ", ".join(f"{k} {v}" for k, v in s["io_ports"].items()),
              file=sys.stderr)
    m.close()
    if m.error:
        print(f"run-guest: guest failed: {m.error}", file=sys.stderr)
        return 1
    if reason == "interrupted":
        return 130
    if args.exec_cmd is not None:
        if watch.exit_status is None:
            print(f"run-guest: the guest ended ({reason}) without reporting the command's "
                  "exit status", file=sys.stderr)
            return 1
        return watch.exit_status & 0xff
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.balloon_opts and not args.balloon:
        parser.error("--balloon-opt needs --balloon")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="hv: %(message)s")
    try:
        return run(args)
    except HvError as e:
        print(f"run-guest: {e}", file=sys.stderr)
        return getattr(e, "exit_status", 2)
    except OSError as e:
        print(f"run-guest: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
