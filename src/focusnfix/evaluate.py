"""Evaluation harness: base model vs fine-tuned LoRAs vs baselines on held-out prompts and seeds.

:func:`evaluate` samples every (prompt, seed) pair (``N = len(prompts) * len(seeds)`` images,
prompt-major order) with the base model and with each method, from the same x_T per seed, and
writes ``out_dir/metrics.json`` (layout in docs/evaluation.md, "Metrics") plus what the report needs.

The metrics and their exact definitions are in :mod:`focusnfix.metrics`; the SLD baseline is
in :mod:`focusnfix.baselines`, the beta sweep (which trains) in :mod:`focusnfix.sweep`.

Files in ``out_dir``: ``metrics.json``; ``images.npz`` (``base`` ``(N, 3, H, W)`` uint8,
``heatmap`` ``(N, 1, H, W)`` uint8 (0-255 for [0, 1]), ``mask`` ``(N, 1, H, W)`` uint8,
``method__<name>`` ``(N, 3, H, W)`` uint8 per method, of its first training run, and
``method__<name>__run<r>`` of its other runs); ``per_image.json`` (prompts, seeds, per-image
rewards, judge probabilities and metrics per method: ``(N,)`` lists, ``(R, N)`` for R runs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from focusnfix import toyworld
from focusnfix.aspects.base import Aspect, CalibratedJudge, Judge
from focusnfix.backbones import Backbone, load_backbone
from focusnfix.baselines import SLD_METHOD, sld_images
from focusnfix.errors import InputError
from focusnfix.files import atomic_write, atomic_write_text, read_json, read_npz
from focusnfix.inference import lora_steps_for
from focusnfix.lora import load_lora_into, lora_identity
from focusnfix.metrics import (
    DEFAULT_EPS,
    PSNR_CAP,
    inside_change,
    json_clean,
    method_metrics,
    outside_mse,
    outside_ssim,
    paired_comparison,
    psnr_of_mse,
    tolists,
)
from focusnfix.reference import build_aspects, compute_reference, sampling_options
from focusnfix.sampling import SamplingOptions, sample

ModelSpec = Backbone | str | Callable[[], Backbone]
#: a method's LoRA: a directory or file, a list of them (one per training run), or None (base)
MethodSpec = str | Path | None | list[str | Path | None]


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
    # PEFT adapter names become ModuleDict keys: no dots (method names like "beta_0.3" have them)
    adapter = "eval_" + "".join(c if c.isalnum() else "_" for c in name)
    load_lora_into(backbone.pipe, lora_dir, adapter_name=adapter)
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
    methods: dict[str, MethodSpec],
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
    localizers: list[tuple[Aspect, float | str]] | None = None,
    compare: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Evaluate base vs each method on every (prompt, seed) pair; write ``out_dir/metrics.json``.

    Args:
        model: a :class:`Backbone`, a model string for :func:`load_backbone`, or a factory.
            Must not carry an active LoRA of its own.
        methods: method name -> LoRA directory (or ``pytorch_lora_weights.safetensors``), a list
            of them (one per training run, i.e. training seed; statistics resample them), or None
            for the plain base model (a sanity method: identical to base). ``"base"`` is reserved.
        aspects: aspect name -> aspect; ``target`` is the fine-tuned aspect; every other one is
            reported under ``other_rewards``.
        judges: aspect name -> evaluation judge (independent of the rewards), or None.
        prompts, seeds: every prompt is sampled with every seed (N = P * S images, prompt-major).
        options: sampling options (use the training ones: steps, guidance, size).
        mask_cfg: a :class:`focusnfix.config.MaskConfig`, as in training.
        out_dir: where ``metrics.json``, ``images.npz`` and ``per_image.json`` go.
        batch_size: images per sampling / scoring call.
        n_bootstrap: bootstrap resamples per interval.
        sld: also run the Safe Latent Diffusion baseline as method ``"sld"`` (SD backbones).
        eps: the smallest noise floor in reward units (see :mod:`focusnfix.metrics`).
        judge_threshold: a judge's defect probability above this counts as a defect.
        base_check_tol: after all LoRAs were unloaded, the first base batch is sampled again and
            must match the stored base images to this max-abs tolerance (else RuntimeError).
        progress: progress bars for sampling (per method) and scoring.
        localizers: the training run's localizing aspects with their gates, whose masks are
            united exactly as in training (:func:`evaluation_setup` reads them from a config);
            default: the target aspect alone with gate ``"auto"``.
        compare: pairs ``(A, B)`` of method names: ``metrics["comparisons"]["A - B"]`` holds the
            paired differences (same runs count needed).

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
    runs: dict[str, list[str | Path | None]] = {}
    for name, spec in methods.items():
        runs[name] = list(spec) if isinstance(spec, (list, tuple)) else [spec]
        if not runs[name]:
            raise InputError(f"method {name!r}: an empty list of LoRAs")
    # what each evaluated LoRA applies (lora_identity): `push --eval` checks that an evaluation is of the LoRA it uploads
    lora_ids = {name: [None if lora is None else lora_identity(lora) for lora in loras] for name, loras in runs.items()}
    for a, b in compare or []:
        if a not in runs or b not in runs:
            raise InputError(f"compare ({a}, {b}): both must be methods, got {sorted(runs)}")
        if len(runs[a]) != len(runs[b]):
            raise InputError(f"compare ({a}, {b}): a paired difference needs as many runs of each, "
                             f"got {len(runs[a])} and {len(runs[b])}")
    localizers = localizers if localizers is not None else [(aspects[target], "auto")]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = resolve_backbone(model)
    device = backbone.device
    for m in list(aspects.values()) + list(judges.values()) + [loc for loc, _ in localizers]:
        m.to(device).eval().requires_grad_(False)

    items = [(p, int(s)) for p in prompts for s in seeds]
    ip, iseeds = [p for p, _ in items], [s for _, s in items]
    n = len(items)
    groups = np.repeat(np.arange(len(prompts)), len(seeds))  # bootstrap clusters: prompts

    # base images, heatmap and mask: training's compute_reference with the run's localizers and gates
    loc_aspects, loc_gates = [a for a, _ in localizers], [g for _, g in localizers]
    refs = [
        compute_reference(backbone, loc_aspects, [True] * len(loc_aspects), ip[sl], iseeds[sl], options, mask_cfg,
                          loc_gates)
        for sl in tqdm(_batches(n, batch_size), desc="base images and masks", unit="batch", disable=not progress)
    ]
    base = torch.cat([r.images.cpu() for r in refs])
    heatmap = torch.cat([r.heatmap.cpu() for r in refs])
    mask = torch.cat([r.mask.cpu() for r in refs])

    images: dict[str, list[torch.Tensor]] = {}
    for name, loras in runs.items():
        images[name] = []
        for r, lora in enumerate(loras):
            desc = f"sampling {name}" + (f" run {r}" if len(loras) > 1 else "")
            if lora is None:
                images[name].append(_sample_all(backbone, ip, iseeds, options, batch_size, desc, progress))
                continue
            adapter = load_lora(backbone, f"{name}_{r}", lora)
            # a LoRA trained with lora.active_steps acts only on the last steps, as in its training (by
            # timestep when evaluated with another step count)
            lora_options = dataclasses.replace(options, lora_steps=lora_steps_for(backbone, lora, options))
            try:
                images[name].append(_sample_all(backbone, ip, iseeds, lora_options, batch_size, desc, progress))
            finally:
                _unload_lora(backbone, adapter)
    if sld:
        images[SLD_METHOD] = [sld_images(backbone, ip, iseeds, options, batch_size, sld_kwargs, progress)]

    # the base model must be untouched by loading / unloading LoRAs
    first = _batches(n, batch_size)[0]
    again = _sample_all(backbone, ip[first], iseeds[first], options, batch_size)
    base_check = float((again - base[first]).abs().max())
    if base_check > base_check_tol:
        raise RuntimeError(f"base images changed by {base_check:.3g} after unloading the LoRAs")

    # scores
    total = 1 + sum(len(v) for v in images.values())
    bar = tqdm(total=total * len(_batches(n, batch_size)), desc="scoring", unit="batch", disable=not progress)
    thresholds = {a: aspect.reward_threshold for a, aspect in aspects.items()}
    base_rewards, base_probs = _scores(base, ip, aspects, judges, batch_size, device, bar)
    entries: dict[str, Any] = {}
    per_image_out: dict[str, Any] = {}
    per_image_all: dict[str, Any] = {}
    entry, _ = method_metrics(target, base_rewards, base_probs, None, None, None, groups, thresholds, eps,
                              judge_threshold, n_bootstrap, bootstrap_seed)
    entries["base"] = entry
    per_image_out["base"] = {"rewards": base_rewards, "judge_probability": base_probs}
    b_np = base.double().numpy()
    m_np = mask.double().numpy()
    for name, run_images in images.items():
        scored = [_scores(imgs, ip, aspects, judges, batch_size, device, bar) for imgs in run_images]
        rewards = {a: np.stack([s[0][a] for s in scored]) for a in aspects}
        probs = {j: np.stack([s[1][j] for s in scored]) for j in judges}
        cmp: dict[str, list[np.ndarray]] = {"outside_mse": [], "outside_ssim": [], "inside_change": []}
        for imgs in run_images:
            x = imgs.double().numpy()
            cmp["outside_mse"].append(np.array([outside_mse(x[i], b_np[i], m_np[i]) for i in range(n)]))
            cmp["outside_ssim"].append(np.array([outside_ssim(x[i], b_np[i], m_np[i]) for i in range(n)]))
            cmp["inside_change"].append(np.array([inside_change(x[i], b_np[i], m_np[i]) for i in range(n)]))
        cmp_arr = {k: np.stack(v) for k, v in cmp.items()}
        entry, per_image = method_metrics(target, rewards, probs, base_rewards, base_probs, cmp_arr, groups,
                                          thresholds, eps, judge_threshold, n_bootstrap, bootstrap_seed)
        entry["n_runs"] = len(run_images)
        entries[name] = entry
        per_image_all[name] = per_image
        one = (lambda v: v[0]) if len(run_images) == 1 else (lambda v: v)  # noqa: E731 - (N,) for one run
        per_image_out[name] = {"rewards": {a: one(v) for a, v in rewards.items()},
                               "judge_probability": {j: one(v) for j, v in probs.items()},
                               "outside_psnr": one(psnr_of_mse(cmp_arr["outside_mse"])),
                               **{k: one(v) for k, (v, _) in per_image.items() if k != "outside_psnr"}}
    bar.close()
    comparisons = {
        f"{a} - {b}": paired_comparison(per_image_all[a], per_image_all[b], groups, n_bootstrap, bootstrap_seed)
        for a, b in compare or []
    }

    notes = []
    lpips_note = _lpips_note()
    if lpips_note:
        notes.append(lpips_note)
    for name, judge in judges.items():
        if isinstance(judge, CalibratedJudge):  # its 0.5 is another raw threshold: say which
            notes.append(f"The {name} judge runs at its own operating point: its probability is moved so that "
                         f"{judge_threshold} on it is {judge.threshold} on the judge as trained.")
    h, w = base.shape[-2:]
    # one id in all three files: load_eval refuses a directory whose files come from two evaluations
    # (each file is written atomically, but a kill between them would leave new images by old metrics)
    eval_id = uuid.uuid4().hex
    metrics = {
        "eval_id": eval_id,
        "aspect": target,
        "n_images": n,
        "methods": entries,
        "comparisons": comparisons,
        "aspects": list(aspects),
        "judges": list(judges),
        "prompts": list(prompts),
        "seeds": [int(s) for s in seeds],
        "settings": {
            "eps": eps,
            "judge_threshold": judge_threshold,
            "n_bootstrap": n_bootstrap,
            "bootstrap_seed": bootstrap_seed,
            "bootstrap": "clustered: training runs x prompts",
            "psnr_cap_db": PSNR_CAP,
            "sampling": {
                "num_inference_steps": options.num_inference_steps,
                "guidance_scale": options.guidance_scale,
                "height": int(h),
                "width": int(w),
                "negative_prompt": options.negative_prompt,
            },
            "mask": mask_cfg.model_dump() if hasattr(mask_cfg, "model_dump") else dict(vars(mask_cfg)),
            "localizers": [{"aspect": a.name, "gate": g} for a, g in localizers],
            "loras": {k: [str(v) if v is not None else None for v in vs] for k, vs in runs.items()},
            "lora_identity": lora_ids,
            "sld": sld,
        },
        "base_check_max_abs_diff": base_check,
        "mean_mask_area": float(mask.float().mean()),
        "empty_mask_share": float((mask.flatten(1).amax(1) <= 0).float().mean()),
        "notes": notes,
    }
    arrays = {"base": _to_u8(base), "heatmap": _to_u8(heatmap), "mask": _to_u8(mask), "eval_id": np.array(eval_id)}
    for k, vs in images.items():
        for r, v in enumerate(vs):
            arrays[f"method__{k}" + (f"__run{r}" if r else "")] = _to_u8(v)
    atomic_write(out_dir / "images.npz", lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".npz")
    per_image_doc = {"eval_id": eval_id, "items": [{"prompt": p, "seed": s} for p, s in items], "methods": per_image_out}
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
    metrics = read_json(mpath, "evaluation metrics")
    lacking = [k for k, kind in (("aspect", str), ("methods", dict)) if not isinstance(metrics.get(k), kind)]
    if lacking:
        raise InputError(f"{mpath} lacks {' and '.join(repr(k) for k in lacking)}: not the metrics.json of a "
                         "focusnfix evaluation (focusnfix eval writes one)")
    ipath = eval_dir / "images.npz"
    arrays = read_npz(ipath, "evaluation images") if ipath.is_file() else {}
    ppath = eval_dir / "per_image.json"
    per_image = read_json(ppath, "per-image results") if ppath.is_file() else {}
    ids = {"images.npz": str(arrays.pop("eval_id")) if "eval_id" in arrays else None,
           "per_image.json": per_image.get("eval_id")}
    mixed = [name for name, i in ids.items() if i is not None and i != metrics.get("eval_id")]
    if mixed:
        raise InputError(f"{eval_dir}: {', '.join(mixed)} come from another evaluation than metrics.json (an "
                         "evaluation stopped while writing its files?); run the evaluation again")
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
    aspects only (the toy world's independent judge of the same aspect), when packaged. A config
    of toy world aspects only also reports every other toy aspect (reward and judge), so that
    "degraded on another aspect" can be measured.
    """
    built = build_aspects(config)
    aspects = {a.name: a for a in built}
    if len(aspects) != len(built):
        raise InputError(f"aspects need distinct names, got {[a.name for a in built]}")
    target = next((a.name for a, c in zip(built, config.aspects, strict=True) if c.weight != 0), built[0].name)
    judges: dict[str, Judge] = {}
    toy = [c.args.get("aspect", a.name) for a, c in zip(built, config.aspects, strict=True) if c.type == "toyworld"]
    for a, c in zip(built, config.aspects, strict=True):
        if c.type == "toyworld":
            try:
                judges[a.name] = toyworld.load_judge(c.args.get("aspect", a.name))
            except (ImportError, FileNotFoundError, ValueError):
                pass
    if toy and len(toy) == len(built):
        covered = {"safety" if t == "safety_narrow" else t for t in toy}
        for name in toyworld.ASPECTS:
            if name not in covered and name not in aspects:
                aspects[name] = toyworld.load_aspect(name)
                judges[name] = toyworld.load_judge(name)
    return aspects, target, judges


def model_loader(config: Any, path: str | None = None) -> Callable[[], Backbone]:
    """A factory loading the config's model as training did: ``model.path`` (or ``path``), its
    ``dtype``, ``variant`` and ``revision``, on ``train.device`` (``auto``: CUDA when available)."""
    m = config.model
    device = config.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return functools.partial(load_backbone, path or m.path, m.dtype, m.variant, m.revision, device)


def evaluation_setup(config: Any, aspects: dict[str, Aspect] | None = None) -> dict[str, Any]:
    """What evaluation takes from a training config so that it sees the images and masks training saw.

    Returns ``{"options": SamplingOptions, "mask_cfg": MaskConfig, "localizers": [(aspect, gate)],
    "model": factory}``: the run's sampling options, mask settings and localizing aspects with their
    gates, each aspect built from the config's own entry (its localizer included), as in training,
    and :func:`model_loader`'s factory of the run's model (dtype, variant, revision, device).

    Args:
        aspects: :func:`aspects_from_config`'s aspects of this config, reused as the localizers
            (else they are built again: a second copy of every localizing model in memory).
    """
    # aspects_from_config puts the config's own aspects first, in config order
    built = list(aspects.values())[: len(config.aspects)] if aspects is not None else build_aspects(config)
    localizers = [(a, c.gate) for a, c in zip(built, config.aspects, strict=True) if c.localize]
    return {"options": sampling_options(config), "mask_cfg": config.mask, "localizers": localizers,
            "model": model_loader(config)}


#: config fields that must agree between runs evaluated together (they shape Î0 and its mask)
SHARED_FIELDS = ("model", "sampling", "mask", "aspects")


def run_config(path: str | Path) -> Any:
    """The training config of a run directory (``RUN/config.yaml``), or of the run holding a LoRA
    directory (``RUN/lora``); None when there is none."""
    from focusnfix.config import load_config

    p = Path(path)
    for d in (p, p.parent, p.parent.parent):
        if (d / "config.yaml").is_file() and (d / "lora").exists():
            return load_config(d / "config.yaml", [])
    return None


def check_same_setup(configs: dict[str, Any]) -> None:
    """Raise InputError naming the fields where runs evaluated together differ (sampling, mask, ...)."""
    from focusnfix.reference import changed_fields

    items = list(configs.items())
    first_name, first = items[0]
    for name, cfg in items[1:]:
        diff = []
        for section in SHARED_FIELDS:
            a, b = first.model_dump(mode="json")[section], cfg.model_dump(mode="json")[section]
            if section == "aspects":
                a, b = [{k: v for k, v in x.items() if k != "weight"} for x in a], \
                       [{k: v for k, v in x.items() if k != "weight"} for x in b]
            diff += changed_fields(a, b, section)
        diff = [d for d in diff if d.split(".")[-1] not in ("grad_mode", "k", "lv_n", "checkpoint_unet",
                                                             "checkpoint_vae", "merge_lora", "compile_unet")]
        if diff:
            raise InputError(f"runs {first_name!r} and {name!r} were trained with different {', '.join(diff)}; "
                             "evaluate them separately (each against the images and masks its training used)")


def summary_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of ``metrics.json``: one row per method, mean [95% interval] of key metrics
    (the judges' view first; "reward improved" is the training reward's, above its noise floor)."""
    target = metrics["aspect"]

    def fmt(stat: Any, digits: int = 2) -> str:
        if not isinstance(stat, dict) or stat.get("mean") is None:
            return "-"
        lo, hi = stat["ci95"]
        return f"{stat['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    # judge columns first (what the claim is measured by), then the reward's own view
    rows = [["method", f"{target} judge defect", "defect removed (judge)", "new defect (judge)", "outside PSNR",
             "others' judge flips", f"{target} reward", "reward improved"]]
    for name, m in metrics["methods"].items():
        rows.append([name, fmt((m.get("judge_defect_rate") or {}).get(target)), fmt(m.get("removal_share")),
                     fmt(m.get("new_defect_share")), fmt(m.get("outside_psnr"), 1), fmt(m.get("others_degraded_share")),
                     fmt(m.get("target_reward")), fmt(m.get("improved_share"))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


__all__ = [
    "ModelSpec",
    "aspects_from_config",
    "check_same_setup",
    "evaluate",
    "evaluation_setup",
    "model_loader",
    "load_eval",
    "load_lora",
    "resolve_backbone",
    "run_config",
    "summary_table",
    "write_metrics",
]
