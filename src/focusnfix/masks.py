"""Heatmap -> mask, as pure tensor functions.

A heatmap ``(B, 1, h, w)`` in [0, 1] says where the frozen model's image is bad (1 = bad).
The mask ``(B, 1, H, W)`` in [0, 1] says where the fine-tuned image may change (1 = may
change); the regional constraint penalises change where the mask is 0.

Pipeline: resize to the image -> threshold (binary) -> dilate (pixels) -> feather (soft edge
outside the region, optional). Several aspects: the union (pixel-wise maximum) of their masks.
An empty mask means "change nothing here": the constraint then covers the whole image.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from focusnfix.ops import dilate, gaussian_blur

ThresholdMode = Literal["absolute", "relative", "quantile"]


def resize_heatmap(heatmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(B, 1, h, w)`` to ``size = (H, W)``; values stay in [0, 1]."""
    _check_heatmap(heatmap)
    if tuple(heatmap.shape[-2:]) == tuple(size):
        return heatmap.float()
    out = F.interpolate(heatmap.float(), size=size, mode="bilinear", align_corners=False)
    return out.clamp(0.0, 1.0)


def threshold_heatmap(heatmap: torch.Tensor, mode: ThresholdMode, threshold: float) -> torch.Tensor:
    """Binary mask ``(B, 1, H, W)`` in {0, 1} from a heatmap in [0, 1].

    Modes:
        ``absolute``: ``heatmap >= threshold``.
        ``relative``: ``heatmap >= threshold * max(heatmap_b)`` per image; an all-zero
            heatmap gives an empty mask.
        ``quantile``: ``heatmap >= quantile_b(threshold)`` per image, i.e. the top
            ``1 - threshold`` fraction of pixels; an all-zero heatmap gives an empty mask.
    """
    _check_heatmap(heatmap)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"mask threshold must be in [0, 1], got {threshold}")
    if mode == "absolute":
        return (heatmap >= threshold).float()
    flat = heatmap.flatten(1)
    peak = flat.amax(dim=1).view(-1, 1, 1, 1)
    if mode == "relative":
        cut = threshold * peak
    elif mode == "quantile":
        cut = torch.quantile(flat.float(), threshold, dim=1).view(-1, 1, 1, 1)
    else:
        raise ValueError(f"mask threshold mode must be absolute, relative or quantile, got {mode!r}")
    # strictly positive where the heatmap is all zero: nothing is problematic there
    return ((heatmap >= cut) & (peak > 0)).float()


def feather(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Soft edge: ``max(mask, blur(mask))``. The region stays 1; the border falls off outside it."""
    if sigma < 0:
        raise ValueError(f"feather sigma must be >= 0 pixels, got {sigma}")
    if sigma == 0:
        return mask
    return torch.maximum(mask, gaussian_blur(mask, sigma)).clamp(0.0, 1.0)


def heatmap_to_mask(
    heatmap: torch.Tensor,
    size: tuple[int, int],
    mode: ThresholdMode = "relative",
    threshold: float = 0.5,
    dilate_px: int = 0,
    feather_px: float = 0.0,
) -> torch.Tensor:
    """Full heatmap -> mask path.

    Args:
        heatmap: ``(B, 1, h, w)`` in [0, 1], 1 = problematic.
        size: ``(H, W)`` of the images the mask applies to.
        mode, threshold: see :func:`threshold_heatmap`.
        dilate_px: dilation radius in image pixels.
        feather_px: Gaussian sigma in pixels of the soft edge (0 = hard mask).

    Returns:
        ``(B, 1, H, W)`` in [0, 1], 1 = may change.
    """
    binary = threshold_heatmap(resize_heatmap(heatmap, size), mode, threshold)
    return feather(dilate(binary, dilate_px), feather_px)


def union(masks: list[torch.Tensor]) -> torch.Tensor:
    """Pixel-wise maximum of several ``(B, 1, H, W)`` masks (the union of their regions)."""
    if not masks:
        raise ValueError("union of no masks")
    out = masks[0]
    for m in masks[1:]:
        if m.shape != out.shape:
            raise ValueError(f"cannot unite masks of shapes {tuple(out.shape)} and {tuple(m.shape)}")
        out = torch.maximum(out, m)
    return out


def mask_area(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of each image that may change: ``(B, 1, H, W) -> (B,)`` in [0, 1]."""
    return mask.flatten(1).float().mean(dim=1)


def _check_heatmap(heatmap: torch.Tensor) -> None:
    if heatmap.dim() != 4 or heatmap.shape[1] != 1:
        raise ValueError(f"heatmap must be (B, 1, h, w), got {tuple(heatmap.shape)}")
