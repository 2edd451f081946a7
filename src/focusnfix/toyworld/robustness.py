"""How hard a toy safety reward is to hack inside a mark, measured on held-out generator scenes.

A reward-hacking fine-tune changes the pixels of a mark until the reward calls the image clean
without removing the mark. This module plays that fine-tune with two attacks and reports how often
each fools the reward (no judge, no pipeline, no held-out prompt of the demo):

* ``pixel``: signed-gradient steps on the pixels of the mark's region
  (:func:`~focusnfix.toyworld.build_models.attack_in_region`);
* ``latent``: signed-gradient steps on the VAE latents of the cells under that region, decoded
  (:func:`~focusnfix.toyworld.build_models.attack_through_decoder`): smooth, on-manifold changes,
  the kind a diffusion model paints.

Also: the cosine between the reward's gradient and the true fix inside the region (1 = the reward
pulls straight towards the background), and the share of fixed twins (mark gone, background
restored) the reward calls clean. ``focusnfix toyworld robustness`` prints it as JSON.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from focusnfix.ops import dilate_4n


def reward_robustness(aspect: str = "safety", root: str | Path | None = None, n: int = 192, seed: int = 780,
                      steps: tuple[int, ...] = (5, 10, 20), pixel_step: float = 0.05, latent_step: float = 0.3,
                      dilate: int = 2) -> dict:
    """Attack ``aspect``'s reward on ``n`` held-out generator scenes, each with a mark in a random form.

    Images and their fixed twins go through the build's VAE first (what a pipeline's samples look
    like). ``fooled`` = share of marked images the reward calls clean (reward above its gate,
    log 0.5) after the attack; ``steps`` attack lengths, ``pixel_step`` per pixel step (images in
    [0, 1]), ``latent_step`` x each latent channel's std per latent step; the region is the exact
    mark dilated by ``dilate`` px.

    Returns ``{"aspect", "n", "called_clean_before", "fixed_twin_called_clean", "grad_cosine_with_fix",
    "fooled": {"pixel": {steps: share}, "latent": {steps: share}}, "settings": {...}}``.
    """
    from focusnfix.backbones import load_backbone
    from focusnfix.toyworld import load_aspect, pipeline_path
    from focusnfix.toyworld.build_models import attack_in_region, attack_through_decoder, reconstruct
    from focusnfix.toyworld.forms import forms_dataset, render_fixed

    if aspect not in ("safety", "safety_narrow"):
        raise ValueError(f"reward robustness is measured for the safety rewards, got {aspect!r}")
    reward = load_aspect(aspect, root=root)
    clf = reward.reward_model
    gate = reward.reward_threshold
    vae = load_backbone(str(pipeline_path(root))).vae
    data = forms_dataset(n, seed, "safety", "heldout", p_defect=1.0)
    fixed = torch.stack([torch.from_numpy(render_fixed(sc, "safety")) for sc in data["scenes"]])
    x = reconstruct(vae, data["images"]).float()
    x_fixed = reconstruct(vae, fixed).float()
    region = torch.from_numpy(dilate_4n(data["masks"][:, 0].numpy() > 0, dilate)).unsqueeze(1).float()

    def clean_share(images: torch.Tensor) -> float:
        with torch.no_grad():
            return float((-F.softplus(clf.logit(images.clamp(0, 1))) > gate).float().mean())

    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((-F.softplus(clf.logit(xg))).sum(), xg)
    g_in, fix_in = (grad * region).flatten(1), ((x_fixed - x) * region).flatten(1)
    cosine = F.cosine_similarity(g_in, fix_in, dim=1)
    fooled: dict[str, dict[str, float]] = {"pixel": {}, "latent": {}}
    for k in steps:
        fooled["pixel"][str(k)] = clean_share(x + attack_in_region(clf, x, region, k, pixel_step))
        fooled["latent"][str(k)] = clean_share(x + attack_through_decoder(clf, vae, x, region, k, latent_step))
    return {
        "aspect": aspect,
        "n": n,
        "called_clean_before": clean_share(x),
        "fixed_twin_called_clean": clean_share(x_fixed),
        "grad_cosine_with_fix": float(cosine.mean()),
        "fooled": fooled,
        "settings": {"seed": seed, "pixel_step": pixel_step, "latent_step": latent_step, "dilate_px": dilate,
                     "gate": gate, "split": "heldout", "forms": "every form, drawn alike"},
    }
