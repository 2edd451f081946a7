"""The safety judge's operating point, set on a person's labels outside the audit set.

The rule (docs/toyworld.md, "The safety judge's operating point"), written before this ran: pick the
threshold t from :data:`GRID` with the highest Cohen's kappa against the 320 person-labelled pipeline
samples of ``experiments/data/`` (none of a held-out prompt; ties to the larger t); the judge at t
(:class:`focusnfix.aspects.base.CalibratedJudge`, every AUC unchanged) replaces the shipped one if its
kappa on audit batches 6-9 together is higher than at 0.5. Prints, as JSON: the kappa of every t on
the person's set, the chosen t, and the audit kappa at 0.5 and at t (batches 6-9, per batch, with
the confusion counts).

    python experiments/judge_threshold.py
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
from person_labelled_judge import person_set  # noqa: E402

GRID = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
AUDIT_BATCHES = (6, 7, 8, 9)


@torch.no_grad()
def probabilities(judge, images: torch.Tensor, prompts: list[str]) -> np.ndarray:
    return torch.cat([judge.defect_probability(images[i : i + 64], prompts[i : i + 64])
                      for i in range(0, len(images), 64)]).numpy()


def agreement(human: np.ndarray, pred: np.ndarray, batches: np.ndarray, batch_ids=AUDIT_BATCHES) -> dict:
    """Kappa of ``pred`` with the person's ``human`` labels, in all and per audit batch of ``batch_ids``."""
    return {"kappa": round(cohen_kappa(human, pred), 3),
            "by_batch": {int(b): round(cohen_kappa(human[batches == b], pred[batches == b]), 3) for b in batch_ids},
            "both": int((human & pred).sum()), "human_only": int((human & ~pred).sum()),
            "judge_only": int((~human & pred).sum())}


def main() -> None:
    torch.set_num_threads(2)
    judge = load_judge("safety", raw=True, person_tuned=False)  # generator-trained, at 0.5
    px, py = person_set()
    p_person = probabilities(judge, px, [""] * len(px))  # the safety judge reads no caption
    y = py.numpy() > 0
    grid = {t: round(cohen_kappa(y, p_person > t), 3) for t in GRID}
    chosen = max(GRID, key=lambda t: (grid[t], t))
    images, doc = load_audit()
    items = doc["items"]
    batches = np.array([it["batch"] for it in items])
    sel = np.flatnonzero(np.isin(batches, AUDIT_BATCHES))
    human = np.array([items[i]["labels"]["safety"] for i in sel], dtype=bool)
    sub_images, prompts = images[torch.from_numpy(sel)], [items[i]["prompt"] for i in sel]
    p_shipped = probabilities(judge, sub_images, prompts)
    p_chosen = probabilities(CalibratedJudge(judge, chosen), sub_images, prompts)
    out = {"person_set_kappa_by_threshold": {str(t): k for t, k in grid.items()}, "chosen_threshold": chosen,
           "audit_6_9": {"at_0.5": agreement(human, p_shipped > 0.5, batches[sel]),
                         f"at_{chosen}": agreement(human, p_chosen > 0.5, batches[sel])}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
