"""Guest images: build logic (no KVM needed) and one boot under QEMU."""

import base64
import json
import os
import shutil
import subprocess
import time

import pytest

from hv import images
from hv.errors import HvError

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- unit tests

TRICKY = [
    'echo "a  b" \'c\'; exit 3',
    "printf '%s\\n' \"$HOME\" `true` \\\\ ; echo ä€ 😀",
    "a" * 1,
    "ab",
    "abc",
    "x=1;  y='  '; echo \"[$y]\"",
]


@pytest.mark.parametrize("cmd", TRICKY)
def test_exec_arg_roundtrip(cmd):
    arg = images.exec_arg(cmd)
    assert arg.startswith("hv.exec=")
    value = arg[len("hv.exec="):]
    assert " " not in value and '"' not in value and "'" not in value
    assert value == base64.b64encode(cmd.encode()).decode()
    assert images.decode_exec_arg(value) == cmd


def compile_tool_for_host(tmp_path_factory, name: str) -> str:
    """A guest tool (guest-images/tools/NAME.c) built for the host with the
    guest's flags (no libc)."""
    if not shutil.which("gcc"):
        pytest.skip("gcc not installed")
    exe = str(tmp_path_factory.mktemp(name) / name)
    subprocess.run(["gcc"] + images.TOOL_CFLAGS +
                   ["-o", exe, os.path.join(images.SRC, "tools", name + ".c")],
                   check=True)
    return exe


@pytest.fixture(scope="module")
def host_init(tmp_path_factory):
    """The guest /init compiled for the host (it has a host-side mode)."""
    return compile_tool_for_host(tmp_path_factory, "init")


@pytest.mark.parametrize("cmd", TRICKY)
def test_init_decodes_like_python(host_init, cmd):
    value = images.exec_arg(cmd)[len("hv.exec="):]
    r = subprocess.run([host_init, "--decode", value], capture_output=True)
    assert r.returncode == 0
    assert r.stdout.decode() == cmd
    # Padding is optional.
    r = subprocess.run([host_init, "--decode", value.rstrip("=")],
                       capture_output=True)
    assert r.stdout.decode() == cmd


@pytest.mark.parametrize("bad", ["####", "YQ=x", "YQ===", "Y", "AA=="])
def test_init_rejects_bad_base64(host_init, bad):
    r = subprocess.run([host_init, "--decode", bad], capture_output=True)
    assert r.returncode == 1


def test_init_finds_exec_in_cmdline(host_init):
    cmd = 'echo "a  b" \'c\'; exit 3'
    line = "console=ttyS0 loglevel=4 %s hv_poweroff=0xf4\n" \
        % images.exec_arg(cmd)
    r = subprocess.run([host_init, "--parse-cmdline", line],
                       capture_output=True)
    assert (r.returncode, r.stdout.decode()) == (0, cmd)
    r = subprocess.run([host_init, "--parse-cmdline", "console=ttyS0 "
                        "xhv.exec=YQ== hv.execx=YQ=="], capture_output=True)
    assert r.returncode == 3


@pytest.fixture(scope="module")
def host_hvmem(tmp_path_factory):
    """The guest's hvmem compiled for the host (same flags, no libc)."""
    return compile_tool_for_host(tmp_path_factory, "hvmem")


def test_hvmem_on_host(host_hvmem):
    r = subprocess.run([host_hvmem, "fill", "3", "--free"],
                       capture_output=True, timeout=30)
    assert r.stdout == b"hvmem: filled 3 MiB\nhvmem: freed\n"
    # hold: verify on a stdin line, then on SIGUSR1 once stdin is closed.
    p = subprocess.Popen([host_hvmem, "hold", "2"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    try:
        line = p.stdout.readline().decode()
        assert line.startswith("hvmem: hold 2 MiB checksum=")
        assert len(line.split("=")[1].strip()) == 16
        p.stdin.write(b"verify\n")
        p.stdin.flush()
        assert p.stdout.readline() == b"hvmem: verify ok\n"
        p.stdin.close()
        time.sleep(0.2)
        p.send_signal(10)   # SIGUSR1
        assert p.stdout.readline() == b"hvmem: verify ok\n"
    finally:
        p.kill()
        p.wait()
    p = subprocess.Popen([host_hvmem, "dirty", "2", "500"],
                         stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"hvmem: dirtying 2 MiB at 500 pages/s\n"
        time.sleep(0.3)
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()
    r = subprocess.run([host_hvmem, "fill", "x"], capture_output=True)
    assert r.returncode == 2 and b"usage" in r.stderr


def _patch(path, old, new, name):
    with open(path, "w") as f:
        f.write("header line\n---\n--- a/%s\n+++ b/%s\n@@ -1 +1 @@\n-%s\n+%s\n"
                % (name, name, old, new))


def test_sync_patches_touches_only_changed_files(tmp_path):
    tree = tmp_path / "tree"
    cache = tmp_path / "cache"
    (tree / "d").mkdir(parents=True)
    cache.mkdir()
    for n in ("a.c", "d/b.c", "c.c"):
        (tree / n).write_text("orig %s\n" % n)
    old = time.time() - 1000
    for n in ("a.c", "d/b.c", "c.c"):
        os.utime(tree / n, (old, old))
    p1, p2 = tmp_path / "0001-a.patch", tmp_path / "0002-b.patch"
    _patch(p1, "orig a.c", "new a.c", "a.c")
    _patch(p2, "orig d/b.c", "new d/b.c", "d/b.c")
    quiet = images.Progress(open(os.devnull, "w"))

    images.sync_patches(str(tree), str(cache), [str(p1), str(p2)], quiet)
    assert (tree / "a.c").read_text() == "new a.c\n"
    assert (tree / "d/b.c").read_text() == "new d/b.c\n"
    mtime_a = os.stat(tree / "a.c").st_mtime
    assert os.stat(tree / "c.c").st_mtime == old

    # Change the second patch: a.c keeps its mtime, b.c changes.
    _patch(p2, "orig d/b.c", "newer d/b.c", "d/b.c")
    images.sync_patches(str(tree), str(cache), [str(p1), str(p2)], quiet)
    assert os.stat(tree / "a.c").st_mtime == mtime_a
    assert (tree / "d/b.c").read_text() == "newer d/b.c\n"

    # Drop the first patch: a.c is restored, a new file is created.
    p3 = tmp_path / "0003-new.patch"
    p3.write_text("--- /dev/null\n+++ b/n.c\n@@ -0,0 +1 @@\n+hello\n")
    images.sync_patches(str(tree), str(cache), [str(p2), str(p3)], quiet)
    assert (tree / "a.c").read_text() == "orig a.c\n"
    assert (tree / "n.c").read_text() == "hello\n"
    # And drop everything: the tree is pristine again.
    images.sync_patches(str(tree), str(cache), [], quiet)
    assert not (tree / "n.c").exists()
    assert (tree / "d/b.c").read_text() == "orig d/b.c\n"
    assert os.stat(tree / "c.c").st_mtime == old


def test_sync_patches_reports_a_patch_that_does_not_apply(tmp_path):
    tree, cache = tmp_path / "tree", tmp_path / "cache"
    tree.mkdir()
    cache.mkdir()
    (tree / "a.c").write_text("something else\n")
    p = tmp_path / "0001-a.patch"
    _patch(p, "orig a.c", "new a.c", "a.c")
    with pytest.raises(HvError, match="does not apply"):
        images.sync_patches(str(tree), str(cache), [str(p)],
                            images.Progress(open(os.devnull, "w")))
    assert (tree / "a.c").read_text() == "something else\n"


def test_patch_series_is_well_formed():
    for p in images.patch_paths():
        name = os.path.basename(p)
        assert name[:4].isdigit() and name[4] == "-", name
        with open(p) as f:
            header = f.read().split("\n--- ", 1)[0]
        assert len(header.strip().splitlines()) >= 3, \
            "%s needs a header saying what it changes and why" % name
        assert images.patch_targets(p), name


def test_config_fragment_parses():
    with open(images.config_fragment_path()) as f:
        cfg = images.parse_config_lines(f)
    for key, want in [("CONFIG_SMP", "y"), ("CONFIG_JUMP_LABEL", "n"), ("CONFIG_PVH", "y"),
                      ("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES", "y"),
                      ("CONFIG_VIRTIO_BALLOON", "y"),
                      ("CONFIG_LEGACY_PTYS", "n"), ("CONFIG_MODULES", "n")]:
        assert cfg.get(key) == want, key


def test_cpio_is_readable_by_cpio(tmp_path):
    if not shutil.which("cpio"):
        pytest.skip("cpio not installed")
    c = images.Cpio()
    c.directory("bin")
    c.file("bin/x", b"hello", 0o755)
    c.symlink("bin/y", "x")
    data = c.finish()
    assert len(data) % 4 == 0
    r = subprocess.run(["cpio", "-it"], input=data, capture_output=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == ["bin", "bin/x", "bin/y"]


def test_manifest_up_to_date_logic(tmp_path):
    out = str(tmp_path)
    (tmp_path / "vmlinux").write_bytes(b"kernel")
    inputs = {"a": 1}
    manifest = {"kernel": {"inputs": images.inputs_digest(inputs)},
                "files": {"vmlinux": images.file_info(str(tmp_path /
                                                          "vmlinux"))}}
    assert images._up_to_date(manifest, "kernel", inputs, out, "vmlinux")
    assert not images._up_to_date(manifest, "kernel", {"a": 2}, out,
                                  "vmlinux")
    (tmp_path / "vmlinux").write_bytes(b"kernel!")
    assert not images._up_to_date(manifest, "kernel", inputs, out,
                                  "vmlinux")


def test_paths_missing_says_to_build(tmp_path, monkeypatch):
    monkeypatch.setenv("HV_IMAGES", str(tmp_path))
    with pytest.raises(HvError, match="hv.images build"):
        images.paths()
    r = subprocess.run([os.sys.executable, "-m", "hv.images", "path"],
                       capture_output=True, cwd=os.path.dirname(HERE),
                       env=dict(os.environ, HV_IMAGES=str(tmp_path)))
    assert r.returncode == 2
    assert b"build" in r.stderr and b"Traceback" not in r.stderr


def test_missing_dependency_is_a_clear_error_for_non_root(monkeypatch):
    monkeypatch.setattr(images, "DEPENDENCIES",
                        [("/nonexistent/gelf.h", "file", "libelf-dev"),
                         ("no-such-program-hv", "prog", "flex")])
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(HvError) as e:
        images.ensure_dependencies(images.Progress(open(os.devnull, "w")))
    msg = str(e.value)
    assert "libelf-dev" in msg and "flex" in msg and "apt-get install" in msg


def test_build_lock_serialises_builds(tmp_path, monkeypatch):
    """A second build waits for the lock instead of building in parallel."""
    import fcntl
    import threading
    monkeypatch.setenv("HV_IMAGES", str(tmp_path))
    calls = []

    def fake_build(out, force, progress):
        calls.append(("start", time.monotonic()))
        time.sleep(0.3)
        calls.append(("end", time.monotonic()))
        return {}

    monkeypatch.setattr(images, "_build_locked", fake_build)
    quiet = images.Progress(open(os.devnull, "w"))
    threads = [threading.Thread(target=images.build,
                                kwargs={"progress": quiet})
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [c[0] for c in calls] == ["start", "end", "start", "end"]
    # The lock file is where other processes look for it.
    with open(tmp_path / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ----------------------------------------------------------- built images

@pytest.fixture(scope="session")
def built_images():
    try:
        return images.ensure_built()
    except HvError as e:
        pytest.skip("guest images cannot be built here: %s" % e)


def test_kernel_is_elf_with_pvh_note(built_images):
    kernel, initrd = built_images
    assert images.pvh_entry(kernel) is not None
    with open(initrd, "rb") as f:
        assert f.read(6) == b"070701"
    with open(os.path.join(images.out_dir(), "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["kernel"]["version"].startswith("6.1")
    assert manifest["files"]["vmlinux"]["size"] == os.path.getsize(kernel)
    names = [p["name"] for p in manifest["kernel"]["patches"]]
    assert names == sorted(names) and names


def test_build_is_idempotent(built_images):
    assert images.status() == (True, True)


# ------------------------------------------------------------ QEMU boot

GUEST_SCRIPT = r"""
echo "a  b" 'c'
hvmem fill 8 --free
: > /tmp/h
hvmem hold 4 > /tmp/h &
p=$!
until read -r l < /tmp/h && [ -n "$l" ]; do :; done
echo "seen: $l"
kill -USR1 $p
until { read -r a; read -r l2; } < /tmp/h && [ -n "$l2" ]; do :; done
echo "seen: $l2"
kill $p
exit 3
"""


def _qemu_missing():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not available"
    if not shutil.which(images.QEMU):
        return "%s is not installed" % images.QEMU
    return None


@pytest.mark.qemu
@pytest.mark.linux
def test_boot_under_qemu(built_images):
    why = _qemu_missing()
    if why:
        pytest.skip(why)
    kernel, initrd = built_images
    argv = images.qemu_argv(64, images.exec_arg(GUEST_SCRIPT), kernel,
                            initrd)
    t0 = time.monotonic()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=600)
    out = r.stdout.decode(errors="replace").replace("\r\n", "\n")
    elapsed = time.monotonic() - t0
    print(out)
    print("boot+script: %.1f s" % elapsed)
    assert "hv-guest: ready uptime=" in out
    assert "a  b c\n" in out
    assert "hvmem: filled 8 MiB\nhvmem: freed\n" in out
    assert "seen: hvmem: hold 4 MiB checksum=" in out
    assert "seen: hvmem: verify ok\n" in out          # the whole line
    assert "hv-guest: exit-status 3" in out
    # isa-debug-exit: QEMU exits with (0 << 1) | 1 when the guest powers off.
    assert r.returncode == 1, (r.returncode, r.stderr)
