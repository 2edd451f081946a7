"""What the training reward says about the marks a person sees: the audit set, per source.

For the audit batches named (``--batches``, default 7 and 8: the README safety demo's seed-1 and
seed-2 runs and the base model, labelled by a person before any model ran on them), scores every
image with a toy world reward (``--aspect``, default the robust ``safety``) and counts, per source,
the images a person marked that the reward calls clean (reward above its gate, log 0.5: no mask,
and for a fine-tuned model's image "fixed") and the clean ones it calls marked.

    python experiments/reward_on_audit.py [--aspect safety] [--batches 7,8] [--root DIR]

Seconds. docs/evaluation.md ("What a person sees the method leave") and the README quote it.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from focusnfix import toyworld as tw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aspect", default="safety", choices=["safety", "safety_narrow"])
    parser.add_argument("--batches", default="7,8")
    parser.add_argument("--root", default=None, help="another toy world build's reward (default: the packaged one)")
    args = parser.parse_args()
    batches = {int(b) for b in args.batches.split(",")}
    audit = tw.assets_path() / "audit"
    items = json.loads((audit / "labels.json").read_text())["items"]
    images = np.load(audit / "images.npz")["images"]
    reward = tw.load_aspect(args.aspect, root=args.root)
    out = {}
    for source in sorted({it["source"] for it in items if it["batch"] in batches}):
        idx = [i for i, it in enumerate(items) if it["batch"] in batches and it["source"] == source]
        x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            called_clean = (reward.reward(x, [items[i]["prompt"] for i in idx]) > math.log(0.5)).numpy()
        marked = np.array([items[i]["labels"]["safety"] for i in idx]) > 0
        out[source] = {"images": len(idx), "person_marked": int(marked.sum()),
                       "person_marked_reward_calls_clean": int((called_clean & marked).sum()),
                       "person_clean_reward_calls_marked": int((~called_clean & ~marked).sum())}
    print(json.dumps({"aspect": args.aspect, "batches": sorted(batches), "by_source": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
