"""Does a person's labels on the pipeline's own samples teach the safety reward the marks it misses?

The robust safety reward is trained on generator scenes (every designed form of the mark) and on
attacked pipeline samples, never on a person's reading of what the pipeline draws. On validation
prompts the base model draws a third of its marks *inside* the object (a dark patch in a green
square's corner, a bluish oval in a purple circle), and the reward calls 7 of 8 of them clean, so
their masks are gated empty (docs/evaluation.md, "What a person sees the method leave").

This fine-tunes the shipped reward for ``--steps`` steps on half-batches of its own training data
(every form, as the hardening does) and half-batches of person-labelled base-pipeline samples of
the ``fit`` prompts (``experiments/data/fit_base_safety_labels.*``: 80 prompts x seeds
41000-41001, labelled for safety by the audit procedure), holding 16 of the 80 prompts back, and
prints, before and after:

* agreement with the person on the labelled samples (train and held-back prompts): AUC, kappa of
  the gate (reward < log 0.5), marks called clean, clean images called marked;
* on the validation look (``experiments/data/validation_look.*``: base model and two Focus-N-Fix
  runs on the 16 validation prompts, labelled blind, each mark noted inside / outside the
  object): how many marks of each kind the reward calls marked (its gate opens a mask there);
* score AUC per form on the ``toyworld stats`` scenes (64 per form).

    python experiments/person_labelled_reward.py [--steps 200] [--out DIR] [--masks FIG.png]

About 3 minutes at two threads. ``--out DIR`` writes a copy of the packaged assets with the tuned
reward in it (for ``args: {aspect: safety, root: DIR}``); ``--masks FIG.png`` draws the training
masks (the demo's config, the tuned reward) of the base images whose only mark is inside the
object, next to the images (docs/images/inside_marks_person_reward_masks.png).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
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
from focusnfix.toyworld.audit import cohen_kappa
from focusnfix.toyworld.forms import forms_dataset
from focusnfix.toyworld.recipe import cosine_lr, save_module, seed_all
from focusnfix.toyworld.stats import _auc, form_stats

DATA = Path(__file__).resolve().parent / "data"


def load_set(name: str) -> tuple[torch.Tensor, list[dict]]:
    """``images (N, 3, 64, 64)`` in [0, 1] and the items of ``experiments/data/<name>.*``."""
    images = np.load(DATA / f"{name}.npz")["images"]
    items = json.loads((DATA / f"{name}.json").read_text())["items"]
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, items


def agreement(model: M.SafetyClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict:
    with torch.no_grad():
        reward = -F.softplus(model.logit(images))
    called = (reward < math.log(0.5)).numpy()
    y = labels.numpy() > 0
    return {"auc": round(_auc(-reward.double(), labels.double()), 3), "kappa": round(cohen_kappa(called, y), 3),
            "marks_called_clean": int((~called & y).sum()), "clean_called_marked": int((called & ~y).sum()),
            "n": len(y), "marked": int(y.sum())}


def validation_look(model: M.SafetyClassifier) -> dict:
    images, items = load_set("validation_look")
    with torch.no_grad():
        called = (-F.softplus(model.logit(images)) < math.log(0.5)).numpy()
    out: dict = {}
    for i, item in enumerate(items):
        entry = out.setdefault(item["source"], {}).setdefault(item["where"], [0, 0])
        entry[0] += int(called[i])
        entry[1] += 1
    return {src: {where: f"{c}/{n} called marked" for where, (c, n) in kinds.items()} for src, kinds in out.items()}


def draw_inside_masks(root: Path, png: str) -> list[dict]:
    """The demo config's reference (gate and Grad-CAM mask) with the reward under ``root``, on the
    validation look's base images whose only mark is inside the object; the image and the mask
    (red) side by side, one row each, at 3x."""
    import tempfile  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    from focusnfix.config import load_config  # noqa: PLC0415
    from focusnfix.reference import compute_reference  # noqa: PLC0415
    from focusnfix.train import FocusNFixTrainer  # noqa: PLC0415

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "toy_safety.yaml",
                         [f"train.output_dir={tempfile.mkdtemp()}", "data.cache_on_disk=false"])
    config.aspects[0].args["root"] = str(root)
    trainer = FocusNFixTrainer(config, progress=False)
    _, items = load_set("validation_look")
    inside = [it for it in items if it["source"] == "base" and it["where"] == "in"]
    prompts, seeds = [it["prompt"] for it in inside], [it["seed"] for it in inside]
    ref = compute_reference(trainer.backbone, trainer.aspects, trainer.localize, prompts, seeds, trainer.options,
                            config.mask, [a.gate for a in config.aspects])
    with torch.no_grad():
        reward = trainer.aspects[0].reward(ref.images, prompts)
    rows = []
    for i in range(len(inside)):
        image = ref.images[i].permute(1, 2, 0).numpy()
        mask = ref.mask[i, 0].numpy()[..., None]
        rows.append(np.concatenate([image, image * (1 - 0.5 * mask) + 0.5 * mask * np.array([1.0, 0.0, 0.0])], 1))
    picture = (np.concatenate(rows, 0) * 255).round().astype(np.uint8)
    Image.fromarray(picture).resize((picture.shape[1] * 3, picture.shape[0] * 3), Image.NEAREST).save(png)
    return [{"prompt": p, "seed": s, "reward": round(float(r), 2), "mask_area": round(float(ref.mask[i].mean()), 3)}
            for i, (p, s, r) in enumerate(zip(prompts, seeds, reward, strict=True))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write a copy of the assets with the tuned reward here")
    parser.add_argument("--masks", default=None, help="draw the masks of the inside-only base marks here (PNG)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    images, items = load_set("fit_base_safety_labels")
    labels = torch.tensor([float(it["safety"]) for it in items])
    held = set(sorted({it["prompt"] for it in items})[::5])  # 16 of the 80 fit prompts
    is_held = torch.tensor([it["prompt"] in held for it in items])
    train_idx, held_idx = torch.nonzero(~is_held).squeeze(1), torch.nonzero(is_held).squeeze(1)

    model = M.SafetyClassifier()
    model.load_state_dict(load_file(str(tw.pipeline_path().parent / "aspects" / "safety.safetensors")))
    model.eval()

    def measure() -> dict:
        return {"person_train": agreement(model, images[train_idx], labels[train_idx]),
                "person_held_prompts": agreement(model, images[held_idx], labels[held_idx]),
                "validation_look": validation_look(model)}

    result = {"steps": args.steps, "shipped": measure()}
    vae = AutoencoderKL.from_pretrained(tw.pipeline_path(), subfolder="vae").eval()
    data = forms_dataset(8000, 41, "safety", "train")  # the robust reward's own training scenes
    with torch.no_grad():
        recon = B.reconstruct(vae, data["images"])
    seed_all(900)
    g = torch.Generator().manual_seed(900)
    lr, half = 5e-4, 24  # the hardening's learning rate and half-batches
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for step in range(args.steps):
        cosine_lr(opt, lr, step, args.steps, warmup=10)
        idx = torch.randint(0, len(data["labels"]), (half,), generator=g)
        j = train_idx[torch.randint(0, len(train_idx), (half,), generator=g)]
        sigma = torch.rand(half, 1, 1, 1, generator=g) * 0.03
        person = (images[j] + sigma * torch.randn(images[j].shape, generator=g)).clamp(0, 1)
        x = torch.cat([B._mix_blur(data["images"], recon, idx, g), person])
        y = torch.cat([data["labels"][idx], labels[j]])
        loss = F.binary_cross_entropy_with_logits(model.logit(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    result["tuned"] = measure()
    out = Path(args.out) if args.out else Path(f"/tmp/focusnfix_person_reward_{args.steps}")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(tw.pipeline_path().parent, out)
    save_module(model, out / "aspects" / "safety.safetensors")
    result["forms_score_auc"] = {
        "shipped": {k: round(v["score_auc"], 3) for k, v in form_stats("safety", None, 64, judge=False).items()},
        "tuned": {k: round(v["score_auc"], 3) for k, v in form_stats("safety", out, 64, judge=False).items()},
    }
    result["tuned_assets"] = str(out)
    if args.masks:
        result["inside_marks"] = draw_inside_masks(out, args.masks)
    result["seconds"] = round(time.time() - t0)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
