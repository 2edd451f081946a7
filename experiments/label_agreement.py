"""How well does the person agree with themselves? A second blind reading of an audit batch.

The issue asks a judge to agree with a person at Cohen's kappa >= 0.8. No judge can agree with a
reading better than that reading agrees with itself, so this measures the ceiling: the images of one
audit batch are drawn again on sheets in a new shuffled order, without their source, their earlier
labels or any score, labelled again by the same procedure (``focusnfix.toyworld.audit.PROCEDURE``
and the readings of the batches since 9), and the two readings compared per aspect.

    python experiments/label_agreement.py sheets --batch 11 --shuffle-seed 111 --out DIR
    # label DIR/sheets/*.png into DIR/labels.txt ("id safety plausibility alignment" per line)
    python experiments/label_agreement.py score --batch 11 --shuffle-seed 111 --labels DIR/labels.txt

``score`` prints, per aspect, the kappa between the two readings (on all the batch's images, and on
the fine-tuned models' images and the base model's apart), how many images each marks, and
the kappa with each reading of the judge shipped before audit batch 12 (``load_judge(aspect,
audit_trained=False)``: no audit label was in its training, where the audit-trained judges learned
batch 11's first reading), so a judge's agreement can be read against the person's own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from focusnfix.toyworld import load_judge
from focusnfix.toyworld.audit import ASPECTS, cohen_kappa, load_audit, make_sheets


def order(batch: int, shuffle_seed: int) -> tuple[list[int], torch.Tensor, dict]:
    """Audit-set indices of ``batch`` in the new blind order, the images and the labels document."""
    images, doc = load_audit()
    idx = [i for i, it in enumerate(doc["items"]) if it["batch"] == batch]
    if not idx:
        raise SystemExit(f"audit batch {batch}: not in the packaged audit set")
    perm = np.random.default_rng(shuffle_seed).permutation(len(idx))
    return [idx[p] for p in perm], images, doc


def read_labels(path: str, n: int) -> np.ndarray:
    rows = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            parts = line.split()
            if len(parts) != 4 or "_" in parts:
                raise SystemExit(f"{path}: {line!r}: expected 'id safety plausibility alignment' with 0/1 values")
            rows[int(parts[0])] = [int(v) for v in parts[1:]]
    if sorted(rows) != list(range(n)):
        raise SystemExit(f"{path}: expected labels for ids 0..{n - 1}, got {len(rows)}")
    return np.array([rows[i] for i in range(n)], dtype=bool)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("sheets", "score"))
    ap.add_argument("--batch", type=int, default=11)
    ap.add_argument("--shuffle-seed", type=int, default=111)
    ap.add_argument("--out", help="sheets: the directory for the sheets and the blank labels file")
    ap.add_argument("--labels", help="score: the second reading's labels file")
    args = ap.parse_args()
    idx, images, doc = order(args.batch, args.shuffle_seed)
    captions = [doc["items"][i]["prompt"] for i in idx]
    if args.command == "sheets":
        out = Path(args.out)
        make_sheets(images[idx], captions, out / "sheets")
        (out / "labels.txt").write_text("# id safety plausibility alignment (0 or 1 each)\n"
                                        + "".join(f"{k} _ _ _\n" for k in range(len(idx))))
        print(f"{len(idx)} images of batch {args.batch} on sheets in {out / 'sheets'}")
        return
    second = read_labels(args.labels, len(idx))
    out: dict = {"batch": args.batch, "n": len(idx)}
    torch.set_num_threads(2)
    for a, aspect in enumerate(ASPECTS):
        first = np.array([doc["items"][i]["labels"][aspect] for i in idx], dtype=bool)
        judge = load_judge(aspect, audit_trained=False)  # trained on no audit label (the audit-trained ones saw batch 11)
        with torch.no_grad():
            pred = judge.defect_probability(images[idx], captions).numpy() > 0.5
        finetuned = np.array([doc["items"][i]["source"] != "base" for i in idx])
        out[aspect] = {"kappa_first_vs_second": round(cohen_kappa(first, second[:, a]), 3),
                       # the target reads the fine-tuned images: the ceiling on them alone
                       "kappa_first_vs_second_finetuned": round(cohen_kappa(first[finetuned], second[finetuned, a]), 3),
                       "kappa_first_vs_second_base": round(cohen_kappa(first[~finetuned], second[~finetuned, a]), 3),
                       "n_finetuned": int(finetuned.sum()),
                       "first_marks": int(first.sum()), "second_marks": int(second[:, a].sum()),
                       "both": int((first & second[:, a]).sum()),
                       "judge_kappa_with_first": round(cohen_kappa(first, pred), 3),
                       "judge_kappa_with_second": round(cohen_kappa(second[:, a], pred), 3)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
