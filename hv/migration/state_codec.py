"""The machine state on the wire (the STATE message, hv.migration.protocol).

A self-describing tagged binary form of plain data, so that STATE never
runs code on load (no pickle).
After the magic comes a CRC-32 of the body (u32). Tags:
  N None, T True, F False, i int (u32 length + signed little-endian bytes),
  f float (f64), s str (u32 length + UTF-8), b bytes (u32 length + data),
  l list / t tuple (u32 count + items), d dict (u32 count + key, value
  pairs), a numpy array (dtype str, shape list, raw bytes; plain numeric
  dtypes only).
Decoding is bounded: a count cannot promise more items than bytes remain,
and one state decodes to at most MAX_STATE_ITEMS values.
"""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np

from .protocol import MAX_STATE_ITEMS, Command, Control, ProtocolError

STATE_MAGIC = b"HVST\x01\x00\x00\x00"
_U32 = struct.Struct("<I")
_MAX_DEPTH = 64


def state_message(data) -> Control:
    """The STATE message of a machine state (Machine.save_state())."""
    return Control(Command.STATE, encode_state(data))


def encode_state(obj) -> bytes:
    """STATE_MAGIC, CRC-32 of the body (u32), body."""
    out = io.BytesIO()
    _enc(obj, out, 0)
    body = out.getvalue()
    return STATE_MAGIC + _U32.pack(zlib.crc32(body)) + body


def _enc(o, out, depth):
    if depth > _MAX_DEPTH:
        raise ValueError("machine state nests too deeply")
    if o is None:
        out.write(b"N")
    elif o is True:
        out.write(b"T")
    elif o is False:
        out.write(b"F")
    elif isinstance(o, (int, np.integer)):
        v = int(o)
        raw = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "little", signed=True)
        out.write(b"i" + _U32.pack(len(raw)) + raw)
    elif isinstance(o, (float, np.floating)):
        out.write(b"f" + struct.pack("<d", float(o)))
    elif isinstance(o, str):
        raw = o.encode("utf-8")
        out.write(b"s" + _U32.pack(len(raw)) + raw)
    elif isinstance(o, (bytes, bytearray, memoryview)):
        raw = bytes(o)
        out.write(b"b" + _U32.pack(len(raw)) + raw)
    elif isinstance(o, np.ndarray):
        if o.dtype.kind not in "biuf":
            raise TypeError(f"machine state: cannot encode array of dtype {o.dtype}")
        out.write(b"a")
        _enc(o.dtype.str, out, depth + 1)
        _enc(list(o.shape), out, depth + 1)
        _enc(np.ascontiguousarray(o).tobytes(), out, depth + 1)
    elif isinstance(o, (list, tuple)):
        out.write((b"l" if isinstance(o, list) else b"t") + _U32.pack(len(o)))
        for item in o:
            _enc(item, out, depth + 1)
    elif isinstance(o, dict):
        out.write(b"d" + _U32.pack(len(o)))
        for k, v in o.items():
            _enc(k, out, depth + 1)
            _enc(v, out, depth + 1)
    elif hasattr(o, "__dataclass_fields__"):
        import dataclasses
        _enc(dataclasses.asdict(o), out, depth)
    else:
        raise TypeError(f"machine state: cannot encode {type(o).__name__} (plain data only)")


def decode_state(data: bytes):
    if not data.startswith(STATE_MAGIC) or len(data) < len(STATE_MAGIC) + 4:
        raise ProtocolError("STATE: not an hv machine state (bad magic or version)")
    crc = _U32.unpack_from(data, len(STATE_MAGIC))[0]
    if zlib.crc32(memoryview(data)[len(STATE_MAGIC) + 4:]) != crc:
        raise ProtocolError("STATE: checksum mismatch (corrupted machine state)")
    r = _Reader(data, len(STATE_MAGIC) + 4)
    obj = r.value(0)
    if r.pos != len(data):
        raise ProtocolError(f"STATE: {len(data) - r.pos} trailing bytes")
    return obj


class _Reader:
    def __init__(self, data: bytes, pos: int):
        self.data, self.pos = data, pos
        self.budget = MAX_STATE_ITEMS

    def count(self, item_bytes: int) -> int:
        """A list/dict count, each item at least item_bytes long."""
        n = self.u32()
        if n * item_bytes > len(self.data) - self.pos:
            raise ProtocolError(f"STATE: a count of {n} items does not fit in the "
                                f"{len(self.data) - self.pos} bytes that remain")
        return n

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError("STATE: truncated machine state")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def value(self, depth: int):
        if depth > _MAX_DEPTH:
            raise ProtocolError("STATE: machine state nests too deeply")
        self.budget -= 1
        if self.budget < 0:
            raise ProtocolError(f"STATE: more than {MAX_STATE_ITEMS} values; a machine "
                                f"state has far fewer")
        tag = self.take(1)
        if tag == b"N":
            return None
        if tag == b"T":
            return True
        if tag == b"F":
            return False
        if tag == b"i":
            n = self.u32()
            if n > 1024:
                raise ProtocolError("STATE: integer too large")
            return int.from_bytes(self.take(n), "little", signed=True)
        if tag == b"f":
            return struct.unpack("<d", self.take(8))[0]
        if tag == b"s":
            try:
                return self.take(self.u32()).decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("STATE: invalid UTF-8 string") from None
        if tag == b"b":
            return self.take(self.u32())
        if tag in (b"l", b"t"):
            n = self.count(1)
            items = [self.value(depth + 1) for _ in range(n)]
            return items if tag == b"l" else tuple(items)
        if tag == b"d":
            n = self.count(2)
            d = {}
            for _ in range(n):
                k = self.value(depth + 1)
                try:
                    d[k] = self.value(depth + 1)
                except TypeError:
                    raise ProtocolError("STATE: unhashable dict key") from None
            return d
        if tag == b"a":
            dt, shape, raw = self.value(depth + 1), self.value(depth + 1), self.value(depth + 1)
            try:
                if not isinstance(dt, str) or not isinstance(raw, bytes):
                    raise TypeError
                dtype = np.dtype(dt)
                if (dtype.kind not in "biuf" or not isinstance(shape, list)
                        or len(shape) > 32 or not all(
                            isinstance(s, int) and 0 <= s <= len(raw) for s in shape)):
                    raise TypeError
                if math.prod(shape) * dtype.itemsize != len(raw):
                    raise TypeError
                return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
            except (TypeError, ValueError):
                raise ProtocolError("STATE: malformed array") from None
        raise ProtocolError(f"STATE: unknown tag {tag!r}")

