"""RichHF-18K TFRecords without TensorFlow, joined with Pick-a-Pic images.

TFRecord framing, per record::

    uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

with ``masked(crc) = ((crc >> 15 | crc << 17) + 0xa282ead8) mod 2**32``. ``data`` is a serialized
``tf.train.Example`` protobuf, decoded here by hand (it only needs the wire format:
``Example{1: Features{1: map<string, Feature>}}``, ``Feature{1: BytesList, 2: FloatList,
3: Int64List}``, each list ``{1: repeated value}``, packed or not).

RichHF-18K fields (one record per image): ``filename`` (bytes: the Pick-a-Pic image name),
``artifact_score``, ``misalignment_score``, ``aesthetics_score``, ``overall_score`` (floats,
higher = better), ``artifact_map``, ``misalignment_map`` (PNG/JPEG bytes, 512 x 512, 0-255),
``prompt_misalignment_label`` (bytes: space-separated 0/1 per prompt word, 0 = misaligned).
The records hold no images and no prompts: images are read from a directory of Pick-a-Pic
images by ``filename``; prompts (Pick-a-Pic captions) from a ``prompt``/``caption`` field if a
record has one, else a captions file (JSON ``{filename: caption}`` or JSON lines with
``filename`` and ``caption``), else a ``<image stem>.txt`` beside the image.
"""

from __future__ import annotations

import glob
import io
import json
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from focusnfix.errors import InputError
from focusnfix.ops import resize

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
    try:
        import crc32c as _fast  # type: ignore[import-not-found]

        return _fast.crc32c(data)
    except ImportError:
        pass
    try:
        import google_crc32c  # type: ignore[import-not-found]

        return google_crc32c.value(data)
    except ImportError:
        pass
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


# ---- RichHF records ---------------------------------------------------------------------------------
@dataclass
class RichHFRecord:
    """One RichHF-18K example.

    Attributes:
        filename: Pick-a-Pic image file name.
        scores: ``{"plausibility", "alignment", "aesthetics", "overall"}`` from ``artifact_score``,
            ``misalignment_score``, ``aesthetics_score``, ``overall_score`` (higher = better).
        artifact_map, misalignment_map: ``(H, W)`` uint8 arrays, 0-255 (512 x 512 in RichHF-18K).
        token_labels: per prompt word, 1 = aligned, 0 = misaligned.
        prompt: the caption if the record carries one (RichHF-18K does not).
    """

    filename: str
    scores: dict[str, float]
    artifact_map: np.ndarray
    misalignment_map: np.ndarray
    token_labels: list[int]
    prompt: str | None = None


SCORE_FIELDS = {
    "plausibility": "artifact_score",
    "alignment": "misalignment_score",
    "aesthetics": "aesthetics_score",
    "overall": "overall_score",
}


def _decode_map(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("L"))


def _encode_png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def record_from_example(ex: dict[str, list], where: str = "record") -> RichHFRecord:
    """Parsed example -> :class:`RichHFRecord`. Raises InputError naming a missing field."""
    required = ["filename", "artifact_map", "misalignment_map", *SCORE_FIELDS.values()]
    missing = [k for k in required if not ex.get(k)]
    if missing:
        raise InputError(f"{where}: RichHF field(s) {missing} missing")
    labels = ex.get("prompt_misalignment_label") or [b""]
    prompt = (ex.get("prompt") or ex.get("caption") or [None])[0]
    return RichHFRecord(
        filename=ex["filename"][0].decode("utf-8"),
        scores={k: float(ex[f][0]) for k, f in SCORE_FIELDS.items()},
        artifact_map=_decode_map(ex["artifact_map"][0]),
        misalignment_map=_decode_map(ex["misalignment_map"][0]),
        token_labels=[int(t) for t in labels[0].decode().split()],
        prompt=prompt.decode("utf-8") if isinstance(prompt, bytes) else prompt,
    )


def record_to_example(rec: RichHFRecord) -> bytes:
    """:class:`RichHFRecord` -> serialized ``tf.train.Example`` in RichHF-18K's layout."""
    feats: dict[str, list] = {
        "filename": [rec.filename.encode()],
        **{f: [float(rec.scores[k])] for k, f in SCORE_FIELDS.items()},
        "artifact_map": [_encode_png(rec.artifact_map)],
        "misalignment_map": [_encode_png(rec.misalignment_map)],
        "prompt_misalignment_label": [" ".join(str(t) for t in rec.token_labels).encode()],
    }
    if rec.prompt is not None:
        feats["prompt"] = [rec.prompt.encode()]
    return encode_example(feats)


def write_richhf(path: str | Path, records: list[RichHFRecord]) -> Path:
    """Write RichHF-layout records to a TFRecord file (used by tests and for small subsets)."""
    return write_tfrecord(path, [record_to_example(r) for r in records])


def expand_tfrecords(pattern: str) -> list[Path]:
    """A glob (or one path) -> sorted TFRecord files. Raises InputError when nothing matches."""
    files = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser())))
    files = [f for f in files if f.is_file()]
    if not files:
        raise InputError(f"--tfrecords {pattern!r} matches no file")
    return files


def read_richhf(pattern: str, verify: bool = True) -> Iterator[RichHFRecord]:
    """Every record of every TFRecord file matching ``pattern``."""
    for path in expand_tfrecords(pattern):
        for i, data in enumerate(read_tfrecord(path, verify)):
            try:
                ex = parse_example(data)
            except (ValueError, UnicodeDecodeError) as err:
                raise InputError(f"{path}: record {i} is not a tf.train.Example: {err}") from err
            yield record_from_example(ex, f"{path} record {i}")


# ---- the training dataset -------------------------------------------------------------------------
IMAGE_SUFFIXES = ("", ".png", ".jpg", ".jpeg", ".webp")


def load_captions(path: str | Path | None) -> dict[str, str]:
    """``{filename: caption}`` from a JSON object or JSON lines (``filename`` + ``caption``/``prompt``)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--captions {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
    except json.JSONDecodeError:
        pass
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["filename"])] = str(row.get("caption", row.get("prompt")))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{path}:{n}: expected a JSON object with 'filename' and 'caption'") from err
    return out


class RichHFDataset(torch.utils.data.Dataset):
    """RichHF-18K records joined with their images and prompts, as tensors.

    Each item is a dict: ``image (3, S, S)`` in [0, 1] (resized to ``image_size``), ``prompt``
    (str), ``maps (2, M, M)`` in [0, 1] (implausibility = artifact map, misalignment map; resized
    to ``map_size``), ``scores (4,)`` (plausibility, alignment, aesthetics, overall), ``filename``.

    Records whose image is missing are skipped with one warning; none found is an InputError.
    """

    def __init__(
        self, tfrecords: str, images_dir: str | Path, image_size: int, map_size: int,
        captions: str | Path | None = None, verify_crc: bool = True,
    ) -> None:
        self.images_dir = Path(images_dir).expanduser()
        if not self.images_dir.is_dir():
            raise InputError(f"--images {self.images_dir} is not a directory")
        self.image_size, self.map_size = image_size, map_size
        caps = load_captions(captions)
        self.items: list[tuple[RichHFRecord, Path, str]] = []
        missing_image, missing_prompt = [], []
        for rec in read_richhf(tfrecords, verify_crc):
            image = self._find_image(rec.filename)
            if image is None:
                missing_image.append(rec.filename)
                continue
            prompt = rec.prompt or caps.get(rec.filename) or caps.get(Path(rec.filename).name)
            if prompt is None and image.with_suffix(".txt").is_file():
                prompt = image.with_suffix(".txt").read_text().strip()
            if prompt is None:
                missing_prompt.append(rec.filename)
                continue
            self.items.append((rec, image, prompt))
        if missing_image or missing_prompt:
            warnings.warn(
                f"RichHF: skipped {len(missing_image)} record(s) without an image in {self.images_dir} "
                f"(e.g. {missing_image[:2]}) and {len(missing_prompt)} without a prompt (e.g. {missing_prompt[:2]})",
                stacklevel=2,
            )
        if not self.items:
            raise InputError(
                f"no usable RichHF record: images must be in {self.images_dir} (by filename) and prompts in the "
                "record, a --captions file, or <image>.txt"
            )

    def _find_image(self, filename: str) -> Path | None:
        base = self.images_dir / filename
        for suffix in IMAGE_SUFFIXES:
            p = base.with_name(base.name + suffix) if suffix else base
            if p.is_file():
                return p
        stem = self.images_dir / Path(filename).stem
        for suffix in IMAGE_SUFFIXES[1:]:
            if stem.with_suffix(suffix).is_file():
                return stem.with_suffix(suffix)
        return None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        rec, path, prompt = self.items[index]
        with Image.open(path) as im:
            image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255.0
        image = resize(image[None], (self.image_size, self.image_size), antialias=True)[0].clamp(0, 1)
        maps = torch.from_numpy(np.stack([rec.artifact_map, rec.misalignment_map])).float() / 255.0
        maps = resize(maps[None], (self.map_size, self.map_size), antialias=True)[0].clamp(0, 1)
        scores = torch.tensor([rec.scores[k] for k in SCORE_FIELDS], dtype=torch.float32)
        return {"image": image, "prompt": prompt, "maps": maps, "scores": scores, "filename": rec.filename}


def collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([i["image"] for i in items]),
        "prompt": [i["prompt"] for i in items],
        "maps": torch.stack([i["maps"] for i in items]),
        "scores": torch.stack([i["scores"] for i in items]),
        "filename": [i["filename"] for i in items],
    }
