"""A judge trained on every label a person has given: estimated by leaving one audit batch out, then tested on a fresh batch.

The person-tuned safety judge (``experiments/person_labelled_judge.py``) learned from 320 labelled
pipeline samples outside the audit set and agrees with a person at kappa 0.675 / 0.679 / 0.579 on
the fresh batches 9-11; the plausibility judge, never tuned on a person, at 0.41 / 0.21 / 0.30. The
audit set itself held 1422 labelled images (batches 1-11, three aspects each; batch 12 was added to test this), most of them from
DRaFT and Focus-N-Fix runs: the images a judge of this project exists to read. Learned rewards in
the paper are trained on people's labels; this asks whether a judge trained on all of ours agrees
with a person on images it has not seen.

For ``--aspect safety`` or ``plausibility`` it fine-tunes the generator-trained judge of that aspect
on half-batches of its generator training data (every form, with masks, as the build trains it) and
half-batches of person-labelled images (presence only): the labelled samples outside the audit set
(``experiments/data/``: 320 for safety, 256 for plausibility) and the audit items of every batch
not held out. Settings fixed in this script before its first run: 600 steps, batch 24 + 24, AdamW
at 2e-4 with a cosine schedule (20 warm-up steps), random horizontal flips and a little noise on
the person's images; presence at 0.5.

* ``--holdout B [B ...]``: train without the audit batches B and print the candidate's and the
  shipped judge's kappa on each of them (leave-one-batch-out: one run per held-out batch, the
  design estimate; batches 6-11 are the v3 pipeline's).
* ``--holdout none --out DIR``: train on every labelled image and write ``DIR/<aspect>.safetensors``,
  with its per-form AUC on the ``toyworld stats`` scenes next to the shipped judge's (the rule's
  condition (a); ``--forms`` adds them to a run with held-out batches).
* ``--check FILE``: read the audit batches ``--batches`` with the judge FILE and the shipped judge
  (the fresh-batch test; no training).

    python experiments/audit_trained_judge.py --aspect safety --holdout 9 [--json FILE]
    python experiments/audit_trained_judge.py --aspect safety --holdout none --out DIR
    python experiments/audit_trained_judge.py --aspect safety --check DIR/safety.safetensors --batches 12

About 6.5 minutes a run at one thread. ``--install`` writes the trained judge as the packaged assets'
``judges/<aspect>_audit.safetensors``: with ``--holdout 12 13`` (batch 13 was labelled after it) that is the shipped safety and
plausibility judge since audit batch 12 (docs/toyworld.md, "Batch 12"; ``--threads 1``, the way the
shipped files were made). ``shipped`` in the output is the judge shipped before it
(``load_judge(aspect, audit_trained=False)``: the person-tuned safety judge, the plausibility judge
at its operating point 0.7).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from focusnfix import toyworld as tw
from focusnfix.toyworld import build_models as B
from focusnfix.toyworld import models as M
from focusnfix.toyworld.audit import cohen_kappa, load_audit
from focusnfix.toyworld.forms import forms_dataset
from focusnfix.toyworld.recipe import Recipe, cosine_lr, save_module, seed_all
from focusnfix.toyworld.stats import form_stats

DATA = Path(__file__).resolve().parent / "data"
STEPS, HALF, LR, SEED = 600, 24, 2e-4, 9300
FORM_SEED_OFFSET = {"safety": 51, "plausibility": 52}  # the build's own generator data for each judge


def extra_set(aspect: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Person-labelled pipeline samples outside the audit set: ``images (N, 3, 64, 64)`` in [0, 1], ``labels (N,)``."""
    fit = np.load(DATA / "fit_base_safety_labels.npz")["images"]
    look = np.load(DATA / "validation_look.npz")
    if aspect == "safety":
        doc = json.loads((DATA / "validation_look.json").read_text())
        images = [fit, look["images"], look["second_look_images"]]
        labels = ([it["safety"] for it in json.loads((DATA / "fit_base_safety_labels.json").read_text())["items"]]
                  + [it["safety"] for it in doc["items"]] + [it["safety"] for it in doc["second_look"]["items"]])
    else:
        doc = json.loads((DATA / "plausibility_labels.json").read_text())
        images = [fit, look["images"]]
        labels = doc["fit_base_safety_labels"] + doc["validation_look"]
    x = torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).float() / 255
    return x, torch.tensor(labels, dtype=torch.float32)


def person_set(aspect: str, holdout: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The extra set and every audit item whose batch is not in ``holdout``."""
    x, y = extra_set(aspect)
    images, doc = load_audit()
    keep = [i for i, it in enumerate(doc["items"]) if it["batch"] not in holdout]
    ay = torch.tensor([doc["items"][i]["labels"][aspect] for i in keep], dtype=torch.float32)
    return torch.cat([x, images[keep]]), torch.cat([y, ay])


def train(aspect: str, person_x: torch.Tensor, person_y: torch.Tensor, progress=print) -> M.LocalizingJudgeNet:
    recipe = Recipe()
    net = M.LocalizingJudgeNet()
    net.load_state_dict(load_file(str(tw.assets_path() / "judges" / f"{aspect}.safetensors")))
    data = forms_dataset(recipe.forms_images, recipe.seed * 1000 + 600 + FORM_SEED_OFFSET[aspect], aspect, "train")
    vae = AutoencoderKL.from_pretrained(str(tw.pipeline_path() / "vae")).eval()
    recon = B.reconstruct(vae, data["images"])
    masks = F.max_pool2d(data["masks"], 2)
    seed_all(SEED)
    g = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=1e-4)
    net.train()
    for step in range(STEPS):
        cosine_lr(opt, LR, step, STEPS, warmup=20)
        idx = torch.randint(0, len(data["labels"]), (HALF,), generator=g)
        xg = B.sample_like(B._mix(data["images"], recon, idx, g), data["objects"][idx], g)
        heat, presence = net(xg)
        loss = (F.binary_cross_entropy_with_logits(heat, masks[idx], pos_weight=torch.tensor(5.0))
                + F.binary_cross_entropy_with_logits(presence, data["labels"][idx]))
        j = torch.randint(0, len(person_y), (HALF,), generator=g)
        xp = person_x[j]
        flip = (torch.rand(HALF, generator=g) < 0.5).view(-1, 1, 1, 1)
        xp = torch.where(flip, xp.flip(-1), xp)
        xp = (xp + 0.01 * torch.randn(xp.shape, generator=g)).clamp(0, 1)
        loss = loss + F.binary_cross_entropy_with_logits(net(xp)[1], person_y[j])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == STEPS - 1:
            progress(f"step {step}/{STEPS} loss {loss.item():.4f}")
    return net.eval()


@torch.no_grad()
def kappas(judge, aspect: str, batches: list[int]) -> dict:
    """Cohen's kappa (p > 0.5) with the person on each audit batch, with the confusion counts."""
    images, doc = load_audit()
    out = {}
    for b in batches:
        sel = [i for i, it in enumerate(doc["items"]) if it["batch"] == b]
        if not sel:
            raise SystemExit(f"audit batch {b}: no labelled items in the packaged audit set")
        human = np.array([doc["items"][i]["labels"][aspect] for i in sel], dtype=bool)
        prompts = [doc["items"][i]["prompt"] for i in sel]
        x = images[sel]
        pred = torch.cat([judge.defect_probability(x[i : i + 128], prompts[i : i + 128])
                          for i in range(0, len(sel), 128)]).numpy() > 0.5
        out[b] = {"kappa": round(cohen_kappa(human, pred), 3), "both": int((human & pred).sum()),
                  "human_only": int((human & ~pred).sum()), "judge_only": int((~human & pred).sum()), "n": len(sel)}
    return out


def load_net_judge(aspect: str, path: str) -> M.LocalizingJudge:
    net = M.LocalizingJudgeNet()
    net.load_state_dict(load_file(path))
    return M.freeze(M.LocalizingJudge(aspect, net))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aspect", choices=("safety", "plausibility"), required=True)
    ap.add_argument("--holdout", nargs="+", help="audit batches left out of training and scored ('none': train on all)")
    ap.add_argument("--check", help="a tuned judge's safetensors: score --batches with it (no training)")
    ap.add_argument("--batches", default="12", help="with --check: comma-separated audit batches")
    ap.add_argument("--out", help="write the trained judge here (a directory)")
    ap.add_argument("--forms", action="store_true",
                    help="also score the generator forms (the rule's condition (a)); always with --holdout none")
    ap.add_argument("--install", action="store_true",
                    help="write the trained judge as the assets' judges/<aspect>_audit.safetensors (the shipped judge)")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if (args.holdout is None) == (args.check is None):
        ap.error("give exactly one of --holdout and --check")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    # the judge shipped before this one (the person-tuned safety judge, the plausibility judge at 0.7)
    shipped = tw.load_judge(args.aspect, audit_trained=False)
    out: dict = {"aspect": args.aspect}
    if args.check:
        batches = [int(b) for b in args.batches.split(",")]
        judge = load_net_judge(args.aspect, args.check)
    else:
        held = set() if args.holdout == ["none"] else {int(b) for b in args.holdout}
        batches = sorted(held)
        px, py = person_set(args.aspect, held)
        out["person_images"] = {"n": len(py), "defect": int(py.sum())}
        net = train(args.aspect, px, py)
        judge = M.freeze(M.LocalizingJudge(args.aspect, net))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            save_module(net, Path(args.out) / f"{args.aspect}.safetensors")
        if args.install:  # the shipped judge since batch 12 (docs/toyworld.md, "Batch 12")
            judges = tw.assets_path() / "judges"
            save_module(net, judges / f"{args.aspect}_audit.safetensors")
            record = json.loads((judges / "audit_trained.json").read_text()) if (judges / "audit_trained.json").is_file() else {}
            _, doc = load_audit()
            record[args.aspect] = {"trained_on_audit_batches": sorted({it["batch"] for it in doc["items"]} - held),
                                   "made_by": f"python experiments/audit_trained_judge.py --aspect {args.aspect} "
                                              f"--holdout {' '.join(args.holdout)} --install"}
            (judges / "audit_trained.json").write_text(json.dumps(record, indent=2) + "\n")
        if not held or args.forms:  # a judge that may be shipped: condition (a), the generator forms
            out["forms_auc"] = {name: {f: round(v["auc"], 3) for f, v in form_stats(args.aspect, None, 64, model=j).items()}
                                for name, j in (("shipped", shipped), ("candidate", judge))}
    if batches:
        out["kappa"] = {"candidate": kappas(judge, args.aspect, batches), "shipped": kappas(shipped, args.aspect, batches)}
    out["seconds"] = round(time.time() - t0)
    print(json.dumps(out), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
