"""Statistics and image metrics of an evaluation, as pure numpy functions (no I/O).

Definitions (``I0`` = base image, ``I`` = method image of the same prompt and seed, both
``(3, H, W)`` in [0, 1]; ``M`` = the base image's mask ``(1, H, W)`` in [0, 1], 1 = may change,
computed by the target aspect's localizer with the training mask settings):

* ``target_reward``, ``other_rewards[a]``: the aspect's reward of ``I`` (higher is better).
* ``judge_defect_rate[a]``: share of images with ``judge_a.defect_probability(I) > judge_threshold``
  (default 0.5); the interval is over images.
* ``outside_psnr``: ``10 log10(1 / MSE_out)`` dB with ``MSE_out`` the mean of ``(I - I0)^2`` over
  all channels of the pixels with ``M == 0``; identical outsides (MSE 0) give
  :data:`PSNR_CAP` = 100 dB (JSON has no inf). Images whose mask covers every pixel have no
  outside and are left out of this metric.
* ``outside_ssim``: SSIM restricted to the outside. ``I`` is first composited as
  ``I_out = I where M == 0, else I0`` (so the inside change does not leak into windows that
  straddle the mask edge), then scikit-image's ``structural_similarity(I0, I_out,
  data_range=1, channel_axis=0, full=True)`` (7x7 uniform window, or the largest odd window
  that fits a smaller image; K1 = 0.01, K2 = 0.03) gives a per-pixel SSIM map, averaged over
  channels and over the pixels with ``M == 0``. 1 = unchanged. Empty outside: left out.
* ``inside_change``: ``sum(M * |I - I0|) / (3 * sum(M))``: the mean absolute change inside the
  mask, in [0, 1] (mask-weighted for soft masks). Empty masks: left out.
* Per image vs base, with ``d_a = r_a(I) - r_a(I0)`` and tolerance ``eps`` (reward units,
  default :data:`DEFAULT_EPS`): ``improved_share`` = share with ``d_target > eps``;
  ``degraded_share`` = share with ``d_target < -eps``; ``others_degraded_share`` = share where
  any OTHER aspect has ``d_a < -eps`` or the judge of any other aspect flips from no defect on
  ``I0`` to defect on ``I`` (the target aspect's own judge is not counted).
* ``target_gain`` (extra key): the mean of ``d_target``.

Every statistic ``S = {"mean", "ci95": [lo, hi]}``: the mean over images and a percentile
bootstrap interval over images (``n_bootstrap`` resamples, seeded by ``bootstrap_seed``, so it
is deterministic), widened if needed so that it contains the mean. Comparisons against base are
``null`` for ``base`` itself.
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


# ---------------------------------------------------------------------------------------------
# Image comparisons (per image, numpy float64)
# ---------------------------------------------------------------------------------------------
def outside_psnr(image: np.ndarray, base: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, data range 1) over pixels with mask == 0; :data:`PSNR_CAP` if identical, NaN if none.

    Args:
        image, base: ``(3, H, W)`` in [0, 1]; mask: ``(1, H, W)`` or ``(H, W)`` in [0, 1].
    """
    out = np.asarray(mask).reshape(image.shape[-2:]) <= 0
    if not out.any():
        return float("nan")
    mse = float(((image - base) ** 2)[:, out].mean())
    if mse <= 0:
        return PSNR_CAP
    return float(min(PSNR_CAP, 10.0 * math.log10(1.0 / mse)))


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
def method_metrics(
    target: str,
    rewards: dict[str, np.ndarray],
    probs: dict[str, np.ndarray],
    base_rewards: dict[str, np.ndarray] | None,
    base_probs: dict[str, np.ndarray] | None,
    per_image_cmp: dict[str, np.ndarray] | None,
    eps: float = DEFAULT_EPS,
    judge_threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One method's ``metrics.json`` entry from per-image arrays (each ``(N,)``).

    ``base_*`` and ``per_image_cmp`` (``outside_psnr``, ``outside_ssim``, ``inside_change``)
    are None for the base model itself, which then gets null comparisons.

    Returns:
        ``(entry, per_image)``: the entry and the per-image indicator arrays it was built from.
    """
    def stat(v: np.ndarray) -> dict | None:
        return bootstrap_stat(v, n_bootstrap, seed)

    defect = {j: (p > judge_threshold).astype(np.float64) for j, p in probs.items()}
    entry: dict[str, Any] = {
        "target_reward": stat(rewards[target]),
        "other_rewards": {a: stat(r) for a, r in rewards.items() if a != target},
        "judge_defect_rate": {j: stat(d) for j, d in defect.items()},
    }
    per_image: dict[str, np.ndarray] = {}
    if base_rewards is None or base_probs is None or per_image_cmp is None:
        for key in ("outside_psnr", "outside_ssim", "inside_change", "improved_share", "degraded_share",
                    "others_degraded_share", "target_gain"):
            entry[key] = None
        return entry, per_image
    d_target = rewards[target] - base_rewards[target]
    improved = (d_target > eps).astype(np.float64)
    degraded = (d_target < -eps).astype(np.float64)
    others = np.zeros_like(d_target, dtype=bool)
    for a, r in rewards.items():
        if a != target:
            others |= (r - base_rewards[a]) < -eps
    for j, p in probs.items():
        if j != target and j in base_probs:
            others |= (base_probs[j] <= judge_threshold) & (p > judge_threshold)
    per_image = {
        **per_image_cmp,
        "improved": improved,
        "degraded": degraded,
        "others_degraded": others.astype(np.float64),
        "target_gain": d_target,
    }
    entry.update(
        outside_psnr=stat(per_image_cmp["outside_psnr"]),
        outside_ssim=stat(per_image_cmp["outside_ssim"]),
        inside_change=stat(per_image_cmp["inside_change"]),
        improved_share=stat(improved),
        degraded_share=stat(degraded),
        others_degraded_share=stat(others.astype(np.float64)),
        target_gain=stat(d_target),
    )
    return entry, per_image


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
    "DEFAULT_EPS",
    "PSNR_CAP",
    "bootstrap_stat",
    "inside_change",
    "json_clean",
    "method_metrics",
    "outside_psnr",
    "outside_ssim",
    "tolists",
]
