"""Localizer calibration: how well an aspect's heatmap -> mask covers known defect pixels.

A Focus-N-Fix mask must contain the defect (else the constraint forbids the fix) and little
else (else it stops protecting the image). Given images whose defect pixels are known (the toy
world's generator draws them with exact masks), :func:`calibrate` measures, for every mask
setting of a grid, on the images that HAVE a defect:

* ``recall``: defect pixels inside the mask / all defect pixels (pooled over images);
* ``area_ratio``: mask pixels / defect pixels (pooled), 1 = the mask is exactly the defect;
* ``image_recall_95``: share of images whose own recall is >= 0.95;

and, for the gate (a mask is empty where the aspect's reward says "no defect"):

* ``defect_masked_share``: share of defect images whose mask is not empty after the gate;
* ``clean_empty_share``: share of clean images whose mask is empty after the gate.

:func:`choose` then picks a setting by a rule stated in advance: the smallest ``area_ratio``
among the settings with ``recall >= min_recall`` and ``image_recall_95 >= min_recall`` (pooled
recall alone lets a few images lose part of their defect), or the highest recall if none does.
Calibration uses training-split images only; never judges or held-out prompts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from focusnfix.config import MaskConfig
from focusnfix.reference import build_mask


def mask_coverage(mask: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Pooled recall and area ratio of ``mask`` against ``truth`` (both ``(N, 1, H, W)`` in [0, 1]).

    A pixel counts as masked when ``mask > 0`` (soft edges may change too). Only images with a
    non-empty ``truth`` enter; returns NaNs when there are none.
    """
    m = (mask > 0).flatten(1).float()
    t = (truth > 0).flatten(1).float()
    has = t.sum(1) > 0
    if not has.any():
        nan = float("nan")
        return {"recall": nan, "area_ratio": nan, "image_recall_95": nan}
    m, t = m[has], t[has]
    inside = (m * t).sum(1)
    return {
        "recall": float(inside.sum() / t.sum()),
        "area_ratio": float(m.sum() / t.sum()),
        "image_recall_95": float((inside / t.sum(1) >= 0.95).float().mean()),
    }


def calibrate(
    heatmaps: torch.Tensor,
    rewards: torch.Tensor,
    truth: torch.Tensor,
    settings: Iterable[MaskConfig],
    gate: float | None,
) -> list[dict[str, Any]]:
    """Coverage of every mask setting; one row per setting.

    Args:
        heatmaps: the aspect's heatmaps ``(N, 1, h, w)`` in [0, 1].
        rewards: the aspect's rewards ``(N,)`` (for the gate).
        truth: defect masks ``(N, 1, H, W)`` in {0, 1}; an all-zero mask = a clean image.
        settings: mask settings to try (threshold mode and value, dilation, feather).
        gate: reward at or above which the mask is emptied (None: no gate).

    Returns:
        Rows ``{"mask": MaskConfig as dict, "gate", "recall", "area_ratio", "image_recall_95",
        "defect_masked_share", "clean_empty_share", "n_defect", "n_clean"}``.
    """
    size = tuple(truth.shape[-2:])
    defect = truth.flatten(1).amax(1) > 0
    clean_by_gate = (rewards.float().reshape(-1) >= gate) if gate is not None else torch.zeros_like(defect)
    rows = []
    for cfg in settings:
        _, mask = build_mask([heatmaps], size, cfg)
        mask = torch.where(clean_by_gate.view(-1, 1, 1, 1), torch.zeros_like(mask), mask)
        nonempty = mask.flatten(1).amax(1) > 0
        row: dict[str, Any] = {"mask": cfg.model_dump(), "gate": gate, **mask_coverage(mask, truth)}
        row["defect_masked_share"] = float(nonempty[defect].float().mean()) if defect.any() else float("nan")
        row["clean_empty_share"] = float((~nonempty[~defect]).float().mean()) if (~defect).any() else float("nan")
        row["n_defect"], row["n_clean"] = int(defect.sum()), int((~defect).sum())
        rows.append(row)
    return rows


def choose(rows: list[dict[str, Any]], min_recall: float = 0.95) -> dict[str, Any]:
    """The smallest ``area_ratio`` among rows with ``recall`` and ``image_recall_95`` both
    ``>= min_recall``; else the row with the highest recall."""
    ok = [r for r in rows if r["recall"] >= min_recall and r["image_recall_95"] >= min_recall]  # NaN fails
    if ok:
        return min(ok, key=lambda r: (r["area_ratio"], -r["recall"]))
    return max(rows, key=lambda r: (r["recall"], -r["area_ratio"]))


def grid(
    modes_thresholds: Iterable[tuple[str, float]] = (
        ("relative", 0.2), ("relative", 0.3), ("relative", 0.5), ("absolute", 0.2), ("absolute", 0.35),
        ("absolute", 0.5),
    ),
    dilations: Iterable[int] = (0, 1, 2, 3, 4),
) -> list[MaskConfig]:
    """The default grid of mask settings (hard masks: feathering only adds area)."""
    return [MaskConfig(threshold_mode=m, threshold=t, dilate_px=d) for m, t in modes_thresholds for d in dilations]


__all__ = ["calibrate", "choose", "grid", "mask_coverage"]
