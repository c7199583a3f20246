"""The Linux guest on a virtio-net device: ping and TCP from the host side,
then a live migration to a second machine whose tap is on the same bridge;
the echo service still answers and the destination sent RARP frames.

Topology (one fresh namespace): br0 10.79.0.1/24 with tapa (source) and
tapb (destination) enslaved; the guest's eth0 is 10.79.0.10/24.
"""

import os
import shutil
import socket
import subprocess
import time

import pytest

from conftest import Console
from loopback import migrate_over_loopback
from netclient import InNs  # scripts/netclient.py: this thread in a namespace
from hv.images import exec_arg

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

MAC = "52:54:00:4e:45:54"
GUEST_IP, HOST_IP = "10.79.0.10", "10.79.0.1"
COMMAND = (f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && "
           "echo hv-net: up && exec nc -ll -p 7 -e cat")


def sh(*args):
    subprocess.run(args, check=True)


@pytest.fixture(scope="module")
def netns():
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"):
        pytest.skip("needs root, /dev/net/tun and ip(8)")
    ns = f"hv-net-guest-{os.getpid()}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        for tap in ("tapa", "tapb"):
            sh("ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap")
            sh("ip", "-n", ns, "link", "set", tap, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{HOST_IP}/24", "dev", "br0")
        sh("ip", "-n", ns, "link", "set", "br0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def new_machine(images, console, ns, tap):
    from hv.vmm import Machine, MachineConfig
    kernel, initrd = images
    with InNs(ns):
        m = Machine(MachineConfig(mem_mib=64, kernel=kernel, initrd=initrd,
                                  append=exec_arg(COMMAND),
                                  nets=[{"tap": tap, "mac": MAC}]))
    m.console_listeners.append(console)
    return m


def echo(ns, payload: bytes, timeout=60.0) -> bytes:
    # "hv-net: up" comes before nc listens (a fork and exec, slow in the guest)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with InNs(ns):
                s = socket.create_connection((GUEST_IP, 7), timeout=timeout)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got
    finally:
        s.close()


def test_guest_network_and_migration(linux_images, netns):
    console = Console()
    src = new_machine(linux_images, console, netns, "tapa")
    machines = [src]
    try:
        src.boot()
        src.start()
        console.wait_for("hv-net: up", timeout=900)
        ping_cmd = ["ping"] if shutil.which("ping") else ["busybox", "ping"]
        ping = subprocess.run(["ip", "netns", "exec", netns, *ping_cmd, "-c", "3", "-W", "20",
                               GUEST_IP], capture_output=True, text=True, timeout=120)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        print(ping.stdout)
        payload = bytes(range(256)) * 64
        assert echo(netns, payload) == payload

        dst = new_machine(linux_images, console, netns, "tapb")
        machines.append(dst)
        with InNs(netns):
            # ETH_P_ALL: a bridge port's frames reach only the all-protocol taps
            cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
            cap.bind(("tapb", 0))
        cap.settimeout(0.2)
        q, res = migrate_over_loopback(src, dst, timeout=60, free_pages="off")
        assert q["status"] == "completed", q
        assert "error" not in res, res.get("error")
        assert dst.status == "running"
        rarps, deadline = [], time.monotonic() + 5
        mac = bytes.fromhex(MAC.replace(":", ""))
        while time.monotonic() < deadline and len(rarps) < 3:
            try:
                f = cap.recv(2048)
            except socket.timeout:
                continue
            if f[6:12] == mac and f[12:14] == b"\x80\x35":
                rarps.append(f)
        cap.close()
        assert len(rarps) == 3, (rarps, dst.nets[0].counters)
        # The source lets its tap go; the guest answers through tapb now.
        src.close()
        assert echo(netns, b"after migration\n") == b"after migration\n"
        assert dst.nets[0].counters["rx_frames"] > 0
        # The guest saw ANNOUNCE, sent its gratuitous ARP and acked on the ctrl queue.
        deadline = time.monotonic() + 60
        while dst.nets[0].status & 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dst.nets[0].status == 1
        print("net:", {k: q.get(k) for k in ("total_time_ms", "downtime_ms", "pages_sent")},
              "dst", dst.nets[0].counters)
    finally:
        for m in machines:
            try:
                m.close()
            except Exception:
                pass
