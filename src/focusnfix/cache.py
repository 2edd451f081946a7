"""The reference cache: Î0, latents, heatmap and mask per (prompt, seed), compact, content-keyed.

:class:`ReferenceCache` stores each item compactly (uint8 image and heatmap, fp16 latents,
bit-packed mask) under a key that hashes the prompt, the seed and everything else that determines
the item (:func:`focusnfix.reference.reference_fields`). A stale item can therefore never be read
for a new config; a changed field is named once, when the folder's manifest no longer matches,
and the folder's items are rebuilt.

Quantizing Î0 to uint8 (and latents to fp16) keeps the cache small; the regional constraint then
ignores differences within half a quantization step (``Reference.image_tolerance``), the
uncertainty of the stored value, so a zero LoRA still gives an exactly zero constraint.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from focusnfix.errors import InputError
from focusnfix.files import atomic_write, atomic_write_text
from focusnfix.reference import CACHE_FORMAT, Reference, changed_fields, fingerprint

#: half a uint8 step plus a margin for float rounding and batch-composition noise (1e-5 is
#: 0.003 of a grey level): the true Î0 lies within this of the stored one
IMAGE_TOLERANCE = 0.5 / 255 + 1e-5
#: fp16 rounds to 11 significant bits: |x - fp16(x)| <= 2^-11 |x|; 2^-10 leaves a margin
LATENT_RELATIVE_TOLERANCE = 2.0**-10


# ---------------------------------------------------------------------------------------------
# Compact storage of one item
# ---------------------------------------------------------------------------------------------
def encode_item(images: torch.Tensor, latents: torch.Tensor, heatmap: torch.Tensor, mask: torch.Tensor,
                prefix_latents: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One item -> compact tensors: uint8 image ``(3, H, W)`` and heatmap ``(1, H, W)``,
    fp16 latents, the mask as packed bits when it is binary (uint8 levels when soft), and the
    frozen prefix's latents in float32 when given (the policy starts from them: exact)."""
    lat16 = latents.detach().to(torch.float16).cpu().contiguous()
    if not torch.isfinite(lat16).all():
        raise InputError("reference latents overflow float16; the model's latents are out of the usual range")
    item = {
        "image": _to_u8(images),
        "latents": lat16,
        "heatmap": _to_u8(heatmap),
        "mask_shape": torch.tensor(list(mask.shape), dtype=torch.int64),
    }
    m = mask.detach().float().cpu()
    if bool(((m == 0) | (m == 1)).all()):
        item["mask_bits"] = torch.from_numpy(np.packbits(m.numpy().astype(np.uint8).reshape(-1)))
    else:
        item["mask_u8"] = _to_u8(m)
    if prefix_latents is not None:
        item["prefix_latents"] = prefix_latents.detach().float().cpu().contiguous()
    return item


def decode_item(item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_item`: float32 ``image``, ``latents``, ``heatmap``, ``mask`` (and
    ``prefix_latents`` where stored)."""
    shape = [int(x) for x in item["mask_shape"].tolist()]
    if "mask_bits" in item:
        n = int(np.prod(shape))
        bits = np.unpackbits(item["mask_bits"].numpy())[:n]
        mask = torch.from_numpy(bits.astype(np.float32)).reshape(shape)
    else:
        mask = item["mask_u8"].float() / 255
    out = {
        "images": item["image"].float() / 255,
        "latents": item["latents"].float(),
        "heatmap": item["heatmap"].float() / 255,
        "mask": mask,
    }
    if "prefix_latents" in item:
        out["prefix_latents"] = item["prefix_latents"]
    return out


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).contiguous()


def _glibc_trim() -> Callable[[], None]:
    """``malloc_trim(0)`` where glibc provides it, else a no-op.

    An epoch streams ~1 MB items through the LRU; glibc serves such sizes from its heap once
    its dynamic mmap threshold has risen, and the freed holes are not returned to the system,
    so RSS grew by ~1 GB per 1,000 items read (measured, benchmarks/cache_memory.py). Trimming
    after each computed batch and every few evictions keeps RSS near the LRU's size."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    return (lambda: trim(0)) if trim is not None else (lambda: None)


_release_freed_memory = _glibc_trim()
#: evictions between two malloc_trim calls
_TRIM_EVERY = 8


def item_nbytes(item: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in item.values())


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------
class ReferenceCache:
    """Reference items keyed by content, on disk (read lazily) with a small in-RAM LRU.

    Args:
        compute: ``(prompts, seeds) -> Reference`` of the frozen model (uncompressed).
        fields: what determines an item besides (prompt, seed) (:func:`reference_fields`).
        directory: where items live (``<key>.safetensors`` plus ``manifest.json``); None keeps
            every item in RAM (compact, grows with the pool).
        ram_items: how many compact items the LRU holds when ``directory`` is set.
        manage: this process writes the manifest and removes stale items (the main process;
            other processes of a multi-process run only read and add items).
        announce: where one-line notices go (a changed field, a rebuild).

    Items missing from a batch are computed together, in batch order. Every item is returned
    through its compact form, also right after it was computed, so a run reads the same
    reference whether an item came from RAM, disk or a fresh computation.
    """

    def __init__(
        self,
        compute: Callable[[list[str], list[int]], Reference],
        fields: dict[str, Any],
        directory: Path | None = None,
        ram_items: int = 256,
        manage: bool = True,
        announce: Callable[[str], None] = print,
    ) -> None:
        self.compute = compute
        self.fields = fields
        self.fingerprint = fingerprint(fields)
        self.directory = directory
        self.ram_items = ram_items if directory is not None else None
        self.ram: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.stats = {"computed": 0, "disk": 0, "ram": 0}
        self.manage = manage
        self.announce = announce
        self._evictions = 0
        self._opened = False

    # -- manifest ----------------------------------------------------------------------------
    def open(self) -> None:
        """Check the folder's manifest: announce changed fields, drop stale items, write it.

        Called once by the managing process before items are read (the trainer calls it before
        other processes start; a single process calls it on first use)."""
        self._opened = True
        if self.directory is None or not self.manage:
            return
        directory, announce = self.directory, self.announce
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / "manifest.json"
        old = None
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = None
        stale = any(directory.glob("*.safetensors")) and (old is None or old.get("fingerprint") != self.fingerprint)
        if stale:
            what = changed_fields(old.get("fields") if old else None, self.fields) if old else ["manifest missing"]
            announce(
                f"reference cache {directory}: {', '.join(what[:6])}{' ...' if len(what) > 6 else ''} changed "
                "since its items were made; rebuilding them"
            )
            for f in directory.glob("*.safetensors"):
                f.unlink()
        if old is None or old.get("fingerprint") != self.fingerprint:
            doc = {"format": CACHE_FORMAT, "fingerprint": self.fingerprint, "fields": self.fields}
            atomic_write_text(manifest, json.dumps(doc, indent=1, default=str))

    # -- items -------------------------------------------------------------------------------
    def key(self, prompt: str, seed: int) -> str:
        """Content key of one item: a hash of (prompt, seed, everything in ``fields``)."""
        doc = json.dumps({"fingerprint": self.fingerprint, "prompt": prompt, "seed": int(seed)})
        return hashlib.sha256(doc.encode()).hexdigest()[:40]

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{key}.safetensors"

    def _remember(self, key: str, item: dict[str, torch.Tensor]) -> None:
        self.ram[key] = item
        self.ram.move_to_end(key)
        while self.ram_items is not None and len(self.ram) > self.ram_items:
            self.ram.popitem(last=False)
            self._evictions += 1
            if self._evictions % _TRIM_EVERY == 0:
                _release_freed_memory()

    def _lookup(self, key: str) -> dict[str, torch.Tensor] | None:
        if key in self.ram:
            self.ram.move_to_end(key)
            self.stats["ram"] += 1
            return self.ram[key]
        if self.directory is not None and self._path(key).is_file():
            try:
                item = load(self._path(key).read_bytes())
            except (SafetensorError, OSError):
                return None  # a damaged file: recompute and overwrite it
            self.stats["disk"] += 1
            self._remember(key, item)
            return item
        return None

    def missing(self, prompts: list[str], seeds: list[int]) -> list[int]:
        """Indices of the (prompt, seed) pairs that are not cached yet."""
        if not self._opened:
            self.open()
        return [i for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)) if self._lookup(self.key(p, s)) is None]

    def add(self, prompts: list[str], seeds: list[int], ref: Reference) -> None:
        """Store the items of an already computed reference batch (in batch order)."""
        if not self._opened:
            self.open()
        self.stats["computed"] += len(prompts)
        for j, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
            key = self.key(p, s)
            prefix = None if ref.prefix_latents is None else ref.prefix_latents[j]
            item = encode_item(ref.images[j], ref.latents[j], ref.heatmap[j], ref.mask[j], prefix)
            if self.directory is not None:
                atomic_write(self._path(key), lambda tmp, item=item: save_file(item, tmp))
            self._remember(key, item)

    def fill(self, prompts: list[str], seeds: list[int]) -> None:
        """Compute (in one batch, in the given order) and store the items not yet cached."""
        todo = self.missing(prompts, seeds)
        if not todo:
            return
        ps, ss = [prompts[i] for i in todo], [seeds[i] for i in todo]
        ref = self.compute(ps, ss)
        self.add(ps, ss, ref)
        del ref
        _release_freed_memory()  # the model's batch buffers, freed just now (cheap next to computing)

    def get(self, prompts: list[str], seeds: list[int], device: torch.device | str = "cpu") -> Reference:
        """The batch's reference (computing what is missing), on ``device``."""
        self.fill(prompts, seeds)
        items = []
        for p, s in zip(prompts, seeds, strict=True):
            item = self._lookup(self.key(p, s))
            assert item is not None
            items.append(decode_item(item))
        keys = ["images", "latents", "heatmap", "mask"] + (["prefix_latents"] if "prefix_latents" in items[0] else [])
        stacked = {k: torch.stack([it[k] for it in items]).to(device) for k in keys}
        tol = stacked["latents"].abs() * LATENT_RELATIVE_TOLERANCE + 1e-6
        return Reference(**stacked, image_tolerance=IMAGE_TOLERANCE, latent_tolerance=tol)

    def ram_bytes(self) -> int:
        """Bytes held by the in-RAM items."""
        return sum(item_nbytes(it) for it in self.ram.values())


__all__ = ["IMAGE_TOLERANCE", "LATENT_RELATIVE_TOLERANCE", "ReferenceCache", "decode_item", "encode_item", "item_nbytes"]
