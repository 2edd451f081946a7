"""``focusnfix demo``: the whole method end to end on the packaged toy world.

1. train Focus-N-Fix on a toy aspect's reward (default: the robust safety reward; an unwanted
   mark no caption asks for; its LoRA on the last sampling steps only, ``lora.active_steps``), and
   the DRaFT baseline (beta = 0, K = 2, the LoRA on every step, as in the paper; everything else the
   same), each with several training seeds (run ``r`` of both methods shares seed ``r``: same LoRA
   initialisation and batch order);
2. evaluate base, DRaFT and Focus-N-Fix on held-out prompts x seeds with every toy aspect and
   the independent judges, statistics resampling training runs and prompts, and the paired
   difference Focus-N-Fix - DRaFT;
3. write ``OUT/metrics.json``, ``OUT/diagnostics.json`` (:mod:`focusnfix.diagnose`),
   ``OUT/report.html``, ``OUT/rate.html`` and the LoRAs of the first
   seed ``OUT/lora/{focusnfix,draft}/pytorch_lora_weights.safetensors``; training runs (logs,
   checkpoints, LoRAs of every seed) stay under ``OUT/runs/<method>_s<seed>/``.

``--reward safety_narrow`` trains on the hackable narrow safety reward (the reward-hacking
experiment); ``--reward plausibility`` on the artifact aspect (RAHF-style heatmap).
Every setting is fixed in advance: the mask by calibration, beta and the LoRA's active steps by the
validation selection of docs/evaluation.md; the held-out prompts and the judges are only used here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from focusnfix import toyworld
from focusnfix.config import config_from_dict
from focusnfix.diagnose import diagnose
from focusnfix.errors import InputError
from focusnfix.evaluate import aspects_from_config, evaluate, evaluation_setup
from focusnfix.files import partial_name, remove_partials, sync_tree
from focusnfix.lora import replace_dir
from focusnfix.rating import write_rating_page
from focusnfix.report import write_report
from focusnfix.runs import train_runs


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo. ``full`` takes about 7-16 minutes on 2 CPU cores, ``quick`` under 1."""

    steps: int
    batch_size: int
    seeds_per_prompt: int
    eval_prompts: int
    eval_seeds: int
    num_inference_steps: int
    train_seeds: int


FULL = DemoSettings(steps=120, batch_size=8, seeds_per_prompt=2, eval_prompts=32, eval_seeds=4, num_inference_steps=20,
                    train_seeds=3)
QUICK = DemoSettings(steps=6, batch_size=4, seeds_per_prompt=1, eval_prompts=8, eval_seeds=2, num_inference_steps=10,
                     train_seeds=1)

#: rewards the demo trains on -> (beta, mask settings), each fixed before the held-out evaluation:
#: the mask by ``focusnfix toyworld calibrate --source pipeline`` on training-caption defects as the
#: base pipeline draws them, beta by
#: ``focusnfix sweep --prompts toy:validation --no-judges`` (docs/evaluation.md)
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    # the LoRA acts on the last 5 of 20 steps (K = 5) and beta, chosen on validation with the
    # hardened reward; its mask and localizer (Grad-CAM, absolute 0.5, dilation 3) by calibration (docs/evaluation.md).
    # Constant beta 0.5: of constant 0.5 and 2 and ramps from 0.5 to 2, 4 and 8, the highest validation reward
    # within the rule's others' limit (half of DRaFT's validation share)
    "safety": {"beta": 0.5, "active_steps": 5, "localizer": "gradcam",
               "mask": {"threshold_mode": "absolute", "threshold": 0.5, "dilate_px": 3}},
    # the reward-hacking experiment: the safety demo's settings, only the reward differs
    "safety_narrow": {"beta": 0.5, "active_steps": 5, "localizer": "gradcam",
                      "mask": {"threshold_mode": "absolute", "threshold": 0.5, "dilate_px": 3}},
    # the LoRA's active steps and beta chosen on validation for this aspect (docs/evaluation.md)
    "plausibility": {"beta": 0.5, "active_steps": 5,
                     "mask": {"threshold_mode": "relative", "threshold": 0.2, "dilate_px": 4}},
}


def demo_config(out: Path, beta: float, s: DemoSettings, reward: str = "safety", seed: int = 0) -> dict[str, Any]:
    """The training config of one demo run.

    Focus-N-Fix (``beta > 0``) and DRaFT (``beta = 0``) share everything but beta and, where
    :data:`DEMO_SETTINGS` gives one, Focus-N-Fix's ``active_steps``: its LoRA then acts only on the
    last L sampling steps and K = L. DRaFT stays the
    paper's baseline: K = 2, the LoRA on every step.
    """
    if reward not in DEMO_SETTINGS:
        raise InputError(f"demo reward must be one of {sorted(DEMO_SETTINGS)}, got {reward!r}")
    late = DEMO_SETTINGS[reward].get("active_steps") if beta > 0 else None
    lora: dict[str, Any] = {"rank": 8, "alpha": 8}
    k = 2
    if late is not None:
        late = min(late, s.num_inference_steps)
        lora["active_steps"], k = late, late
    return {
        "model": {"path": "toy"},
        "lora": lora,
        "sampling": {"num_inference_steps": s.num_inference_steps, "guidance_scale": 5.0, "grad_mode": "draft_k", "k": k},
        "objective": {"beta": beta, "norm": "frobenius", "space": "pixel"} | (
            {"beta_end": DEMO_SETTINGS[reward]["beta_end"]} if beta > 0 and "beta_end" in DEMO_SETTINGS[reward] else {}),
        "mask": DEMO_SETTINGS[reward]["mask"],
        "aspects": [{"type": "toyworld", "gate": "auto", "args": {"aspect": reward} | (
            {"localizer": DEMO_SETTINGS[reward]["localizer"]} if "localizer" in DEMO_SETTINGS[reward] else {})}],
        "data": {"prompts_file": "toy:fit", "seeds_per_prompt": s.seeds_per_prompt},
        "train": {
            "output_dir": str(out),
            "steps": s.steps,
            "batch_size": s.batch_size,
            "learning_rate": 1e-3,
            "weight_decay": 0.1,
            "max_grad_norm": 1.0,
            "checkpoint_every": max(1, s.steps // 2),
            "sample_every": 0,
            "device": "cpu",
            "seed": seed,
        },
    }


def run_demo(out: str | Path, quick: bool = False, progress: bool = True, reward: str = "safety",
             train_seeds: int | None = None, jobs: int | None = None) -> dict[str, Any]:
    """Train both methods on every training seed, evaluate, report. Returns the metrics dict.

    Args:
        out: output directory.
        quick: the small settings (CI).
        reward: the toy aspect trained on (a key of :data:`DEMO_SETTINGS`).
        train_seeds: training seeds per method (default: the settings').
        jobs: runs trained side by side (default: 2 on a machine with 2 or more cores).
    """
    s = QUICK if quick else FULL
    n_seeds = train_seeds or s.train_seeds
    if n_seeds < 1:
        raise InputError(f"--train-seeds must be >= 1, got {n_seeds}")
    jobs = jobs or min(2, os.cpu_count() or 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    beta = DEMO_SETTINGS[reward]["beta"] if reward in DEMO_SETTINGS else 0.0
    configs = {}
    for name, b in (("focusnfix", beta), ("draft", 0.0)):
        for seed in range(n_seeds):
            # a rerun into the same --out keeps finished runs of the same config, continues killed
            # ones from their last checkpoint, and retrains runs of other settings (train_runs)
            run_dir = out / "runs" / f"{name}_s{seed}"
            configs[(name, seed)] = config_from_dict(demo_config(run_dir, b, s, reward, seed))
    end = DEMO_SETTINGS.get(reward, {}).get("beta_end")
    shown = f"{beta:g}" if end is None else f"{beta:g}, ramped to {end:g} from half way"
    print(f"[demo] training Focus-N-Fix (beta = {shown}) and DRaFT on the {reward} reward, {n_seeds} seed(s) each, "
          f"{s.steps} steps, {jobs} at a time", flush=True)
    loras = dict(zip(configs, train_runs(list(configs.values()), jobs=jobs, progress=progress and jobs == 1,
                                         replace=True), strict=True))
    for name in ("focusnfix", "draft"):
        final = out / "lora" / name
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_partials(final.parent)  # what a killed demo left half copied
        tmp = Path(tempfile.mkdtemp(prefix=partial_name(name), dir=final.parent))
        try:
            shutil.copytree(loras[(name, 0)], tmp, dirs_exist_ok=True)
            sync_tree(tmp)
            replace_dir(tmp, final)  # the previous copy stays until this one is whole
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"[demo] evaluating on {s.eval_prompts} held-out prompts x {s.eval_seeds} seeds", flush=True)
    config = configs[("focusnfix", 0)]
    # the trained aspect as the config builds it, and every other toy aspect (its reward and its judge)
    aspects, target, judges = aspects_from_config(config)
    setup = evaluation_setup(config, aspects)
    prompts = toyworld.prompts("heldout")[: s.eval_prompts]
    seeds = list(range(10_000, 10_000 + s.eval_seeds))  # disjoint from the training seeds
    metrics = evaluate(
        "toy",
        {name: [loras[(name, r)] for r in range(n_seeds)] for name in ("focusnfix", "draft")},
        aspects,
        target,
        judges,
        prompts,
        seeds,
        setup["options"],
        setup["mask_cfg"],
        out,
        batch_size=16,
        progress=progress,
        localizers=setup["localizers"],
        compare=[("focusnfix", "draft")],
    )
    # after the fact (held-out, judges): where the fixes happened and whether the mask allowed them
    diagnose(out, toyworld.load_judge("safety" if target == "safety_narrow" else target))
    logs = {f"{name} seed {seed}": Path(c.train.output_dir) / "log.jsonl" for (name, seed), c in configs.items()}
    write_report(out, out / "report.html", train_logs=logs)
    write_rating_page(out, out / "rate.html")
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s: {out / 'report.html'}", flush=True)
    return metrics
