"""Evaluation harness: base model vs fine-tuned LoRAs vs baselines on held-out prompts and seeds.

:func:`evaluate` samples every (prompt, seed) pair (``N = len(prompts) * len(seeds)`` images,
prompt-major order) with the base model and with each method, from the same x_T per seed, and
writes ``out_dir/metrics.json`` in the schema of DESIGN.md plus what the report needs.

The metrics and their exact definitions are in :mod:`focusnfix.metrics`; the SLD baseline is
in :mod:`focusnfix.baselines`, the beta sweep (which trains) in :mod:`focusnfix.sweep`.

Files in ``out_dir``: ``metrics.json``; ``images.npz`` (``base`` ``(N, 3, H, W)`` uint8,
``heatmap`` ``(N, 1, H, W)`` uint8 (0-255 for [0, 1]), ``mask`` ``(N, 1, H, W)`` uint8,
``method__<name>`` ``(N, 3, H, W)`` uint8 per method); ``per_image.json`` (prompts, seeds,
per-image rewards, judge probabilities and metrics per method).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from focusnfix import toyworld
from focusnfix.aspects.base import Aspect, Judge
from focusnfix.backbones import Backbone, load_backbone
from focusnfix.baselines import SLD_METHOD, sld_images
from focusnfix.errors import InputError
from focusnfix.files import atomic_write, atomic_write_text
from focusnfix.lora import check_lora_file
from focusnfix.metrics import (
    DEFAULT_EPS,
    PSNR_CAP,
    inside_change,
    json_clean,
    method_metrics,
    outside_psnr,
    outside_ssim,
    tolists,
)
from focusnfix.reference import build_aspects, compute_reference
from focusnfix.sampling import SamplingOptions, sample

ModelSpec = Backbone | str | Callable[[], Backbone]


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


def _sample_all(
    backbone: Backbone, prompts: list[str], seeds: list[int], options: SamplingOptions, bs: int,
    desc: str = "sampling", progress: bool = False,
) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for sl in tqdm(_batches(len(prompts), bs), desc=desc, unit="batch", disable=not progress):
            out.append(sample(backbone, prompts[sl], seeds[sl], options).images.float().cpu())
    return torch.cat(out)


def load_lora(backbone: Backbone, name: str, lora_dir: str | Path) -> str:
    """Load a LoRA (directory or file) as the backbone's only active adapter; returns the adapter name.

    Raises:
        InputError: no readable LoRA file there, or one whose keys or shapes do not fit the model.
    """
    path = check_lora_file(lora_dir)
    # PEFT adapter names become ModuleDict keys: no dots (method names like "beta_0.3" have them)
    adapter = "eval_" + "".join(c if c.isalnum() else "_" for c in name)
    try:
        backbone.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        more = f" (+{len(lines) - 2} more)" if len(lines) > 2 else ""
        raise InputError(f"LoRA {path} does not fit the model: {' '.join(lines[:2])}{more}") from err
    backbone.pipe.set_adapters([adapter])
    return adapter


def _unload_lora(backbone: Backbone, adapter: str) -> None:
    backbone.pipe.delete_adapters([adapter])


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def _scores(
    images: torch.Tensor, prompts: list[str], aspects: dict[str, Aspect], judges: dict[str, Judge], bs: int, device,
    bar: tqdm,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rewards: dict[str, list[np.ndarray]] = {a: [] for a in aspects}
    probs: dict[str, list[np.ndarray]] = {j: [] for j in judges}
    with torch.no_grad():
        for sl in _batches(images.shape[0], bs):
            bar.update(1)
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
    progress: bool = False,
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
        progress: progress bars for sampling (per method) and scoring.

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
        for sl in tqdm(_batches(n, batch_size), desc="base images and masks", unit="batch", disable=not progress)
    ]
    base = torch.cat([r.images.cpu() for r in refs])
    heatmap = torch.cat([r.heatmap.cpu() for r in refs])
    mask = torch.cat([r.mask.cpu() for r in refs])

    images: dict[str, torch.Tensor] = {}
    for name, lora in methods.items():
        if lora is None:
            images[name] = _sample_all(backbone, ip, iseeds, options, batch_size, f"sampling {name}", progress)
            continue
        adapter = load_lora(backbone, name, lora)
        try:
            images[name] = _sample_all(backbone, ip, iseeds, options, batch_size, f"sampling {name}", progress)
        finally:
            _unload_lora(backbone, adapter)
    if sld:
        images[SLD_METHOD] = sld_images(backbone, ip, iseeds, options, batch_size, sld_kwargs, progress)

    # the base model must be untouched by loading / unloading LoRAs
    first = _batches(n, batch_size)[0]
    again = _sample_all(backbone, ip[first], iseeds[first], options, batch_size)
    base_check = float((again - base[first]).abs().max())
    if base_check > base_check_tol:
        raise RuntimeError(f"base images changed by {base_check:.3g} after unloading the LoRAs")

    # scores
    bar = tqdm(total=(1 + len(images)) * len(_batches(n, batch_size)), desc="scoring", unit="batch",
               disable=not progress)
    base_rewards, base_probs = _scores(base, ip, aspects, judges, batch_size, device, bar)
    entries: dict[str, Any] = {}
    per_image_out: dict[str, Any] = {}
    entry, _ = method_metrics(target, base_rewards, base_probs, None, None, None, eps, judge_threshold,
                              n_bootstrap, bootstrap_seed)
    entries["base"] = entry
    per_image_out["base"] = {"rewards": base_rewards, "judge_probability": base_probs}
    b_np = base.double().numpy()
    m_np = mask.double().numpy()
    for name, imgs in images.items():
        rewards, probs = _scores(imgs, ip, aspects, judges, batch_size, device, bar)
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
    bar.close()

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
    atomic_write_text(out_dir / "per_image.json", json.dumps(json_clean(tolists(per_image_doc))))
    metrics = json_clean(metrics)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


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
    atomic_write_text(path, json.dumps(json_clean(metrics), indent=2))
    return path


# ---------------------------------------------------------------------------------------------
# Config-driven pieces (shared by the CLI and the beta sweep)
# ---------------------------------------------------------------------------------------------
def aspects_from_config(config: Any) -> tuple[dict[str, Aspect], str, dict[str, Judge]]:
    """``(aspects by name, target, judges)`` from a training config.

    The target is the first aspect with a non-zero weight. Judges exist for ``toyworld``
    aspects only (the toy world's independent judge of the same aspect), when packaged.
    """
    built = build_aspects(config)
    aspects = {a.name: a for a in built}
    if len(aspects) != len(built):
        raise InputError(f"aspects need distinct names, got {[a.name for a in built]}")
    target = next((a.name for a, c in zip(built, config.aspects, strict=True) if c.weight != 0), built[0].name)
    judges: dict[str, Judge] = {}
    for a, c in zip(built, config.aspects, strict=True):
        if c.type == "toyworld":
            try:
                judges[a.name] = toyworld.load_judge(c.args.get("aspect", a.name))
            except (ImportError, FileNotFoundError, ValueError):
                pass
    return aspects, target, judges


def summary_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of ``metrics.json``: one row per method, mean [95% interval] of key metrics."""
    target = metrics["aspect"]

    def fmt(stat: Any, digits: int = 2) -> str:
        if not isinstance(stat, dict) or stat.get("mean") is None:
            return "-"
        lo, hi = stat["ci95"]
        return f"{stat['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    rows = [["method", f"{target} reward", f"{target} judge defect", "outside PSNR", "improved", "degraded",
             "others degraded"]]
    for name, m in metrics["methods"].items():
        rows.append([name, fmt(m.get("target_reward")), fmt((m.get("judge_defect_rate") or {}).get(target)),
                     fmt(m.get("outside_psnr"), 1), fmt(m.get("improved_share")), fmt(m.get("degraded_share")),
                     fmt(m.get("others_degraded_share"))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


__all__ = [
    "ModelSpec",
    "aspects_from_config",
    "evaluate",
    "load_eval",
    "load_lora",
    "resolve_backbone",
    "summary_table",
    "write_metrics",
]
