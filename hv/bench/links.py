"""Two hosts joined by one link: network namespaces made with pyroute2, a
veth pair between them, and the link shaped with tbf (`tc qdisc ... tbf`)
at a rate users have (1gbit, 10gbit). The hosts share the machine's clock
and filesystem, so QMP sockets and logs stay in a temporary directory.

GuestSegment adds the guest's own network apart from that link: a client
namespace that is also the switch, and in each host a bridge joining the
switch and the tap of the guest's virtio-net. The guest has one MAC and
one address wherever it runs."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


class LinkError(ValueError):
    """A link that cannot be made as asked; the message says why."""


def parse_rate(text: str) -> int:
    """A link rate as tc writes it ("1gbit", "100mbit", "2.5gbit") -> bits/s."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)bit\s*", text.lower())
    if not m:
        raise LinkError(f"link rate {text!r}: give it as tc does, e.g. 100mbit, 1gbit, 10gbit")
    bps = int(float(m.group(1)) * _UNITS[m.group(2)])
    if not 10**6 <= bps <= 10**12:
        raise LinkError(f"link rate {text!r}: between 1mbit and 1000gbit")
    return bps


def tbf_args(bps: int) -> list[str]:
    """tbf's parameters for a rate: a bucket of 5 ms at that rate (at least
    a 64 KiB GSO frame, which must fit in one bucket) and 50 ms of queue."""
    burst = max(bps // 8 // 200, 64 << 10) + 2048
    return ["rate", f"{bps}bit", "burst", str(burst), "latency", "50ms"]


def shape(ns: str, ifname: str, bps: int | None) -> None:
    """Put tbf on ifname's egress in namespace ns (bps None: unlimited, as
    the veth is)."""
    if bps is None:
        return
    cmd = ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", ifname, "root",
           "tbf", *tbf_args(bps)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise LinkError(f"tc tbf on {ifname} in {ns}: {r.stderr.strip() or r.returncode}")


@dataclass
class Hosts:
    """Namespaces PREFIX-a (address A) and PREFIX-b (address B) joined by a
    veth pair, each end shaped to rate_bps (None: unlimited)."""
    prefix: str = "hv-link"
    rate_bps: int | None = None
    subnet: str = "10.77.0"     # apart from the guest segment's 10.78.0
    mtu: int = 1500

    @property
    def ns_a(self) -> str:
        return f"{self.prefix}-a"

    @property
    def ns_b(self) -> str:
        return f"{self.prefix}-b"

    @property
    def ip_a(self) -> str:
        return f"{self.subnet}.1"

    @property
    def ip_b(self) -> str:
        return f"{self.subnet}.2"

    @property
    def if_a(self) -> str:
        return f"{self.prefix.replace('-', '')[:11]}0"

    @property
    def if_b(self) -> str:
        return f"{self.prefix.replace('-', '')[:11]}1"

    def create(self) -> "Hosts":
        from pyroute2 import IPRoute, NetNS, netns
        self.remove()
        netns.create(self.ns_a)
        netns.create(self.ns_b)
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.if_a, kind="veth", peer=self.if_b)
            for ifname, ns in ((self.if_a, self.ns_a), (self.if_b, self.ns_b)):
                ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], net_ns_fd=ns)
        for ns, ifname, ip in ((self.ns_a, self.if_a, self.ip_a),
                               (self.ns_b, self.if_b, self.ip_b)):
            with NetNS(ns) as n:
                idx = n.link_lookup(ifname=ifname)[0]
                n.addr("add", index=idx, address=ip, prefixlen=24)
                n.link("set", index=idx, state="up", mtu=self.mtu)
                n.link("set", index=n.link_lookup(ifname="lo")[0], state="up")
            shape(ns, ifname, self.rate_bps)
        return self

    def remove(self) -> None:
        from pyroute2 import netns
        for ns in (self.ns_a, self.ns_b):
            if ns in netns.listnetns():
                netns.remove(ns)

    def __enter__(self) -> "Hosts":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.remove()


#: the guest's segment: the same MAC and address on every host, the client's
GUEST_MAC = "52:54:00:4d:49:47"
GUEST_IP, CLIENT_IP = "10.78.0.10", "10.78.0.100"
TAP = "tap0"            # each host's, in its own namespace


def ip(*argv: str) -> None:
    r = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise LinkError(f"ip {' '.join(argv)}: {r.stderr.strip() or r.returncode}")


@dataclass
class GuestSegment:
    """The guest's segment (MTU 1500) between the hosts' namespaces and
    client_ns: in client_ns a bridge with CLIENT_IP and a veth to each
    host; in each host a bridge joining that veth (up0) and TAP. Bridges
    are per namespace, so each is made in its own; without STP a port
    forwards as soon as it is up. The hosts must exist."""
    client_ns: str
    hosts: tuple[str, ...] = field(default_factory=tuple)

    def create(self) -> "GuestSegment":
        self.remove()
        ip("netns", "add", self.client_ns)
        for ns in (*self.hosts, self.client_ns):
            # no IPv6: its router and listener chatter would reach the guest
            for conf in ("default", "all"):
                subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                                f"net.ipv6.conf.{conf}.disable_ipv6=1"], capture_output=True)
        c = self.client_ns
        ip("-n", c, "link", "add", "br0", "type", "bridge")
        ip("-n", c, "link", "set", "lo", "up")
        for i, host in enumerate(self.hosts):
            port = f"sw-{i}"
            ip("-n", c, "link", "add", port, "type", "veth", "peer", "name", "up0",
               "netns", host)
            ip("-n", c, "link", "set", port, "master", "br0", "up")
            ip("-n", host, "link", "add", "br0", "type", "bridge")
            ip("-n", host, "tuntap", "add", "dev", TAP, "mode", "tap")
            for dev in ("up0", TAP):
                ip("-n", host, "link", "set", dev, "master", "br0", "up")
            ip("-n", host, "link", "set", "br0", "up")
        ip("-n", c, "addr", "add", f"{CLIENT_IP}/24", "dev", "br0")
        ip("-n", c, "link", "set", "br0", "up")
        return self

    def remove(self) -> None:
        """The client's namespace (the hosts' bridges and taps go with them)."""
        from pyroute2 import netns
        if self.client_ns in netns.listnetns():
            netns.remove(self.client_ns)


def guest_services(echo_port: int, stream_port: int | None = None) -> str:
    """The shell line a guest starts its network with: GUEST_IP on eth0, an
    echo service on echo_port (busybox nc, each connection's bytes sent
    back), and with stream_port a source of zeros to each connection (what
    a client reads the guest's sending throughput from)."""
    line = (f"ip addr add {GUEST_IP}/24 dev eth0; ip link set eth0 up; "
            f"nc -ll -p {echo_port} -e cat </dev/null >/dev/null 2>&1 & ")
    if stream_port is not None:
        # nc -e runs one program, whatever its build does with arguments
        line += ("printf '#!/bin/sh\\nexec cat /dev/zero\\n' >/tmp/zeros; chmod +x /tmp/zeros; "
                 f"nc -ll -p {stream_port} -e /tmp/zeros </dev/null >/dev/null 2>&1 & ")
    return line
