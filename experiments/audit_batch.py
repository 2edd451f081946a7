"""A fresh audit batch: a blind check of every judge, and the person's removal shares over the demo's seeds.

Batch 9 (docs/toyworld.md, "The audit set") is 144 images of the README safety demo's seed-0 runs
of Focus-N-Fix and DRaFT and its base model on all 48 held-out prompts x seed 23000; batch 10 the
seed-1 runs, the base model and the narrow-reward demo's seed-0 Focus-N-Fix run on 36 held-out
prompts x seed 24000. Each was planned before it was sampled and labelled blind before any judge
ran on it, colours read by eye; batch 11 the seed-2 runs and the base model on all 48 held-out
prompts x seed 25000; batch 12 the seed-0 runs and the base model on all 48 held-out prompts x seed
26000; batch 13 the seed-1 runs and the base model on all 48 held-out prompts x seed 27000. This
prints, for ``--batch N`` (default 13), as JSON:

* ``kappa``: Cohen's kappa (p > 0.5) of each judge with the person, per aspect: the shipped judges,
  the generator-trained safety judge at 0.5 and at 0.2 (its operating point until the person-tuned
  judge replaced it on batch 11), the learned attribute reader the scene fit replaced, the scene
  fit's safety judges (``scene_fit``, ``scene_fit_mark``), and the person-tuned safety judge
  (``person_tuned``: the installed ``judges/safety_person.safetensors``, or the weights ``--tuned
  FILE`` names, as ``experiments/person_labelled_judge.py --out DIR`` writes them), and the judges
  trained on every audit label but batch 12's (``audit_trained``, shipped since batch 12: on
  batches 1-11 they read their own training labels); for plausibility the shipped judge and the
  one before it (at its operating point 0.7); for alignment the shipped scene fit with its decision
  fitted to the person's labels of batches 6-12 (since batch 13) and the plain scene fit before it;
* ``person``: per fine-tuned source, paired by prompt and seed with the base image, how many of the
  base model's marked images it leaves clean (removal) and how many clean ones it marks (new), for
  the batch and pooled over ``--demo-batches`` (default 7-13: the demo's seed-1, seed-2, seed-0,
  seed-1, seed-2, seed-0 and seed-1 runs, the last four again on other noise);
* ``pooled_paired_focusnfix_minus_draft``: the person's removal of Focus-N-Fix minus DRaFT's
  on the same base-marked images, with a 95% bootstrap interval over them;
* ``judge_on_same_images``: the same shares read by the generator-trained safety judge at 0.5;
  ``other_judges_on_same_images``: by each other safety judge.

    python experiments/audit_batch.py [--batch 13] [--demo-batches 7,8,9,10,11,12,13] [--tuned DIR/safety.safetensors]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from safetensors.torch import load_file

from focusnfix.toyworld import assets_path, load_attribute_reader, load_judge
from focusnfix.toyworld import models as M
from focusnfix.toyworld.audit import cohen_kappa, load_audit
from focusnfix.toyworld.scene_fit import SceneFitMarkJudge, SceneFitSafetyJudge


@torch.no_grad()
def probabilities(judge, images: torch.Tensor, prompts: list[str]) -> np.ndarray:
    return torch.cat([judge.defect_probability(images[i : i + 64], prompts[i : i + 64])
                      for i in range(0, len(prompts), 64)]).numpy()


def removal(items: list[dict], marked: np.ndarray) -> dict:
    """Per fine-tuned source: base-marked images left clean / base-marked, base-clean now marked / base-clean."""
    base = {(it["prompt"], it["seed"], it["batch"]): bool(m) for it, m in zip(items, marked, strict=True)
            if it["source"] == "base"}
    out: dict = {}
    for it, m in zip(items, marked, strict=True):
        key = (it["prompt"], it["seed"], it["batch"])
        if it["source"] == "base" or key not in base:
            continue
        e = out.setdefault(it["source"], {"base_marked": 0, "removed": 0, "base_clean": 0, "new": 0})
        if base[key]:
            e["base_marked"] += 1
            e["removed"] += int(not m)
        else:
            e["base_clean"] += 1
            e["new"] += int(bool(m))
    for e in out.values():
        e["removal_share"] = round(e["removed"] / max(1, e["base_marked"]), 3)
        e["new_defect_share"] = round(e["new"] / max(1, e["base_clean"]), 3)
    return out


def paired_removal(items: list[dict], marked: np.ndarray, a: str, b: str, n_boot: int = 10000) -> dict:
    """Removal of ``a`` minus removal of ``b`` on the same base-marked (prompt, seed) images, with a 95%
    bootstrap interval over those images."""
    by_key: dict = {}
    for it, m in zip(items, marked, strict=True):
        by_key.setdefault((it["prompt"], it["seed"], it["batch"]), {})[it["source"]] = bool(m)
    rows = [(not v[a]) - (not v[b]) for v in by_key.values() if v.get("base") and a in v and b in v]
    diffs = np.array(rows, dtype=float)
    boot = np.random.default_rng(0).choice(diffs, (n_boot, len(diffs))).mean(axis=1)
    return {"n": len(diffs), "mean": round(float(diffs.mean()), 3),
            "ci95": [round(float(q), 3) for q in np.quantile(boot, [0.025, 0.975])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=13, help="the fresh batch whose kappas are printed")
    ap.add_argument("--demo-batches", default="7,8,9,10,11,12,13",
                    help="the batches of the safety demo's runs pooled for the person's removal shares")
    ap.add_argument("--tuned", help="the person-tuned safety judge's safetensors (experiments/person_labelled_judge.py --out)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    images, doc = load_audit()
    items = doc["items"]
    batches = np.array([it["batch"] for it in items])
    demo_batches = tuple(int(b) for b in args.demo_batches.split(","))
    sel = np.flatnonzero(batches == args.batch)
    demo = np.flatnonzero(np.isin(batches, demo_batches))
    prompts = [it["prompt"] for it in items]
    judges = {
        "safety": {"learned at 0.5": load_judge("safety", raw=True, person_tuned=False),
                   "learned at 0.2": load_judge("safety", person_tuned=False),
                   "scene_fit": SceneFitSafetyJudge(load_judge("safety", raw=True, person_tuned=False)),
                   "scene_fit_mark": SceneFitMarkJudge()},
        "plausibility": {"shipped": load_judge("plausibility"),
                         "before (at 0.7)": load_judge("plausibility", audit_trained=False)},
        "alignment": {"shipped (scene fit, fitted decision)": load_judge("alignment"),
                      "scene fit (before)": load_judge("alignment", audit_trained=False),
                      "attribute reader (before)": load_attribute_reader()},
    }
    if args.tuned:
        net = M.LocalizingJudgeNet()
        net.load_state_dict(load_file(args.tuned))
        judges["safety"]["person_tuned"] = M.freeze(M.LocalizingJudge("safety", net))
    elif (assets_path() / "judges" / "safety_person.safetensors").is_file():
        judges["safety"]["person_tuned"] = load_judge("safety", person_tuned=True)
    if (assets_path() / "judges" / "safety_audit.safetensors").is_file():
        judges["safety"]["audit_trained"] = load_judge("safety", audit_trained=True)
    out: dict = {"n": len(sel), "kappa": {}, "human_defect_rate": {}}
    sub = torch.from_numpy(sel)
    for aspect, variants in judges.items():
        human = np.array([items[i]["labels"][aspect] for i in sel], dtype=bool)
        out["human_defect_rate"][aspect] = round(float(human.mean()), 3)
        for name, judge in variants.items():
            pred = probabilities(judge, images[sub], [prompts[i] for i in sel]) > 0.5
            out["kappa"].setdefault(aspect, {})[name] = {
                "kappa": round(cohen_kappa(human, pred), 3), "judge_defect_rate": round(float(pred.mean()), 3),
                "both": int((human & pred).sum()), "human_only": int((human & ~pred).sum()),
                "judge_only": int((~human & pred).sum())}
    human_demo = np.array([items[i]["labels"]["safety"] for i in demo], dtype=bool)
    judge_demo = probabilities(load_judge("safety", raw=True, person_tuned=False), images[torch.from_numpy(demo)],
                               [prompts[i] for i in demo]) > 0.5
    demo_items = [items[i] for i in demo]
    this = [it["batch"] == args.batch for it in demo_items]
    pooled = "batches_" + "_".join(str(b) for b in demo_batches)
    out["person"] = {f"batch_{args.batch}": removal([it for it, k in zip(demo_items, this, strict=True) if k],
                                                     human_demo[this]),
                     pooled: removal(demo_items, human_demo)}
    out["person"]["pooled_paired_focusnfix_minus_draft"] = paired_removal(
        demo_items, human_demo, "focusnfix/safety", "draft/safety")
    out["judge_on_same_images"] = {
        f"batch_{args.batch}": removal([it for it, k in zip(demo_items, this, strict=True) if k], judge_demo[this]),
        pooled: removal(demo_items, judge_demo)}
    for name, judge in judges["safety"].items():
        if name != "learned at 0.5":
            read = probabilities(judge, images[torch.from_numpy(demo)], [prompts[i] for i in demo]) > 0.5
            out.setdefault("other_judges_on_same_images", {})[name] = {pooled: removal(demo_items, read)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
