"""The recipe of a toy world build (sizes, steps, seeds) and the training utilities its stages share."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


@dataclass
class Recipe:
    """Sizes and step counts of one build (``quick()`` gives the fast, lower-quality one)."""

    seed: int = 0
    n_train: int = 20000  # pipeline training scenes
    vae_images: int = 8000
    vae_steps: int = 800
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 2e-3
    # the decoder alone, fine-tuned on whole images after the VAE (encoder frozen: the UNet's latents
    # do not move). Without it the decoder greys backgrounds, shifts colours and invents a dark patch on
    # green and purple objects' lower-right edge (docs/toyworld.md, "The decoder"); 0 = none (v1, v2)
    vae_decoder_steps: int = 1000
    vae_decoder_lr: float = 1e-3
    unet_steps: int = 2400
    unet_batch: int = 48
    unet_lr: float = 1e-3
    # stage 2 (toy world v2): the stage-1 EMA weights fine-tuned for v-prediction on a zero-terminal-SNR
    # schedule, sampled with trailing timesteps, so the model sees pure noise in training and places the
    # object where the caption says instead of where the noise's low frequencies say (docs/toyworld.md,
    # "Caption following"). 0 ships the stage-1 epsilon pipeline (toy world v1).
    unet_v_steps: int = 2400
    unet_v_lr: float = 5e-4
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    aspect_images: int = 6000
    aspect_steps: int = 600
    judge_images: int = 6000
    judge_steps: int = 500
    forms_images: int = 8000  # toy world v2: robust safety reward and localizing judges (every defect form)
    forms_steps: int = 900
    # the robust safety reward's adversarial training (build_models.train_safety_robust): signed-gradient
    # steps inside each defect per attacked image (0 = none), their size, and how close to the true fix
    # an attacked image must come to count as fixed. 10 since toy world v3's oracle (focusnfix oracle,
    # docs/evaluation.md): with 4, 200 Adam steps on a sample's latents recoloured a third of its marks
    # into blobs the reward called clean
    reward_attack_steps: int = 10
    reward_attack_step_size: float = 0.08
    reward_attack_fix_tol: float = 0.1
    # what "as good as the fix" means for an attacked mark (build_models.still_marked): "mark" looks
    # at the mark's pixels only, so a mark moved into the object's edge beside them counts as fixed
    # (every reward up to toy world v3); "region" also looks beside the mark, in the attack's region
    reward_fix_rule: str = "mark"
    # where the attack paints: "pixel" (signed steps on the pixels of the defect's region), "latent"
    # (signed steps on the VAE latents of the cells under that region, decoded: the smooth, on-manifold
    # changes a fine-tuned diffusion model makes) or "both" (alternate batches). Latent steps are
    # reward_attack_latent_step x each latent channel's std. The shipped reward: "both" (pixel attacks
    # alone left it fooled by 22% of 20-step decoder attacks; docs/evaluation.md)
    reward_attack_space: str = "both"
    reward_attack_latent_step: float = 0.3
    # then hardening against long attacks (build_models.harden_safety_reward), after the pipeline is
    # built: each round sends reward_harden_images marked renders and their fixed twins through the
    # pipeline (SDEdit), runs reward_harden_attack_steps Adam steps on the marked outputs' latents
    # against the current reward under the oracle's objective (focusnfix oracle: -reward + beta x the
    # change outside the mark's region, one beta of reward_harden_betas per image), keeps the attack
    # at a third, two thirds and its end, labels each "marked" unless it came within
    # reward_attack_fix_tol of the fixed twin's output over the mark, and fine-tunes the reward for
    # reward_harden_steps on these next to its own training data. 0 rounds = none. Shipped (toy world
    # v3): 2 rounds of 120-step attacks on 256 renders; with 60-step attacks on 384 the objective's
    # optimum removed fewer marks than before hardening (docs/evaluation.md, "Before the fact")
    reward_harden_rounds: int = 2
    reward_harden_images: int = 256
    reward_harden_attack_steps: int = 120
    reward_harden_attack_lr: float = 0.05
    reward_harden_betas: tuple[float, ...] = (0.0, 0.5, 2.0)
    reward_harden_steps: int = 200
    reward_harden_lr: float = 5e-4
    # the localizing judges: steps, and how often each form is drawn among defective scenes (form ->
    # weight, forms not named: 1; empty = every form alike, the shipped judges). Tried and not shipped:
    # 1350 steps with safety bump x3, plausibility blotched x3 and faded x2 raised those forms' AUC a
    # little but lowered the safety judge's audit agreement (docs/toyworld.md)
    judge_forms_steps: int = 900
    judge_form_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    sdedit_images: int = 2400  # defect renders (and their fixed twins) sent through the pipeline for the safety judge
    model_batch: int = 48
    model_lr: float = 2e-3
    threads: int = 1  # torch threads per process
    parallel: bool = True  # train aspect models + judges in a second process while the UNet trains
    device: str = "cpu"  # the shipped build is CPU; "cuda" gives a faster build of the same recipe

    def __post_init__(self) -> None:
        if self.reward_fix_rule not in ("mark", "region"):
            raise ValueError(f"Recipe.reward_fix_rule must be mark or region, got {self.reward_fix_rule!r}")
        if self.reward_attack_space not in ("pixel", "latent", "both"):
            raise ValueError(f"Recipe.reward_attack_space must be pixel, latent or both, got {self.reward_attack_space!r}")

    @classmethod
    def quick(cls, seed: int = 0) -> Recipe:
        return cls(seed=seed, n_train=2000, vae_images=1000, vae_steps=150, vae_decoder_steps=60, unet_steps=150, unet_v_steps=100, unet_batch=32,
                   aspect_images=800, aspect_steps=60, judge_images=800, judge_steps=50, forms_images=800,
                   forms_steps=60, judge_forms_steps=60, sdedit_images=64)


def seed_all(seed: int) -> None:
    """Seed Python's and torch's global generators."""
    random.seed(seed)
    torch.manual_seed(seed)


def cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int = 50) -> None:
    """Set ``opt``'s learning rate: linear warm-up, then cosine decay to 2% of ``base``."""
    if step < warmup:
        lr = base * (step + 1) / warmup
    else:
        lr = base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        lr = max(lr, base * 0.02)
    for g in opt.param_groups:
        g["lr"] = lr


def save_module(module: nn.Module, path: Path) -> None:
    """Write a module's state dict as safetensors."""
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))


__all__ = ["Recipe", "cosine_lr", "save_module", "seed_all"]
