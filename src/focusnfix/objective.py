"""The Focus-N-Fix objective as pure tensor functions.

The paper maximises ``J(θ) = r(Î, c) − β · ‖(1 − M(Î0)) ⊙ (Î − Î0)‖_F``; we minimise its
negative, averaged over the batch:

    loss = −mean_b r(Î_b, c_b) + β · mean_b ‖(1 − M_b) ⊙ (Î_b − Î0_b)‖_F

where Î is the fine-tuned (policy) image, Î0 the frozen model's image for the same prompt and
noise, and M_b the mask of the region that may change (1 = may change). Both terms are
returned separately so the trainer logs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

ConstraintNorm = Literal["frobenius", "squared", "mean"]


def regional_constraint(
    policy: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor,
    norm: ConstraintNorm = "frobenius",
    tolerance: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Per-image change outside the mask.

    Args:
        policy: ``(B, C, H, W)`` fine-tuned images (or latents).
        reference: ``(B, C, H, W)`` frozen-model images (or latents) for the same prompts and noise;
            treated as a constant (detached).
        mask: ``(B, 1, H, W)`` in [0, 1], 1 = may change; resized (bilinear) if its size differs.
        norm: ``"frobenius"`` (paper: ``sqrt(sum d²)``), ``"squared"`` (``sum d²``) or
            ``"mean"`` (per-pixel mean of ``d²`` over the whole image).
        tolerance: a float or a tensor broadcastable to ``policy``, >= 0: differences up to it
            count as none (``d - clamp(d, -t, t)``). The reference cache stores Î0 quantized
            and passes its quantization error here, so a zero LoRA's constraint stays exactly 0.

    Returns:
        ``(B,)`` non-negative. Its gradient is finite (zero) where policy equals reference.
    """
    if policy.shape != reference.shape:
        raise ValueError(f"policy {tuple(policy.shape)} and reference {tuple(reference.shape)} differ in shape")
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != policy.shape[0]:
        raise ValueError(f"mask must be (B, 1, H, W) with B={policy.shape[0]}, got {tuple(mask.shape)}")
    if mask.shape[-2:] != policy.shape[-2:]:
        mask = F.interpolate(mask.float(), size=policy.shape[-2:], mode="bilinear", align_corners=False)
    diff = policy - reference.detach()
    if not (isinstance(tolerance, float) and tolerance == 0.0):
        tol = torch.as_tensor(tolerance, dtype=diff.dtype, device=diff.device)
        diff = diff - diff.clamp(-tol, tol)  # soft threshold: 0 inside the dead zone, shifted outside
    outside = (1.0 - mask.to(policy.dtype)) * diff
    flat = outside.flatten(1)
    if norm == "frobenius":
        # linalg.vector_norm has a zero (not NaN) subgradient at 0, which step 0 relies on:
        # the zero-initialised LoRA reproduces the reference exactly.
        return torch.linalg.vector_norm(flat, ord=2, dim=1)
    if norm == "squared":
        return flat.pow(2).sum(dim=1)
    if norm == "mean":
        return flat.pow(2).mean(dim=1)
    raise ValueError(f"constraint norm must be 'frobenius', 'squared' or 'mean', got {norm!r}")


def reward_composite(policy: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``M * policy + (1 - M) * reference``: what the reward scores with ``objective.reward_input:
    composite`` (ours, not the paper). Gradients reach ``policy`` only where ``M > 0`` (scaled by M).

    Args:
        policy: ``(B, 3, H, W)`` fine-tuned images in [0, 1].
        reference: ``(B, 3, H, W)`` frozen-model images in [0, 1]; detached.
        mask: ``(B, 1, H, W)`` in [0, 1], 1 = may change; resized (bilinear) if its size differs.

    Returns:
        ``(B, 3, H, W)`` in [0, 1]; equals ``reference`` where the mask is 0, ``policy`` where it is 1.
    """
    if policy.shape != reference.shape:
        raise ValueError(f"policy {tuple(policy.shape)} and reference {tuple(reference.shape)} differ in shape")
    if mask.shape[-2:] != policy.shape[-2:]:
        mask = F.interpolate(mask.float(), size=policy.shape[-2:], mode="bilinear", align_corners=False)
    mask = mask.to(policy.dtype)
    return mask * policy + (1.0 - mask) * reference.detach().to(policy.dtype)


def beta_at(step: int, steps: int, beta: float, beta_end: float | None = None, ramp_start: float = 0.5) -> float:
    """The constraint weight at optimizer step ``step`` (0-based) of ``steps``.

    Constant ``beta`` when ``beta_end`` is None. Otherwise ``beta`` up to step ``ramp_start * steps``,
    then linear to ``beta_end`` at the last step (``steps - 1``).
    """
    if steps < 1 or not 0 <= step < steps:
        raise ValueError(f"step must be in [0, {steps}), got {step}")
    if not 0 <= ramp_start < 1:
        raise ValueError(f"ramp_start must be in [0, 1), got {ramp_start}")
    if beta_end is None:
        return beta
    start = ramp_start * steps
    if step <= start:
        return beta
    last = steps - 1  # step > start, so last >= step > start
    return beta + (beta_end - beta) * (step - start) / (last - start)


@dataclass
class ObjectiveTerms:
    """The loss and its parts; all per-image tensors are ``(B,)``."""

    loss: torch.Tensor
    reward: torch.Tensor
    constraint: torch.Tensor


def focus_n_fix_loss(
    reward: torch.Tensor,
    policy: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    norm: ConstraintNorm = "frobenius",
    tolerance: float | torch.Tensor = 0.0,
) -> ObjectiveTerms:
    """``loss = −mean(reward) + beta · mean(constraint)``.

    Args:
        reward: ``(B,)`` differentiable reward of the policy images (higher is better).
        policy, reference, mask, norm, tolerance: see :func:`regional_constraint`.
        beta: weight of the regional constraint; 0 gives plain DRaFT (the constraint is still
            computed and logged, without gradient).

    Returns:
        :class:`ObjectiveTerms` with the scalar loss and the per-image reward and constraint.
    """
    if reward.dim() != 1 or reward.shape[0] != policy.shape[0]:
        raise ValueError(f"reward must be (B,) with B={policy.shape[0]}, got {tuple(reward.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta == 0:
        with torch.no_grad():
            constraint = regional_constraint(policy, reference, mask, norm, tolerance)
        loss = -reward.mean()
    else:
        constraint = regional_constraint(policy, reference, mask, norm, tolerance)
        loss = -reward.mean() + beta * constraint.mean()
    return ObjectiveTerms(loss=loss, reward=reward.detach(), constraint=constraint.detach())
