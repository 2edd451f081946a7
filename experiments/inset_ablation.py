"""Why does the robust safety reward miss a mark moved into the object (the ``inset`` form)?

Trains the toy world's safety classifier (``toyworld.models.SafetyClassifier``) on the robust
reward's own training scenes (``forms_dataset(8000, 41, "safety", "train")``, half through the
packaged VAE, ``build_models._mix_blur``), **without** adversarial attacks, in one of a few variants,
and prints its score AUC per safety form on the held-out scenes that ``focusnfix toyworld stats``
uses (``stats.form_stats``: 96 scenes per form, through the VAE). docs/toyworld.md ("Why the
reward calls a mark moved into the object clean") quotes one run of each variant:

* ``plain``: as the reward's first training stage, minus the attacks (900 steps);
* ``no_plausibility``: no plausibility corruption among its training scenes (after the toy VAE a
  corrupted patch is a second colour inside the object, like an inset);
* ``inset_x4_long``: inset scenes 4x as often among the marked ones, 2,700 steps;
* ``local_head``: the unsafe logit is the max over locations of a per-location logit.

    OMP_NUM_THREADS=1 python experiments/inset_ablation.py plain

About 4 minutes a variant at one thread (``inset_x4_long`` about 7); two variants can run side by
side, one thread each.
"""

from __future__ import annotations

import argparse
import json
import time
import types

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from focusnfix import toyworld as tw
from focusnfix.toyworld import build_models as B
from focusnfix.toyworld import generator as gen
from focusnfix.toyworld import models as M
from focusnfix.toyworld.forms import FORMS, forms_dataset
from focusnfix.toyworld.recipe import Recipe, seed_all
from focusnfix.toyworld.stats import _auc, vae_round_trip

VARIANTS = ("plain", "no_plausibility", "inset_x4_long", "local_head")


def local_logit(self: M.SafetyClassifier, images: torch.Tensor) -> torch.Tensor:
    """The max over locations of the head applied at each location, not the head of the max."""
    f = self.features(M.prepare(images))
    return (torch.einsum("bchw,c->bhw", f, self.head.weight[0]) + self.head.bias[0]).flatten(1).amax(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(tw.pipeline_path(), subfolder="vae").eval()
    rates = dict(gen.DEFAULT_RATES)
    if args.variant == "no_plausibility":
        gen.DEFAULT_RATES["plausibility"] = 0.0
    try:
        weights = {"inset": 4.0} if args.variant == "inset_x4_long" else None
        data = forms_dataset(8000, 41, "safety", "train", weights=weights)
    finally:
        gen.DEFAULT_RATES.clear()
        gen.DEFAULT_RATES.update(rates)
    with torch.no_grad():
        recon = B.reconstruct(vae, data["images"])
    seed_all(41)  # the classifier's initial weights
    model = M.SafetyClassifier()
    if args.variant == "local_head":
        model.logit = types.MethodType(local_logit, model)
    labels = data["labels"]

    def loss_fn(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = B._mix_blur(data["images"], recon, idx, g)
        return F.binary_cross_entropy_with_logits(model.logit(x), labels[idx])

    steps = 2700 if args.variant == "inset_x4_long" else 900
    B._fit(model, loss_fn, len(labels), Recipe(), steps, 41, args.variant, lambda _msg: None)
    auc = {}
    with torch.no_grad():
        for k, form in enumerate(FORMS["safety"]):  # the scenes of stats.form_stats
            d = forms_dataset(96, 779 + 100 * k, "safety", "heldout", forms=(form,))
            reward = model(vae_round_trip(d["images"]))
            auc[form] = round(_auc(-reward.double(), d["labels"].double()), 3)
    print(json.dumps({"variant": args.variant, "steps": steps, "score_auc": auc, "seconds": round(time.time() - t0)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
