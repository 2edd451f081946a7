"""The frozen model's reference per (prompt, seed): image Î0, latents, heatmap and mask.

Training and evaluation both take their reference from here, so both build masks with the same
function from the same config.

This module also says what determines an item (:func:`reference_fields`: the sampling options
that shape Î0, a content hash of the model's weights, the localizing aspects and the mask
settings), which keys the cache of :mod:`focusnfix.cache`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from focusnfix import masks as mask_ops
from focusnfix.aspects import Aspect
from focusnfix.aspects.base import aspect_heatmap
from focusnfix.aspects.registry import build_aspect
from focusnfix.backbones import Backbone
from focusnfix.config import Config, MaskConfig
from focusnfix.errors import InputError
from focusnfix.sampling import SamplingOptions, sample

#: bump when the stored layout or the meaning of an item changes: old caches are rebuilt
CACHE_FORMAT = 2
#: sampling options that shape only the policy's gradient, never Î0
_GRADIENT_ONLY = ("grad_mode", "k", "lv_n", "checkpoint_unet", "checkpoint_vae", "merge_lora", "compile_unet")


def sampling_options(config: Config) -> SamplingOptions:
    """The run's sampling options (DDIM steps, guidance, size, gradient mode, the LoRA's active steps)."""
    return SamplingOptions(**config.sampling.model_dump(), lora_steps=config.lora.active_steps)


def build_aspects(config: Config) -> list[Aspect]:
    """The config's aspects, built in config order."""
    return [build_aspect(a.type, dict(a.args), a.name) for a in config.aspects]


# ---------------------------------------------------------------------------------------------
# Computing a reference
# ---------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """Reference data of a batch.

    Attributes:
        images: Î0 ``(B, 3, H, W)`` in [0, 1].
        latents: Î0's final latents ``(B, C, h, w)``.
        heatmap: ``(B, 1, H, W)`` in [0, 1]: maximum over the localizing aspects (pictures, logs).
        mask: ``(B, 1, H, W)`` in [0, 1], 1 = may change: union of the localizing aspects' masks.
        image_tolerance: how far the true Î0 may lie from ``images`` per pixel (0 = exact).
        latent_tolerance: the same for ``latents``, per element (None = exact).
        prefix_latents: with ``lora.active_steps``, the latents ``(B, C, h, w)`` after the frozen
            prefix (the first N - L steps), exact: the policy's chain starts there; else None.
    """

    images: torch.Tensor
    latents: torch.Tensor
    heatmap: torch.Tensor
    mask: torch.Tensor
    image_tolerance: float = 0.0
    latent_tolerance: torch.Tensor | None = None
    prefix_latents: torch.Tensor | None = None


def build_mask(heatmaps: list[torch.Tensor], size: tuple[int, int], mask_cfg: MaskConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmaps of the localizing aspects -> ``(heatmap, mask)``, both ``(B, 1, H, W)`` in [0, 1].

    The one place where a run's mask settings turn heatmaps into the mask (training, evaluation
    and ``focusnfix mask`` all call it): each heatmap is resized, thresholded, dilated and
    feathered; the mask is the union, the heatmap the pixel-wise maximum.
    """
    resized = [mask_ops.resize_heatmap(h.float(), size) for h in heatmaps]
    masks = [
        mask_ops.heatmap_to_mask(h, size, mask_cfg.threshold_mode, mask_cfg.threshold, mask_cfg.dilate_px, mask_cfg.feather_px)
        for h in resized
    ]
    return mask_ops.union(resized), mask_ops.union(masks)


def gate_value(aspect: Aspect, gate: float | str) -> float | None:
    """The reward at or above which ``aspect``'s mask is empty (None: no gate); see ``AspectConfig.gate``."""
    if gate == "off":
        return None
    if gate == "auto":
        return aspect.reward_threshold
    return float(gate)


def compute_reference(
    backbone: Backbone,
    aspects: list[Aspect],
    localize: list[bool],
    prompts: list[str],
    seeds: list[int],
    options: SamplingOptions,
    mask_cfg: MaskConfig,
    gates: list[float | str] | None = None,
) -> Reference:
    """Î0 with the LoRA disabled, its heatmap and mask (union of the localizing aspects), no gradient.

    ``gates`` (one per aspect, see :func:`gate_value`; default ``"auto"``): an aspect whose reward on
    an image is at or above its gate contributes an empty mask for that image (its heatmap is kept
    for pictures), so a clean image keeps the constraint everywhere.
    """
    with torch.no_grad(), backbone.adapters_disabled():
        out = sample(backbone, prompts, seeds, options)
    return reference_from_images(out.images, out.latents, aspects, localize, prompts, mask_cfg, gates,
                                 out.prefix_latents, seeds=seeds)


def reference_from_images(
    images: torch.Tensor,
    latents: torch.Tensor,
    aspects: list[Aspect],
    localize: list[bool],
    prompts: list[str],
    mask_cfg: MaskConfig,
    gates: list[float | str] | None = None,
    prefix_latents: torch.Tensor | None = None,
    seeds: Sequence[int] | None = None,
) -> Reference:
    """The reference of already sampled frozen-model images ``(B, 3, H, W)`` in [0, 1] and their
    latents (and frozen-prefix latents, ``SampleOutput.prefix_latents``): heatmaps, gates and
    masks exactly as :func:`compute_reference` makes them. ``seeds``: the images' initial-noise
    seeds, passed to each localizer's ``heatmap`` (user masks keyed by (prompt, seed)).

    The trainer uses it at step 0, where a zero LoRA's sample IS the frozen model's (bit for
    bit), to skip a second sampling pass.
    """
    images = images.detach().float()
    size = tuple(images.shape[-2:])
    gates = gates if gates is not None else ["auto"] * len(aspects)
    heatmaps, masks = [], []
    for aspect, loc, gate in zip(aspects, localize, gates, strict=True):
        if not loc:
            continue
        with torch.no_grad():
            hm = aspect_heatmap(aspect, images, prompts, seeds)
        _check_heatmap(hm, aspect, images.shape[0])
        heat, mask = build_mask([hm], size, mask_cfg)
        cut = gate_value(aspect, gate)
        if cut is not None:
            with torch.no_grad():
                clean = aspect.reward(images, prompts).float().reshape(-1) >= cut
            mask = torch.where(clean.view(-1, 1, 1, 1).to(mask.device), torch.zeros_like(mask), mask)
        heatmaps.append(heat)
        masks.append(mask)
    prefix = None if prefix_latents is None else prefix_latents.detach().float()
    return Reference(images, latents.detach().float(), mask_ops.union(heatmaps), mask_ops.union(masks),
                     prefix_latents=prefix)


def _check_heatmap(hm: torch.Tensor, aspect: Aspect, batch: int) -> None:
    if hm.dim() != 4 or hm.shape[0] != batch or hm.shape[1] != 1:
        raise InputError(f"aspect {aspect.name!r}: heatmap must be (B, 1, h, w), got {tuple(hm.shape)}")
    if not torch.isfinite(hm).all() or hm.min() < 0 or hm.max() > 1:
        raise InputError(f"aspect {aspect.name!r}: heatmap values must be finite and in [0, 1]")


# ---------------------------------------------------------------------------------------------
# Identity: what determines an item
# ---------------------------------------------------------------------------------------------
def hash_tensors(named: Iterable[tuple[str, torch.Tensor]], skip: Callable[[str], bool] = lambda _: False) -> str:
    """sha256 over names, dtypes, shapes and bytes of tensors (content identity of weights)."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        if skip(name):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _is_lora(name: str) -> bool:
    return "lora_" in name


def model_identity(backbone: Backbone) -> dict[str, str]:
    """Content hash of the pipeline's weights (LoRA parameters excluded) and scheduler config.

    Hashing the loaded weights, not a path, catches a model replaced in place, a hub revision
    that moved, and a different dtype; it costs about a second per GB of weights.
    """
    out: dict[str, str] = {}
    for name, component in sorted(backbone.pipe.components.items()):
        if isinstance(component, torch.nn.Module):
            out[name] = hash_tensors(component.state_dict().items(), skip=_is_lora)[:16]
    out["scheduler"] = hashlib.sha256(json.dumps(dict(backbone.scheduler.config), sort_keys=True, default=str).encode()).hexdigest()[:16]
    return out


def _file_digest(path: Path, h: Any) -> None:
    with path.open("rb") as f:  # streamed: weight files can be gigabytes
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def _file_hashes(value: Any) -> Any:
    """Identities of the files a config value names: a content hash of a file (a mask image, a
    weight file), the listing with sizes and modification times of a directory (a model folder,
    whose weights are hashed anyway through the aspect's state dict)."""
    if isinstance(value, dict):
        return {k: _file_hashes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_file_hashes(v) for v in value]
    if isinstance(value, str) and len(value) < 4096:
        p = Path(value)
        try:
            h = hashlib.sha256()
            if p.is_file():
                _file_digest(p, h)
                return h.hexdigest()[:16]
            if p.is_dir():
                for f in sorted(x for x in p.rglob("*") if x.is_file()):
                    st = f.stat()
                    h.update(f"{f.relative_to(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                return h.hexdigest()[:16]
        except OSError:
            return None
    return None


def reference_fields(config: Config, backbone: Backbone, aspects: list[Aspect], device: str,
                     mixed_precision: str | None = None) -> dict[str, Any]:
    """Everything besides (prompt, seed) that determines a reference item, as a JSON-able dict.

    ``mixed_precision``: the precision the run really uses (accelerate's when the config leaves it unset).
    """
    sampling = {k: v for k, v in config.sampling.model_dump(mode="json").items() if k not in _GRADIENT_ONLY}
    localizers = []
    for aspect, cfg in zip(aspects, config.aspects, strict=True):
        if cfg.localize:
            localizers.append(
                {
                    "type": cfg.type,
                    "name": aspect.name,
                    "gate": gate_value(aspect, cfg.gate),
                    "args": cfg.args,
                    "files": _file_hashes(cfg.args),
                    "weights": hash_tensors(aspect.state_dict().items())[:16],
                }
            )
    fields = {
        "format": CACHE_FORMAT,
        "model": model_identity(backbone),
        "sampling": sampling,
        "precision": {"mixed_precision": mixed_precision or config.train.mixed_precision or "no", "device": device},
        "aspects": localizers,
        "mask": config.mask.model_dump(mode="json"),
    }
    if config.lora.active_steps is not None:  # items then also hold the frozen prefix's latents
        fields["prefix_steps"] = max(config.sampling.num_inference_steps - config.lora.active_steps, 0)
    return fields


def fingerprint(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like trees differ (``["mask.threshold", ...]``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += changed_fields(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out += changed_fields(a, b, f"{prefix}.{i}" if prefix else str(i))
        return out
    return [] if old == new else [prefix or "(root)"]


__all__ = [
    "CACHE_FORMAT",
    "Reference",
    "build_aspects",
    "build_mask",
    "changed_fields",
    "compute_reference",
    "fingerprint",
    "gate_value",
    "hash_tensors",
    "model_identity",
    "reference_fields",
    "reference_from_images",
    "sampling_options",
]
