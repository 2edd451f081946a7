"""Calibrate the toy aspects' localizers against the generator's exact defect masks.

The calibration set is drawn from TRAINING captions only: scenes with the aspect's defect in the
form the base pipeline draws it (:data:`~focusnfix.toyworld.forms.BASE_FORM`) for about half of
them, clean otherwise, passed through the toy VAE and given the look of the pipeline's samples
(:func:`~focusnfix.toyworld.build_models.sample_like`). Masks are computed on the base model's
images, so the base form is the one that matters.

``focusnfix toyworld calibrate --aspect safety`` runs it and prints the chosen setting; the
numbers are in docs/evaluation.md.
"""

from __future__ import annotations

from typing import Any

import torch

from focusnfix import calibration
from focusnfix.aspects import Aspect
from focusnfix.aspects.saliency import SaliencyAspect
from focusnfix.toyworld import SALIENCY_LOCALIZERS
from focusnfix.toyworld.forms import BASE_FORM, forms_dataset

#: where calibration images come from (see :func:`calibration_set`)
SOURCES = ("renders", "pipeline")


def calibration_set(aspect: str, n: int = 512, seed: int = 7,
                    source: str = "renders") -> dict[str, torch.Tensor | list[str]]:
    """``{"images" (N, 3, 64, 64) in [0, 1], "masks" (N, 1, 64, 64) in {0, 1}, "captions"}``, training captions.

    ``source="renders"``: generator renders through the VAE with the sample look (exact masks).
    ``source="pipeline"``: ``n // 2`` renders (about half with the base-form defect) and their
    fixed twins, each pair passed through the base pipeline image-to-image with the same noise
    (:func:`~focusnfix.toyworld.sdedit.sdedit_forms_dataset`); the mask is where the two outputs
    still differ, i.e. the defect as the pipeline itself draws it (soft, haloed, moved a little),
    which is what a mask on the base model's samples must cover.
    """
    from focusnfix.backbones import load_backbone
    from focusnfix.toyworld.build_models import reconstruct, sample_like

    if source not in SOURCES:
        raise ValueError(f"calibration source must be one of {SOURCES}, got {source!r}")
    if source == "pipeline":
        from focusnfix.toyworld.sdedit import sdedit_forms_dataset

        data = sdedit_forms_dataset(load_backbone("toy"), n // 2, seed, aspect, forms=(BASE_FORM[aspect],))
        return {"images": data["images"], "masks": data["masks"], "captions": list(data["captions"])}
    data = forms_dataset(n, seed, aspect, split="train", p_defect=0.5, forms=(BASE_FORM[aspect],))
    vae = load_backbone("toy").vae
    images = reconstruct(vae, data["images"]).float()
    images = sample_like(images, data["objects"].float(), torch.Generator().manual_seed(seed))
    return {"images": images, "masks": data["masks"], "captions": list(data["captions"])}


def localizers(aspect_name: str) -> dict[str, Aspect]:
    """The packaged aspect (as ``"packaged"``) and, for the saliency-localized safety rewards,
    the alternatives of :data:`SALIENCY_LOCALIZERS` on the same reward model."""
    from focusnfix import toyworld

    packaged = toyworld.load_aspect(aspect_name)
    out: dict[str, Aspect] = {"packaged": packaged}
    if isinstance(packaged, SaliencyAspect):
        for name, opts in SALIENCY_LOCALIZERS.items():
            alt = SaliencyAspect(aspect_name, packaged.reward_model, **opts)
            alt.reward_threshold = packaged.reward_threshold
            out[name] = alt
    return out


def calibrate_aspect(aspect_name: str, n: int = 512, seed: int = 7, batch: int = 64,
                     min_recall: float = 0.95, source: str = "renders") -> dict[str, Any]:
    """Calibration of every localizer of ``aspect_name`` over :func:`calibration.grid`.

    Returns ``{"aspect", "n", "min_recall", "localizers": {name: {"rows": [...], "chosen": row,
    "packaged_setting": row of the setting the toy preset uses}}}``.
    """
    data = calibration_set("safety" if aspect_name == "safety_narrow" else aspect_name, n, seed, source)
    images, truth, captions = data["images"], data["masks"], data["captions"]
    n = len(images)
    out: dict[str, Any] = {"aspect": aspect_name, "n": n, "seed": seed, "source": source,
                           "min_recall": min_recall, "localizers": {}}
    for name, aspect in localizers(aspect_name).items():
        heat, rew = [], []
        for i in range(0, n, batch):
            x, p = images[i : i + batch], captions[i : i + batch]
            heat.append(aspect.heatmap(x, p).detach())
            with torch.no_grad():
                rew.append(aspect.reward(x, p).float().reshape(-1))
        rows = calibration.calibrate(torch.cat(heat), torch.cat(rew), truth, calibration.grid(),
                                     aspect.reward_threshold)
        out["localizers"][name] = {"rows": rows, "chosen": calibration.choose(rows, min_recall)}
    return out


__all__ = ["SALIENCY_LOCALIZERS", "SOURCES", "calibrate_aspect", "calibration_set", "localizers"]
