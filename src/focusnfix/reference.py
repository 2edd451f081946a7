"""The frozen model's reference per (prompt, seed): image Î0, latents, heatmaps and mask.

Training and evaluation both take their reference from here, so both build masks with the same
function from the same config.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from focusnfix import masks as mask_ops
from focusnfix.aspects import Aspect, build_aspect
from focusnfix.backbones import Backbone
from focusnfix.config import Config
from focusnfix.errors import InputError
from focusnfix.sampling import SamplingOptions, sample


def sampling_options(config: Config) -> SamplingOptions:
    s = config.sampling
    return SamplingOptions(**s.model_dump())


def build_aspects(config: Config) -> list[Aspect]:
    return [build_aspect(a.type, dict(a.args), a.name) for a in config.aspects]


# ---------------------------------------------------------------------------------------------
# Reference cache
# ---------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """Reference data of a batch: Î0 ``(B, 3, H, W)`` in [0, 1], its latents, heatmaps and mask."""

    images: torch.Tensor
    latents: torch.Tensor
    heatmap: torch.Tensor  # (B, 1, H, W): max over localizing aspects, for pictures and logs
    mask: torch.Tensor  # (B, 1, H, W) in [0, 1], 1 = may change


def compute_reference(
    backbone: Backbone,
    aspects: list[Aspect],
    localize: list[bool],
    prompts: list[str],
    seeds: list[int],
    options: SamplingOptions,
    mask_cfg: Any,
) -> Reference:
    """Î0 with the LoRA disabled, the union of the localizing aspects' masks, no gradient."""
    with torch.no_grad(), backbone.adapters_disabled():
        out = sample(backbone, prompts, seeds, options)
    images = out.images.float()
    size = tuple(images.shape[-2:])
    heatmaps, masks = [], []
    for aspect, loc in zip(aspects, localize, strict=True):
        if not loc:
            continue
        with torch.no_grad():
            hm = aspect.heatmap(images, prompts)
        _check_heatmap(hm, aspect, images.shape[0])
        hm = mask_ops.resize_heatmap(hm.float(), size)
        heatmaps.append(hm)
        masks.append(
            mask_ops.heatmap_to_mask(
                hm, size, mask_cfg.threshold_mode, mask_cfg.threshold, mask_cfg.dilate_px, mask_cfg.feather_px
            )
        )
    return Reference(images, out.latents.float(), mask_ops.union(heatmaps), mask_ops.union(masks))


def _check_heatmap(hm: torch.Tensor, aspect: Aspect, batch: int) -> None:
    if hm.dim() != 4 or hm.shape[0] != batch or hm.shape[1] != 1:
        raise InputError(f"aspect {aspect.name!r}: heatmap must be (B, 1, h, w), got {tuple(hm.shape)}")
    if not torch.isfinite(hm).all() or hm.min() < 0 or hm.max() > 1:
        raise InputError(f"aspect {aspect.name!r}: heatmap values must be finite and in [0, 1]")


class ReferenceCache:
    """Î0, latents, heatmap and mask per pool item, computed on first use and kept.

    Items missing from a batch are computed together, in batch order, so the reference of a
    batch seen first at step 0 is computed in exactly the policy's batch composition (bit-exact
    zero constraint for a zero LoRA). With ``directory`` set, items are also written there and
    read back on resume, so a resumed run sees the same references as an uninterrupted one.
    """

    def __init__(self, compute: Callable[[list[str], list[int]], Reference], directory: Path | None = None):
        self.compute = compute
        self.directory = directory
        self.items: dict[int, dict[str, torch.Tensor]] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        assert self.directory is not None
        return self.directory / f"item_{index:06d}.safetensors"

    def get(self, indices: list[int], prompts: list[str], seeds: list[int], device: torch.device) -> Reference:
        missing = [i for i, idx in enumerate(indices) if idx not in self.items]
        still = []
        for i in missing:
            if self.directory is not None and self._path(indices[i]).is_file():
                self.items[indices[i]] = load_file(str(self._path(indices[i])))
            else:
                still.append(i)
        if still:
            ref = self.compute([prompts[i] for i in still], [seeds[i] for i in still])
            for j, i in enumerate(still):
                item = {k: getattr(ref, k)[j].detach().cpu().contiguous() for k in ("images", "latents", "heatmap", "mask")}
                self.items[indices[i]] = item
                if self.directory is not None:
                    _atomic_save(item, self._path(indices[i]))
        stacked = {k: torch.stack([self.items[idx][k] for idx in indices]).to(device) for k in ("images", "latents", "heatmap", "mask")}
        return Reference(**stacked)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
