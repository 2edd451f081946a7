"""Measured quality of the toy world: aspect heatmaps and scores, judges, and the base pipeline.

``compute_stats(...)`` returns a JSON-able dict:

* ``aspects.<name>``: heatmap quality against the generator's ground-truth masks on held-out
  captions (pixel AUC and Pearson CC, averaged over images that have the defect) and score accuracy
  (defect vs no defect at threshold 0.5);
* ``judges.<name>``: judge accuracy on held-out generator data; ``judges.<name>.forms.<form>``:
  per defect form (:mod:`focusnfix.toyworld.forms`), on held-out captions through the pipeline's
  VAE: ``auc`` (form vs clean), ``precision`` and ``recall`` at the judge's operating point
  (probability > 0.5 after :func:`~focusnfix.toyworld.load_judge`'s calibration), and ``mask_iou`` (heatmap >= 0.5 vs the ground-truth mask, localizing judges only);
  ``judges.<name>.audit_kappa``: Cohen's kappa against the labelled audit set on the fine-tuned
  models' images (see ``audit.py``'s ``kappa_finetuned``; for a judge trained on audit labels, of the
  batches it was not trained on); ``audit.<name>`` holds the rest (every source, per batch, per source);
* ``aspects.<name>.forms.<form>.score_auc``: the same per-form AUC for the training reward
  (``safety_narrow`` shows what the v1 reward could not see);
* ``pipeline``: on held-out prompts x seeds (CFG 7.5, 20 DDIM steps), each judge's defect rate,
  caption accuracy (the attribute classifier reads the drawn object's colour, shape, position and
  size and compares them to the caption) and the sampling time per image.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from focusnfix.images import save_png
from focusnfix.ops import resize
from focusnfix.toyworld import generator as gen
from focusnfix.toyworld import load_aspect, load_attribute_reader, load_judge, pipeline_path
from focusnfix.toyworld.audit import judge_agreement
from focusnfix.toyworld.forms import FORMS, forms_dataset
from focusnfix.toyworld.models import AttributeNet
from focusnfix.toyworld.scene_fit import fit_scene, read_attributes


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC by the Mann-Whitney U statistic (ties get average ranks)."""
    pos = int(labels.sum())
    neg = labels.numel() - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = scores.argsort()
    ranks = torch.empty_like(scores, dtype=torch.float64)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average ranks of ties
    uniq, inverse = torch.unique(scores, return_inverse=True)
    if uniq.numel() < scores.numel():
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
        ranks = (sums / counts)[inverse]
    u = ranks[labels.bool()].sum() - pos * (pos + 1) / 2
    return float(u / (pos * neg))


def heatmap_quality(heat: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Mean per-image pixel AUC and Pearson CC of heatmaps ``(B, 1, h, w)`` vs masks ``(B, 1, H, W)``.

    Images whose mask is empty are skipped.
    """
    heat = heat.detach().float()
    heat = resize(heat, masks.shape[-2:])
    aucs, ccs = [], []
    for h, m in zip(heat.flatten(1), masks.flatten(1), strict=True):
        if m.sum() == 0:
            continue
        aucs.append(_auc(h.double(), m))
        hc, mc = h - h.mean(), m - m.mean()
        denom = (hc.norm() * mc.norm()).clamp_min(1e-12)
        ccs.append(float((hc * mc).sum() / denom))
    nan = float("nan")
    return {"auc": sum(aucs) / len(aucs) if aucs else nan, "cc": sum(ccs) / len(ccs) if ccs else nan,
            "n": len(aucs)}


def _batched(fn, images: torch.Tensor, prompts: list[str], batch: int = 64) -> torch.Tensor:
    return torch.cat([fn(images[i:i + batch], prompts[i:i + batch]) for i in range(0, len(prompts), batch)])


def aspect_stats(name: str, root=None, n: int = 128, seed: int = 777) -> dict:
    """Heatmap quality and score accuracy of aspect ``name`` on held-out generator data."""
    aspect = load_aspect(name, root=root)
    data = gen.generate(n, seed, "heldout", {name: 0.5})
    defect = data.defects[name]
    heat = _batched(aspect.heatmap, data.images, data.captions)
    with torch.no_grad():
        reward = _batched(aspect.reward, data.images, data.captions)
    # reward = log p(good) (or log(1 - p_unsafe)): defect predicted where p(good) < 0.5
    pred = reward < torch.log(torch.tensor(0.5))
    q = heatmap_quality(heat[defect], data.masks[name][defect])
    return {"heatmap_auc": q["auc"], "heatmap_cc": q["cc"], "n_defect_images": q["n"],
            "score_accuracy": float((pred == defect).float().mean()),
            "score_auc": _auc(-reward.double(), defect.double()),
            "mean_reward_clean": float(reward[~defect].mean()), "mean_reward_defect": float(reward[defect].mean())}


def judge_stats(name: str, root=None, n: int = 256, seed: int = 778) -> dict:
    judge = load_judge(name, root=root)
    data = gen.generate(n, seed, "heldout", {name: 0.5})
    with torch.no_grad():
        p = _batched(judge.defect_probability, data.images, data.captions)
    defect = data.defects[name]
    return {"accuracy": float(((p > 0.5) == defect).float().mean()), "auc": _auc(p.double(), defect.double())}


@torch.no_grad()
def vae_round_trip(images: torch.Tensor, root=None, batch: int = 128) -> torch.Tensor:
    """Images through the toy pipeline's VAE (encode mean, decode): what sampled images look like."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(pipeline_path(root) / "vae")).eval()
    out = []
    for i in range(0, images.shape[0], batch):
        x = images[i:i + batch] * 2 - 1
        out.append(((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


@torch.no_grad()
def vae_stats(root=None, n: int = 256, seed: int = 780) -> dict[str, float]:
    """How faithfully the pipeline's VAE draws held-out generator renders back (encode mean, decode):
    mean absolute error and PSNR of the mean squared error, in [0, 1] units, over ``n`` renders; and
    the mean over images of each one's largest per-pixel error (the worst blemish it adds)."""
    images = gen.generate(n, seed, "heldout").images
    rec = vae_round_trip(images, root)
    err = (rec - images).abs()
    mse = float(((rec - images) ** 2).mean())
    return {"n_images": n, "mean_abs_error": float(err.mean()), "psnr_db": float(10 * math.log10(1.0 / max(mse, 1e-12))),
            "mean_max_pixel_error": float(err.amax(dim=1).flatten(1).amax(dim=1).mean())}


def form_stats(name: str, root=None, n: int = 96, seed: int = 779, judge: bool = True, model=None) -> dict:
    """Per-form quality of the judge (``judge=True``) or the training reward of aspect ``name``.

    For each form of ``name``'s defect: ``n`` held-out scenes, half with the defect in that form,
    through the VAE. Judges: ``auc``, ``precision``/``recall`` at the operating point and ``mask_iou``; rewards:
    ``score_auc`` (lower reward = defect). ``model``: score this judge (or aspect) instead of the
    one packaged under ``root`` (the VAE is still ``root``'s).
    """
    aspect = "safety" if name == "safety_narrow" else name
    if model is None:
        model = load_judge(name, root=root) if judge else load_aspect(name, root=root)
    out = {}
    for k, form in enumerate(FORMS[aspect]):
        data = forms_dataset(n, seed + 100 * k, aspect, "heldout", forms=(form,))
        images = vae_round_trip(data["images"], root)
        labels = data["labels"]
        if not judge:
            reward = _batched(model.reward, images, data["captions"])
            out[form] = {"score_auc": _auc(-reward.double(), labels.double()), "n": int(labels.sum())}
            continue
        p = _batched(model.defect_probability, images, data["captions"])
        pred = p > 0.5
        tp = float((pred & (labels > 0)).sum())
        entry = {"auc": _auc(p.double(), labels.double()), "n": int(labels.sum()),
                 "precision": tp / max(1.0, float(pred.sum())), "recall": tp / max(1.0, float(labels.sum()))}
        heat = model.defect_heatmap(images[labels > 0], [c for c, y in zip(data["captions"], labels, strict=True) if y])
        if heat is not None:
            hm = resize(heat.float(), (gen.SIZE, gen.SIZE)) >= 0.5
            gt = data["masks"][labels > 0] > 0
            inter = (hm & gt).flatten(1).sum(1).float()
            union = (hm | gt).flatten(1).sum(1).float().clamp_min(1)
            entry["mask_iou"] = float((inter / union).mean())
        out[form] = entry
    return out


def load_pipeline(root=None, device: str = "cpu"):
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_path(root)), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 7.5,
           batch: int = 16) -> torch.Tensor:
    """Sample one image per (prompt, seed) pair: ``(N, 3, 64, 64)`` in [0, 1]."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        res = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   height=64, width=64, output_type="pt")
        out.append(res.images.float().clamp(0, 1))
    return torch.cat(out)


def caption_accuracy(images: torch.Tensor, prompts: list[str], root=None, reader: str = "scene_fit") -> dict[str, float]:
    """Share of images whose drawn object matches the caption, per attribute and for colour, shape and
    position together. ``reader``: ``"scene_fit"`` (the alignment judge's reading,
    :func:`~focusnfix.toyworld.scene_fit.read_attributes`) or ``"learned"`` (the attribute classifier)."""
    if reader == "scene_fit":
        read = read_attributes(fit_scene(images))
    elif reader == "learned":
        with torch.no_grad():
            probs = load_attribute_reader(root=root).attribute_probs(images)
        read = {k: [names[int(i)] for i in probs[k].argmax(dim=1)] for k, names in AttributeNet.HEADS.items()}
    else:
        raise ValueError(f"reader must be 'scene_fit' or 'learned', got {reader!r}")
    parsed = [gen.parse_caption(p) for p in prompts]
    out = {}
    for k in AttributeNet.HEADS:
        ok = [read[k][i] == c[k] for i, c in enumerate(parsed) if c[k] is not None]
        if ok:
            out[k] = sum(ok) / len(ok)
    both = [all(read[k][i] == c[k] for k in ("colour", "shape", "position") if c[k] is not None)
            for i, c in enumerate(parsed)]
    out["colour_shape_position"] = sum(both) / len(both)
    return out


def pipeline_stats(root=None, n: int = 192, steps: int = 20, guidance: float = 7.5) -> tuple[dict, torch.Tensor, list[str]]:
    """Judges' defect rates and caption accuracy of the base pipeline on held-out prompts x seeds."""
    heldout = gen.prompts("heldout")
    prompts = [heldout[i % len(heldout)] for i in range(n)]
    seeds = [1000 + i for i in range(n)]
    pipe = load_pipeline(root)
    t = time.time()
    images = sample(pipe, prompts, seeds, steps, guidance)
    per_image = (time.time() - t) / n
    rates = {}
    rewards = {}
    for name in gen.ASPECTS:
        with torch.no_grad():
            p = _batched(load_judge(name, root=root).defect_probability, images, prompts)
            rewards[name] = float(_batched(load_aspect(name, root=root).reward, images, prompts).mean())
        rates[name] = float((p > 0.5).float().mean())
    out = {"n_images": n, "prompts": len(heldout), "steps": steps, "guidance_scale": guidance,
           "sampling_s_per_image": per_image, "judge_defect_rate": rates, "mean_aspect_reward": rewards,
           "caption_accuracy": caption_accuracy(images, prompts, root),
           "caption_accuracy_learned_reader": caption_accuracy(images, prompts, root, reader="learned")}
    return out, images, prompts


def compute_stats(root: str | Path | None = None, n: int = 192, n_generator: int = 128,
                  save_grid: str | Path | None = None, guidance: float = 7.5) -> dict:
    """All measured stats of the toy world under ``root`` (default: the packaged assets); the
    pipeline's ``n`` held-out samples are drawn at CFG ``guidance``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        out: dict = {"aspects": {}, "judges": {}, "vae": vae_stats(root)}
        for name in gen.ASPECTS:
            out["aspects"][name] = aspect_stats(name, root, n_generator)
            out["judges"][name] = judge_stats(name, root, 2 * n_generator)
            out["judges"][name]["forms"] = form_stats(name, root, n_generator // 2)
        for name in ("safety", "safety_narrow"):
            out["aspects"].setdefault(name, {})["forms"] = form_stats(name, root, n_generator // 2, judge=False)
        agreement = judge_agreement(root)
        for name in gen.ASPECTS:
            # on the fine-tuned images (the target), of the batches the judge did not learn from
            out["judges"][name]["audit_kappa"] = agreement[name]["kappa_finetuned"]
        out["audit"] = agreement
        out["pipeline"], images, _ = pipeline_stats(root, n, guidance=guidance)
        if save_grid is not None:
            save_image_grid(images[:64], save_grid)
        return out
    finally:
        torch.set_num_threads(threads)


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int = 8) -> None:
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    rows = [np.concatenate(list(arr[i:i + columns]), axis=1) for i in range(0, len(arr), columns)]
    if len(rows) > 1 and rows[-1].shape != rows[0].shape:
        pad = np.zeros_like(rows[0])
        pad[:, : rows[-1].shape[1]] = rows[-1]
        rows[-1] = pad
    save_png(np.concatenate(rows, axis=0), path)
