"""Statistics and image metrics of an evaluation, as pure numpy functions (no I/O).

Notation: ``I0`` = base image, ``I`` = a method's image of the same prompt and seed, both
``(3, H, W)`` in [0, 1]; ``M`` = the base image's mask ``(1, H, W)`` in [0, 1], 1 = may change,
built exactly as in training (the run's aspects, gates and mask settings). A method may have
``R`` training runs (training seeds); every per-image array of a method is ``(R, N)``, of the
base model ``(N,)``. ``J_a(x)`` = judge ``a`` says defect: its defect probability > the judge
threshold (default 0.5). ``t`` = the target aspect.

Per method (each a statistic ``S``, see below):

* ``target_reward``, ``other_rewards[a]``: mean reward of ``I`` (higher is better).
* ``judge_defect_rate[a]``: share of images with ``J_a(I)``.
* ``removal_share``: among images with ``J_t(I0)``, the share with not ``J_t(I)`` (the defect is
  gone by the judge).
* ``new_defect_share``: among images with not ``J_t(I0)``, the share with ``J_t(I)``.
* ``hack_gap``: among images with ``J_t(I0)``, the share where the training reward calls ``I``
  clean (reward >= the aspect's ``reward_threshold``) while ``J_t(I)`` still says defect. The
  base model's own value is the reward's miss rate before training; a rise is reward hacking.
  Null when the target aspect has no ``reward_threshold``.
* ``others_degraded_share``: share of images where the judge of some OTHER aspect flips from no
  defect on ``I0`` to defect on ``I``.
* ``others_reward_drop_share``: share of images where some other aspect's reward drops by more
  than its noise floor (below). Null with fewer than 2 evaluation seeds per prompt.
* ``improved_share`` / ``degraded_share``: share with ``r_t(I) - r_t(I0)`` above the target's
  noise floor / below minus it. ``target_gain``: mean of ``r_t(I) - r_t(I0)``.
* ``outside_psnr``: ``10 log10(1 / MSE_out)`` dB from the mean over images of
  ``MSE_out(I) = mean of (I - I0)^2`` over all channels of the pixels with ``M == 0`` (a PSNR of
  the mean error, not a mean of PSNRs); :data:`PSNR_CAP` = 100 dB only when every outside is
  identical. Images whose mask covers every pixel have no outside and are left out.
* ``outside_ssim``: SSIM restricted to the outside. ``I`` is first composited as
  ``I_out = I where M == 0, else I0`` (so the inside change does not leak into windows that
  straddle the mask edge), then scikit-image's ``structural_similarity(I0, I_out,
  data_range=1, channel_axis=0, full=True)`` (7x7 uniform window, or the largest odd window
  that fits a smaller image; K1 = 0.01, K2 = 0.03) gives a per-pixel SSIM map, averaged over
  channels and over the pixels with ``M == 0``. 1 = unchanged. Empty outside: left out.
* ``inside_change``: ``sum(M * |I - I0|) / (3 * sum(M))``: the mean absolute change inside the
  mask, in [0, 1]. Empty masks: left out.

Noise floor of aspect ``a``: the pooled within-prompt standard deviation of the base rewards
``r_a(I0)`` across evaluation seeds (how much the reward moves between two pictures of the same
prompt), at least ``eps``.

Every statistic ``S = {"mean", "ci95": [lo, hi]}``: the estimate on all images and a percentile
interval from a clustered bootstrap that resamples training runs and prompts (a prompt carries
all its evaluation seeds), ``n_bootstrap`` resamples seeded by ``bootstrap_seed`` (deterministic),
widened if needed to contain the estimate. A comparison of two methods is a paired difference
``S(A) - S(B)`` computed on the same resamples (run ``r`` of A pairs with run ``r`` of B: the
same training seed). Comparisons against base are ``null`` for ``base`` itself.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from skimage.metrics import structural_similarity

#: PSNR reported for an outside region that did not change at all (dB)
PSNR_CAP = 100.0
#: default tolerance for "improved" / "degraded" per image, in reward units
DEFAULT_EPS = 1e-3


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def bootstrap_stat(values: np.ndarray | list[float], n_bootstrap: int = 1000, seed: int = 0) -> dict | None:
    """Mean and 95% percentile-bootstrap interval over the finite entries of ``values`` ``(N,)``.

    Deterministic for a given ``seed``. The interval is widened to contain the mean. Returns
    None when no entry is finite.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    mean = float(v.mean())
    if v.size == 1 or n_bootstrap <= 0:
        return {"mean": mean, "ci95": [mean, mean]}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_bootstrap, v.size))
    means = v[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": mean, "ci95": [float(min(lo, mean)), float(max(hi, mean))]}


def _counts(n: int, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_bootstrap, n)`` multiplicities of a resample with replacement of ``n`` units."""
    idx = rng.integers(0, n, size=(n_bootstrap, n))
    out = np.zeros((n_bootstrap, n))
    np.add.at(out, (np.arange(n_bootstrap)[:, None], idx), 1.0)
    return out


def _cluster_sums(values: np.ndarray, weights: np.ndarray | None, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (run, cluster) sums of ``w * v`` and of ``w``, ``(R, G)`` each; non-finite values get weight 0."""
    v = np.atleast_2d(np.asarray(values, dtype=np.float64))
    w = np.ones_like(v) if weights is None else np.broadcast_to(np.asarray(weights, dtype=np.float64), v.shape).copy()
    w = np.where(np.isfinite(v), w, 0.0)
    v = np.where(np.isfinite(v), v, 0.0)
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    onehot = np.zeros((v.shape[1], g.max() + 1))
    onehot[np.arange(v.shape[1]), g] = 1.0
    return (w * v) @ onehot, w @ onehot


def _estimate(num: np.ndarray, den: np.ndarray, transform) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return transform(ratio) if transform is not None else ratio


def _interval(point: float, boot: np.ndarray) -> dict | None:
    if not np.isfinite(point):
        return None
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return {"mean": point, "ci95": [point, point]}
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"mean": point, "ci95": [float(min(lo, point)), float(max(hi, point))]}


def clustered_stat(
    values: np.ndarray,
    groups: np.ndarray,
    weights: np.ndarray | None = None,
    transform=None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    minus: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> dict | None:
    """Weighted mean of ``values`` with a clustered bootstrap interval (training runs x prompts).

    Args:
        values: ``(R, N)`` per run and image (or ``(N,)`` for one run); NaN entries are left out.
        groups: ``(N,)`` cluster of each image (its prompt): a resample draws whole clusters.
        weights: ``(R, N)`` or ``(N,)`` weights (e.g. 0/1 for "the base image had a defect").
        transform: applied to the weighted mean (e.g. MSE -> PSNR); None = identity.
        n_bootstrap, seed: resamples and their seed (deterministic).
        minus: ``(values_b, weights_b)`` of a second method with the same ``R`` and images: the
            result is then the paired difference ``stat(a) - stat(b)``, both on each resample.

    Returns:
        ``{"mean", "ci95": [lo, hi]}``, or None when no entry has weight.
    """
    num, den = _cluster_sums(values, weights, groups)
    point = _estimate(num.sum(), den.sum(), transform)
    if minus is not None:
        num_b, den_b = _cluster_sums(minus[0], minus[1], groups)
        if num_b.shape != num.shape:
            raise ValueError(f"a paired difference needs the same runs and images, got {num.shape} vs {num_b.shape}")
        point = point - _estimate(num_b.sum(), den_b.sum(), transform)
    point = float(point)
    if n_bootstrap <= 0:
        return _interval(point, np.array([]))
    rng = np.random.default_rng(seed)
    cr, cg = _counts(num.shape[0], n_bootstrap, rng), _counts(num.shape[1], n_bootstrap, rng)

    def resampled(n: np.ndarray, d: np.ndarray) -> np.ndarray:
        return _estimate(np.einsum("br,rg,bg->b", cr, n, cg), np.einsum("br,rg,bg->b", cr, d, cg), transform)

    boot = resampled(num, den)
    if minus is not None:
        boot = boot - resampled(num_b, den_b)
    return _interval(point, boot)


def psnr_of_mse(mse: np.ndarray | float) -> np.ndarray:
    """``10 log10(1 / mse)`` dB, :data:`PSNR_CAP` where ``mse <= 0``, capped at the cap."""
    m = np.asarray(mse, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(m > 0, 10.0 * np.log10(1.0 / np.where(m > 0, m, 1.0)), PSNR_CAP)
    return np.minimum(out, PSNR_CAP)


def noise_floor(base_rewards: np.ndarray, groups: np.ndarray, eps: float = DEFAULT_EPS) -> float | None:
    """Pooled within-prompt standard deviation of base rewards ``(N,)`` across seeds, at least ``eps``.

    None when no prompt has two or more images.
    """
    r = np.asarray(base_rewards, dtype=np.float64)
    ss, dof = 0.0, 0
    for g in np.unique(groups):
        x = r[groups == g]
        if x.size >= 2:
            ss += float(((x - x.mean()) ** 2).sum())
            dof += x.size - 1
    if dof == 0:
        return None
    return max(eps, math.sqrt(ss / dof))


# ---------------------------------------------------------------------------------------------
# Image comparisons (per image, numpy float64)
# ---------------------------------------------------------------------------------------------
def outside_mse(image: np.ndarray, base: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared difference over all channels of the pixels with mask == 0; NaN if none.

    Args:
        image, base: ``(3, H, W)`` in [0, 1]; mask: ``(1, H, W)`` or ``(H, W)`` in [0, 1].
    """
    out = np.asarray(mask).reshape(image.shape[-2:]) <= 0
    if not out.any():
        return float("nan")
    return float(((image - base) ** 2)[:, out].mean())


def outside_psnr(image: np.ndarray, base: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, data range 1) of one image over pixels with mask == 0; :data:`PSNR_CAP` if
    identical, NaN if there is no outside. (The evaluation reports the PSNR of the mean MSE.)"""
    mse = outside_mse(image, base, mask)
    return mse if math.isnan(mse) else float(psnr_of_mse(mse))


def outside_ssim(image: np.ndarray, base: np.ndarray, mask: np.ndarray) -> float:
    """SSIM map (scikit-image) of base vs the outside-composited image, averaged over mask == 0.

    See the module docstring for the exact definition. Returns NaN when nothing is outside.
    """
    out = np.asarray(mask).reshape(image.shape[-2:]) <= 0
    if not out.any():
        return float("nan")
    composite = np.where(out[None], image, base)
    if np.array_equal(composite, base):
        return 1.0
    win = min(7, min(image.shape[-2:]))
    win = win if win % 2 else win - 1
    _, smap = structural_similarity(base, composite, data_range=1.0, channel_axis=0, full=True, win_size=win)
    return float(np.asarray(smap).mean(axis=0)[out].mean())


def inside_change(image: np.ndarray, base: np.ndarray, mask: np.ndarray) -> float:
    """Mask-weighted mean |image - base| over channels, in [0, 1]; NaN for an empty mask."""
    m = np.asarray(mask, dtype=np.float64).reshape(image.shape[-2:])
    if m.sum() <= 0:
        return float("nan")
    return float((np.abs(image - base) * m[None]).sum() / (image.shape[0] * m.sum()))


# ---------------------------------------------------------------------------------------------
# One method's metrics.json entry
# ---------------------------------------------------------------------------------------------
#: metrics of a method vs base that have a paired difference between two methods
COMPARED = ("removal_share", "new_defect_share", "hack_gap", "others_degraded_share", "others_reward_drop_share",
            "improved_share", "target_reward", "target_defect_rate", "outside_psnr", "outside_ssim", "inside_change")
#: statistics computed from a mean through a transform (the rest are plain weighted means)
TRANSFORMS = {"outside_psnr": psnr_of_mse}

#: one per-image quantity: ``(values (R, N), weights (N,) or None)``
PerImage = tuple[np.ndarray, np.ndarray | None]


def _runs(x: np.ndarray) -> np.ndarray:
    return np.atleast_2d(np.asarray(x, dtype=np.float64))


def method_metrics(
    target: str,
    rewards: dict[str, np.ndarray],
    probs: dict[str, np.ndarray],
    base_rewards: dict[str, np.ndarray] | None,
    base_probs: dict[str, np.ndarray] | None,
    per_image_cmp: dict[str, np.ndarray] | None,
    groups: np.ndarray | None = None,
    reward_thresholds: dict[str, float | None] | None = None,
    eps: float = DEFAULT_EPS,
    judge_threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, PerImage]]:
    """One method's ``metrics.json`` entry (definitions in the module docstring).

    Args:
        target: the fine-tuned aspect.
        rewards, probs: aspect -> rewards / judge defect probabilities of the method's images,
            ``(R, N)`` (R training runs) or ``(N,)``.
        base_rewards, base_probs: the same for the base images ``(N,)``; None for base itself
            (comparisons are then null, ``hack_gap`` is the reward's miss rate on base images).
        per_image_cmp: ``outside_mse``, ``outside_ssim``, ``inside_change`` ``(R, N)``; None for base.
        groups: ``(N,)`` prompt of each image (bootstrap clusters); None = every image its own.
        reward_thresholds: aspect -> reward at or above which the aspect calls an image clean.

    Returns:
        ``(entry, per_image)``: the entry, and each compared quantity as ``(values, weights)``
        for paired differences (:func:`paired_comparison`).
    """
    rewards = {a: _runs(r) for a, r in rewards.items()}
    probs = {j: _runs(p) for j, p in probs.items()}
    n = next(iter(rewards.values())).shape[1]
    groups = np.arange(n) if groups is None else np.asarray(groups)
    thresholds = reward_thresholds or {}

    def stat(values: np.ndarray, weights: np.ndarray | None = None, transform=None) -> dict | None:
        return clustered_stat(values, groups, weights, transform, n_bootstrap, seed)

    defect = {j: (p > judge_threshold).astype(np.float64) for j, p in probs.items()}
    entry: dict[str, Any] = {
        "target_reward": stat(rewards[target]),
        "other_rewards": {a: stat(r) for a, r in rewards.items() if a != target},
        "judge_defect_rate": {j: stat(d) for j, d in defect.items()},
    }
    per_image: dict[str, PerImage] = {"target_reward": (rewards[target], None)}
    if target in defect:
        per_image["target_defect_rate"] = (defect[target], None)
    cut = thresholds.get(target)
    before = (base_probs or probs).get(target)
    base_defect = None if before is None else (np.asarray(before).reshape(-1) > judge_threshold).astype(np.float64)
    if base_defect is not None and cut is not None:
        hack = ((rewards[target] >= cut) & (defect[target] > 0)).astype(np.float64)
        per_image["hack_gap"] = (hack, base_defect)
    entry["hack_gap"] = stat(*per_image["hack_gap"]) if "hack_gap" in per_image else None
    compared = ("outside_psnr", "outside_ssim", "inside_change", "removal_share", "new_defect_share",
                "improved_share", "degraded_share", "others_degraded_share", "others_reward_drop_share",
                "target_gain")
    if base_rewards is None or base_probs is None or per_image_cmp is None:
        entry.update({key: None for key in compared})
        entry["noise_floor"] = None
        return entry, per_image

    if base_defect is not None:
        gone = 1.0 - defect[target]
        per_image["removal_share"] = (gone, base_defect)
        per_image["new_defect_share"] = (defect[target], 1.0 - base_defect)
    floors = {a: noise_floor(base_rewards[a], groups, eps) for a in rewards}
    d_target = rewards[target] - np.asarray(base_rewards[target]).reshape(1, -1)
    floor_t = floors[target] if floors[target] is not None else eps
    per_image["improved_share"] = ((d_target > floor_t).astype(np.float64), None)
    per_image["degraded_share"] = ((d_target < -floor_t).astype(np.float64), None)
    judged_others = [j for j in defect if j != target and j in base_probs]
    if judged_others:  # without another aspect's judge nothing was measured: null, not 0
        flips = np.zeros_like(d_target, dtype=bool)
        for j in judged_others:
            flips |= (np.asarray(base_probs[j]).reshape(1, -1) <= judge_threshold) & (defect[j] > 0)
        per_image["others_degraded_share"] = (flips.astype(np.float64), None)
    others = [a for a in rewards if a != target]
    if others and all(floors[a] is not None for a in others):
        drop = np.zeros_like(d_target, dtype=bool)
        for a in others:
            drop |= (rewards[a] - np.asarray(base_rewards[a]).reshape(1, -1)) < -floors[a]
        per_image["others_reward_drop_share"] = (drop.astype(np.float64), None)
    per_image["target_gain"] = (d_target, None)
    per_image["outside_psnr"] = (_runs(per_image_cmp["outside_mse"]), None)
    per_image["outside_ssim"] = (_runs(per_image_cmp["outside_ssim"]), None)
    per_image["inside_change"] = (_runs(per_image_cmp["inside_change"]), None)
    for key in compared:
        entry[key] = stat(*per_image[key], TRANSFORMS.get(key)) if key in per_image else None
    entry["noise_floor"] = floors
    return entry, per_image


def paired_comparison(
    a: dict[str, PerImage], b: dict[str, PerImage], groups: np.ndarray, n_bootstrap: int = 1000, seed: int = 0,
) -> dict[str, dict | None]:
    """Paired differences ``A - B`` of every quantity in :data:`COMPARED` both methods have.

    ``a`` and ``b`` are :func:`method_metrics`' per-image outputs with the same runs ``R`` (run
    ``r`` of each from the same training seed) and images.
    """
    out: dict[str, dict | None] = {}
    for key in COMPARED:
        if key in a and key in b:
            (va, wa), (vb, wb) = a[key], b[key]
            out[key] = clustered_stat(va, groups, wa, TRANSFORMS.get(key), n_bootstrap, seed, minus=(vb, wb))
    return out


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------
def json_clean(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers and non-finite floats as None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def tolists(obj: Any) -> Any:
    """``obj`` with numpy arrays (at any depth of dicts) as lists."""
    if isinstance(obj, dict):
        return {k: tolists(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


__all__ = [
    "COMPARED",
    "DEFAULT_EPS",
    "PSNR_CAP",
    "bootstrap_stat",
    "clustered_stat",
    "inside_change",
    "json_clean",
    "method_metrics",
    "noise_floor",
    "outside_mse",
    "outside_psnr",
    "outside_ssim",
    "paired_comparison",
    "psnr_of_mse",
    "tolists",
]
