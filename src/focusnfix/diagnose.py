"""After-the-fact checks of an evaluation: where the fix happened, and whether the mask allowed it.

The claim tables say *whether* a method removed a defect (by the judge) and how much the rest of
the image changed, each averaged on its own. These checks join the two per image, and test the mask
against the judge's own localization. They read a finished evaluation directory (``images.npz``,
``per_image.json``, ``metrics.json``) and a localizing judge; they use held-out images and judges,
so they explain a result and must never choose a setting (docs/evaluation.md).

* ``mask_holds_judge_defect``: on base images the judge calls defective, the share of the pixels
  it localizes (heatmap >= 0.5) that lie inside the training mask (pooled, and per image).
* ``regional_removal_share``: the share of base-defect images whose defect is gone AND whose
  outside-mask PSNR vs base is >= ``min_psnr`` dB: a fix "only where it was wrong".
* ``inside_change_share``: on the images whose defect is gone, the share of the squared change
  vs base that lies inside the mask.
* ``composite_removal_share``: the judge's removal share on ``mask * method + (1 - mask) * base``,
  the method's pixels pasted into the base image inside the mask only: how often a fix exists
  within the mask (a lower bound: the paste leaves seams).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from focusnfix.errors import InputError
from focusnfix.evaluate import load_eval
from focusnfix.files import atomic_write_text


class LocalizingJudge(Protocol):
    def defect_probability(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...
    def defect_heatmap(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


def composite(base: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask * after + (1 - mask) * base``; images ``(N, 3, H, W)`` in [0, 1], mask ``(N, 1, H, W)`` in {0, 1}."""
    return mask * after + (1 - mask) * base


def outside_psnr(base: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB, peak 1) over the pixels outside ``mask``: ``(N,)``; 100 dB where nothing changed."""
    keep = 1 - mask
    mse = (((after - base) ** 2) * keep).flatten(1).sum(1) / (keep.flatten(1).sum(1) * base.shape[1]).clamp(min=1)
    return torch.where(mse > 0, 10 * torch.log10(1 / mse.clamp(min=1e-30)), torch.full_like(mse, 100.0))


def mask_holds_localized(heatmap: torch.Tensor, mask: torch.Tensor, defect: torch.Tensor,
                         level: float = 0.5) -> dict[str, float]:
    """How much of a judge's localized defect the mask holds.

    Args:
        heatmap: the judge's heatmap on the base images ``(N, 1, H, W)`` in [0, 1] (at image size).
        mask: the training masks ``(N, 1, H, W)``; ``> 0`` counts as inside.
        defect: ``(N,)`` bool, the judge's presence call on the base images.
        level: heatmap level at and above which a pixel is localized.

    Returns ``pooled`` (inside / all localized pixels), ``images_ge_95`` and ``images_lt_50`` (share
    of images with a localized pixel whose own share is >= 0.95 / < 0.5), ``n_images``.
    """
    loc = (heatmap >= level).float() * defect.view(-1, 1, 1, 1).float()
    inside = (loc * (mask > 0).float()).flatten(1).sum(1)
    total = loc.flatten(1).sum(1)
    has = total > 0
    if not has.any():
        nan = float("nan")
        return {"pooled": nan, "images_ge_95": nan, "images_lt_50": nan, "n_images": 0}
    share = inside[has] / total[has]
    return {"pooled": float(inside[has].sum() / total[has].sum()), "images_ge_95": float((share >= 0.95).float().mean()),
            "images_lt_50": float((share < 0.5).float().mean()), "n_images": int(has.sum())}


def fix_locality(base: torch.Tensor, after: torch.Tensor, mask: torch.Tensor, base_defect: torch.Tensor,
                 after_defect: torch.Tensor, composite_defect: torch.Tensor, min_psnr: float = 35.0) -> dict[str, Any]:
    """Where one method's fixes happened (see the module docstring); all shares over base-defect images.

    Args:
        base, after: ``(N, 3, H, W)`` in [0, 1]; mask ``(N, 1, H, W)`` in {0, 1}.
        base_defect, after_defect, composite_defect: ``(N,)`` bool judge calls on the base image,
            the method's image and :func:`composite`.
    """
    n = int(base_defect.sum())
    if n == 0:
        return {"n_base_defect": 0, "removal_share": None, "regional_removal_share": None,
                "median_outside_psnr_of_removals": None, "inside_change_share": None, "composite_removal_share": None}
    removed = base_defect & ~after_defect
    psnr = outside_psnr(base, after, mask)
    sq = (after - base) ** 2
    inside, total = (sq * mask).flatten(1).sum(1), sq.flatten(1).sum(1)
    return {
        "n_base_defect": n,
        "removal_share": float(removed.sum()) / n,
        "regional_removal_share": float((removed & (psnr >= min_psnr)).sum()) / n,
        "median_outside_psnr_of_removals": float(psnr[removed].median()) if removed.any() else None,
        "inside_change_share": float(inside[removed].sum() / total[removed].sum().clamp(min=1e-30)) if removed.any() else None,
        "composite_removal_share": float((base_defect & ~composite_defect).sum()) / n,
    }


def diagnose(eval_dir: str | Path, judge: LocalizingJudge, min_psnr: float = 35.0, batch_size: int = 64) -> dict[str, Any]:
    """The checks of the module docstring on a finished evaluation; writes ``EVAL_DIR/diagnostics.json``.

    Every training run of every method enters (its results are averaged over runs). Returns
    ``{"aspect", "min_psnr", "mask_holds_judge_defect": {...}, "methods": {name: {... averaged, "runs": [...]}}}``.
    """
    eval_dir = Path(eval_dir)
    for name in ("images.npz", "per_image.json", "metrics.json"):
        if not (eval_dir / name).is_file():
            raise InputError(f"{eval_dir} is not a finished evaluation directory: {name} is missing")
    metrics, z, per_image = load_eval(eval_dir)  # checks that the three files are of one evaluation
    items, aspect = per_image.get("items"), metrics.get("aspect")
    if not isinstance(items, list) or not all(isinstance(it, dict) and "prompt" in it for it in items):
        raise InputError(f"{eval_dir / 'per_image.json'}: expected an 'items' list of objects with a 'prompt'")
    if not isinstance(aspect, str):
        raise InputError(f"{eval_dir / 'metrics.json'}: expected the evaluated 'aspect' name")
    missing = [k for k in ("base", "mask") if k not in z]
    if missing:
        raise InputError(f"{eval_dir / 'images.npz'}: the arrays {missing} are missing (written by focusnfix eval)")
    prompts = [it["prompt"] for it in items]

    def load(key: str) -> torch.Tensor:
        return torch.from_numpy(z[key]).float() / 255

    base, mask = load("base"), (torch.from_numpy(z["mask"]) > 0).float()

    @torch.no_grad()
    def judged(images: torch.Tensor, heat: bool = False) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            x, p = images[i : i + batch_size], prompts[i : i + batch_size]
            if heat:
                h = judge.defect_heatmap(x, p).float()
                out.append(torch.nn.functional.interpolate(h, size=x.shape[-2:], mode="nearest"))
            else:
                out.append(judge.defect_probability(x, p).float().reshape(-1) > 0.5)
        return torch.cat(out)

    base_defect = judged(base)
    result: dict[str, Any] = {"eval_id": metrics.get("eval_id"), "aspect": aspect, "min_psnr": min_psnr,
                              "mask_holds_judge_defect": mask_holds_localized(judged(base, heat=True), mask, base_defect),
                              "methods": {}}
    methods = sorted({k.split("__")[1] for k in z if k.startswith("method__")})
    for method in methods:
        runs = [k for k in z if k == f"method__{method}" or k.startswith(f"method__{method}__run")]
        rows = []
        for key in runs:
            after = load(key)
            rows.append(fix_locality(base, after, mask, base_defect, judged(after), judged(composite(base, after, mask)),
                                     min_psnr))
        mean = {}
        for k in rows[0]:
            vals = [r[k] for r in rows if r[k] is not None]
            mean[k] = float(np.mean(vals)) if vals else None
        result["methods"][method] = {**mean, "runs": rows}
    atomic_write_text(eval_dir / "diagnostics.json", json.dumps(result, indent=2))
    return result


__all__ = ["composite", "diagnose", "fix_locality", "mask_holds_localized", "outside_psnr"]
