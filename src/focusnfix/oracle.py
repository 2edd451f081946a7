"""What the objective asks for, free of the LoRA: each reference image optimized alone.

Focus-N-Fix trains one LoRA shared by every prompt and seed; when it fails to fix, the cause may
be the objective (the reward, the mask and beta prefer something other than a fix) or the model
(a LoRA on the last sampling steps cannot draw the fix the objective prefers in the steps
given). This module separates the two. For each frozen-model image Î0 (its final latents
``z0``, its mask ``M`` built exactly as training builds it), it optimizes a per-image latent
offset ``δ`` with Adam on the run's own objective:

    loss(δ) = −r(D(z0 + δ), c) + β · ‖(1 − M) ⊙ (D(z0 + δ) − Î0)‖

with ``D`` the VAE decoder, ``r`` the target aspect's reward and the run's norm. No UNet, no
LoRA: the result is the best image the objective can reach by moving the latents freely (a
local optimum from ``δ = 0``). If those images are fixed (by an independent judge) at a high
outside PSNR, the objective is sound and the trained model is the limit; if the reward rises
while the judge still sees the defect, the reward is hacked even with total freedom.

``focusnfix oracle`` runs it for a training config on any prompts (use training prompts: this
is a diagnosis, not a way to choose settings) and writes ``oracle.json`` and a picture grid.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from focusnfix.errors import InputError
from focusnfix.objective import regional_constraint
from focusnfix.reference import compute_reference, gate_value


@dataclass
class OracleResult:
    """One beta's optimized batch.

    Attributes:
        images: ``(B, 3, H, W)`` in [0, 1], the decoded optimum.
        reward: ``(B,)`` the target reward of ``images``.
        constraint: ``(B,)`` the run's constraint of ``images`` against Î0 (the run's norm).
    """

    images: torch.Tensor
    reward: torch.Tensor
    constraint: torch.Tensor


def optimize_latents(
    decode,
    reward_fn,
    latents: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    steps: int = 200,
    lr: float = 0.05,
    norm: str = "frobenius",
) -> OracleResult:
    """Adam on a per-image latent offset under ``−reward + beta · constraint``.

    Args:
        decode: ``latents (B, C, h, w) -> images (B, 3, H, W)`` in [0, 1], differentiable.
        reward_fn: ``images -> (B,)`` reward, higher is better, differentiable.
        latents: ``(B, C, h, w)`` the reference's final latents (the start, ``δ = 0``).
        reference: ``(B, 3, H, W)`` in [0, 1], Î0 (the constraint's anchor).
        mask: ``(B, 1, H, W)`` in [0, 1], 1 = may change.
        beta: constraint weight (>= 0); 0 lets the reward move the whole image.
        steps: Adam steps; lr: Adam's learning rate in latent units (latents have std about 1).
        norm: the constraint's norm (``regional_constraint``).

    The loss is summed over the batch, so every image is optimized as if alone (Adam's update
    is per element). Returns the last iterate (not the best one: what optimization reaches).
    """
    if beta < 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be finite and >= 0, got {beta}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    delta = torch.zeros_like(latents, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    reference = reference.detach()
    for _ in range(steps):
        images = decode(latents.detach() + delta)
        loss = -reward_fn(images).sum()
        if beta > 0:
            loss = loss + beta * regional_constraint(images, reference, mask, norm).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        images = decode(latents + delta).clamp(0, 1)
        return OracleResult(images, reward_fn(images).float(), regional_constraint(images, reference, mask, norm))


def _psnr_pooled(a: torch.Tensor, b: torch.Tensor, outside: torch.Tensor) -> float:
    """PSNR (dB, images in [0, 1]) of the mean squared error over all ``outside`` pixels of a batch."""
    w = outside.expand_as(a)
    mse = float(((a - b) ** 2 * w).sum() / w.sum().clamp_min(1e-12))
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def objective_oracle(
    config: Any,
    prompts: list[str],
    seeds: list[int],
    betas: list[float],
    steps: int = 200,
    lr: float = 0.05,
    batch_size: int = 16,
    judges: bool = True,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run :func:`optimize_latents` for every (prompt, seed) and beta of a training config.

    Masks, gates, sampling and the constraint's norm are the run's (``config``); the reward is its
    target aspect's. With ``judges`` (toy world), each image is also judged: the target's judge
    says whether the defect is there before and after.

    Returns ``{"aspect", "n", "steps", "lr", "betas": {beta: {"reward": mean, "called_clean": share,
    "outside_psnr": dB pooled, "inside_change": mean abs change inside the mask, "judge_removal": share
    of judged-defect base images judged clean after (None without judges), "judge_new_defect",
    "hack": share of images the reward calls clean and the judge calls defective}}, "base": {...}}``;
    with ``out_dir``, writes ``oracle.json`` and ``oracle.png`` (rows: Î0, its mask, each beta).
    """
    from tqdm.auto import tqdm

    from focusnfix.evaluate import aspects_from_config, evaluation_setup, resolve_backbone
    from focusnfix.files import atomic_write_text
    from focusnfix.metrics import json_clean

    o = config.objective
    if o.space != "pixel" or o.reward_input != "image":  # what optimize_latents implements
        raise InputError(f"the oracle optimizes the paper's objective (objective.space: pixel, reward_input: image); "
                         f"this config has space {o.space!r}, reward_input {o.reward_input!r}")
    weighted = [c for c in config.aspects if c.weight != 0]
    if len(weighted) > 1 or (weighted and weighted[0].weight != 1):
        raise InputError("the oracle optimizes one reward at weight 1 against beta; this config weights "
                         + ", ".join(f"{c.name or c.type} {c.weight:g}" for c in weighted)
                         + " (give the others weight 0; for a target weight w, divide the betas by w)")
    aspects, target, judge_models = aspects_from_config(config)
    judge = judge_models.get(target) if judges else None
    setup = evaluation_setup(config, aspects)
    backbone = resolve_backbone(setup["model"])  # the run's dtype, variant, revision and device
    for m in [aspects[target], *(a for a, _ in setup["localizers"]), *([judge] if judge is not None else [])]:
        m.to(backbone.device).eval().requires_grad_(False)  # where the images are (train.device: auto = CUDA)
    reward = aspects[target]
    gate = gate_value(reward, weighted[0].gate if weighted else "auto")  # the config's gate of the target
    items = [(p, s) for p in prompts for s in seeds]
    if not items:
        raise ValueError("the oracle needs at least one prompt and seed")
    loc_aspects = [a for a, _ in setup["localizers"]]
    gates = [g for _, g in setup["localizers"]]
    collected: dict[str, list[torch.Tensor]] = {"base": [], "mask": [], "reward0": []}
    per_beta: dict[float, dict[str, list[torch.Tensor]]] = {b: {"images": [], "reward": []} for b in betas}
    bar = tqdm(total=len(items) * len(betas), desc="oracle", disable=not progress, unit="img")
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        ps, ss = [p for p, _ in chunk], [s for _, s in chunk]
        ref = compute_reference(backbone, loc_aspects, [True] * len(loc_aspects), ps, ss, setup["options"],
                                setup["mask_cfg"], gates)
        with torch.no_grad():
            collected["base"].append(ref.images)
            collected["mask"].append(ref.mask)
            collected["reward0"].append(reward.reward(ref.images, ps).float())
        for b in betas:
            res = optimize_latents(backbone.decode, lambda x, ps=ps: reward.reward(x, ps), ref.latents,
                                   ref.images, ref.mask, b, steps, lr, config.objective.norm)
            per_beta[b]["images"].append(res.images)
            per_beta[b]["reward"].append(res.reward)
            bar.update(len(chunk))
    bar.close()
    all_prompts = [p for p, _ in items]
    base = torch.cat(collected["base"])
    mask = torch.cat(collected["mask"])
    reward0 = torch.cat(collected["reward0"])

    def judged(images: torch.Tensor) -> torch.Tensor | None:
        if judge is None:
            return None
        with torch.no_grad():
            return torch.cat([judge.defect_probability(images[i:i + 64], all_prompts[i:i + 64]) >= 0.5
                              for i in range(0, len(images), 64)])

    base_defect = judged(base)
    doc: dict[str, Any] = {
        "aspect": target, "n": len(items), "steps": steps, "lr": lr, "norm": config.objective.norm,
        "base": {"reward": float(reward0.mean()),
                 "called_clean": float((reward0 >= gate).float().mean()) if gate is not None else None,
                 "mask_area": float(mask.mean()),
                 "judge_defect": None if base_defect is None else float(base_defect.float().mean())},
        "betas": {},
    }
    rows = [base, mask.expand_as(base)]
    for b in betas:
        images = torch.cat(per_beta[b]["images"])
        r = torch.cat(per_beta[b]["reward"])
        rows.append(images)
        clean = (r >= gate) if gate is not None else None
        inside = mask.expand_as(base)
        entry = {
            "reward": float(r.mean()),
            "called_clean": None if clean is None else float(clean.float().mean()),
            "outside_psnr": _psnr_pooled(images, base, 1 - mask),
            "inside_change": float(((images - base).abs() * inside).sum() / inside.sum().clamp_min(1e-12)),
            "judge_removal": None, "judge_new_defect": None, "hack": None,
        }
        after = judged(images)
        if after is not None and base_defect is not None:
            had = base_defect
            entry["judge_removal"] = float((~after[had]).float().mean()) if had.any() else None
            entry["judge_new_defect"] = float(after[~had].float().mean()) if (~had).any() else None
            if clean is not None:
                entry["hack"] = float((clean.cpu() & after.cpu()).float().mean())
        doc["betas"][f"{b:g}"] = entry
    if out_dir is not None:
        from focusnfix.images import grid, save_png

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "oracle.json", json.dumps(json_clean(doc), indent=2))
        n = min(16, len(base))
        save_png(grid([row[:n] for row in rows], scale=2), out / "oracle.png")
    return doc


__all__ = ["OracleResult", "objective_oracle", "optimize_latents"]
