"""Builds hv's guest: a small Linux kernel (ELF vmlinux, PVH entry) and an
uncompressed newc initramfs, reproducibly from Debian packages.

Inputs live in guest-images/:
    kernel.config        fragment applied on top of `make tinyconfig`
    patches/*.patch      applied in sorted order (-p1)
    initramfs/           applets.txt (busybox applet links) and rootfs/
    tools/*.c            the guest's /init and tools, built with gcc -static

Outputs go to guest-images/out/ (or $HV_IMAGES): vmlinux, initramfs.cpio and
manifest.json.  The kernel build tree is kept in <out>/cache/ so that a
change to one patch recompiles only what the change touches.

    python -m hv.images build [--force]   build what is out of date
    python -m hv.images path              print the kernel and initramfs paths
    python -m hv.images cmdline           print the base kernel command line
    python -m hv.images disk --size 64M --out FILE [--from DIR]
                                          an ext4 disk image (for run-guest --disk)

Python API: paths(), ensure_built(), exec_arg(command), base_cmdline().
"""

import base64
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from hv.errors import HvError

KERNEL_PACKAGE = "linux-source-6.1"
KERNEL_DIR = "linux-source-6.1"
KERNEL_NAME = "vmlinux"
INITRD_NAME = "initramfs.cpio"
MANIFEST_NAME = "manifest.json"
# Bump when the build procedure changes in a way that changes outputs.
BUILDER_VERSION = 1

APT_PACKAGES = ["flex", "bison", "bc", "libelf-dev", "cpio", "busybox-static",
                "gcc", "make", "libc6-dev", "e2fsprogs"]
# (what is checked, how, the Debian package providing it)
DEPENDENCIES = [
    ("flex", "prog", "flex"),
    ("bison", "prog", "bison"),
    ("bc", "prog", "bc"),
    ("gcc", "prog", "gcc"),
    ("make", "prog", "make"),
    ("cpio", "prog", "cpio"),
    ("/usr/include/gelf.h", "file", "libelf-dev"),
    ("/usr/lib/x86_64-linux-gnu/libc.a", "file", "libc6-dev"),
    ("/bin/busybox", "file", "busybox-static"),
]
BUSYBOX = "/bin/busybox"

# Base kernel command line for hv guests; the VMM adds virtio_mmio.device=
# entries, hv_poweroff=PORT and hv.exec=.
#   mitigations=off      no verw (MDS buffer clearing) on return to user
#   noxsave, clearcpuid  features whose instructions the emulator cannot run
#                        at CPL0, cleared even if the VMM's CPUID shows them
#                        (141 cx16, 151 popcnt, 295 smep, 308 smap), and
#                        297 erms / 580 fsrm: without them memset/clear_page/
#                        copies use rep stosq/movsq instead of byte-wise rep
#                        stosb/movsb, one emulated iteration per 8 bytes
#                        (a 16 MiB fill in the guest: ~10 s -> ~6 s)
#   no_timer_check, lpj, tsc=reliable   skip timer and delay calibration
BASE_CMDLINE = ("console=ttyS0 loglevel=4 mitigations=off noxsave nofsgsbase "
                "clearcpuid=141,151,295,308,297,580 no_timer_check lpj=1000000 "
                "tsc=reliable")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SRC = os.path.join(REPO, "guest-images")

XEN_ELFNOTE_PHYS32_ENTRY = 18


# ---------------------------------------------------------------- locations

def out_dir():
    return os.path.abspath(os.environ.get("HV_IMAGES")
                           or os.path.join(SRC, "out"))


def paths():
    """(kernel_path, initrd_path) of the built guest; HvError if missing."""
    out = out_dir()
    kernel = os.path.join(out, KERNEL_NAME)
    initrd = os.path.join(out, INITRD_NAME)
    missing = [p for p in (kernel, initrd) if not os.path.isfile(p)]
    if missing:
        raise HvError("guest image missing: %s; run `python -m hv.images "
                      "build` first" % ", ".join(missing))
    return kernel, initrd


def exec_arg(command):
    """The hv.exec= command line parameter that makes /init run `command`."""
    return "hv.exec=" + base64.b64encode(command.encode("utf-8")).decode()


def decode_exec_arg(value):
    """Inverse of exec_arg (value without the `hv.exec=` prefix)."""
    return base64.b64decode(value, validate=True).decode("utf-8")


def base_cmdline():
    return BASE_CMDLINE


# ----------------------------------------------------------- reference QEMU

QEMU = "qemu-system-x86_64"
POWEROFF_PORT = 0xf4


def qemu_argv(mem_mib=64, append="", kernel=None, initrd=None, qemu=QEMU, cpus=1):
    """QEMU 7.2 microvm command line that boots the guest the way hv does:
    PVH entry, no ACPI (MP table), serial console on stdio, power-off
    through isa-debug-exit at POWEROFF_PORT (QEMU then exits with status
    1); cpus vCPUs."""
    if kernel is None or initrd is None:
        kernel, initrd = paths()
    cmdline = " ".join(x for x in (BASE_CMDLINE, "hv_poweroff=0x%x"
                                   % POWEROFF_PORT, append) if x)
    return [qemu,
            "-M", "microvm,acpi=off,x-option-roms=off,rtc=off",
            "-accel", "kvm",
            "-cpu", "qemu64,-cx16,vendor=GenuineIntel",
            "-m", str(mem_mib), "-smp", str(cpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0x%x,iosize=4" % POWEROFF_PORT,
            "-kernel", kernel, "-initrd", initrd,
            "-append", cmdline]


# ------------------------------------------------------------------ helpers

class Progress:
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self._inline = False

    def say(self, msg):
        self._end_inline()
        self.stream.write("[hv.images %5.1fs] %s\n"
                          % (time.monotonic() - self.t0, msg))
        self.stream.flush()

    def inline(self, msg):
        if not self.tty:
            return
        line = "[hv.images %5.1fs] %s" % (time.monotonic() - self.t0, msg)
        self.stream.write("\r" + line[:110].ljust(110))
        self.stream.flush()
        self._inline = True

    def _end_inline(self):
        if self._inline:
            self.stream.write("\n")
            self._inline = False


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def run(cmd, cwd=None, what=None, env=None, capture=False):
    try:
        r = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE if capture else None,
                           stderr=subprocess.STDOUT if capture else None)
    except FileNotFoundError as e:
        raise HvError("%s: %s not found" % (what or cmd[0], cmd[0])) from e
    if r.returncode != 0:
        out = (r.stdout or b"").decode(errors="replace")[-3000:]
        raise HvError("%s failed (exit %d): %s\n%s"
                      % (what or cmd[0], r.returncode, " ".join(cmd), out))
    return (r.stdout or b"").decode(errors="replace")


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def copy_atomic(src, dst):
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def save_json(path, obj):
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n")
                 .encode())


# ------------------------------------------------------------------ inputs

def config_fragment_path():
    return os.path.join(SRC, "kernel.config")


def patch_paths():
    d = os.path.join(SRC, "patches")
    if not os.path.isdir(d):
        return []
    return [os.path.join(d, n) for n in sorted(os.listdir(d))
            if n.endswith(".patch")]


def kernel_inputs():
    """What the kernel depends on: config fragment and patch series."""
    frag = config_fragment_path()
    if not os.path.isfile(frag):
        raise HvError("kernel config fragment missing: %s" % frag)
    return {
        "builder": BUILDER_VERSION,
        "package": KERNEL_PACKAGE,
        "config_sha256": sha256_file(frag),
        "patches": [{"name": os.path.basename(p), "sha256": sha256_file(p)}
                    for p in patch_paths()],
    }


def initramfs_source_files():
    files = []
    for sub in ("initramfs", "tools"):
        top = os.path.join(SRC, sub)
        for root, dirs, names in os.walk(top):
            dirs.sort()
            for n in sorted(names):
                files.append(os.path.join(root, n))
    return files


def initramfs_inputs():
    h = hashlib.sha256()
    for p in initramfs_source_files():
        h.update(os.path.relpath(p, SRC).encode() + b"\0")
        if os.path.islink(p):
            h.update(b"L" + os.readlink(p).encode())
        else:
            h.update(sha256_file(p).encode())
            h.update(b"x" if os.access(p, os.X_OK) else b"-")
    return {
        "builder": BUILDER_VERSION,
        "sources_sha256": h.hexdigest(),
        "busybox_sha256": sha256_file(BUSYBOX) if os.path.exists(BUSYBOX)
        else None,
    }


def inputs_digest(inputs):
    return sha256_bytes(json.dumps(inputs, sort_keys=True).encode())


# ------------------------------------------------------------- dependencies

def missing_dependencies():
    missing = []
    for thing, kind, pkg in DEPENDENCIES:
        ok = (shutil.which(thing) if kind == "prog" else os.path.exists(thing))
        if not ok and pkg not in missing:
            missing.append(pkg)
    return missing


def ensure_dependencies(progress, need_apt=False):
    missing = missing_dependencies()
    if need_apt and not shutil.which("apt-get"):
        raise HvError("apt-get not found: building the guest kernel needs a "
                      "Debian system (it downloads %s)" % KERNEL_PACKAGE)
    if not missing:
        return
    if os.geteuid() != 0:
        raise HvError("missing build dependencies: %s. Install them with: "
                      "apt-get install -y --no-install-recommends %s"
                      % (", ".join(missing), " ".join(APT_PACKAGES)))
    progress.say("installing build dependencies: %s" % " ".join(missing))
    apt_get(["install", "-y", "--no-install-recommends"] + APT_PACKAGES,
            progress)
    still = missing_dependencies()
    if still:
        raise HvError("build dependencies still missing after apt-get "
                      "install: %s" % ", ".join(still))


_apt_updated = False


def apt_get(args, progress, cwd=None):
    """apt-get ARGS; on failure run apt-get update once and retry."""
    global _apt_updated
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "-q"] + args
    r = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL)
    if r.returncode == 0:
        return
    if not _apt_updated and os.geteuid() == 0:
        progress.say("apt-get %s failed; running apt-get update" % args[0])
        subprocess.run(["apt-get", "-q", "update"], env=env,
                       stdin=subprocess.DEVNULL)
        _apt_updated = True
        r = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL)
        if r.returncode == 0:
            return
    raise HvError("`%s` failed (exit %d)" % (" ".join(cmd), r.returncode))


# ------------------------------------------------------------ kernel source

def find_deb(d):
    if not os.path.isdir(d):
        return None
    debs = sorted(n for n in os.listdir(d)
                  if n.startswith(KERNEL_PACKAGE + "_") and n.endswith(".deb"))
    return os.path.join(d, debs[-1]) if debs else None


def fetch_source(cache, progress):
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    deb = find_deb(debs)
    if deb:
        return deb
    # apt's own cache may already have it (no download needed then).
    local = find_deb("/var/cache/apt/archives")
    if local:
        progress.say("using %s" % local)
        shutil.copyfile(local, os.path.join(debs, os.path.basename(local)))
    else:
        progress.say("downloading %s (about 140 MB) with apt-get download"
                     % KERNEL_PACKAGE)
        apt_get(["download", KERNEL_PACKAGE], progress, cwd=debs)
    deb = find_deb(debs)
    if not deb:
        raise HvError("apt-get download %s produced no .deb in %s"
                      % (KERNEL_PACKAGE, debs))
    return deb


def unpack_source(cache, deb, progress):
    tree = os.path.join(cache, KERNEL_DIR)
    marker = os.path.join(tree, ".hv-unpacked")
    if os.path.exists(marker):
        with open(marker) as f:
            if f.read().strip() == os.path.basename(deb):
                return tree
    progress.say("unpacking %s" % os.path.basename(deb))
    for old in (tree, os.path.join(cache, "pristine"),
                os.path.join(cache, "state.json")):
        if os.path.isdir(old):
            shutil.rmtree(old)
        elif os.path.exists(old):
            os.unlink(old)
    tmp = tempfile.mkdtemp(prefix="unpack.", dir=cache)
    try:
        run(["dpkg-deb", "-x", deb, tmp], what="dpkg-deb")
        tarball = os.path.join(tmp, "usr", "src", KERNEL_DIR + ".tar.xz")
        if not os.path.exists(tarball):
            raise HvError("%s does not contain %s" % (deb, tarball))
        run(["tar", "-C", tmp, "-xf", tarball], what="tar")
        os.replace(os.path.join(tmp, KERNEL_DIR), tree)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(marker, "w") as f:
        f.write(os.path.basename(deb) + "\n")
    return tree


# ----------------------------------------------------------------- patching

def patch_targets(path):
    """Files a unified diff touches, relative to the tree (-p1)."""
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    targets = []
    for a, b in zip(lines, lines[1:]):
        if a.startswith("--- ") and b.startswith("+++ "):
            old = a[4:].split("\t")[0].strip()
            new = b[4:].split("\t")[0].strip()
            name = new if new != "/dev/null" else old
            name = name.split("/", 1)[1] if "/" in name else name
            if name not in targets:
                targets.append(name)
    return targets


def sync_patches(tree, cache, patches, progress):
    """Bring the tree to pristine + `patches`, rewriting only files whose
    content changes, so make recompiles only what the change touches.

    Pristine copies of every file any series ever touched are kept in
    <cache>/pristine (files that do not exist in the pristine tree are
    listed in pristine/.absent)."""
    state_path = os.path.join(cache, "state.json")
    state = load_json(state_path, {})
    pristine = os.path.join(cache, "pristine")
    os.makedirs(pristine, exist_ok=True)
    absent_path = os.path.join(pristine, ".absent")
    absent = set(load_json(absent_path, []))
    old_touched = set(state.get("touched", []))

    new_touched = []
    for p in patches:
        for t in patch_targets(p):
            if t not in new_touched:
                new_touched.append(t)

    # Save pristine copies of files touched for the first time.  A file not
    # yet saved has never been patched, so the tree holds its pristine form.
    for t in new_touched:
        saved = os.path.join(pristine, t)
        if os.path.exists(saved) or t in absent:
            continue
        if t in old_touched:
            raise HvError("kernel tree is inconsistent (%s patched but no "
                          "pristine copy); remove %s and rebuild"
                          % (t, cache))
        src = os.path.join(tree, t)
        if os.path.exists(src):
            os.makedirs(os.path.dirname(saved), exist_ok=True)
            shutil.copy2(src, saved)
        else:
            absent.add(t)
    save_json(absent_path, sorted(absent))

    # Apply the series to a scratch copy of the touched files.
    scratch = tempfile.mkdtemp(prefix="patch.", dir=cache)
    try:
        for t in new_touched:
            if t in absent:
                continue
            dst = os.path.join(scratch, t)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(pristine, t), dst)
        for p in patches:
            r = subprocess.run(["patch", "-p1", "--batch", "--forward",
                                "--no-backup-if-mismatch", "-r", "-",
                                "-d", scratch, "-i", p],
                               stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
            if r.returncode != 0:
                raise HvError("patch %s does not apply to %s:\n%s"
                              % (os.path.basename(p), KERNEL_DIR,
                                 r.stdout.decode(errors="replace")))
        # Desired content for every file touched now or before.
        changed = 0
        for t in sorted(old_touched | set(new_touched)):
            live = os.path.join(tree, t)
            if t in new_touched:
                want = os.path.join(scratch, t)
            else:
                want = os.path.join(pristine, t)
            want_data = None
            if os.path.exists(want) and not (t in absent and
                                             t not in new_touched):
                with open(want, "rb") as f:
                    want_data = f.read()
            have_data = None
            if os.path.exists(live):
                with open(live, "rb") as f:
                    have_data = f.read()
            if want_data == have_data:
                continue
            changed += 1
            if want_data is None:
                os.unlink(live)
            else:
                os.makedirs(os.path.dirname(live), exist_ok=True)
                write_atomic(live, want_data)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    state["touched"] = new_touched
    state["patches"] = [{"name": os.path.basename(p),
                         "sha256": sha256_file(p)} for p in patches]
    save_json(state_path, state)
    progress.say("patches: %d applied, %d file(s) changed in the tree"
                 % (len(patches), changed))


# ------------------------------------------------------------------- config

def parse_config_lines(lines):
    """{SYMBOL: value} from .config syntax; 'n' for `# X is not set`."""
    out = {}
    for line in lines:
        line = line.strip()
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line[2:-len(" is not set")]] = "n"
        elif line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def make_cmd(tree):
    return ["make", "-C", tree, "ARCH=x86_64", "-j%d" % (os.cpu_count() or 1)]


def configure(tree, cache, frag, progress):
    state_path = os.path.join(cache, "state.json")
    state = load_json(state_path, {})
    key = inputs_digest({"config": sha256_file(frag),
                         "patches": state.get("patches")})
    dotconfig = os.path.join(tree, ".config")
    if state.get("config_key") == key and os.path.exists(dotconfig):
        return
    progress.say("configuring: tinyconfig + %s" % os.path.basename(frag))
    old = None
    if os.path.exists(dotconfig):
        with open(dotconfig, "rb") as f:
            old = f.read()
    cfgdir = tempfile.mkdtemp(prefix="config.", dir=cache)
    try:
        newcfg = os.path.join(cfgdir, ".config")
        env = dict(os.environ, KCONFIG_CONFIG=newcfg)
        mk = ["make", "-C", tree, "ARCH=x86_64"]
        run(mk + ["tinyconfig"], env=env, capture=True, what="make tinyconfig")
        run([os.path.join(tree, "scripts/kconfig/merge_config.sh"), "-m",
             "-O", cfgdir, newcfg, frag], cwd=tree, env=env, capture=True,
            what="merge_config.sh")
        run(mk + ["olddefconfig"], env=env, capture=True,
            what="make olddefconfig")
        with open(newcfg) as f:
            final = parse_config_lines(f)
        with open(frag) as f:
            wanted = parse_config_lines(f)
        bad = ["%s: wanted %s, got %s" % (k, v, final.get(k, "n"))
               for k, v in wanted.items() if final.get(k, "n") != v]
        if bad:
            raise HvError("kernel config fragment %s does not hold after "
                          "olddefconfig (missing dependency?):\n  %s"
                          % (frag, "\n  ".join(bad)))
        with open(newcfg, "rb") as f:
            new = f.read()
        if new != old:
            write_atomic(dotconfig, new)
    finally:
        shutil.rmtree(cfgdir, ignore_errors=True)
    state["config_key"] = key
    save_json(state_path, state)


def compile_kernel(tree, progress):
    progress.say("compiling vmlinux (make -j%d; a full build takes about "
                 "3 minutes on 2 cores)" % (os.cpu_count() or 1))
    cmd = make_cmd(tree) + ["vmlinux"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = []
    steps = 0
    last_report = time.monotonic()
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        tail = (tail + [line])[-60:]
        if line.startswith("  ") and not line.startswith("   "):
            steps += 1
            progress.inline("kernel: %d steps, %s" % (steps, line.strip()))
            if not progress.tty and time.monotonic() - last_report > 15:
                progress.say("kernel: %d steps, %s" % (steps, line.strip()))
                last_report = time.monotonic()
    rc = proc.wait()
    if rc != 0:
        raise HvError("kernel build failed (make exit %d); last output:\n%s"
                      % (rc, "\n".join(tail)))
    progress.say("kernel: %d build steps" % steps)
    rel = run(["make", "-s", "-C", tree, "ARCH=x86_64", "kernelrelease"],
              capture=True, what="make kernelrelease").strip().splitlines()
    return rel[-1] if rel else ""


def pvh_entry(path):
    """The built kernel's PVH entry point, or None (hv.boot reads the note)."""
    from .boot import pvh_entry as entry_of
    with open(path, "rb") as f:
        return entry_of(f.read(), path)


# --------------------------------------------------------------- initramfs

class Cpio:
    """Deterministic newc writer (mtime 0, root-owned, fixed inodes)."""

    def __init__(self):
        self.parts = []
        self.ino = 1

    def _entry(self, name, mode, data=b"", nlink=1, rdev=(0, 0)):
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join("%08X" % v for v in (
            self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0,
            rdev[0], rdev[1], len(name_b), 0))
        self.ino += 1
        blob = hdr.encode() + name_b
        blob += b"\0" * (-len(blob) % 4)
        blob += data
        blob += b"\0" * (-len(blob) % 4)
        self.parts.append(blob)

    def directory(self, name, perm=0o755):
        self._entry(name, 0o040000 | perm, nlink=2)

    def file(self, name, data, perm=0o644):
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name, target):
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name, major, minor, perm=0o600):
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self):
        self.ino = 0
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


# The guest tools use hvrt.h instead of a C library: static glibc would add
# ~700 KiB per tool to the initramfs, which the guest kernel unpacks slowly.
TOOL_CFLAGS = ["-static", "-nostdlib", "-ffreestanding", "-fno-stack-protector",
               "-fno-pie", "-no-pie", "-Os", "-s", "-Wall", "-Werror",
               "-fno-asynchronous-unwind-tables", "-Wl,--build-id=none"]


def build_tools(cache, progress):
    tools_src = os.path.join(SRC, "tools")
    outd = os.path.join(cache, "tools")
    os.makedirs(outd, exist_ok=True)
    built = {}
    for n in sorted(os.listdir(tools_src)):
        if not n.endswith(".c"):
            continue
        exe = os.path.join(outd, n[:-2])
        progress.say("gcc %s (static, no libc)" % n)
        run(["gcc"] + TOOL_CFLAGS + ["-o", exe, os.path.join(tools_src, n)],
            what="gcc %s" % n, capture=True)
        built[n[:-2]] = exe
    return built


def read_applets():
    path = os.path.join(SRC, "initramfs", "applets.txt")
    applets = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                applets.append(line)
    return applets


def build_initramfs(cache, progress):
    tools = build_tools(cache, progress)
    if "init" not in tools:
        raise HvError("guest-images/tools/init.c is missing")
    have = set(run([BUSYBOX, "--list-full"], capture=True,
                   what="busybox --list-full").split())
    c = Cpio()
    dirs = ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc",
            "sys", "tmp", "root", "etc", "run", "mnt"]
    for d in dirs:
        c.directory(d, 0o1777 if d == "tmp" else 0o755)
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    c.chardev("dev/console", 5, 1)
    with open(BUSYBOX, "rb") as f:
        c.file("bin/busybox", f.read(), 0o755)
    for applet in read_applets():
        full = next((p for p in (applet, "bin/" + applet, "sbin/" + applet,
                                 "usr/bin/" + applet, "usr/sbin/" + applet)
                     if p in have), None)
        if full is None:
            raise HvError("busybox in %s has no applet %r (listed in "
                          "guest-images/initramfs/applets.txt)"
                          % (BUSYBOX, applet))
        if full == "bin/busybox":
            continue
        depth = full.count("/")
        c.symlink(full, "../" * depth + "bin/busybox")
    with open(tools["init"], "rb") as f:
        c.file("init", f.read(), 0o755)
    for name, exe in sorted(tools.items()):
        if name == "init":
            continue
        with open(exe, "rb") as f:
            c.file("bin/" + name, f.read(), 0o755)
    rootfs = os.path.join(SRC, "initramfs", "rootfs")
    if os.path.isdir(rootfs):
        for root, ds, names in os.walk(rootfs):
            ds.sort()
            rel = os.path.relpath(root, rootfs)
            for d in ds:
                name = os.path.normpath(os.path.join(rel, d))
                if name not in dirs:
                    c.directory(name)
            for n in sorted(names):
                p = os.path.join(root, n)
                name = os.path.normpath(os.path.join(rel, n))
                with open(p, "rb") as f:
                    c.file(name, f.read(),
                           0o755 if os.access(p, os.X_OK) else 0o644)
    return c.finish()


# -------------------------------------------------------------------- build

def file_info(path):
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def _up_to_date(manifest, part, inputs, out, name):
    if not manifest or manifest.get(part, {}).get("inputs") != \
            inputs_digest(inputs):
        return False
    path = os.path.join(out, name)
    info = manifest.get("files", {}).get(name)
    try:
        return info is not None and os.path.getsize(path) == info["size"] \
            and sha256_file(path) == info["sha256"]
    except OSError:
        return False


def status():
    """(kernel_ok, initramfs_ok) without building anything."""
    out = out_dir()
    manifest = load_json(os.path.join(out, MANIFEST_NAME))
    return (_up_to_date(manifest, "kernel", kernel_inputs(), out,
                        KERNEL_NAME),
            _up_to_date(manifest, "initramfs", initramfs_inputs(), out,
                        INITRD_NAME))


def build(force=False, progress=None):
    """Build whatever is out of date; returns the manifest."""
    progress = progress or Progress()
    out = out_dir()
    os.makedirs(out, exist_ok=True)
    lockf = open(os.path.join(out, ".lock"), "w")
    try:
        try:
            fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.say("another build holds %s; waiting for it"
                         % os.path.join(out, ".lock"))
            fcntl.flock(lockf, fcntl.LOCK_EX)
        return _build_locked(out, force, progress)
    finally:
        lockf.close()


def _build_locked(out, force, progress):
    manifest_path = os.path.join(out, MANIFEST_NAME)
    manifest = load_json(manifest_path, {}) or {}
    kin = kernel_inputs()
    kernel_ok = not force and _up_to_date(manifest, "kernel", kin, out,
                                          KERNEL_NAME)
    iin = initramfs_inputs()
    initrd_ok = not force and _up_to_date(manifest, "initramfs", iin, out,
                                          INITRD_NAME)
    if kernel_ok and initrd_ok:
        progress.say("up to date: %s" % out)
        return manifest
    ensure_dependencies(progress, need_apt=not kernel_ok)
    cache = os.path.join(out, "cache")
    os.makedirs(cache, exist_ok=True)
    manifest.setdefault("files", {})
    if not kernel_ok:
        t0 = time.monotonic()
        deb = fetch_source(cache, progress)
        tree = unpack_source(cache, deb, progress)
        sync_patches(tree, cache, patch_paths(), progress)
        configure(tree, cache, config_fragment_path(), progress)
        release = compile_kernel(tree, progress)
        vmlinux = os.path.join(tree, "vmlinux")
        entry = pvh_entry(vmlinux)
        if entry is None:
            raise HvError("built vmlinux has no PVH entry note "
                          "(XEN_ELFNOTE_PHYS32_ENTRY): is CONFIG_PVH on?")
        copy_atomic(vmlinux, os.path.join(out, KERNEL_NAME))
        deb_name = os.path.basename(deb)
        manifest["kernel"] = {
            "inputs": inputs_digest(kin),
            "package": deb_name,
            "version": deb_name.split("_")[1] if "_" in deb_name else "",
            "release": release,
            "config_sha256": kin["config_sha256"],
            "patches": kin["patches"],
            "pvh_entry": "0x%x" % entry,
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        manifest["files"][KERNEL_NAME] = file_info(
            os.path.join(out, KERNEL_NAME))
        save_json(manifest_path, manifest)
        progress.say("kernel %s ready: %s (%d bytes)"
                     % (release, os.path.join(out, KERNEL_NAME),
                        manifest["files"][KERNEL_NAME]["size"]))
    if not initrd_ok:
        t0 = time.monotonic()
        data = build_initramfs(cache, progress)
        write_atomic(os.path.join(out, INITRD_NAME), data)
        manifest["initramfs"] = {
            "inputs": inputs_digest(iin),
            "busybox_sha256": iin["busybox_sha256"],
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        manifest["files"][INITRD_NAME] = file_info(
            os.path.join(out, INITRD_NAME))
        save_json(manifest_path, manifest)
        progress.say("initramfs ready: %s (%d bytes)"
                     % (os.path.join(out, INITRD_NAME), len(data)))
    return manifest


def ensure_built(progress=None):
    """Build if needed; returns (kernel_path, initrd_path)."""
    build(progress=progress)
    return paths()


# ---------------------------------------------------------------------- CLI

USAGE = """usage: python -m hv.images build [--force]
       python -m hv.images path
       python -m hv.images cmdline
       python -m hv.images disk --size SIZE --out FILE [--from DIR]"""

# ------------------------------------------------------------- disk images

DISK_MIN = 1 << 20           # mkfs.ext4 wants room for its metadata
DISK_MAX = 1 << 40


def parse_size(text):
    """'64M', '1G', '1048576', '512K' (optionally 'MiB'/'MB') -> bytes; HvError if bad."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    if scale != 1:
        t = t[:-1]
    try:
        value = int(t) * scale
    except ValueError:
        raise HvError("disk size %r is not a size like 64M or 1G" % text) from None
    if value % 512:
        raise HvError("disk size %r is not a whole number of 512-byte sectors" % text)
    if not DISK_MIN <= value <= DISK_MAX:
        raise HvError("disk size %r is out of range: give 1M to 1T" % text)
    return value


def _mkfs():
    for d in ([None] + ["/usr/sbin", "/sbin"]):
        found = shutil.which("mkfs.ext4", path=d) if d else shutil.which("mkfs.ext4")
        if found:
            return found
    raise HvError("mkfs.ext4 not found: install Debian's e2fsprogs "
                  "(apt-get install e2fsprogs)")


def make_disk(out, size, src=None):
    """An ext4 image of size bytes at out holding a copy of directory src
    (mkfs.ext4 -d; no journal: a small test disk is made and checked faster)."""
    size = parse_size(size) if isinstance(size, str) else size
    if isinstance(size, bool) or not isinstance(size, int) or not DISK_MIN <= size <= DISK_MAX \
            or size % 512:
        raise HvError("disk size %r is out of range: give 1M to 1T in whole sectors" % (size,))
    if src is not None and not os.path.isdir(src):
        raise HvError("--from %s is not a directory" % src)
    if os.path.exists(out):
        raise HvError("%s already exists; remove it first" % out)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise HvError("cannot create %s: %s is not a directory" % (out, parent))
    mkfs = _mkfs()
    tmp = out + ".tmp%d" % os.getpid()
    try:
        with open(tmp, "wb") as f:
            f.truncate(size)
        cmd = [mkfs, "-q", "-F", "-O", "^has_journal", "-m", "0", "-L", "hv-disk"]
        if src is not None:
            cmd += ["-d", src]
        p = subprocess.run(cmd + [tmp], capture_output=True, text=True)
        if p.returncode != 0:
            msg = (p.stderr or p.stdout).strip().splitlines()
            raise HvError("mkfs.ext4 failed: %s" % (msg[-1] if msg else "status %d"
                                                    % p.returncode))
        os.replace(tmp, out)
    except OSError as e:
        raise HvError("cannot create %s: %s" % (out, e.strerror)) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _disk_main(rest):
    import argparse

    class P(argparse.ArgumentParser):
        def error(self, message):
            raise HvError("disk: %s\n%s" % (message, USAGE))

    p = P(prog="python -m hv.images disk", add_help=False)
    p.add_argument("--size", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--from", dest="src")
    a = p.parse_args(rest)
    make_disk(a.out, parse_size(a.size), a.src)
    print("disk: %s (%s bytes, ext4%s)" % (a.out, parse_size(a.size),
                                           ", from %s" % a.src if a.src else ""))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(USAGE)
            return 0 if argv else 2
        cmd, rest = argv[0], argv[1:]
        if cmd == "build":
            if rest not in ([], ["--force"]):
                raise HvError("unknown arguments: %s\n%s"
                              % (" ".join(rest), USAGE))
            build(force=bool(rest))
            k, i = paths()
            print("kernel: %s\ninitrd: %s" % (k, i))
            return 0
        if cmd == "path":
            k, i = paths()
            print("kernel: %s\ninitrd: %s" % (k, i))
            return 0
        if cmd == "cmdline":
            print(base_cmdline())
            return 0
        if cmd == "disk":
            return _disk_main(rest)
        raise HvError("unknown command %r\n%s" % (cmd, USAGE))
    except HvError as e:
        sys.stderr.write("hv.images: %s\n" % e)
        return e.exit_status
    except KeyboardInterrupt:
        sys.stderr.write("hv.images: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
