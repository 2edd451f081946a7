"""Evaluation harness: base model vs fine-tuned LoRAs vs baselines on held-out prompts and seeds.

:func:`evaluate` samples every (prompt, seed) pair (``N = len(prompts) * len(seeds)`` images,
prompt-major order) with the base model and with each method, from the same x_T per seed, and
writes ``out_dir/metrics.json`` in the schema of DESIGN.md plus what the report needs.

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

Files in ``out_dir``: ``metrics.json``; ``images.npz`` (``base`` ``(N, 3, H, W)`` uint8,
``heatmap`` ``(N, 1, H, W)`` uint8 (0-255 for [0, 1]), ``mask`` ``(N, 1, H, W)`` uint8,
``method__<name>`` ``(N, 3, H, W)`` uint8 per method); ``per_image.json`` (prompts, seeds,
per-image rewards, judge probabilities and metrics per method).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from focusnfix.aspects.base import Aspect, Judge
from focusnfix.backbones import Backbone, load_backbone
from focusnfix.errors import InputError
from focusnfix.files import atomic_write, atomic_write_text
from focusnfix.sampling import SamplingOptions, initial_noise, sample

#: PSNR reported for an outside region that did not change at all (dB)
PSNR_CAP = 100.0
#: default tolerance for "improved" / "degraded" per image, in reward units
DEFAULT_EPS = 1e-3
#: name of the SLD baseline method
SLD_METHOD = "sld"

ModelSpec = Backbone | str | Callable[[], Backbone]


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
    from skimage.metrics import structural_similarity

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
# Sampling helpers
# ---------------------------------------------------------------------------------------------
def resolve_backbone(model: ModelSpec) -> Backbone:
    """A :class:`Backbone` from a backbone, a model string (``"toy"``, dir, hub id) or a factory."""
    if isinstance(model, Backbone):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_backbone(str(model))
    if callable(model):
        return model()
    raise InputError(f"model must be a Backbone, a model path or a factory, got {type(model).__name__}")


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _same_prompt_batches(prompts: list[str], size: int) -> list[slice]:
    """Consecutive runs of one prompt, at most ``size`` long (SLD tokenizes a batch untruncated,
    which fails for prompts of different token lengths beyond the tokenizer's maximum)."""
    out, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start] or i - start == size:
            out.append(slice(start, i))
            start = i
    return out


def _sample_all(backbone: Backbone, prompts: list[str], seeds: list[int], options: SamplingOptions, bs: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for sl in _batches(len(prompts), bs):
            out.append(sample(backbone, prompts[sl], seeds[sl], options).images.float().cpu())
    return torch.cat(out)


def _load_lora(backbone: Backbone, name: str, lora_dir: str | Path) -> str:
    from focusnfix.lora import check_lora_file

    path = check_lora_file(lora_dir)
    # PEFT adapter names become ModuleDict keys: no dots (method names like "beta_0.3" have them)
    adapter = "eval_" + "".join(c if c.isalnum() else "_" for c in name)
    try:
        backbone.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError) as err:
        raise InputError(f"LoRA {path} does not fit the model: {err}") from err
    backbone.pipe.set_adapters([adapter])
    return adapter


def _unload_lora(backbone: Backbone, adapter: str) -> None:
    backbone.pipe.delete_adapters([adapter])


def sld_images(
    backbone: Backbone,
    prompts: list[str],
    seeds: list[int],
    options: SamplingOptions,
    batch_size: int = 8,
    sld_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Safe Latent Diffusion (diffusers' ``StableDiffusionPipelineSafe``) on the same components.

    SLD runs its own denoising loop (its safety guidance is a third UNet branch), with a DDIM
    scheduler built from the backbone's scheduler config (eta = 0). Its x_T is passed in as
    ``latents``: the same per-seed CPU draw as :func:`focusnfix.sampling.initial_noise`
    (divided by ``init_noise_sigma``, which SLD multiplies back), so SLD starts from exactly
    the base image's x_T. SD backbones only.

    Returns:
        ``(N, 3, H, W)`` float in [0, 1].
    """
    from diffusers import DDIMScheduler, StableDiffusionPipelineSafe

    pipe = backbone.pipe
    if type(pipe).__name__ != "StableDiffusionPipeline":
        raise InputError(f"the sld baseline needs a StableDiffusionPipeline, got {type(pipe).__name__}")
    safe = StableDiffusionPipelineSafe(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=DDIMScheduler.from_config(backbone.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    safe.set_progress_bar_config(disable=True)
    h, w = options.height or backbone.default_size[0], options.width or backbone.default_size[1]
    kwargs = dict(sld_kwargs or {})
    kwargs.setdefault("sld_warmup_steps", min(10, max(0, options.num_inference_steps // 5)))
    out = []
    with torch.no_grad():
        for sl in _same_prompt_batches(prompts, batch_size):
            noise = initial_noise(backbone, seeds[sl], h, w) / safe.scheduler.init_noise_sigma
            imgs = safe(
                prompts[sl],
                height=h,
                width=w,
                num_inference_steps=options.num_inference_steps,
                guidance_scale=options.guidance_scale,
                negative_prompt=[options.negative_prompt] * len(prompts[sl]) if options.negative_prompt else None,
                latents=noise,
                output_type="np",
                **kwargs,
            ).images
            out.append(torch.from_numpy(np.asarray(imgs)).permute(0, 3, 1, 2).float())
    return torch.cat(out).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def _scores(
    images: torch.Tensor, prompts: list[str], aspects: dict[str, Aspect], judges: dict[str, Judge], bs: int, device
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rewards: dict[str, list[np.ndarray]] = {a: [] for a in aspects}
    probs: dict[str, list[np.ndarray]] = {j: [] for j in judges}
    with torch.no_grad():
        for sl in _batches(images.shape[0], bs):
            x = images[sl].to(device)
            for name, aspect in aspects.items():
                r = aspect.reward(x, prompts[sl]).float().reshape(-1)
                if r.shape[0] != x.shape[0]:
                    raise InputError(f"aspect {name!r}: reward must be (B,), got {tuple(r.shape)}")
                rewards[name].append(r.cpu().numpy())
            for name, judge in judges.items():
                p = judge.defect_probability(x, prompts[sl]).float().reshape(-1)
                if p.shape[0] != x.shape[0]:
                    raise InputError(f"judge {name!r}: defect_probability must be (B,), got {tuple(p.shape)}")
                probs[name].append(p.cpu().numpy())
    return ({k: np.concatenate(v).astype(np.float64) for k, v in rewards.items()},
            {k: np.concatenate(v).astype(np.float64) for k, v in probs.items()})


def _to_u8(x: torch.Tensor) -> np.ndarray:
    return (x.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def _json_clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


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
# The harness
# ---------------------------------------------------------------------------------------------
def evaluate(
    model: ModelSpec,
    methods: dict[str, str | Path | None],
    aspects: dict[str, Aspect],
    target: str,
    judges: dict[str, Judge] | None,
    prompts: list[str],
    seeds: list[int],
    options: SamplingOptions,
    mask_cfg: Any,
    out_dir: str | Path,
    batch_size: int = 8,
    n_bootstrap: int = 1000,
    sld: bool = False,
    sld_kwargs: dict[str, Any] | None = None,
    eps: float = DEFAULT_EPS,
    judge_threshold: float = 0.5,
    bootstrap_seed: int = 0,
    base_check_tol: float = 1e-5,
) -> dict[str, Any]:
    """Evaluate base vs each method on every (prompt, seed) pair; write ``out_dir/metrics.json``.

    Args:
        model: a :class:`Backbone`, a model string for :func:`load_backbone`, or a factory.
            Must not carry an active LoRA of its own.
        methods: method name -> LoRA directory (or ``pytorch_lora_weights.safetensors``), or None
            for the plain base model (a sanity method: identical to base). ``"base"`` is reserved.
        aspects: aspect name -> aspect; ``target`` is the fine-tuned aspect, whose localizer
            gives the mask; every other one is reported under ``other_rewards``.
        judges: aspect name -> evaluation judge (independent of the rewards), or None.
        prompts, seeds: every prompt is sampled with every seed (N = P * S images, prompt-major).
        options: sampling options (use the training ones: steps, guidance, size).
        mask_cfg: a :class:`focusnfix.config.MaskConfig` (threshold, dilation, feather), as in training.
        out_dir: where ``metrics.json``, ``images.npz`` and ``per_image.json`` go.
        batch_size: images per sampling / scoring call.
        n_bootstrap: bootstrap resamples per interval.
        sld: also run the Safe Latent Diffusion baseline as method ``"sld"`` (SD backbones).
        eps: tolerance in reward units for improved / degraded (see module docstring).
        judge_threshold: a judge's defect probability above this counts as a defect.
        base_check_tol: after all LoRAs were unloaded, the first base batch is sampled again and
            must match the stored base images to this max-abs tolerance (else RuntimeError).

    Returns:
        The ``metrics.json`` dict.
    """
    judges = dict(judges or {})
    if target not in aspects:
        raise InputError(f"target aspect {target!r} is not among the aspects {sorted(aspects)}")
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise InputError("prompts must be a non-empty list of non-empty strings")
    if not seeds:
        raise InputError("seeds must be a non-empty list of integers")
    if "base" in methods:
        raise InputError("method name 'base' is reserved for the base model")
    if sld and SLD_METHOD in methods:
        raise InputError(f"method name {SLD_METHOD!r} is reserved for the SLD baseline")
    for name in methods:
        if not name or any(c in name for c in "/\\ ") or name.startswith("."):
            raise InputError(f"method name {name!r} must be non-empty without spaces or slashes")
    from focusnfix.lora import check_lora_file
    from focusnfix.reference import compute_reference

    for lora in methods.values():
        if lora is not None:
            check_lora_file(lora)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = resolve_backbone(model)
    device = backbone.device
    for m in list(aspects.values()) + list(judges.values()):
        m.to(device).eval().requires_grad_(False)

    items = [(p, int(s)) for p in prompts for s in seeds]
    ip, iseeds = [p for p, _ in items], [s for _, s in items]
    n = len(items)

    # base images, heatmap and mask of the target aspect (training's compute_reference)
    refs = [
        compute_reference(backbone, [aspects[target]], [True], ip[sl], iseeds[sl], options, mask_cfg)
        for sl in _batches(n, batch_size)
    ]
    base = torch.cat([r.images.cpu() for r in refs])
    heatmap = torch.cat([r.heatmap.cpu() for r in refs])
    mask = torch.cat([r.mask.cpu() for r in refs])

    images: dict[str, torch.Tensor] = {}
    for name, lora in methods.items():
        if lora is None:
            images[name] = _sample_all(backbone, ip, iseeds, options, batch_size)
            continue
        adapter = _load_lora(backbone, name, lora)
        try:
            images[name] = _sample_all(backbone, ip, iseeds, options, batch_size)
        finally:
            _unload_lora(backbone, adapter)
    if sld:
        images[SLD_METHOD] = sld_images(backbone, ip, iseeds, options, batch_size, sld_kwargs)

    # the base model must be untouched by loading / unloading LoRAs
    first = _batches(n, batch_size)[0]
    again = _sample_all(backbone, ip[first], iseeds[first], options, batch_size)
    base_check = float((again - base[first]).abs().max())
    if base_check > base_check_tol:
        raise RuntimeError(f"base images changed by {base_check:.3g} after unloading the LoRAs")

    # scores
    base_rewards, base_probs = _scores(base, ip, aspects, judges, batch_size, device)
    entries: dict[str, Any] = {}
    per_image_out: dict[str, Any] = {}
    entry, _ = method_metrics(target, base_rewards, base_probs, None, None, None, eps, judge_threshold,
                              n_bootstrap, bootstrap_seed)
    entries["base"] = entry
    per_image_out["base"] = {"rewards": base_rewards, "judge_probability": base_probs}
    b_np = base.double().numpy()
    m_np = mask.double().numpy()
    for name, imgs in images.items():
        rewards, probs = _scores(imgs, ip, aspects, judges, batch_size, device)
        x = imgs.double().numpy()
        cmp = {
            "outside_psnr": np.array([outside_psnr(x[i], b_np[i], m_np[i]) for i in range(n)]),
            "outside_ssim": np.array([outside_ssim(x[i], b_np[i], m_np[i]) for i in range(n)]),
            "inside_change": np.array([inside_change(x[i], b_np[i], m_np[i]) for i in range(n)]),
        }
        entry, per_image = method_metrics(target, rewards, probs, base_rewards, base_probs, cmp, eps,
                                          judge_threshold, n_bootstrap, bootstrap_seed)
        entries[name] = entry
        per_image_out[name] = {"rewards": rewards, "judge_probability": probs, **per_image}

    notes = []
    lpips_note = _lpips_note()
    if lpips_note:
        notes.append(lpips_note)
    h, w = base.shape[-2:]
    metrics = {
        "aspect": target,
        "n_images": n,
        "methods": entries,
        "aspects": list(aspects),
        "judges": list(judges),
        "prompts": list(prompts),
        "seeds": [int(s) for s in seeds],
        "settings": {
            "eps": eps,
            "judge_threshold": judge_threshold,
            "n_bootstrap": n_bootstrap,
            "bootstrap_seed": bootstrap_seed,
            "psnr_cap_db": PSNR_CAP,
            "sampling": {
                "num_inference_steps": options.num_inference_steps,
                "guidance_scale": options.guidance_scale,
                "height": int(h),
                "width": int(w),
                "negative_prompt": options.negative_prompt,
            },
            "mask": mask_cfg.model_dump() if hasattr(mask_cfg, "model_dump") else dict(vars(mask_cfg)),
            "loras": {k: (str(v) if v is not None else None) for k, v in methods.items()},
            "sld": sld,
        },
        "base_check_max_abs_diff": base_check,
        "mean_mask_area": float(mask.float().mean()),
        "notes": notes,
    }
    arrays = {"base": _to_u8(base), "heatmap": _to_u8(heatmap), "mask": _to_u8(mask)}
    arrays.update({f"method__{k}": _to_u8(v) for k, v in images.items()})
    atomic_write(out_dir / "images.npz", lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".npz")
    per_image_doc = {"items": [{"prompt": p, "seed": s} for p, s in items], "methods": per_image_out}
    atomic_write_text(out_dir / "per_image.json", json.dumps(_json_clean(_tolists(per_image_doc))))
    metrics = _json_clean(metrics)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _tolists(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _tolists(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def _lpips_note() -> str | None:
    try:
        import lpips  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure (missing, torchvision mismatch) = skip
        return "lpips: not computed (package not installed or not importable)"
    return "lpips: installed but not computed (its backbone weights need a download; not attempted offline)"


# ---------------------------------------------------------------------------------------------
# Reading results back
# ---------------------------------------------------------------------------------------------
def load_eval(eval_dir: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """``(metrics, arrays, per_image)`` of an evaluation directory (arrays as in images.npz)."""
    eval_dir = Path(eval_dir)
    mpath = eval_dir / "metrics.json"
    if not mpath.is_file():
        raise InputError(f"{eval_dir} is not an evaluation directory (no metrics.json)")
    try:
        metrics = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{mpath} is not valid JSON: {err}") from err
    ipath = eval_dir / "images.npz"
    arrays: dict[str, np.ndarray] = {}
    if ipath.is_file():
        with np.load(ipath) as data:
            arrays = {k: data[k] for k in data.files}
    ppath = eval_dir / "per_image.json"
    per_image = json.loads(ppath.read_text()) if ppath.is_file() else {}
    return metrics, arrays, per_image


def write_metrics(eval_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Atomically rewrite ``eval_dir/metrics.json``."""
    path = Path(eval_dir) / "metrics.json"
    atomic_write_text(path, json.dumps(_json_clean(metrics), indent=2))
    return path


# ---------------------------------------------------------------------------------------------
# Config-driven pieces (shared by the CLI and the beta sweep)
# ---------------------------------------------------------------------------------------------
def aspects_from_config(config: Any) -> tuple[dict[str, Aspect], str, dict[str, Judge]]:
    """``(aspects by name, target, judges)`` from a training config.

    The target is the first aspect with a non-zero weight. Judges exist for ``toyworld``
    aspects only (the toy world's independent judge of the same aspect), when packaged.
    """
    from focusnfix.reference import build_aspects

    built = build_aspects(config)
    aspects = {a.name: a for a in built}
    if len(aspects) != len(built):
        raise InputError(f"aspects need distinct names, got {[a.name for a in built]}")
    target = next((a.name for a, c in zip(built, config.aspects, strict=True) if c.weight != 0), built[0].name)
    judges: dict[str, Judge] = {}
    for a, c in zip(built, config.aspects, strict=True):
        if c.type == "toyworld":
            try:
                from focusnfix.toyworld import load_judge

                judges[a.name] = load_judge(c.args.get("aspect", a.name))
            except (ImportError, FileNotFoundError, ValueError):
                pass
    return aspects, target, judges


def sweep(
    config_path: str | Path,
    betas: list[float],
    out_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    prompts: list[str] | None = None,
    seeds: list[int] | None = None,
    batch_size: int = 8,
    n_bootstrap: int = 1000,
    progress: bool = False,
) -> dict[str, Any]:
    """Train one LoRA per beta (``out_dir/beta_<b>/``, beta = 0 is DRaFT) and evaluate them all.

    Each run is the config with ``objective.beta=b`` and ``train.output_dir=out_dir/beta_<b>``
    (plus ``overrides``). All LoRAs are evaluated together against one base in
    ``out_dir/eval/`` (methods ``beta_<b>``), on ``prompts`` (default: the config's training
    prompts) x ``seeds`` (default: 10000, 10001, i.e. noise never used in training).
    A finished run (its ``lora/`` exists) is not retrained.

    Writes ``out_dir/sweep.json``: ``{"aspect", "eval_dir", "points": [{"beta", "method",
    "run_dir", "lora_dir", "target_gain": S, "target_reward": S, "outside_psnr": S,
    "outside_ssim": S, "improved_share": S, "degraded_share": S, "others_degraded_share": S}]}``
    with S as in metrics.json; ``target_gain`` = mean per-image target reward change vs base.
    """
    from focusnfix.config import load_config, resolve_prompts
    from focusnfix.lora import LORA_WEIGHT_NAME
    from focusnfix.reference import sampling_options
    from focusnfix.train import FocusNFixTrainer

    if not betas:
        raise InputError("--betas must list at least one beta")
    if any(not math.isfinite(b) or b < 0 for b in betas):
        raise InputError(f"--betas must be finite and >= 0, got {betas}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[float, Path] = {}
    config = None
    for b in betas:
        run_dir = out_dir / f"beta_{b:g}"
        config = load_config(config_path, [*overrides, f"objective.beta={b}", f"train.output_dir={run_dir}"])
        if not (run_dir / "lora" / LORA_WEIGHT_NAME).is_file():
            FocusNFixTrainer(config, progress=progress).train()
        runs[b] = run_dir
    assert config is not None
    aspects, target, judges = aspects_from_config(config)
    eval_prompts = prompts or resolve_prompts(config.data, Path(config_path).parent)
    eval_seeds = seeds if seeds is not None else [10000, 10001]
    methods = {f"beta_{b:g}": runs[b] / "lora" for b in betas}
    metrics = evaluate(
        config.model.path, methods, aspects, target, judges, eval_prompts, eval_seeds, sampling_options(config),
        config.mask, out_dir / "eval", batch_size=batch_size, n_bootstrap=n_bootstrap,
    )
    keys = ("target_gain", "target_reward", "outside_psnr", "outside_ssim", "improved_share", "degraded_share",
            "others_degraded_share")
    points = []
    for b in betas:
        name = f"beta_{b:g}"
        entry = metrics["methods"][name]
        points.append({"beta": b, "method": name, "draft": b == 0, "run_dir": str(runs[b]),
                       "lora_dir": str(runs[b] / "lora"), **{k: entry.get(k) for k in keys}})
    doc = {"aspect": target, "eval_dir": str(out_dir / "eval"), "config": str(config_path), "points": points}
    atomic_write_text(out_dir / "sweep.json", json.dumps(_json_clean(doc), indent=2))
    return doc


__all__ = [
    "aspects_from_config",
    "sweep",
    "DEFAULT_EPS",
    "PSNR_CAP",
    "SLD_METHOD",
    "bootstrap_stat",
    "evaluate",
    "inside_change",
    "load_eval",
    "method_metrics",
    "outside_psnr",
    "outside_ssim",
    "resolve_backbone",
    "sld_images",
    "write_metrics",
]
