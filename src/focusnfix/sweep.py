"""The beta sweep: one LoRA per constraint weight, trained and then evaluated together.

The only part of evaluation that trains; :mod:`focusnfix.evaluate` itself never imports the trainer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from focusnfix.config import load_config, resolve_prompts
from focusnfix.errors import InputError
from focusnfix.evaluate import aspects_from_config, check_same_setup, evaluate, evaluation_setup
from focusnfix.files import atomic_write_text, read_json
from focusnfix.metrics import json_clean

#: the selection rule's floor on the outside PSNR (dB) of a validation point
SELECT_MIN_PSNR = 35.0
#: the selection rule's ceiling on the share of validation images where another aspect's reward drops
#: (3 of 32 images: about the noise of a 32-image validation set)
SELECT_MAX_OTHERS_DROP = 0.10
#: ... raised, when DRaFT was run on the same validation split, to this share of DRaFT's own figure
#: (the claim's target: others degraded <= half of DRaFT's)
SELECT_OTHERS_VS_DRAFT = 0.5


def _mean(p: dict[str, Any], key: str, default: float) -> float:
    v = p.get(key)
    return v["mean"] if isinstance(v, dict) and v.get("mean") is not None else default


def select_beta(points: list[dict[str, Any]], min_psnr: float = SELECT_MIN_PSNR,
                max_others_drop: float = SELECT_MAX_OTHERS_DROP,
                draft: dict[str, Any] | None = None) -> dict[str, Any]:
    """The selection rule of docs/evaluation.md, on training-time signals only.

    Among the points with beta > 0 whose outside PSNR (vs the reference, outside the training
    mask: what the constraint holds) is >= ``min_psnr`` and whose share of images with another
    aspect's reward dropping beyond its noise floor is <= the others' limit, the one with the
    highest mean target reward (ties: the larger beta). If none qualifies: the largest beta.
    The others' limit is ``max_others_drop``, or :data:`SELECT_OTHERS_VS_DRAFT` x ``draft``'s
    share where a DRaFT point measured on the same validation images is given and that is larger.
    Returns ``{"beta", "method", "run_dir", "qualified": [betas], "others_limit", "rule"}``.
    """
    candidates = [p for p in points if p["beta"] > 0]
    if not candidates:
        raise InputError("selection needs at least one beta > 0")
    limit = max_others_drop
    if draft is not None:
        limit = max(limit, SELECT_OTHERS_VS_DRAFT * _mean(draft, "others_reward_drop_share", 0.0))
    ok = [p for p in candidates if _mean(p, "outside_psnr", 0.0) >= min_psnr
          and _mean(p, "others_reward_drop_share", 0.0) <= limit]
    best = max(ok, key=lambda p: (_mean(p, "target_reward", -math.inf), p["beta"])) if ok else \
        max(candidates, key=lambda p: p["beta"])
    others = f"{max_others_drop:g}" + (f" (or {SELECT_OTHERS_VS_DRAFT:g} x DRaFT's, if larger)" if draft else "")
    rule = (f"highest target reward among beta > 0 with outside PSNR >= {min_psnr:g} dB and others' reward "
            f"drop share <= {others}; else the largest beta")
    return {"beta": best["beta"], "method": best["method"], "run_dir": best.get("run_dir"),
            "qualified": [p["beta"] for p in ok], "others_limit": limit, "rule": rule}


def _draft_point(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    drafts = [p for p in points if p["beta"] == 0]
    if len(drafts) > 1:
        raise InputError(f"the selection takes one DRaFT (beta 0) reference, got {len(drafts)}: "
                         f"{[p.get('run_dir') for p in drafts]}")
    return drafts[0] if drafts else None


def combine_sweeps(paths: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Apply :func:`select_beta` to the points of several sweeps on the same prompts and seeds.

    A grid that varies more than beta (a beta schedule, DRaFT's own K and LoRA steps) is one
    ``focusnfix sweep`` per setting; this reads their ``sweep.json`` files (each point keeps its
    ``run_dir`` and its sweep's ``overrides``) and writes ``out_dir/sweep.json`` with every point
    and the selection. The beta 0 point, if one, is the DRaFT reference of the others' limit.
    """
    if not paths:
        raise InputError("--combine needs at least one sweep.json")
    docs = []
    for path in paths:
        path = Path(path)
        f = path / "sweep.json" if path.is_dir() else path
        if not f.is_file():
            raise InputError(f"no sweep.json at {path} (expected a `focusnfix sweep` output directory or its sweep.json)")
        doc = read_json(f, "sweep file")
        if not isinstance(doc.get("points"), list) or not all(isinstance(p, dict) and "beta" in p for p in doc["points"]):
            raise InputError(f"sweep file {f}: expected a 'points' list of objects with a 'beta' (focusnfix sweep's sweep.json)")
        docs.append((f, doc))
    prompts = {json.dumps(d.get("prompts")) for _, d in docs}
    if len(prompts) > 1:
        raise InputError(f"the sweeps were evaluated on different prompts: {[str(f) for f, _ in docs]}")
    points = [p | {"sweep": str(f), "overrides": [*(d.get("overrides") or []),
                                                   *((d.get("draft_overrides") or []) if p["beta"] == 0 else [])]}
              for f, d in docs for p in d["points"]]
    doc = {"aspect": docs[0][1].get("aspect"), "combined": [str(f) for f, _ in docs],
           "judges": all(d.get("judges") for _, d in docs), "prompts": docs[0][1].get("prompts"), "points": points}
    if any(p["beta"] > 0 for p in points):
        doc["selection"] = select_beta(points, draft=_draft_point(points))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "sweep.json", json.dumps(json_clean(doc), indent=2))
    return doc


def run_overrides(beta: float, overrides: list[str] | tuple[str, ...], out_dir: Path) -> list[str]:
    """The ``--set`` overrides of a sweep's run at ``beta``: ``objective.beta``, its output directory,
    and for beta = 0 no ``objective.beta_end``: beta 0 is DRaFT, whose constraint weight stays 0 (a
    config's beta schedule would otherwise ramp it up from 0)."""
    extra = ["objective.beta_end=null"] if beta == 0 else []
    return [*overrides, f"objective.beta={beta}", *extra, f"train.output_dir={out_dir / f'beta_{beta:g}'}"]


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
    judges: bool = True,
    jobs: int = 1,
    draft_overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train one LoRA per beta (``out_dir/beta_<b>/``, beta = 0 is DRaFT) and evaluate them all.

    Each run is the config with ``objective.beta=b`` and ``train.output_dir=out_dir/beta_<b>``
    (plus ``overrides``; :func:`run_overrides`: beta 0 drops a ``beta_end`` schedule). All LoRAs are evaluated together against one base in
    ``out_dir/eval/`` (methods ``beta_<b>``), on ``prompts`` (default: the config's training
    prompts) x ``seeds`` (default: 10000, 10001, i.e. noise never used in training), with the
    masks training used. A finished run of the same config is not retrained, a killed one continues
    from its last checkpoint, and a folder holding a run of another config is refused
    (:func:`~focusnfix.runs.train_runs`). ``jobs`` runs train side by side.
    ``draft_overrides`` apply to the beta 0 run only (the paper's DRaFT: ``lora.active_steps=null``,
    ``sampling.k=2`` where the config trains a late LoRA); that point is also the DRaFT reference
    of :func:`select_beta`'s others' limit.

    For choosing beta (docs/evaluation.md): give validation prompts and ``judges=False``; the
    judges are then never loaded, and :func:`select_beta` picks beta from training-time signals.

    Writes ``out_dir/sweep.json``: ``{"aspect", "eval_dir", "selection", "points": [{"beta",
    "method", "run_dir", "lora_dir", "target_gain": S, "target_reward": S, "outside_psnr": S,
    "outside_ssim": S, "improved_share": S, "degraded_share": S, "others_degraded_share": S,
    "others_reward_drop_share": S, "removal_share": S, "hack_gap": S}]}`` with S as in
    metrics.json (judge-based entries null without judges).
    """
    from focusnfix.runs import train_runs

    if not betas:
        raise InputError("--betas must list at least one beta")
    if any(not math.isfinite(b) or b < 0 for b in betas):
        raise InputError(f"--betas must be finite and >= 0, got {betas}")
    # checked before training, which the evaluation would otherwise only reach an hour later
    if seeds is not None and (not seeds or any(isinstance(x, bool) or not isinstance(x, int) for x in seeds)):
        raise InputError(f"--seeds: the evaluation seeds must be a non-empty list of integers, got {seeds!r}")
    if batch_size < 1 or n_bootstrap < 1 or jobs < 1:
        raise InputError(f"--batch-size, --bootstrap and --jobs must be >= 1, got {batch_size}, {n_bootstrap}, {jobs}")
    if prompts is not None and (not prompts or any(not isinstance(x, str) or not x.strip() for x in prompts)):
        raise InputError("--prompts: the evaluation prompts must be a non-empty list of non-empty strings")
    if draft_overrides and 0 not in betas:
        raise InputError(f"--draft-set {list(draft_overrides)} changes the beta 0 (DRaFT) run, but --betas {betas} has "
                         "no beta 0: add 0 to --betas, or drop --draft-set")
    placed = [o for o in [*overrides, *draft_overrides] if o.split("=", 1)[0].strip() in ("train.output_dir", "objective.beta")]
    if placed:
        raise InputError(f"--set {placed[0]}: a sweep sets each run's objective.beta and train.output_dir itself "
                         f"(--betas; --out/beta_<b>), so it cannot be overridden")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = {b: load_config(config_path, run_overrides(b, [*overrides, *(draft_overrides if b == 0 else ())], out_dir))
               for b in betas}
    # every run is evaluated against one reference and mask: a --draft-set that changes them is refused
    check_same_setup({f"beta {b:g}": c for b, c in configs.items()})
    train_runs(list(configs.values()), jobs=jobs, progress=progress)
    runs = {b: Path(c.train.output_dir) for b, c in configs.items()}
    config = configs[betas[0]]
    aspects, target, judge_models = aspects_from_config(config)
    if not judges:
        judge_models = {}
    setup = evaluation_setup(config, aspects)
    eval_prompts = prompts or resolve_prompts(config.data, Path(config_path).parent)
    eval_seeds = seeds if seeds is not None else [10000, 10001]
    methods = {f"beta_{b:g}": runs[b] / "lora" for b in betas}
    metrics = evaluate(
        setup["model"], methods, aspects, target, judge_models, eval_prompts, eval_seeds, setup["options"],
        setup["mask_cfg"], out_dir / "eval", batch_size=batch_size, n_bootstrap=n_bootstrap, progress=progress,
        localizers=setup["localizers"],
    )
    keys = ("target_gain", "target_reward", "outside_psnr", "outside_ssim", "improved_share", "degraded_share",
            "others_degraded_share", "others_reward_drop_share", "removal_share", "hack_gap")
    points = []
    for b in betas:
        name = f"beta_{b:g}"
        entry = metrics["methods"][name]
        points.append({"beta": b, "method": name, "draft": b == 0, "run_dir": str(runs[b]),
                       "lora_dir": str(runs[b] / "lora"), **{k: entry.get(k) for k in keys}})
    doc = {"aspect": target, "eval_dir": str(out_dir / "eval"), "config": str(config_path),
           "overrides": list(overrides), "draft_overrides": list(draft_overrides), "judges": judges, "prompts": eval_prompts, "points": points}
    if any(b > 0 for b in betas):
        points = json_clean(points)
        doc["selection"] = select_beta(points, draft=_draft_point(points))
    atomic_write_text(out_dir / "sweep.json", json.dumps(json_clean(doc), indent=2))
    return doc


__all__ = ["SELECT_MAX_OTHERS_DROP", "SELECT_MIN_PSNR", "SELECT_OTHERS_VS_DRAFT", "combine_sweeps", "run_overrides",
           "select_beta", "sweep"]
