"""Two hosts joined by one link: network namespaces made with pyroute2, a
veth pair between them, and the link shaped with tbf (`tc qdisc ... tbf`)
at a rate users have (1gbit, 10gbit). The hosts share the machine's clock
and filesystem, so QMP sockets and logs stay in a temporary directory."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

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
    subnet: str = "10.78.0"
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
