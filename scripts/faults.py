"""Network faults on the migration link of scripts/migrate-between-hosts:
two network namespaces joined by a veth pair. This machine's kind has tbf
and nftables but no netem (../shared/PLATFORM.md), so:

    loss=PCT       random drops, PCT percent of the packets each way (two
                   decimals at most), with nftables in host A's namespace:
                   `numgen random mod 10000 < PCT*100 counter drop` on the
                   veth's input and output (packets seen and dropped are
                   counted);
    rate=RATE      tbf on both ends of the veth (tc's units: 100mbit, 1gbit);
    flap=SECONDS   once the bulk pass is under way, the source host's veth
                   end goes down for SECONDS, then up again;
    reset          once the bulk pass is under way, the migration's TCP
                   connections are reset: `ss -K` on the destination host
                   aborts its end, and the kernel sends the source a RST
                   (an nft `reject with tcp reset` can only answer a packet,
                   and a receiver whose source was reset sends none, so it
                   would be left waiting out its I/O timeout);
    none           no fault (a retry after a failed run).

A link rate as users have it (--link RATE) is the same tbf. Flap and reset
must hit the bulk pass while it runs: without a link rate, their run limits
the link to FAULT_LINK so that the pass lasts long enough (a 128 MiB guest's
is ~20 MiB: milliseconds on an unlimited veth).

    link = Link(End(ns_a, if_a), End(ns_b, if_b), port)
    inj = Injection(fault, link, source=End(...), dest=End(...))
    inj.arm()                 # before migrate
    ... inj.watch(q)          # every query-migrate reply
    facts = inj.end()         # after the migration ended: the link is whole again

Needs root, `tc` and `ip` (iproute2), `nft` (Debian's nftables) for loss.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

KINDS = ("none", "loss", "rate", "flap", "reset")
#: the link rate a flap or reset run gets when none was given (see above)
FAULT_LINK = "100mbit"
#: nftables table of the loss fault (in host A's namespace)
NFT_TABLE = "hvfault"

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)$")
#: tc's rate units in bytes per second (bit: bits/s, bps: bytes/s; k, m, g, t are 1000s)
_UNIT = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "tbit": 1e12 / 8,
         "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "tbps": 1e12}


class FaultError(RuntimeError):
    """A fault could not be set up or undone; the message says what to do."""


@dataclass(frozen=True)
class Fault:
    kind: str
    value: float | str | None = None

    def __str__(self) -> str:
        if self.value is None:
            return self.kind
        v = f"{self.value:g}" if isinstance(self.value, float) else self.value
        return f"{self.kind}={v}"

    @property
    def during(self) -> bool:
        """Whether it strikes once the bulk pass is under way (else it holds
        for the whole migration)."""
        return self.kind in ("flap", "reset")


def rate_bytes(text: str) -> float:
    """A tc rate ("1gbit", "100mbit", "50mbps") in bytes per second."""
    m = _RATE.match(text.strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a rate like 100mbit, 1gbit or 10gbit (tc's units: "
                         f"bit, kbit, mbit, gbit, tbit for bits/s; bps, kbps, ... for bytes/s)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_rate(text: str) -> str:
    """argparse type of --link and rate=: the rate, checked, as tc takes it."""
    try:
        rate_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip().lower()


def parse_fault(text: str) -> Fault:
    """argparse type of --fault: loss=PCT, rate=RATE, flap=SECONDS, reset, none."""
    kind, sep, value = text.strip().partition("=")
    usage = "loss=PCT, rate=RATE, flap=SECONDS, reset or none"
    if kind not in KINDS:
        raise argparse.ArgumentTypeError(f"fault {text!r}: the kinds are {usage}")
    if kind in ("none", "reset"):
        if sep:
            raise argparse.ArgumentTypeError(f"fault {text!r}: {kind} takes no value")
        return Fault(kind)
    if not value:
        raise argparse.ArgumentTypeError(f"fault {text!r}: give a value, like {kind}="
                                         + {"loss": "1", "rate": "100mbit", "flap": "5"}[kind])
    if kind == "rate":
        return Fault(kind, parse_rate(value))
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if kind == "loss" and not (0 < number <= 100
                               and abs(round(number * 100) - number * 100) < 1e-6):
        raise argparse.ArgumentTypeError(f"fault {text!r}: loss is a percentage above 0 and "
                                         f"at most 100, two decimals at most")
    if kind == "flap" and not 0 < number <= 3600:
        raise argparse.ArgumentTypeError(f"fault {text!r}: flap is a number of seconds "
                                         f"above 0, at most 3600")
    return Fault(kind, number)


# -------------------------------------------------------------------- the link

@dataclass(frozen=True)
class End:
    """One end of the veth: its namespace and interface."""
    ns: str
    ifname: str


def _run(argv: list[str], what: str, input: str | None = None) -> str:
    try:
        p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        hint = " (apt-get install nftables)" if argv[0] == "nft" or "nft" in argv else ""
        raise FaultError(f"{what}: {argv[0]} not found{hint}") from None
    if p.returncode != 0:
        raise FaultError(f"{what}: {' '.join(argv)} failed: {(p.stderr or p.stdout).strip()}")
    return p.stdout


class Link:
    """The migration link between the two hosts: a veth pair, ends a and b,
    the migration on TCP port `port`."""

    def __init__(self, a: End, b: End, port: int):
        self.a, self.b, self.port = a, b, port
        self.rate: str | None = None

    # -- rate (tbf) -----------------------------------------------------------
    def set_rate(self, rate: str | None) -> None:
        """tbf of rate on both ends (each host's egress); None removes it.
        The bucket holds 2 ms at the rate and at least 256 KiB: the veth
        carries 64 KiB frames (and GSO), which must fit in it whole."""
        for end in (self.a, self.b):
            if rate is None:
                subprocess.run(["tc", "-n", end.ns, "qdisc", "del", "dev", end.ifname, "root"],
                               capture_output=True)
                continue
            burst = max(int(rate_bytes(rate) * 0.002), 256 << 10)
            _run(["tc", "-n", end.ns, "qdisc", "replace", "dev", end.ifname, "root", "tbf",
                  "rate", rate, "burst", str(burst), "latency", "50ms"],
                 f"link rate {rate} on {end.ns}/{end.ifname}")
        self.rate = rate

    # -- loss (nftables) -------------------------------------------------------
    def set_loss(self, pct: float) -> None:
        """Drop pct percent of the packets both ways, at host A's end."""
        if shutil.which("nft") is None:
            raise FaultError("loss needs the nft command: apt-get install nftables")
        n, dev = round(pct * 100), self.a.ifname
        # per chain: one rule counts every packet, the next drops n in 10000
        script = (f"table inet {NFT_TABLE} {{\n"
                  f"  chain out {{ type filter hook output priority 0; policy accept;\n"
                  f"    oifname \"{dev}\" counter\n"
                  f"    oifname \"{dev}\" numgen random mod 10000 < {n} counter drop; }}\n"
                  f"  chain in {{ type filter hook input priority 0; policy accept;\n"
                  f"    iifname \"{dev}\" counter\n"
                  f"    iifname \"{dev}\" numgen random mod 10000 < {n} counter drop; }}\n"
                  f"}}\n")
        self.clear_loss()
        _run(["ip", "netns", "exec", self.a.ns, "nft", "-f", "-"], f"loss={pct:g}",
             input=script)

    def loss_counts(self) -> tuple[int, int] | None:
        """(packets seen, packets dropped) by the loss rules so far, both
        ways (None: no rules)."""
        p = subprocess.run(["ip", "netns", "exec", self.a.ns, "nft", "-j", "list", "table",
                            "inet", NFT_TABLE], capture_output=True, text=True)
        if p.returncode != 0:
            return None
        seen = dropped = 0
        for item in json.loads(p.stdout).get("nftables", []):
            exprs = item.get("rule", {}).get("expr", [])
            packets = sum(e["counter"]["packets"] for e in exprs if "counter" in e)
            if any("drop" in e for e in exprs):
                dropped += packets
            else:
                seen += packets
        return seen, dropped

    def clear_loss(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.a.ns, "nft", "delete", "table", "inet",
                        NFT_TABLE], capture_output=True)

    # -- down, up, reset -----------------------------------------------------------
    def set_up(self, end: End, up: bool) -> None:
        _run(["ip", "-n", end.ns, "link", "set", end.ifname, "up" if up else "down"],
             f"setting {end.ns}/{end.ifname} {'up' if up else 'down'}")

    def established(self, end: End) -> int:
        """TCP connections of the migration port established at end (the
        destination's: local port `port`)."""
        out = _run(["ip", "netns", "exec", end.ns, "ss", "-t", "-n", "-H", "state",
                    "established", f"( sport = :{self.port} )"], "listing connections")
        return len([line for line in out.splitlines() if line.strip()])

    def reset(self, end: End) -> int:
        """Abort the migration's connections at end (the destination); the
        kernel sends each peer a RST. Returns how many there were."""
        n = self.established(end)
        _run(["ip", "netns", "exec", end.ns, "ss", "-K", "-t", "-n", "state", "established",
              f"( sport = :{self.port} )"], "resetting the migration's connections")
        if n and self.established(end):
            raise FaultError("ss -K left the migration's connections open: this kernel needs "
                             "CONFIG_INET_DIAG_DESTROY for reset")
        return n

    def clear(self) -> None:
        """Every fault undone: both ends up, no loss rules, no rate."""
        for end in (self.a, self.b):
            subprocess.run(["ip", "-n", end.ns, "link", "set", end.ifname, "up"],
                           capture_output=True)
        self.clear_loss()
        self.set_rate(None)


# ----------------------------------------------------------- one fault, one run

class Injection:
    """One fault on one migration from source to dest (ends of link).

    arm() sets up what holds for the whole migration (loss, rate; for flap
    and reset the link rate FAULT_LINK when the link has none); watch(q),
    given each query-migrate reply, strikes a flap or reset once round 0 is
    running and at least at_bytes have been sent; end() undoes everything
    (waiting for a flap's link to come back) and returns what happened."""

    def __init__(self, fault: Fault, link: Link, source: End, dest: End,
                 at_bytes: int = 1 << 20):
        self.fault, self.link, self.source, self.dest = fault, link, source, dest
        self.at_bytes = at_bytes
        self.t0 = None
        self.facts: dict = {"fault": str(fault)}
        self._thread: threading.Thread | None = None
        self._struck = False
        self._own_rate = False
        self._error: Exception | None = None

    def _ms(self) -> float:
        return round((time.monotonic() - self.t0) * 1000, 1)

    def arm(self) -> None:
        f, link = self.fault, self.link
        self.t0 = time.monotonic()
        if f.kind == "loss":
            link.set_loss(f.value)
        elif f.kind == "rate":
            self._saved_rate = link.rate
            link.set_rate(f.value)
            self._own_rate = True
        elif f.during and link.rate is None:
            self._saved_rate = None
            link.set_rate(FAULT_LINK)
            self._own_rate = True
            self.facts["fault_link"] = FAULT_LINK
        if f.kind != "none":
            self.facts["fault_hit"] = not f.during      # loss and rate hold from the start

    def watch(self, q: dict) -> None:
        """Strike a flap or reset at the right moment of the migration q
        (a query-migrate reply) describes."""
        if not self.fault.during or self._struck:
            return
        rounds = q.get("__io.github.hv_rounds") or []
        sent = (q.get("ram") or {}).get("transferred", 0)
        if q.get("status") != "active" or len(rounds) != 1 or sent < self.at_bytes:
            return
        self._struck = True
        self.facts.update(fault_hit=True, fault_at_ms=self._ms(), fault_at_bytes=sent,
                          fault_round=rounds[-1].get("round"))
        if self.fault.kind == "reset":
            self.facts["connections_reset"] = self.link.reset(self.dest)
            return
        self._thread = threading.Thread(target=self._flap, daemon=True)
        self._thread.start()

    def _flap(self) -> None:
        try:
            self.link.set_up(self.source, False)
            down = time.monotonic()
            time.sleep(self.fault.value)
            self.link.set_up(self.source, True)
            self.facts["link_down_ms"] = round((time.monotonic() - down) * 1000, 1)
            self.facts["link_up_at_ms"] = self._ms()
        except Exception as e:
            self._error = e

    def end(self) -> dict:
        """Undo the fault; the facts of this run (fault, fault_hit, when it
        struck, packets dropped...)."""
        if self._thread is not None:
            self._thread.join()
        if self.fault.kind == "loss":
            seen, dropped = self.link.loss_counts() or (None, None)
            self.facts.update(packets_seen=seen, packets_dropped=dropped)
            self.link.clear_loss()
        if self._own_rate:
            self.link.set_rate(self._saved_rate)
        if self.fault.during and not self._struck:
            self.facts["fault_hit"] = False
        if self._error is not None:
            raise FaultError(f"fault {self.fault}: {self._error}")
        return dict(self.facts)
