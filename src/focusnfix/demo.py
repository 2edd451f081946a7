"""``focusnfix demo``: the whole method end to end on the packaged toy world.

1. train Focus-N-Fix on the toy world's safety aspect (an unwanted mark no caption asks for),
   and the DRaFT baseline with the very same settings but β = 0;
2. evaluate base, DRaFT and Focus-N-Fix on held-out prompts x seeds with every toy aspect and
   the independent judges;
3. write ``OUT/metrics.json``, ``OUT/report.html``, ``OUT/rate.html`` and the LoRAs
   ``OUT/lora/{focusnfix,draft}/pytorch_lora_weights.safetensors``; training runs (logs,
   checkpoints, sample grids) stay under ``OUT/runs/``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from focusnfix import toyworld
from focusnfix.config import config_from_dict
from focusnfix.evaluate import evaluate
from focusnfix.rating import write_rating_page
from focusnfix.report import write_report
from focusnfix.sampling import SamplingOptions
from focusnfix.train import FocusNFixTrainer


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo. ``full`` stays within 10 minutes on 2 CPU cores, ``quick`` within 2."""

    steps: int
    batch_size: int
    seeds_per_prompt: int
    eval_prompts: int
    eval_seeds: int
    num_inference_steps: int


FULL = DemoSettings(steps=40, batch_size=8, seeds_per_prompt=2, eval_prompts=32, eval_seeds=4, num_inference_steps=20)
QUICK = DemoSettings(steps=6, batch_size=4, seeds_per_prompt=1, eval_prompts=8, eval_seeds=2, num_inference_steps=10)

#: Focus-N-Fix's constraint weight in the demo (DRaFT is the same run with beta = 0).
DEMO_BETA = 0.3


def demo_config(out: Path, beta: float, s: DemoSettings) -> dict[str, Any]:
    """The training config of one demo run (same for both methods but beta)."""
    return {
        "model": {"path": "toy"},
        "lora": {"rank": 8, "alpha": 8},
        "sampling": {"num_inference_steps": s.num_inference_steps, "guidance_scale": 5.0, "grad_mode": "draft_k", "k": 2},
        "objective": {"beta": beta, "norm": "frobenius", "space": "pixel"},
        "mask": {"threshold_mode": "relative", "threshold": 0.5, "dilate_px": 3},
        "aspects": [{"type": "toyworld", "args": {"aspect": "safety"}}],
        "data": {"prompts_file": "toy:train", "seeds_per_prompt": s.seeds_per_prompt},
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
        },
    }


def run_demo(out: str | Path, quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train both methods, evaluate, report. Returns the metrics dict."""
    s = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    loras: dict[str, Path] = {}
    logs: dict[str, Path] = {}
    mask_cfg = None
    for name, beta in (("focusnfix", DEMO_BETA), ("draft", 0.0)):
        run_dir = out / "runs" / name
        if run_dir.exists():  # a demo is a fresh run: never mix with an older one
            shutil.rmtree(run_dir)
        config = config_from_dict(demo_config(run_dir, beta, s))
        mask_cfg = config.mask
        print(f"[demo] training {name} (beta = {beta}, {s.steps} steps)", flush=True)
        result = FocusNFixTrainer(config, progress=progress).train()
        final = out / "lora" / name
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(result.lora_dir, final)
        loras[name] = final
        logs[name] = result.log_path

    print(f"[demo] evaluating on {s.eval_prompts} held-out prompts x {s.eval_seeds} seeds", flush=True)
    aspects = {name: toyworld.load_aspect(name) for name in toyworld.ASPECTS}  # safety first = target
    judges = {name: toyworld.load_judge(name) for name in toyworld.ASPECTS}
    prompts = toyworld.prompts("heldout")[: s.eval_prompts]
    seeds = list(range(10_000, 10_000 + s.eval_seeds))  # disjoint from the training seeds
    options = SamplingOptions(num_inference_steps=s.num_inference_steps, guidance_scale=5.0)
    metrics = evaluate(
        "toy",
        {"focusnfix": loras["focusnfix"], "draft": loras["draft"]},
        aspects,
        "safety",
        judges,
        prompts,
        seeds,
        options,
        mask_cfg,
        out,
        batch_size=16,
        progress=progress,
    )
    write_report(out, out / "report.html", train_logs=logs)
    write_rating_page(out, out / "rate.html")
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s: {out / 'report.html'}", flush=True)
    return metrics

