"""One report of one migration, the same field names and units wherever hv
reports a migration: read from query-migrate (QEMU's MigrationInfo, with
hv's prefixed figures when the VMM is hv), written by migrate-between-hosts
--json and bench-migration --json.

Fields (None where the VMM does not say):
  status, error
  total_time_ms, setup_ms, downtime_ms          milliseconds
  bytes_sent                                    bytes on the wire
  throughput_mib_s                              MiB/s on the wire
  pages_total, pages_sent                       4 KiB pages (sent: with data)
  pages_skipped_free, pages_skipped_zero        pages not sent as data
  rounds, round_pages                           dirty-log passes; hv: pages per round
  verified                                      hv --verify: hashes matched
  compression                                   hv: what compression did
  free_page_info                                hv: the free page bitmap's reply
  cpu_throttle_pct                              auto-converge's throttle at the end, %
  dirty_pages_rate                              pages dirtied a second (last measured)
  postcopy                                      the migration switched to postcopy
  postcopy_requests                             page requests the source served
  postcopy_pages_requested                      hv: pages fetched on demand
  fault_latency_mean_ms, fault_latency_max_ms   hv: the destination's page faults,
                                                fault to page in place
"""

from __future__ import annotations

from ..qmp_commands import PREFIX

PAGE = 4096
FIELDS = ("status", "error", "total_time_ms", "setup_ms", "downtime_ms", "bytes_sent",
          "throughput_mib_s", "pages_total", "pages_sent", "pages_skipped_free",
          "pages_skipped_zero", "rounds", "round_pages", "verified", "compression",
          "free_page_info", "cpu_throttle_pct", "dirty_pages_rate", "postcopy",
          "postcopy_requests", "postcopy_pages_requested", "fault_latency_mean_ms",
          "fault_latency_max_ms")


def from_query_migrate(q: dict) -> dict:
    """The report of a finished migration from its last query-migrate."""
    ram = q.get("ram") or {}
    hv_rounds = q.get(PREFIX + "rounds")
    page = ram.get("page-size") or PAGE
    normal = ram.get("normal")
    return {
        "status": q.get("status"),
        "error": q.get("error-desc"),
        "total_time_ms": q.get("total-time"),
        "setup_ms": q.get("setup-time"),
        "downtime_ms": q.get("downtime"),
        "bytes_sent": ram.get("transferred"),
        "throughput_mib_s": round(ram["mbps"] * 1e6 / 8 / (1 << 20), 3)
        if ram.get("mbps") else None,
        "pages_total": ram["total"] // page if ram.get("total") else None,
        "pages_sent": normal,
        "pages_skipped_free": q.get(PREFIX + "pages-skipped-free"),
        # hv: zero pages of the bulk pass; QEMU: its duplicate (zero) pages
        "pages_skipped_zero": q.get(PREFIX + "pages-skipped-zero", ram.get("duplicate")),
        "rounds": len(hv_rounds) if hv_rounds is not None else ram.get("dirty-sync-count"),
        "round_pages": [r["pages"] for r in hv_rounds] if hv_rounds is not None
        else ([normal] if normal else []),
        "verified": q.get(PREFIX + "verified"),
        "compression": q.get(PREFIX + "compression"),
        "free_page_info": q.get(PREFIX + "free-page-info"),
        "cpu_throttle_pct": q.get("cpu-throttle-percentage"),
        "dirty_pages_rate": ram.get("dirty-pages-rate"),
        # QEMU says postcopy by its bytes; hv by its figures as well
        "postcopy": bool(ram.get("postcopy-bytes") or ram.get("postcopy-requests")
                         or q.get(PREFIX + "postcopy-pages") is not None),
        "postcopy_requests": ram.get("postcopy-requests"),
        "postcopy_pages_requested": q.get(PREFIX + "postcopy-pages-requested"),
        "fault_latency_mean_ms": q.get(PREFIX + "postcopy-fault-latency-mean-ms"),
        "fault_latency_max_ms": q.get(PREFIX + "postcopy-fault-latency-max-ms"),
    }
