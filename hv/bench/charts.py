"""The charts of hv's benchmarks, drawn with matplotlib (Agg, no screen):
each has its axes with units, a legend, and the workload in its title, so
that it says what it shows without the table beside it.

Rows are the benchmark's result dicts (config, tool, round_pages,
bytes_sent, total_time_ms, downtime_ms, samples: [(seconds, bytes sent,
bytes remaining)...])."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB = 1 << 20


def _done(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "completed"]


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pages_per_round(rows: list[dict], path: str, title: str,
                    in_use_pages: int | None = None) -> str:
    """Grouped bars: pages sent with data in each round of each hv
    configuration (round 0 is the bulk pass, the last the stop-and-copy);
    QEMU reports no rounds, so its total is one bar."""
    rows = [r for r in _done(rows) if r.get("round_pages")]
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        xs = [k + i * width - 0.4 + width / 2 for k in range(len(r["round_pages"]))]
        label = (f"{r['config']}: {sum(r['round_pages'])} pages"
                 + (" (all rounds)" if r.get("tool") == "qemu" else
                    f" in {len(r['round_pages'])} rounds"))
        ax.bar(xs, [max(v, 0.8) for v in r["round_pages"]], width, label=label)
    if in_use_pages:
        ax.axhline(in_use_pages, color="gray", ls="--", lw=1,
                   label=f"pages neither free nor zero at start: {in_use_pages}")
    nr = max((len(r["round_pages"]) for r in rows), default=1)
    ax.set_xticks(range(nr))
    ax.set_xticklabels(["0 (bulk)"] + [str(k) for k in range(1, nr)])
    ax.set_yscale("log")
    ax.set_xlabel("migration round (hv; QEMU: all rounds in one bar)")
    ax.set_ylabel("pages sent with data (4 KiB each, log scale)")
    ax.set_title(f"Pages sent per round: {title}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def bytes_and_time(rows: list[dict], path: str, title: str) -> str:
    """Two panels, one bar per configuration: MiB on the wire, and total
    time with the downtime inside it."""
    rows = [r for r in _done(rows) if r.get("bytes_sent") is not None]
    names = [r["config"] for r in rows]
    colors = ["tab:blue" if r.get("tool") == "hv" else "tab:orange" for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.8))
    a1.bar(names, [r["bytes_sent"] / MIB for r in rows], color=colors)
    a1.set_ylabel("sent on the wire (MiB)")
    a1.set_title("Bytes sent")
    total = [r.get("total_time_ms") or 0 for r in rows]
    down = [r.get("downtime_ms") or 0 for r in rows]
    a2.bar(names, total, color=colors, label="total time")
    a2.bar(names, down, color="black", width=0.4, label="of which downtime")
    a2.set_ylabel("time (ms)")
    a2.set_title("Total time and downtime")
    a2.legend(fontsize=8)
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    from matplotlib.patches import Patch
    a1.legend(handles=[Patch(color="tab:blue", label="hv"),
                       Patch(color="tab:orange", label="QEMU 7.2")], fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def timeline(rows: list[dict], path: str, title: str) -> str:
    """Each configuration's migration over time, from query-migrate polled
    while it ran: MiB sent so far, and MiB still to send (remaining)."""
    rows = [r for r in _done(rows) if r.get("samples")]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for r in rows:
        t = [s[0] * 1000 for s in r["samples"]]
        a1.plot(t, [s[1] / MIB for s in r["samples"]], marker=".", label=r["config"])
        a2.plot(t, [s[2] / MIB for s in r["samples"]], marker=".", label=r["config"])
    a1.set_ylabel("sent so far (MiB)")
    a2.set_ylabel("remaining to send (MiB)")
    a2.set_xlabel("time since migrate (ms)")
    a1.set_title(f"Migration over time: {title}")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)
