"""hv's live-migration wire protocol (version 1).

Every message is a fixed 24-byte little-endian header and a payload:

    offset size  field
    0      4     magic    b"HVMG"
    4      2     version  1
    6      2     command  (0 is invalid)
    8      4     flags    (0; reserved for later versions)
    12     4     reserved (must be 0)
    16     8     length   payload bytes that follow

Commands and their payloads:

    HELLO    1  page_size u32, channels u16, channel u16, memory size u64,
                features u64, session u64
    MEMORY   2  range table, then the pages' data in table order
    ZERO     3  range table (the pages read as zero; no data)
    FILL     4  range table (the pages hold a repeated u32 pattern, e.g.
                the guest's PAGE_POISON value; no data)
    STATE    5  the machine state (save_state()'s plain data, see
                encode_state: a tagged binary form, never pickle)
    VERIFY   6  range table, then one u64 page hash per page (--verify)
    COMPLETE 7  empty: the source is paused and has sent everything
    ACK      8  command u16 being acknowledged, 6 bytes of padding
    RUNNING  9  empty: the destination restored and resumed the guest
    ERROR   10  UTF-8 message: the peer gives up, and says why
    CANCEL  11  UTF-8 reason: the source gives up
    FREE    12  range table (the source skipped these pages as free: their
                content is undefined, the destination discards its copy so
                that they cost it no memory; no data)
    POSTCOPY 13 range table, possibly empty: the switch to postcopy; these
                pages are not valid on the destination (dirtied since they
                were sent) and will come after the guest resumes there. The
                first comes while the source still runs the guest (the
                pages dirty so far): the destination drops them and answers
                ACK; the second, paused, adds those dirtied since
    REQUEST 14  range table (destination -> source, the return path): the
                guest faulted on these pages; send them ahead of the rest
    DONE    15  faults u64, latency sum ns u64, latency max ns u64, latency
                count u64 (destination -> source): every page is in place,
                the source may let its copy of the guest go
    MEMORY_ZSTD 16  range table, then one zstd frame that decompresses to
                exactly the pages' data in table order (compression zstd or
                auto; the frame is at most pages.zstd_bound() of that size,
                and a frame that is not valid or not exactly that long is
                refused)

A range table is: count u32, pattern u32 (FILL only, else 0), then count
pairs of (start pfn u64, page count u64). Ranges are page frame numbers of
guest physical memory; they must lie inside the memory size the HELLO
announced, and within one message they are sorted and do not overlap.

Everything the peer sends is checked before the receiver allocates or reads
for it: a range table has at most min(MAX_RANGES, guest pages) entries, a
payload is never longer than its table can need for the guest's memory, a
STATE at most state_limit() bytes that decode to at most MAX_STATE_ITEMS
values. So no stream makes the receiver hold more than about guest RAM (the
pages themselves go straight into guest memory) plus a few MiB.

Message sequence (one connection; `connections: N` opens N, see below):

    source (hv.migration.sender)          destination (hv.migration.receiver)
      |-- HELLO -------------------------->|  checks version, page size,
      |<------------------------- ACK -----|  memory size (or ERROR)
      |-- FREE / ZERO / FILL / MEMORY ---->|  bulk pass: every page that is
      |                                    |  neither free nor zero has data;
      |                                    |  free pages are FREE ranges
      |-- ZERO / MEMORY ... -------------->|  dirty rounds
      |   (source pauses its vCPUs)        |
      |-- ZERO / MEMORY ... -------------->|  last dirty pages
      |-- STATE -------------------------->|
      |-- VERIFY (optional) -------------->|  hashes checked before resume
      |-- COMPLETE ----------------------->|  restore state, resume guest
      |<--------------------- RUNNING -----|  (or ERROR: nothing resumed)
      |   (source stops: "completed")      |

    CANCEL (source) or ERROR (either side) may come at any point before
    RUNNING; the destination then resumes nothing and exits non-zero, the
    source resumes its guest.

Postcopy (FEATURE_POSTCOPY in HELLO; hv.migration.postcopy): instead of
the final pause's last pages, the source sends, still running,

      |-- POSTCOPY (dirty so far) -------->|  drops them (one connection;
      |<-------------------- ACK ----------|  with more, at the switch)

and then, paused,

      |-- POSTCOPY (dirtied since) ------->|  registers RAM with userfaultfd,
      |-- STATE -------------------------->|  drops the rest to fetch (and
      |-- COMPLETE ----------------------->|  what was never sent), restores,
      |<--------------------- RUNNING -----|  resumes: the guest runs there
      |<-------------- REQUEST (faults) ---|  a fault asks for its page;
      |-- MEMORY / ZERO (asked first) ---->|  the rest follows in the
      |-- MEMORY / ZERO (background) ----->|  background
      |-- VERIFY (optional) -------------->|  hashes of every page
      |-- COMPLETE ----------------------->|  everything was sent
      |<------------------------ DONE -----|  every page placed: the source
      |   (source stops: "completed")      |  may drop its copy

    After RUNNING the guest runs on the destination and the source never
    resumes it: a failure then leaves the source paused, keeping the memory,
    and pauses the destination's guest (postcopy-paused); neither side runs
    the guest with a page missing.

With N connections, connection 0 carries the sequence above; connections
1..N-1 each send HELLO (channel i, same session) and get ACK, then carry
only FREE / ZERO / FILL / MEMORY and end with COMPLETE. A page always travels on
the same connection (memory is striped in fixed blocks), so rounds stay in
order per page; the destination applies STATE/COMPLETE of connection 0 only
after every other connection has sent COMPLETE.

Destination states (hv.migration.receiver.Receiver, one function over
(state, command); anything not in the table is refused with ProtocolError
naming what was expected):

      WAIT_HELLO --HELLO--> MEMORY --MEMORY[_ZSTD]|ZERO|FILL|FREE--> MEMORY
                              |
                              +--STATE--> STATE --VERIFY--> STATE
                              |             |
                              |             +--COMPLETE--> COMPLETE
                              |                   (restore, resume,
                              |                    send RUNNING)
                              +--POSTCOPY--> POSTCOPY --POSTCOPY|STATE--> POSTCOPY
                                       (ACK)
                                               |
                                               +--COMPLETE--> POSTCOPY_ACTIVE
                                                    (resume; pages are served
                                                     by the fault loop)
      POSTCOPY_ACTIVE --VERIFY--> POSTCOPY_ACTIVE --COMPLETE--> COMPLETE (DONE)
      any state but COMPLETE --CANCEL|ERROR--> FAILED
      secondary connection: WAIT_HELLO --HELLO--> MEMORY --COMPLETE--> COMPLETE
"""

from __future__ import annotations

import enum
import io
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import HvError
from . import pages

MAGIC = b"HVMG"
VERSION = 2     # 2: POSTCOPY comes twice, the first answered with ACK
HEADER = struct.Struct("<4sHHIIQ")
HEADER_SIZE = HEADER.size  # 24
HELLO = struct.Struct("<IHHQQQ")
TABLE_HEAD = struct.Struct("<II")
ACK = struct.Struct("<H6x")
DONE = struct.Struct("<QQQQ")

# Features announced in HELLO.
FEATURE_ZERO = 1 << 0
FEATURE_FILL = 1 << 1
FEATURE_VERIFY = 1 << 2
FEATURE_CHANNELS = 1 << 3
FEATURE_POSTCOPY = 1 << 4       # the destination tracks what it holds for a switch
FEATURE_ZSTD = 1 << 5           # the source may send MEMORY_ZSTD
FEATURES = (FEATURE_ZERO | FEATURE_FILL | FEATURE_VERIFY | FEATURE_CHANNELS | FEATURE_POSTCOPY
            | FEATURE_ZSTD)

# Limits that keep a malformed header from making the receiver allocate
# without bound (see also state_limit()).
MAX_RANGES = 1 << 20
MAX_STATE = 64 << 20
MAX_STATE_ITEMS = 1 << 18       # decoded values in one STATE (a machine has ~1000)
MAX_MESSAGE = 1 << 20


class Command(enum.IntEnum):
    HELLO = 1
    MEMORY = 2
    ZERO = 3
    FILL = 4
    STATE = 5
    VERIFY = 6
    COMPLETE = 7
    ACK = 8
    RUNNING = 9
    ERROR = 10
    CANCEL = 11
    FREE = 12
    POSTCOPY = 13
    REQUEST = 14
    DONE = 15
    MEMORY_ZSTD = 16


class MigrationError(HvError):
    """A migration failed; the message says why."""


class ProtocolError(MigrationError):
    """The peer sent something that does not fit the protocol or the state."""


class PeerError(MigrationError):
    """The peer sent ERROR (or CANCEL) with its reason."""


def reason(e: BaseException) -> str:
    """What went wrong, never empty (MemoryError() and friends have no message)."""
    text = str(e)
    if isinstance(e, MigrationError) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def state_limit(mem_size: int) -> int:
    """The largest STATE a guest of mem_size bytes can need: a fixed part
    (vCPUs, devices) and the balloon's page bitmaps, which grow with RAM."""
    return min(MAX_STATE, (4 << 20) + mem_size // 2048)


@dataclass
class Header:
    command: Command
    length: int
    flags: int = 0
    version: int = VERSION

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.version, int(self.command), self.flags, 0, self.length)


def parse_header(raw: bytes) -> Header:
    """Decode and check a header; ProtocolError on anything unexpected."""
    if len(raw) != HEADER_SIZE:
        raise ProtocolError(f"truncated header: {len(raw)} of {HEADER_SIZE} bytes")
    magic, version, command, flags, reserved, length = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"not an hv migration stream: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}; this hv speaks "
                            f"version {VERSION}")
    try:
        cmd = Command(command)
    except ValueError:
        raise ProtocolError(f"unknown command {command}") from None
    if reserved != 0 or flags != 0:
        raise ProtocolError(f"{cmd.name}: reserved header fields are not zero")
    return Header(cmd, length, flags, version)


# ---------------------------------------------------------------- messages

@dataclass
class Hello:
    page_size: int
    mem_size: int
    features: int = FEATURES
    channels: int = 1
    channel: int = 0
    session: int = 0

    def payload(self) -> bytes:
        return HELLO.pack(self.page_size, self.channels, self.channel, self.mem_size,
                          self.features, self.session)

    @classmethod
    def parse(cls, data: bytes) -> "Hello":
        if len(data) != HELLO.size:
            raise ProtocolError(f"HELLO payload is {len(data)} bytes, expected {HELLO.size}")
        ps, channels, channel, mem, feats, session = HELLO.unpack(data)
        return cls(ps, mem, feats, channels, channel, session)


def _u64(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.uint64))


@dataclass
class Ranges:
    """MEMORY, MEMORY_ZSTD, ZERO, FILL, FREE, VERIFY, POSTCOPY and REQUEST: a
    range table (and, for MEMORY, the pages' data; for MEMORY_ZSTD, their
    zstd frame in `data`; for VERIFY, one hash per page). `data` of MEMORY is
    used by in-memory streams and tests; the socket path moves page data
    straight from/to guest memory."""
    command: Command
    starts: np.ndarray
    counts: np.ndarray
    pattern: int = 0
    data: bytes | None = None
    hashes: np.ndarray | None = None

    def __post_init__(self):
        self.starts = _u64(self.starts)
        self.counts = _u64(self.counts)

    @property
    def npages(self) -> int:
        return int(self.counts.sum()) if len(self.counts) else 0

    def table(self) -> bytes:
        t = np.empty(2 * len(self.starts), dtype="<u8")
        t[0::2] = self.starts
        t[1::2] = self.counts
        return TABLE_HEAD.pack(len(self.starts), self.pattern & 0xFFFFFFFF) + t.tobytes()

    def body_length(self, page_size: int) -> int:
        if self.command == Command.MEMORY:
            return self.npages * page_size
        if self.command == Command.VERIFY:
            return self.npages * 8
        if self.command == Command.MEMORY_ZSTD:
            return len(self.data or b"")
        return 0

    def __eq__(self, other):
        return (isinstance(other, Ranges) and self.command == other.command
                and self.pattern == other.pattern
                and np.array_equal(self.starts, other.starts)
                and np.array_equal(self.counts, other.counts)
                and self.data == other.data
                and ((self.hashes is None and other.hashes is None)
                     or (self.hashes is not None and other.hashes is not None
                         and np.array_equal(self.hashes, other.hashes))))


RANGE_COMMANDS = (Command.MEMORY, Command.MEMORY_ZSTD, Command.ZERO, Command.FILL,
                  Command.FREE, Command.VERIFY, Command.POSTCOPY, Command.REQUEST)
#: the commands whose pages land in guest memory (recv_body's mem)
DATA_COMMANDS = (Command.MEMORY, Command.MEMORY_ZSTD)
#: range messages whose table may be empty
EMPTY_TABLE_OK = (Command.POSTCOPY,)


def max_ranges(npages: int) -> int:
    """Ranges in one table: they do not overlap, so no more than pages."""
    return max(1, min(MAX_RANGES, npages))


def max_range_payload(command: Command, npages: int, page_size: int) -> int:
    """The longest payload a range message can need for npages of guest memory."""
    if command == Command.MEMORY_ZSTD:
        body = pages.zstd_bound(npages * page_size)
    else:
        body = {Command.MEMORY: page_size, Command.VERIFY: 8}.get(command, 0) * npages
    return TABLE_HEAD.size + 16 * max_ranges(npages) + body


def parse_table(command: Command, head: bytes, npages: int = 1 << 52) -> tuple[int, int]:
    """Decode a table head: (number of ranges, pattern)."""
    if len(head) != TABLE_HEAD.size:
        raise ProtocolError(f"{command.name}: truncated range table")
    n, pattern = TABLE_HEAD.unpack(head)
    least = 0 if command in EMPTY_TABLE_OK else 1
    if n < least or n > max_ranges(npages):
        raise ProtocolError(f"{command.name}: range table of {n} entries "
                            f"(expected {least}..{max_ranges(npages)})")
    if pattern and command != Command.FILL:
        raise ProtocolError(f"{command.name}: pattern field must be 0")
    return n, pattern


def parse_ranges(command: Command, raw: bytes, npages: int,
                 ram: list[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The (starts, counts) of a range table, every range inside npages and,
    with ram ((first pfn, pages) regions), inside one region of RAM."""
    t = np.frombuffer(raw, dtype="<u8")
    starts = np.ascontiguousarray(t[0::2], dtype=np.uint64)
    counts = np.ascontiguousarray(t[1::2], dtype=np.uint64)
    if (counts == 0).any():
        raise ProtocolError(f"{command.name}: empty range in table")
    if (starts >= npages).any() or (counts > np.uint64(npages) - np.minimum(starts, npages)).any():
        bad = int(np.argmax((starts >= npages) |
                            (counts > np.uint64(npages) - np.minimum(starts, npages))))
        raise ProtocolError(f"{command.name}: range pfn {int(starts[bad])} + {int(counts[bad])} "
                            f"pages lies outside guest memory ({npages} pages)")
    if ram is not None and len(ram) > 1:
        firsts = np.array([f for f, _ in ram], dtype=np.uint64)
        ends = np.array([f + n for f, n in ram], dtype=np.uint64)
        r = np.searchsorted(firsts, starts, side="right") - 1
        outside = (r < 0) | (starts + counts > ends[np.maximum(r, 0)])
        if outside.any():
            bad = int(np.argmax(outside))
            raise ProtocolError(f"{command.name}: range pfn {int(starts[bad])} + "
                                f"{int(counts[bad])} pages is not in guest RAM (it reaches "
                                f"into the 32-bit hole)")
    # In bounds, so start + count cannot overflow.
    behind = np.nonzero(starts[1:] < starts[:-1] + counts[:-1])[0]
    if len(behind):
        i = int(behind[0]) + 1
        raise ProtocolError(f"{command.name}: range {i} (pfn {int(starts[i])} + "
                            f"{int(counts[i])} pages) overlaps or comes before range {i - 1} "
                            f"(pfn {int(starts[i - 1])} + {int(counts[i - 1])} pages); the "
                            f"ranges of one message must be sorted and must not overlap")
    return starts, counts


@dataclass
class Control:
    """COMPLETE, RUNNING, ERROR, CANCEL, ACK, DONE and STATE (payload as bytes)."""
    command: Command
    payload: bytes = b""

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", "replace")

    @property
    def acked(self) -> Command | None:
        if self.command != Command.ACK:
            return None
        try:
            return Command(ACK.unpack(self.payload)[0])
        except (ValueError, struct.error):
            raise ProtocolError("ACK of an unknown command") from None


def ack(command: Command) -> Control:
    return Control(Command.ACK, ACK.pack(int(command)))


def error(message: str) -> Control:
    return Control(Command.ERROR, message.encode("utf-8")[:MAX_MESSAGE])


def cancel(reason: str = "") -> Control:
    return Control(Command.CANCEL, reason.encode("utf-8")[:MAX_MESSAGE])


def check_control(h: Header, mem_size: int = 1 << 64) -> None:
    """Payload length limits of the commands that carry no range table."""
    limit = {Command.HELLO: HELLO.size, Command.COMPLETE: 0, Command.RUNNING: 0,
             Command.ACK: ACK.size, Command.ERROR: MAX_MESSAGE,
             Command.CANCEL: MAX_MESSAGE, Command.STATE: state_limit(mem_size),
             Command.DONE: DONE.size}[h.command]
    if h.command in (Command.HELLO, Command.ACK, Command.DONE) and h.length != limit:
        raise ProtocolError(f"{h.command.name}: payload of {h.length} bytes, expected {limit}")
    if h.length > limit:
        raise ProtocolError(f"{h.command.name}: payload of {h.length} bytes exceeds {limit}")


# ------------------------------------------------------------ byte streams

class Stream:
    """Where messages go and come from. SocketStream moves page data with
    hv._pages straight between guest memory and the socket; BufferStream
    does the same through a file-like object (tests, files)."""

    page_size = 4096

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def read(self, n: int) -> bytes:
        raise NotImplementedError

    def write_pages(self, mem, starts, counts) -> int:
        raise NotImplementedError

    def read_pages(self, mem, starts, counts) -> int:
        raise NotImplementedError

    def link_rate(self) -> float | None:
        """Bytes a second the link delivers, as TCP measures it (None: not
        a TCP stream, or not known yet)."""
        return None

    def set_rate(self, bytes_per_sec: int) -> None:
        """A new max_bandwidth for the sends that follow (0: unlimited); a
        stream with no rate limit has nothing to change."""

    # -- messages --------------------------------------------------------
    def send(self, msg, mem=None) -> int:
        """Send a Hello, Ranges or Control. Ranges of MEMORY take their data
        from msg.data or, when None, from guest memory `mem`. Returns bytes."""
        if isinstance(msg, Hello):
            payload = msg.payload()
            self.write(Header(Command.HELLO, len(payload)).pack() + payload)
            return HEADER_SIZE + len(payload)
        if isinstance(msg, Control):
            self.write(Header(msg.command, len(msg.payload)).pack() + msg.payload)
            return HEADER_SIZE + len(msg.payload)
        if isinstance(msg, Ranges):
            table = msg.table()
            body = msg.body_length(self.page_size)
            self.write(Header(msg.command, len(table) + body).pack() + table)
            n = HEADER_SIZE + len(table)
            if msg.command == Command.MEMORY:
                if msg.data is not None:
                    if len(msg.data) != body:
                        raise ValueError("MEMORY data does not match its table")
                    self.write(msg.data)
                else:
                    self.write_pages(mem, msg.starts, msg.counts)
                n += body
            elif msg.command == Command.MEMORY_ZSTD:
                if not msg.data:
                    raise ValueError("MEMORY_ZSTD without its frame")
                self.write(msg.data)
                n += body
            elif msg.command == Command.VERIFY:
                h = _u64(msg.hashes).astype("<u8")
                if len(h) != msg.npages:
                    raise ValueError("VERIFY hashes do not match its table")
                self.write(h.tobytes())
                n += body
            return n
        raise TypeError(f"cannot send {msg!r}")

    def recv_header(self) -> Header:
        return parse_header(self.read(HEADER_SIZE))

    def recv_body(self, h: Header, npages: int, mem=None, ram=None):
        """Read the payload of h. Ranges of MEMORY go into guest memory `mem`
        when given, else into msg.data. npages bounds the ranges."""
        if h.command not in RANGE_COMMANDS:
            check_control(h, npages * self.page_size)
            payload = self.read(h.length)
            if h.command == Command.HELLO:
                return Hello.parse(payload)
            return Control(h.command, payload)
        if h.length < TABLE_HEAD.size:
            raise ProtocolError(f"{h.command.name}: payload of {h.length} bytes is too short "
                                f"for a range table")
        limit = max_range_payload(h.command, npages, self.page_size)
        if h.length > limit:
            raise ProtocolError(f"{h.command.name}: payload of {h.length} bytes exceeds the "
                                f"{limit} that {npages} pages of guest memory can need")
        n, pattern = parse_table(h.command, self.read(TABLE_HEAD.size), npages)
        if h.length < TABLE_HEAD.size + 16 * n:
            raise ProtocolError(f"{h.command.name}: payload of {h.length} bytes is shorter "
                                f"than its table of {n} ranges")
        starts, counts = parse_ranges(h.command, self.read(16 * n), npages, ram)
        msg = Ranges(h.command, starts, counts, pattern)
        if h.command == Command.MEMORY_ZSTD:
            self._recv_zstd(h, msg, h.length - TABLE_HEAD.size - 16 * n, mem)
            return msg
        body = msg.body_length(self.page_size)
        if h.length != TABLE_HEAD.size + 16 * n + body:
            raise ProtocolError(f"{h.command.name}: payload length {h.length} does not match "
                                f"its table ({n} ranges, {msg.npages} pages)")
        if h.command == Command.MEMORY:
            if mem is not None:
                self.read_pages(mem, starts, counts)
            else:
                msg.data = self.read(body)
        elif h.command == Command.VERIFY:
            msg.hashes = np.frombuffer(self.read(body), dtype="<u8").astype(np.uint64)
        return msg

    def _recv_zstd(self, h: Header, msg: Ranges, length: int, mem) -> None:
        """A MEMORY_ZSTD frame, bounded by what its pages can need, then
        decompressed straight into guest memory (or kept in msg.data)."""
        raw = msg.npages * self.page_size
        if length <= 0 or length > pages.zstd_bound(raw):
            raise ProtocolError(f"MEMORY_ZSTD: a frame of {length} bytes for {msg.npages} "
                                f"pages (at most {pages.zstd_bound(raw)})")
        frame = self.read(length)
        if mem is None:
            msg.data = frame
            return
        if getattr(self, "_zstd", None) is None:
            self._zstd = pages.Zstd()
        try:
            self._zstd.decompress_into(mem, msg.starts, msg.counts, frame, self.page_size)
        except ValueError as e:
            raise ProtocolError(f"MEMORY_ZSTD: corrupt compressed batch of {msg.npages} "
                                f"pages at pfn {int(msg.starts[0])}: {e}") from None

    def recv(self, npages: int = 1 << 52, mem=None):
        return self.recv_body(self.recv_header(), npages, mem)


class BufferStream(Stream):
    """Messages through file-like objects (io.BytesIO in tests): reads come
    from f, writes go to out (f itself when out is None)."""

    def __init__(self, f=None, page_size: int = 4096, out=None):
        self.f = f if f is not None else io.BytesIO()
        self.out = out if out is not None else self.f
        self.page_size = page_size

    def write(self, data) -> None:
        self.out.write(bytes(data))

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ProtocolError(f"stream ended: got {len(data)} of {n} bytes")
        return data

    def write_pages(self, mem, starts, counts) -> int:
        n = 0
        for s, c in zip(starts.tolist(), counts.tolist()):
            chunk = mem.view[s * self.page_size:(s + c) * self.page_size]
            self.out.write(chunk)
            n += len(chunk)
        return n

    def read_pages(self, mem, starts, counts) -> int:
        n = 0
        for s, c in zip(starts.tolist(), counts.tolist()):
            ln = c * self.page_size
            data = self.read(ln)
            mem.view[s * self.page_size:s * self.page_size + ln] = data
            n += ln
        return n
