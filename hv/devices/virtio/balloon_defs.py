"""virtio-balloon constants, wire layouts and errors (device ID 5).

Feature bits, config space and queues as Linux 6.1 and the virtio 1.x spec
define them (include/uapi/linux/virtio_balloon.h), plus hv's free page bitmap
extension, which guest-images/patches/0010-virtio-balloon-free-page-bitmap.patch
implements in the guest driver.
"""

from __future__ import annotations

import struct

from ...errors import HvError

VIRTIO_ID_BALLOON = 5

# -- feature bits ---------------------------------------------------------------
F_MUST_TELL_HOST = 0
F_STATS_VQ = 1
F_DEFLATE_ON_OOM = 2
F_FREE_PAGE_HINT = 3
F_PAGE_POISON = 4
F_REPORTING = 5
# hv's free page bitmap. Device-specific feature bits are 0-23 and the spec
# and Linux hand them out upward from 0 (0-5 are taken for the balloon), so
# the top of the device range is the bit least likely to be given to another
# meaning: a future spec feature would have to climb through 6-22 first, and
# a guest that does not know bit 23 simply never acks it.
F_FREE_PAGE_BITMAP = 23

FEATURE_NAMES = {
    F_MUST_TELL_HOST: "MUST_TELL_HOST", F_STATS_VQ: "STATS_VQ",
    F_DEFLATE_ON_OOM: "DEFLATE_ON_OOM", F_FREE_PAGE_HINT: "FREE_PAGE_HINT",
    F_PAGE_POISON: "PAGE_POISON", F_REPORTING: "REPORTING",
    F_FREE_PAGE_BITMAP: "FREE_PAGE_BITMAP",
}

# -- config space (little-endian u32s) -------------------------------------------
CFG_NUM_PAGES = 0            # host: target balloon size in 4 KiB pages
CFG_ACTUAL = 4               # guest: pages in the balloon now
CFG_FREE_PAGE_HINT_CMD_ID = 8  # host: hint command id (0 STOP, 1 DONE, >= 2 a round)
CFG_POISON_VAL = 12          # guest: the value free pages hold (PAGE_POISON)
CFG_FREE_PAGE_BITMAP_CMD_ID = 16  # host: bitmap request id (hv extension, 0 = none)
CFG_FREE_PAGE_BITMAP_DROP = 20    # host: what the guest drops before the snapshot
CONFIG_SIZE = 24

#: free page bitmap drop_cache: the values of /proc/sys/vm/drop_caches the
#: guest applies before its snapshot (guest-images/patches/0011-...)
DROP_CACHE = {"none": 0, "pagecache": 1, "all": 3}

CMD_ID_STOP = 0
CMD_ID_DONE = 1

PFN_SHIFT = 12  # VIRTIO_BALLOON_PFN_SHIFT: PFNs on the wire are 4 KiB frames

# -- queues: present when their feature is negotiated, numbered densely ------------
QUEUE_ROLES = (
    ("inflate", None, 256),
    ("deflate", None, 256),
    ("stats", F_STATS_VQ, 256),
    ("free_page", F_FREE_PAGE_HINT, 256),
    ("reporting", F_REPORTING, 32),   # Linux needs >= PAGE_REPORTING_CAPACITY (32)
    ("bitmap", F_FREE_PAGE_BITMAP, 64),
)

# -- stats queue: packed {le16 tag, le64 val} entries ---------------------------------
STAT = struct.Struct("<HQ")
STAT_NAMES = {
    0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults",
    4: "free_memory", 5: "total_memory", 6: "available_memory",
    7: "disk_caches", 8: "hugetlb_allocations", 9: "hugetlb_failures",
}

# -- free page bitmap chunk (device-readable buffer on the bitmap queue) ----------------
# le32 cmd_id, le32 flags, le64 start_pfn, le64 nr_pfns, then ceil(nr_pfns/64)
# le64 words of bits: bit i (KVM layout: bit i%64 of word i/64) set when page
# frame start_pfn + i was free in the guest's snapshot.
BITMAP_HDR = struct.Struct("<IIQQ")
BITMAP_F_LAST = 1       # the last chunk of this snapshot
BITMAP_F_ABORTED = 2    # the guest gave up on this command id (no bits follow)


class BalloonError(HvError):
    """A balloon operation the guest or the configuration cannot satisfy."""


class BalloonTimeout(BalloonError, TimeoutError):
    """The guest did not answer in time."""
