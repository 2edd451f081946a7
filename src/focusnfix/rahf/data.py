"""RichHF-18K TFRecords without TensorFlow, joined with Pick-a-Pic images.

The records are TFRecord files of ``tf.train.Example`` protobufs (:mod:`focusnfix.rahf.tfrecord`).

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
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from focusnfix.errors import InputError
from focusnfix.ops import resize
from focusnfix.rahf.tfrecord import encode_example, parse_example, read_tfrecord, write_tfrecord


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
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("L"))


def _encode_png(array: np.ndarray) -> bytes:
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
