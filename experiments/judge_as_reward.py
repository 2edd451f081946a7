"""Is the reward's blindness what keeps Focus-N-Fix from removing the marks DRaFT removes?

The safety demo's measured cause (README; docs/evaluation.md, "The README demo's own images"):
Focus-N-Fix removes 0.60 of the judged marks against DRaFT's 0.76, and most marks it leaves are
ones the training reward calls clean, so their masks are gated empty. An intervention tests that
cause: train both methods, with the demo's settings, on a reward that sees what the evaluation
judge sees, and judge them with a judge no reward was optimised against.

Written before the first run (nothing below was tuned on its outcome):

* Reward: the shipped safety judge (the generator-trained localizing judge tuned on a person's 320
  labels), ``reward = log(1 - p_defect)`` (``logsigmoid(-logit)``), gate at ``log 0.5`` (its own
  operating point, 0.5), heatmap = its defect heatmap, mask absolute 0.5 (the same operating point
  on the heatmap) dilated 3 px (the demo's dilation).
* Everything else is the safety demo's (``focusnfix.demo.demo_config``): Focus-N-Fix β 0.5 with the
  LoRA on the last 5 steps, DRaFT β 0 with K = 2 and the LoRA on every step, 120 steps of batch 8
  on ``toy:fit`` × 2 seeds, 3 training seeds per method; the demo's 32 held-out prompts × 4 seeds.
* Judges: the untrained scene fit (:class:`~focusnfix.toyworld.scene_fit.SceneFitMarkJudge`) for
  safety, the shipped plausibility and alignment judges for the others. The reward's own reading
  (the tuned judge) is reported next to it, as what training optimised.
* Second arm (``--arm every``), written after the first arm's result and before running it: the
  first arm's Focus-N-Fix did not raise this reward at all (its LoRA on the last 5 steps), so the
  same runs with Focus-N-Fix's LoRA on every step and K = 2 (DRaFT's schedule, β 0.5) test whether
  the late LoRA is what blocks removal; the same rule.
* The cause is supported if Focus-N-Fix's removal share by the scene fit is not below DRaFT's (the
  paired difference's 95% interval's lower bound >= -0.05); not supported if it stays below.
* Third arm (``--arm select``), written after both arms' held-out results (late 0.03, every step
  0.43 against DRaFT's 0.94) and before any run of it: neither arm's setting was chosen for this
  reward; the every-step arm was one point. Here the selection protocol (docs/evaluation.md) chooses
  them for this reward, then the held-out evaluation runs once. Validation grid, fixed now: the
  LoRA on every step (K = 2) at β 0.25, 0.5, 1, 2 with DRaFT (β 0, the others' reference), and
  the LoRA on the last 10 steps (K = 10) at β 0.25, 0.5; 120 steps, 1 training seed each, the 16
  validation captions × 2 seeds, judges not loaded; the plausibility and alignment rewards ride
  along with weight 0 (the rule's others' signal). Rule unchanged (``focusnfix select``: outside
  PSNR >= 35 dB, others' drop share <= max(0.10, half of DRaFT's); the highest target reward, else
  the largest β). The selected point is trained with 3 training seeds and judged as above against
  the same DRaFT runs; the same cause rule, and #9's removal target (>= 0.60) read off it.
  Result (docs/evaluation.md): the last 10 steps at β 0.25 selected; removal 0.51 [0.21, 0.78]
  (per seed 0.70 / 0.65 / 0.18), paired -0.43 [-0.72, -0.18]: not supported, target missed.
* Fourth arm (``--arm steps``), written after the third arm's held-out result and before any run
  of it: one of the three selected runs did not learn in 120 steps (its training reward flat) and
  the other two were still rising, so training length is the open question. The protocol allows
  choosing steps on validation: the grid adds the last 10 steps (K = 10) at β 0.25 and 0.5 trained
  240 steps (1 training seed, the same validation captions × seeds, judges not loaded, the same
  riders), combined with the third arm's seven 120-step points (the DRaFT reference stays its
  120-step run, the demo's DRaFT); the rule unchanged. If a 240-step point is selected it is
  trained with 3 training seeds for 240 steps and judged as above against the same 120-step DRaFT
  runs (a K = 10 late step costs about what DRaFT's K = 2 step on every step does); if a 120-step
  point is selected, nothing more is run.
  Result (docs/evaluation.md): β 0.25 at 240 steps gains 3.18 on validation (120 steps: 2.41) at
  34.8 dB, under the rule's 35; the 120-step point is selected again, nothing held out was run.

    python experiments/judge_as_reward.py --out DIR [--arm late|every|select|steps] [--train-seeds 3]   # 13-15 min on 2 cores; select 40

Training runs go to ``DIR/runs`` (DRaFT's are shared by every arm), each arm's evaluation to
``DIR/eval_ARM`` (``metrics.json``, ``images.npz``, ``judge_as_reward.json``); the third arm's
validation sweeps to ``DIR/select/`` (``sweep.json`` there holds every point and the selection); the
fourth arm's to ``DIR/select_steps/`` (it needs the third arm's ``DIR/select/`` sweeps).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from focusnfix import toyworld
from focusnfix.aspects.base import Aspect
from focusnfix.config import config_from_dict
from focusnfix.demo import FULL, QUICK, DemoSettings, demo_config
from focusnfix.evaluate import evaluate, evaluation_setup
from focusnfix.runs import train_runs
from focusnfix.toyworld.models import LocalizingJudge
from focusnfix.toyworld.scene_fit import SceneFitMarkJudge

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the spawned training runs import this module


class JudgeRewardAspect(Aspect):
    """A localizing judge used as a training reward: ``log(1 - p_defect)``, the judge's heatmap."""

    reward_threshold = math.log(0.5)

    def __init__(self, judge: LocalizingJudge, name: str = "safety") -> None:
        super().__init__()
        self.judge, self.name = judge, name

    def reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``images (B, 3, H, W)`` in [0, 1] -> ``(B,)`` in (-inf, 0]."""
        return F.logsigmoid(-self.judge.net(images)[1])

    def heatmap(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``(B, 1, 32, 32)`` in [0, 1]."""
        return self.judge.defect_heatmap(images, prompts)


def judge_aspect() -> Aspect:
    """The ``python`` aspect factory the training configs name."""
    judge = toyworld.load_judge("safety", person_tuned=True)
    assert isinstance(judge, LocalizingJudge)
    return JudgeRewardAspect(judge)


#: the third arm's validation grid, fixed before its run: span -> (LoRA's active steps or None = every
#: step, K, betas); beta 0 is DRaFT (every step, K = 2), the others' reference of the rule
SELECT_GRID: dict[str, tuple[int | None, int, tuple[float, ...]]] = {
    "every": (None, 2, (0.0, 0.25, 0.5, 1.0, 2.0)),
    "last10": (10, 10, (0.25, 0.5)),
}

#: the fourth arm's added points, fixed before its run: span -> (active steps, K, betas, training steps)
STEPS_GRID: dict[str, tuple[int | None, int, tuple[float, ...], int]] = {
    "last10_240steps": (10, 10, (0.25, 0.5), 240),
}


def _span(span: str) -> tuple[int | None, int, tuple[float, ...], int | None]:
    """``(active steps, K, betas, training steps or None = the demo's)`` of a span of either grid."""
    return STEPS_GRID[span] if span in STEPS_GRID else (*SELECT_GRID[span], None)


def run_config(run_dir: Path, beta: float, seed: int, s: DemoSettings = FULL, arm: str = "late",
               span: str | None = None) -> dict:
    """One training run's config: the demo's, with the judge as the reward and its mask settings.

    ``arm == "every"`` (or ``span``, a key of :data:`SELECT_GRID`) sets Focus-N-Fix's LoRA span and K;
    DRaFT (``beta == 0``) keeps the demo's (every step, K = 2).
    """
    cfg = demo_config(run_dir, beta, s, "safety", seed)
    span = "every" if arm == "every" else span
    if span is not None and beta > 0:
        active, k, _, steps = _span(span)
        cfg["lora"].pop("active_steps", None)
        if active is not None:
            cfg["lora"]["active_steps"] = min(active, s.num_inference_steps)
        cfg["sampling"]["k"] = min(k, s.num_inference_steps)
        if steps is not None and s is FULL:  # --quick keeps its smoke-test length
            cfg["train"]["steps"] = steps
            cfg["train"]["checkpoint_every"] = max(1, steps // 2)
    cfg["aspects"] = [{"type": "python", "gate": "auto", "args": {"target": "judge_as_reward:judge_aspect"}}]
    cfg["mask"] = {"threshold_mode": "absolute", "threshold": 0.5, "dilate_px": 3}
    return cfg


def select_on_validation(out: Path, s: DemoSettings, arm: str = "select") -> dict:
    """The third arm's choice: one ``focusnfix sweep`` per span of :data:`SELECT_GRID` on the
    validation captions (judges not loaded), combined by ``focusnfix select``'s rule; with ``arm ==
    "steps"`` the fourth arm's: the spans of :data:`STEPS_GRID` swept to ``out/select_steps`` and
    combined with the third arm's sweeps (run first if missing).

    The other aspects' rewards ride along with weight 0 (not localizing): the rule's others' signal.
    Returns the selection with its ``span``; writes ``out/select/sweep.json`` (``out/select_steps/``).
    """
    import yaml

    from focusnfix.sweep import combine_sweeps, sweep

    grids = {"select": list(SELECT_GRID)} | ({"select_steps": list(STEPS_GRID)} if arm == "steps" else {})
    sweeps = {}
    for folder, spans in grids.items():
        for span in spans:
            betas = _span(span)[2]
            cfg = run_config(out / folder / span, 0.5, 0, s, span=span)
            cfg["aspects"] += [{"type": "toyworld", "weight": 0.0, "localize": False, "args": {"aspect": a}}
                               for a in ("plausibility", "alignment")]
            path = out / folder / f"{span}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            sweeps[span] = out / folder / span
            if not (sweeps[span] / "sweep.json").is_file():  # the third arm's sweeps are reused by the fourth
                sweep(path, list(betas), sweeps[span], prompts=toyworld.prompts("validation"), judges=False, jobs=2)
    doc = combine_sweeps([d / "sweep.json" for d in sweeps.values()], out / list(grids)[-1])
    chosen = doc["selection"]
    chosen["span"] = next(span for span, d in sweeps.items() if str(chosen["run_dir"]).startswith(str(d)))
    return chosen


def write_grid(out: Path, n: int = 10) -> Path | None:
    """Once the late and every-step arms are evaluated: ``out/grid.png``, rows base / Focus-N-Fix late /
    Focus-N-Fix every step / (Focus-N-Fix as selected, once that arm is evaluated) / DRaFT (training
    seed 0) on ``n`` base images the scene fit flags, evenly spaced."""
    from PIL import Image

    if not all((out / f"eval_{arm}" / "images.npz").is_file() for arm in ("late", "every")):
        return None
    z = {arm: np.load(out / f"eval_{arm}" / "images.npz") for arm in ("late", "every", "select")
         if (out / f"eval_{arm}" / "images.npz").is_file()}
    with torch.no_grad():
        flagged = SceneFitMarkJudge().defect_probability(torch.from_numpy(z["late"]["base"]).float() / 255, []) > 0.5
    idx = np.flatnonzero(flagged.numpy())
    idx = idx[:: max(1, len(idx) // n)][:n]
    rows = [z["late"]["base"], z["late"]["method__focusnfix"], z["every"]["method__focusnfix"],
            *([z["select"]["method__focusnfix"]] if "select" in z else []), z["late"]["method__draft"]]
    grid = np.concatenate([np.concatenate([np.pad(r[i].transpose(1, 2, 0), ((2, 2), (2, 2), (0, 0)), constant_values=255)
                                           for i in idx], 1) for r in rows], 0)
    path = out / "grid.png"
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the demo's smoke-test settings")
    ap.add_argument("--arm", choices=("late", "every", "select", "steps"), default="late",
                    help="Focus-N-Fix's LoRA span and beta: the demo's (last 5 steps, K = 5), DRaFT's (every "
                         "step, K = 2), chosen on validation by the selection protocol, or so with 240-step "
                         "points added")
    args = ap.parse_args()
    s = QUICK if args.quick else FULL
    fnf_dir, beta, span = {"late": ("focusnfix", 0.5, None), "every": ("focusnfix_every", 0.5, "every")}.get(
        args.arm, (None, None, None))
    chosen = None
    if args.arm in ("select", "steps"):
        chosen = select_on_validation(args.out, s, args.arm)
        print(json.dumps({"selected": chosen}, indent=1), flush=True)
        if args.arm == "steps" and chosen["span"] not in STEPS_GRID:
            print("a 120-step point is selected: the third arm's held-out result stands, nothing more to run")
            return
        fnf_dir, beta, span = f"focusnfix_select_{chosen['span']}_b{chosen['beta']:g}", chosen["beta"], chosen["span"]
    configs = {(name, r): config_from_dict(run_config(
                   args.out / "runs" / f"{fnf_dir if name == 'focusnfix' else name}_s{r}", b, r, s, span=span))
               for name, b in (("focusnfix", beta), ("draft", 0.0)) for r in range(args.train_seeds)}
    eval_dir = args.out / f"eval_{args.arm}"
    loras = dict(zip(configs, train_runs(list(configs.values()), jobs=2), strict=True))

    config = configs[("focusnfix", 0)]
    setup = evaluation_setup(config)
    aspects = {"safety": judge_aspect()} | {a: toyworld.load_aspect(a) for a in ("plausibility", "alignment")}
    judges = {"safety": SceneFitMarkJudge()} | {a: toyworld.load_judge(a) for a in ("plausibility", "alignment")}
    metrics = evaluate(
        "toy", {m: [loras[(m, r)] for r in range(args.train_seeds)] for m in ("focusnfix", "draft")},
        aspects, "safety", judges, toyworld.prompts("heldout")[: s.eval_prompts],
        list(range(10_000, 10_000 + s.eval_seeds)), setup["options"], setup["mask_cfg"], eval_dir,
        batch_size=16, localizers=setup["localizers"], compare=[("focusnfix", "draft")])

    # the reward's own reading of the same images (what training optimised), per run
    z = np.load(eval_dir / "images.npz")
    tuned = toyworld.load_judge("safety", person_tuned=True)
    prompts = [""] * len(z["base"])  # the safety judge reads no caption

    @torch.no_grad()
    def flagged(key: str) -> np.ndarray:
        x = torch.from_numpy(z[key]).float()
        x = x / 255 if x.max() > 1.5 else x
        return (tuned.defect_probability(x, prompts) > 0.5).numpy()

    base = flagged("base")
    by_reward = {}
    for key in z.files:
        if key.startswith("method__"):
            after = flagged(key)
            by_reward[key] = {"removed": round(float((base & ~after).sum() / max(base.sum(), 1)), 3),
                              "new": round(float((~base & after).sum() / max((~base).sum(), 1)), 3)}
    keys = ("removal_share", "new_defect_share", "hack_gap", "others_degraded_share", "outside_psnr")
    summary = {"judge": "scene_fit_mark", "arm": args.arm, "selected": chosen,
               **{k: {m: metrics["methods"][m][k] for m in ("focusnfix", "draft")} for k in keys},
               "paired": {c: {k: v[k] for k in keys if k in v} for c, v in metrics["comparisons"].items()},
               "reward_reading": {"base_flagged": int(base.sum()), "runs": by_reward}}
    (eval_dir / "judge_as_reward.json").write_text(json.dumps(summary, indent=1))
    write_grid(args.out)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
