"""Metrics of a RAHF model: saliency metrics for heatmaps, PLCC/SRCC for scores.

Heatmap metrics (as in the MIT saliency benchmark, used by the RAHF paper), each a pure function
of one predicted map ``p`` and one ground-truth map ``g`` (2-D arrays, same shape, values >= 0):

* ``mse``: mean squared error (on [0, 1] maps);
* ``cc``: Pearson correlation of the two maps, in [-1, 1];
* ``kld``: KL divergence of g from p, each normalised to sum 1 (>= 0, lower is better);
* ``sim``: histogram intersection of the two normalised maps, in [0, 1];
* ``nss``: mean of the standardised p at the fixation pixels of g;
* ``auc_judd``: AUC of p separating fixation pixels from the rest, in [0, 1].

Fixations of a continuous ground-truth map are its pixels ``>= fixation_threshold * max(g)``
(ours: 0.5). CC, KLD, SIM, NSS and AUC-Judd are undefined for an empty ground truth (many RichHF
images have no artifact): :func:`evaluate` averages them over non-empty maps only and reports
how many there were; MSE averages over all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from focusnfix.ops import resize
from focusnfix.rahf.model import HEATMAPS, SCORES, RAHFModel

EPS = float(np.finfo(np.float64).eps)


def _arr(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).squeeze()


def mse(p, g) -> float:
    p, g = _arr(p), _arr(g)
    return float(np.mean((p - g) ** 2))


def cc(p, g) -> float:
    p, g = _arr(p).ravel(), _arr(g).ravel()
    ps, gs = p.std(), g.std()
    if ps == 0 or gs == 0:
        return float("nan")
    return float(np.mean((p - p.mean()) * (g - g.mean())) / (ps * gs))


def kld(p, g) -> float:
    p, g = _arr(p), _arr(g)
    p = p / (p.sum() + EPS)
    g = g / (g.sum() + EPS)
    return float(np.sum(g * np.log(EPS + g / (p + EPS))))


def sim(p, g) -> float:
    p, g = _arr(p), _arr(g)
    if p.sum() == 0 or g.sum() == 0:
        return float("nan")
    return float(np.minimum(p / p.sum(), g / g.sum()).sum())


def fixations(g, threshold: float = 0.5) -> np.ndarray:
    """Boolean fixation map of a ground truth: ``g >= threshold * max(g)`` (empty if g == 0)."""
    g = _arr(g)
    peak = g.max()
    return g >= threshold * peak if peak > 0 else np.zeros(g.shape, dtype=bool)


def nss(p, g, threshold: float = 0.5) -> float:
    p, fix = _arr(p), fixations(g, threshold)
    if not fix.any() or p.std() == 0:
        return float("nan")
    return float(((p - p.mean()) / p.std())[fix].mean())


def auc_judd(p, g, threshold: float = 0.5) -> float:
    """AUC-Judd: thresholds at the saliency values of the fixations; TPR = share of fixations with
    ``p >= t``, FPR = share of the other pixels with ``p >= t``; curve closed with (0, 0) and
    (1, 1), trapezoid rule. Tied values count together (MIT's code jitters them instead)."""
    p, fix = _arr(p).ravel(), fixations(g, threshold).ravel()
    n_fix, n_pix = int(fix.sum()), p.size
    if n_fix == 0 or n_fix == n_pix:
        return float("nan")
    thresholds = np.unique(p[fix])[::-1]  # distinct fixation saliencies, high to low (ties counted together)
    fix_sorted, other_sorted = np.sort(p[fix]), np.sort(p[~fix])
    tp = np.concatenate([[0.0], n_fix - np.searchsorted(fix_sorted, thresholds, side="left"), [n_fix]]) / n_fix
    n_other = n_pix - n_fix
    fp = np.concatenate([[0.0], n_other - np.searchsorted(other_sorted, thresholds, side="left"), [n_other]]) / n_other
    return float(np.trapezoid(tp, fp) if hasattr(np, "trapezoid") else np.trapz(tp, fp))


def plcc(pred, target) -> float:
    pred, target = _arr(pred).ravel(), _arr(target).ravel()
    if pred.size < 2 or pred.std() == 0 or target.std() == 0:
        return float("nan")
    return float(stats.pearsonr(pred, target)[0])


def srcc(pred, target) -> float:
    pred, target = _arr(pred).ravel(), _arr(target).ravel()
    if pred.size < 2 or pred.std() == 0 or target.std() == 0:
        return float("nan")
    return float(stats.spearmanr(pred, target)[0])


HEATMAP_METRICS = {"cc": cc, "kld": kld, "sim": sim, "nss": nss, "auc_judd": auc_judd}


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


@torch.no_grad()
def evaluate(model: RAHFModel, loader, device: torch.device | str = "cpu") -> dict:
    """All metrics of ``model`` on a loader of :func:`focusnfix.rahf.data.collate` batches.

    Returns:
        ``{"n_images": N, "heatmaps": {map: {"mse": x, "n_nonempty": k, "cc": x, ...}},
        "scores": {score: {"mse": x, "plcc": x, "srcc": x}}}``; undefined values are None.
    """
    model.eval()
    per_map: dict[str, dict[str, list[float]]] = {m: {"mse": [], **{k: [] for k in HEATMAP_METRICS}} for m in HEATMAPS}
    nonempty = dict.fromkeys(HEATMAPS, 0)
    preds: dict[str, list[float]] = {s: [] for s in SCORES}
    targets: dict[str, list[float]] = {s: [] for s in SCORES}
    n = 0
    for batch in loader:
        out = model(batch["image"].to(device), batch["prompt"])
        for j, name in enumerate(HEATMAPS):
            pred = out[name][:, 0].cpu()
            gt = batch["maps"][:, j]
            pred = resize(pred[:, None], gt.shape[-2:])[:, 0]
            for p, g in zip(pred, gt, strict=True):
                per_map[name]["mse"].append(mse(p, g))
                if g.max() > 0:
                    nonempty[name] += 1
                    for k, fn in HEATMAP_METRICS.items():
                        per_map[name][k].append(fn(p, g))
        for j, name in enumerate(SCORES):
            preds[name] += out[name].cpu().tolist()
            targets[name] += batch["scores"][:, j].tolist()
        n += batch["image"].shape[0]
    result = {"n_images": n, "heatmaps": {}, "scores": {}}
    for name in HEATMAPS:
        result["heatmaps"][name] = {"n_nonempty": nonempty[name], **{k: _mean(v) for k, v in per_map[name].items()}}
    for name in SCORES:
        p, t = np.array(preds[name]), np.array(targets[name])
        result["scores"][name] = {"mse": float(np.mean((p - t) ** 2)), "plcc": _nan_none(plcc(p, t)),
                                  "srcc": _nan_none(srcc(p, t))}
    return result


def _nan_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def format_metrics(result: dict) -> str:
    """A human-readable table of :func:`evaluate`'s result."""
    lines = [f"images: {result['n_images']}"]
    keys = ["mse", *HEATMAP_METRICS]
    lines.append(f"{'heatmap':<16}{'n>0':>6}" + "".join(f"{k:>10}" for k in keys))
    for name, m in result["heatmaps"].items():
        lines.append(f"{name:<16}{m['n_nonempty']:>6}" + "".join(_fmt(m[k]) for k in keys))
    lines.append(f"{'score':<16}" + "".join(f"{k:>10}" for k in ("mse", "plcc", "srcc")))
    for name, m in result["scores"].items():
        lines.append(f"{name:<16}" + "".join(_fmt(m[k]) for k in ("mse", "plcc", "srcc")))
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return f"{'n/a':>10}" if x is None else f"{x:>10.4f}"


def write_metrics(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(result, indent=2))
    return path
