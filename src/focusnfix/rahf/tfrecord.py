"""TFRecord files and ``tf.train.Example`` protobufs, read and written without TensorFlow.

TFRecord framing, per record::

    uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

with ``masked(crc) = ((crc >> 15 | crc << 17) + 0xa282ead8) mod 2**32``. ``data`` is a serialized
``tf.train.Example`` protobuf, decoded here by hand (it only needs the wire format:
``Example{1: Features{1: map<string, Feature>}}``, ``Feature{1: BytesList, 2: FloatList,
3: Int64List}``, each list ``{1: repeated value}``, packed or not).

Why not the ``tfrecord`` package: it parses ``tf.train.Example`` through protobuf classes generated
for one protobuf major version (a second protobuf pin next to transformers' and tensorboard's), and
RichHF-18K needs only this small read path; this reader verifies both CRCs and is tested on the
CRC-32C check value, the framing bytes and corrupted files (tests/test_rahf.py).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from focusnfix.errors import InputError

# optional accelerators of crc32c (not extras: the pure-Python fallback is exact, only slower)
try:
    import crc32c as _fast_crc32c  # type: ignore[import-not-found]
except ImportError:
    _fast_crc32c = None
try:
    import google_crc32c as _google_crc32c  # type: ignore[import-not-found]
except ImportError:
    _google_crc32c = None

# ---- crc32c ---------------------------------------------------------------------------------------
_CRC_TABLE: list[int] = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``; uses the ``crc32c`` or ``google-crc32c`` package when
    installed (fast), else pure Python (about 5-10 MB/s, enough for RichHF's small maps)."""
    if _fast_crc32c is not None:
        return _fast_crc32c.crc32c(data)
    if _google_crc32c is not None:
        return _google_crc32c.value(data)
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---- TFRecord framing -----------------------------------------------------------------------------
def read_tfrecord(path: str | Path, verify: bool = True) -> Iterator[bytes]:
    """Yield the payload of each record of a TFRecord file (uncompressed).

    Raises:
        InputError: truncated file or CRC mismatch (``verify``), naming the file and record.
    """
    path = Path(path)
    with open(path, "rb") as f:
        index = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise InputError(f"{path}: truncated TFRecord header at record {index}")
            (length,) = struct.unpack("<Q", header[:8])
            (length_crc,) = struct.unpack("<I", header[8:])
            if verify and masked_crc(header[:8]) != length_crc:
                raise InputError(f"{path}: record {index} has a bad length CRC (not a TFRecord file, or compressed?)")
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                raise InputError(f"{path}: truncated TFRecord data at record {index}")
            if verify and masked_crc(data) != struct.unpack("<I", footer)[0]:
                raise InputError(f"{path}: record {index} has a bad data CRC")
            yield data
            index += 1


def write_tfrecord(path: str | Path, records: list[bytes]) -> Path:
    """Write payloads as an uncompressed TFRecord file."""
    path = Path(path)
    with open(path, "wb") as f:
        for data in records:
            header = struct.pack("<Q", len(data))
            f.write(header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data)))
    return path


# ---- tf.train.Example wire format ---------------------------------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """Yield ``(field_number, wire_type, value)``: bytes for length-delimited and fixed, int for varints."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield num, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos)
            yield num, wire, buf[pos : pos + n]
            pos += n
        elif wire == 5:
            yield num, wire, buf[pos : pos + 4]
            pos += 4
        elif wire == 1:
            yield num, wire, buf[pos : pos + 8]
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_feature(buf: bytes) -> list:
    for num, _wire, value in _fields(buf):
        assert isinstance(value, bytes)
        if num == 1:  # BytesList
            return [v for n, _w, v in _fields(value) if n == 1]
        if num == 2:  # FloatList: packed (wire 2) or repeated fixed32 (wire 5)
            out: list = []
            for n, w, v in _fields(value):
                if n == 1:
                    out.extend(struct.unpack(f"<{len(v) // 4}f", v) if w == 2 else struct.unpack("<f", v))
            return out
        if num == 3:  # Int64List: packed or repeated varints
            out = []
            for n, w, v in _fields(value):
                if n != 1:
                    continue
                if w == 0:
                    out.append(_signed64(v))
                else:
                    pos = 0
                    while pos < len(v):
                        x, pos = _varint(v, pos)
                        out.append(_signed64(x))
            return out
    return []


def parse_example(data: bytes) -> dict[str, list]:
    """A serialized ``tf.train.Example`` -> ``{name: [values]}`` (bytes, floats or ints).

    Raises:
        ValueError: malformed protobuf.
    """
    result: dict[str, list] = {}
    for num, _w, features in _fields(data):
        if num != 1:
            continue
        for n, _w2, entry in _fields(features):  # map entries
            if n != 1:
                continue
            key, value = "", b""
            for en, _w3, ev in _fields(entry):
                if en == 1:
                    key = ev.decode("utf-8")
                elif en == 2:
                    value = ev
            result[key] = _parse_feature(value)
    return result


def _put_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _ld(num: int, payload: bytes) -> bytes:
    return _put_varint(num << 3 | 2) + _put_varint(len(payload)) + payload


def encode_example(features: dict[str, list]) -> bytes:
    """``{name: [values]}`` -> serialized ``tf.train.Example`` (the inverse of :func:`parse_example`).

    Values: a list of ``bytes``/``str`` (BytesList), ``float`` (FloatList, packed) or ``int``
    (Int64List, packed); a non-list value is wrapped in a list.
    """
    entries = b""
    for key, values in features.items():
        if not isinstance(values, (list, tuple)):
            values = [values]
        if values and isinstance(values[0], (bytes, str)):
            inner = b"".join(_ld(1, v.encode() if isinstance(v, str) else v) for v in values)
            feature = _ld(1, inner)
        elif values and isinstance(values[0], float):
            feature = _ld(2, _ld(1, struct.pack(f"<{len(values)}f", *values)))
        elif values and isinstance(values[0], int):
            feature = _ld(3, _ld(1, b"".join(_put_varint(v & ((1 << 64) - 1)) for v in values)))
        else:
            feature = _ld(1, b"")
        entries += _ld(1, _ld(1, key.encode()) + _ld(2, feature))
    return _ld(1, entries)


__all__ = ["crc32c", "encode_example", "masked_crc", "parse_example", "read_tfrecord", "write_tfrecord"]
