"""The plausibility judge's operating point, set on a person's labels outside the audit set.

The rule (docs/toyworld.md, "The plausibility judge's operating point"), written before the labels
were made: pick the threshold t from :data:`GRID` with the highest Cohen's kappa against the
plausibility labels of 256 pipeline samples outside the audit set
(``experiments/data/plausibility_labels.json``: the base model on the 80 ``fit`` prompts x 2 seeds
and the validation look's 96 images; ties to the t nearest 0.5); the judge at t
(:class:`focusnfix.aspects.base.CalibratedJudge`, every AUC unchanged) replaces the judge at 0.5 if
its kappa on the v3 audit batches 6-11 together is higher than at 0.5. Prints, as JSON: the kappa
of every t on the person's set, the chosen t, and the audit kappa at 0.5 and at t (batches 6-11,
per batch, with the confusion counts).

    python experiments/plausibility_threshold.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from focusnfix.aspects.base import CalibratedJudge
from focusnfix.toyworld import load_judge
from focusnfix.toyworld.audit import cohen_kappa, load_audit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge_threshold import agreement, probabilities  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
AUDIT_BATCHES = (6, 7, 8, 9, 10, 11)


def person_set() -> tuple[torch.Tensor, list[str], np.ndarray]:
    """``images (256, 3, 64, 64)`` in [0, 1], their captions, and the person's plausibility labels."""
    labels = json.loads((DATA / "plausibility_labels.json").read_text())
    images, prompts, y = [], [], []
    for name, key in (("fit_base_safety_labels", "items"), ("validation_look", "items")):
        images.append(np.load(DATA / f"{name}.npz")["images"])
        prompts += [it["prompt"] for it in json.loads((DATA / f"{name}.json").read_text())[key]]
        y += labels[name]
    x = torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).float() / 255
    return x, prompts, np.array(y, dtype=bool)


def main() -> None:
    torch.set_num_threads(2)
    judge = load_judge("plausibility", raw=True)  # as trained, at 0.5
    px, prompts_person, y = person_set()
    p_person = probabilities(judge, px, prompts_person)
    grid = {t: round(cohen_kappa(y, p_person > t), 3) for t in GRID}
    chosen = max(GRID, key=lambda t: (grid[t], -abs(t - 0.5)))
    images, doc = load_audit()
    items = doc["items"]
    batches = np.array([it["batch"] for it in items])
    sel = np.flatnonzero(np.isin(batches, AUDIT_BATCHES))
    human = np.array([items[i]["labels"]["plausibility"] for i in sel], dtype=bool)
    sub_images, prompts = images[torch.from_numpy(sel)], [items[i]["prompt"] for i in sel]
    p_half = probabilities(judge, sub_images, prompts)
    p_chosen = probabilities(CalibratedJudge(judge, chosen), sub_images, prompts)
    out = {"person_set": {"n": len(y), "marked": int(y.sum()), "judge_flags_at_0.5": int((p_person > 0.5).sum())},
           "person_set_kappa_by_threshold": {str(t): k for t, k in grid.items()}, "chosen_threshold": chosen,
           "audit_6_11": {"at_0.5": agreement(human, p_half > 0.5, batches[sel], AUDIT_BATCHES),
                          f"at_{chosen}": agreement(human, p_chosen > 0.5, batches[sel], AUDIT_BATCHES)}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
