"""Audit agreement of the scene-fit judges against the learned ones.

The learned ones: the safety judge that ships, and the attribute reader that the scene fit replaced
as alignment judge (docs/toyworld.md, "Scene-fit judges"). Prints Cohen's kappa (p > 0.5) per batch,
on the v3 batches 6-8 together (the rule's figure) and on all 990 images, with the confusion counts
of batches 6-8.

    python experiments/scene_fit_audit.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from focusnfix.toyworld import load_attribute_reader, load_judge
from focusnfix.toyworld.audit import cohen_kappa, load_audit
from focusnfix.toyworld.scene_fit import SceneFitAlignmentJudge, SceneFitSafetyJudge

V3_BATCHES = (6, 7, 8)


@torch.no_grad()
def predictions(judge, images: torch.Tensor, prompts: list[str]) -> np.ndarray:
    p = torch.cat([judge.defect_probability(images[i : i + 64], prompts[i : i + 64]) for i in range(0, len(prompts), 64)])
    return p.numpy() > 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the table here too")
    args = ap.parse_args()
    torch.set_num_threads(2)
    images, doc = load_audit()
    prompts = [it["prompt"] for it in doc["items"]]
    batches = np.array([it.get("batch", 1) for it in doc["items"]])
    v3 = np.isin(batches, V3_BATCHES)
    learned = load_judge("safety", raw=True, person_tuned=False)  # at 0.5, as the rule compared them
    judges = {"safety": {"learned": learned, "scene_fit": SceneFitSafetyJudge(learned)},
              "alignment": {"learned": load_attribute_reader(), "scene_fit": SceneFitAlignmentJudge()}}
    out: dict = {}
    for aspect, variants in judges.items():
        human = np.array([it["labels"][aspect] for it in doc["items"]], dtype=bool)
        for name, judge in variants.items():
            pred = predictions(judge, images, prompts)
            row = {"all": cohen_kappa(human, pred), "batches_6_8": cohen_kappa(human[v3], pred[v3]),
                   "by_batch": {int(b): cohen_kappa(human[batches == b], pred[batches == b]) for b in sorted(set(batches))},
                   "batches_6_8_counts": {"both": int((human & pred)[v3].sum()), "human_only": int((human & ~pred)[v3].sum()),
                                          "judge_only": int((~human & pred)[v3].sum())}}
            out.setdefault(aspect, {})[name] = row
            by_batch = " ".join(f"{b}:{k:.3f}" for b, k in row["by_batch"].items())
            print(f"{aspect:9s} {name:9s} all {row['all']:.3f}  batches 6-8 {row['batches_6_8']:.3f}  "
                  f"{row['batches_6_8_counts']}  | {by_batch}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
