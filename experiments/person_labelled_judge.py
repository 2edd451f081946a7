"""Does a person's reading of pipeline samples teach the safety *judge* the marks it misses?

The shipped safety judge sees nearly every mark the base model draws beside an object but few of
those a fine-tuned model leaves inside it (audit batches 6-8: 41 marks a person sees, the judge
not; docs/toyworld.md). Outside the audit set the project holds 320 pipeline samples labelled for
safety by the same procedure, none of a held-out prompt:

* ``experiments/data/fit_base_safety_labels.*``: the base model on the 80 ``fit`` prompts x 2 seeds;
* ``experiments/data/validation_look.*``: the base model and Focus-N-Fix runs with the demo's
  settings on the 16 ``validation`` prompts x 2 seeds (96 images), and a second look (64 images).

This fine-tunes the shipped judge on half-batches of its own generator training data (every form,
with masks, as the build trains it) and half-batches of those 320 images (presence only: a person
says whether, not exactly where), with settings fixed before it was run: 300 steps, batch 24 + 24,
AdamW at 2e-4 with a cosine schedule, random horizontal flips and a little noise on the person's
images. Then it prints, for the shipped and the tuned judge: the per-form AUC on the ``toyworld
stats`` scenes (64 per form) and Cohen's kappa with the audit labels, per batch, on the v3
batches 6-8 together and on all 990.

The rule, written with this script and before its first run (docs/toyworld.md, "A judge tuned
on a person's labels"): the tuned judge replaces the shipped one if no form's AUC falls more than
0.02 and its kappa on batches 6-8 together is higher than the shipped judge's (0.574).

    python experiments/person_labelled_judge.py [--out DIR] [--json FILE] [--demo DEMO_DIR] [--install [--model DIR]]

``--demo DEMO_DIR`` (a ``focusnfix demo`` output) also reads that demo's held-out images with both
judges: per training run, the share of the base images' marks each method removes and the share of
clean base images it marks (a second reading of the claim table, by a judge that was not shipped).

About 2.5 minutes at two threads. ``--out DIR`` writes the tuned judge's weights there; ``--install``
writes them as ``judges/safety_person.safetensors`` of the packaged assets (or of ``--model DIR``, a
build directory): the tuned judge replaced the generator-trained one on audit batch 11, by the rule in
docs/toyworld.md ("Batch 11"), and was the shipped safety judge until the audit-trained one replaced it
on batch 12 (``load_judge("safety", person_tuned=True)`` loads it). The weights are the same on every
run at two threads (bit for bit on one CPU; to CPU-kind rounding on another: close weights, the same
decision on every audit image; a test checked this while it was the shipped judge, and left the CI
suite, whose 15 minutes it no longer fitted, when it stopped being).
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
STEPS, HALF, LR, SEED = 300, 24, 2e-4, 9100
V3_BATCHES = (6, 7, 8)


def person_set() -> tuple[torch.Tensor, torch.Tensor]:
    """The 320 person-labelled pipeline samples: ``images (N, 3, 64, 64)`` in [0, 1], ``labels (N,)``."""
    images, labels = [], []
    fit = np.load(DATA / "fit_base_safety_labels.npz")["images"]
    images.append(fit)
    labels += [it["safety"] for it in json.loads((DATA / "fit_base_safety_labels.json").read_text())["items"]]
    look = np.load(DATA / "validation_look.npz")
    doc = json.loads((DATA / "validation_look.json").read_text())
    images += [look["images"], look["second_look_images"]]
    labels += [it["safety"] for it in doc["items"]] + [it["safety"] for it in doc["second_look"]["items"]]
    x = torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).float() / 255
    return x, torch.tensor(labels, dtype=torch.float32)


def tune(net: M.LocalizingJudgeNet, person_x: torch.Tensor, person_y: torch.Tensor, progress=print,
         form_weights: dict[str, float] | None = None) -> M.LocalizingJudgeNet:
    recipe = Recipe()
    data = forms_dataset(recipe.forms_images, recipe.seed * 1000 + 600 + 51, "safety", "train", weights=form_weights)
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
        if step % 50 == 0 or step == STEPS - 1:
            progress(f"step {step}/{STEPS} loss {loss.item():.4f}")
    return net.eval()


@torch.no_grad()
def audit_kappa(judge: M.LocalizingJudge) -> dict:
    images, doc = load_audit()
    human = np.array([it["labels"]["safety"] for it in doc["items"]], dtype=bool)
    batches = np.array([it["batch"] for it in doc["items"]])
    prompts = [it["prompt"] for it in doc["items"]]
    pred = torch.cat([judge.defect_probability(images[i : i + 128], prompts[i : i + 128])
                      for i in range(0, len(prompts), 128)]).numpy() > 0.5
    v3 = np.isin(batches, V3_BATCHES)
    return {"all": round(cohen_kappa(human, pred), 3), "batches_6_8": round(cohen_kappa(human[v3], pred[v3]), 3),
            "by_batch": {int(b): round(cohen_kappa(human[batches == b], pred[batches == b]), 3) for b in sorted(set(batches))},
            "batches_6_8_counts": {"both": int((human & pred)[v3].sum()), "human_only": int((human & ~pred)[v3].sum()),
                                   "judge_only": int((~human & pred)[v3].sum())}}


@torch.no_grad()
def demo_reading(judge: M.LocalizingJudge, demo_dir: str) -> dict:
    """Per method and training run of a demo: removal share (base marked -> clean) and new-defect
    share (base clean -> marked), by ``judge`` at 0.5, on the demo's stored held-out images."""
    from focusnfix.evaluate import load_eval

    _, arrays, per_image = load_eval(demo_dir)
    prompts = [it["prompt"] for it in per_image["items"]]

    def marked(key: str) -> np.ndarray:
        x = torch.from_numpy(arrays[key]).float()
        x = x / 255 if arrays[key].dtype == np.uint8 else x
        return judge.defect_probability(x, prompts).numpy() > 0.5

    base = marked("base")
    out: dict = {"base_marked": int(base.sum()), "n": len(prompts)}
    for method in sorted({k.split("__")[1] for k in arrays if k.startswith("method__")}):
        runs = sorted(k for k in arrays if k == f"method__{method}" or k.startswith(f"method__{method}__run"))
        removal, new = [], []
        for key in runs:
            after = marked(key)
            removal.append(round(float((base & ~after).sum() / max(1, base.sum())), 3))
            new.append(round(float((~base & after).sum() / max(1, (~base).sum())), 3))
        out[method] = {"removal_share_per_run": removal, "removal_share": round(float(np.mean(removal)), 3),
                       "new_defect_share_per_run": new, "new_defect_share": round(float(np.mean(new)), 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the tuned judge's safetensors here (a directory)")
    ap.add_argument("--json", help="write the comparison here too")
    ap.add_argument("--inset-weight", type=float, default=None,
                    help="draw generator `inset` scenes this many times as often as each other form")
    ap.add_argument("--no-audit", action="store_true", help="score the generator forms only (designing a variant)")
    ap.add_argument("--demo", help="a demo output directory whose held-out images both judges read")
    ap.add_argument("--install", action="store_true",
                    help="write the tuned weights as the assets' judges/safety_person.safetensors (the shipped safety judge)")
    ap.add_argument("--model", help="with --install: a build directory instead of the packaged assets")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    px, py = person_set()
    shipped = tw.load_judge("safety", raw=True, person_tuned=False)  # generator-trained, at 0.5, as the rule compared them
    net = M.LocalizingJudgeNet()
    net.load_state_dict(load_file(str((Path(args.model) if args.model else tw.assets_path()) / "judges" / "safety.safetensors")))
    tuned_net = tune(net, px, py, form_weights={"inset": args.inset_weight} if args.inset_weight else None)
    tuned = M.freeze(M.LocalizingJudge("safety", tuned_net))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        save_module(tuned_net, Path(args.out) / "safety.safetensors")
    if args.install:
        root = Path(args.model) if args.model else tw.assets_path()
        save_module(tuned_net, root / "judges" / "safety_person.safetensors")
    out = {}
    for name, judge in (("shipped", shipped), ("tuned", tuned)):  # "shipped": the generator-trained judge it started from
        forms = {f: round(v["auc"], 3) for f, v in form_stats("safety", None, 64, model=judge).items()}
        out[name] = {"forms_auc": forms, "audit_kappa": None if args.no_audit else audit_kappa(judge)}
        print(name, json.dumps(out[name]), flush=True)
    if args.demo:
        out["demo"] = {name: demo_reading(judge, args.demo) for name, judge in (("shipped", shipped), ("tuned", tuned))}
        print("demo", json.dumps(out["demo"]), flush=True)
    out["seconds"] = round(time.time() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
