"""Localize a scalar reward by saliency: input gradient, SmoothGrad or Grad-CAM.

The paper localizes over-sexualization and violence with gradient saliency maps of scalar
safety classifiers. These functions turn any differentiable ``reward(images, prompts) -> (B,)``
into a heatmap ``(B, 1, h, w)`` in [0, 1] of where the *defect* lives: they differentiate
``-reward`` (the defect score), so a region that lowers the reward lights up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from focusnfix.aspects.base import Aspect
from focusnfix.ops import gaussian_blur

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]
SaliencyMethod = Literal["input_gradient", "smoothgrad", "gradcam"]


def normalize_per_image(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each map of ``(B, 1, h, w)`` (non-negative) to [0, 1] by its own maximum.

    An all-zero map stays all zero (no defect found).
    """
    peak = maps.flatten(1).amax(dim=1).clamp_min(eps).view(-1, 1, 1, 1)
    return (maps / peak).clamp(0.0, 1.0)


def input_gradient_saliency(
    reward_fn: RewardFn,
    images: torch.Tensor,
    prompts: list[str],
    smooth_samples: int = 0,
    noise_std: float = 0.1,
    blur_sigma: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """|d(-reward)/d image| summed over channels, optionally SmoothGrad-averaged.

    Args:
        reward_fn: differentiable ``(B, 3, H, W) in [0, 1], prompts -> (B,)``.
        images: ``(B, 3, H, W)`` in [0, 1]; not modified, need not require grad.
        smooth_samples: 0 for the plain input gradient, n > 0 for SmoothGrad over n noisy copies.
        noise_std: SmoothGrad noise standard deviation, in image units ([0, 1] range).
        blur_sigma: Gaussian blur of the map, pixels (0 = none).
        generator: RNG for SmoothGrad noise (determinism).

    Returns:
        ``(B, 1, H, W)`` in [0, 1].
    """
    images = images.detach()
    copies = max(1, smooth_samples)
    total = torch.zeros_like(images[:, :1])
    with torch.enable_grad():
        for _ in range(copies):
            x = images
            if smooth_samples > 0:
                noise = torch.randn(images.shape, generator=generator, device="cpu").to(images)
                x = (images + noise_std * noise).clamp(0.0, 1.0)
            x = x.clone().requires_grad_(True)
            defect = -reward_fn(x, prompts).sum()
            (grad,) = torch.autograd.grad(defect, x)
            total += grad.abs().sum(dim=1, keepdim=True)
    return normalize_per_image(gaussian_blur(total / copies, blur_sigma))


def gradcam_saliency(
    reward_fn: RewardFn,
    layer: nn.Module,
    images: torch.Tensor,
    prompts: list[str],
    blur_sigma: float = 0.0,
) -> torch.Tensor:
    """Grad-CAM of the defect score ``-reward`` on one convolutional/feature layer.

    ``layer`` must output a ``(B, C, h, w)`` tensor during ``reward_fn``. For transformer layers
    that output tokens ``(B, N, C)`` with a square patch grid (N = s*s or s*s + 1 with a class
    token), the tokens are reshaped to ``(B, C, s, s)``.

    Returns:
        ``(B, 1, h, w)`` in [0, 1] at the layer's resolution.
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        # The graph starts at this layer's output: the gradient is taken with respect to it alone, so
        # the layers before it need not record their activations (most of a deep reward model's memory).
        first = output[0] if isinstance(output, tuple) else output
        act = first.detach().requires_grad_(True)
        captured["act"] = act
        out = act.clone()  # not the leaf itself: the model may change its output in place (x += residual)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = images.detach()
            defect = -reward_fn(x, prompts).sum()
            if "act" not in captured:
                raise RuntimeError("gradcam: the chosen layer was not called by the reward model")
            act = captured["act"]
            (grad,) = torch.autograd.grad(defect, act)
    finally:
        handle.remove()
    act, grad = _as_feature_map(act.detach()), _as_feature_map(grad)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1): channel importance
    cam = F.relu((weights * act).sum(dim=1, keepdim=True))
    return normalize_per_image(gaussian_blur(cam, blur_sigma))


def _as_feature_map(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4:
        return t
    if t.dim() == 3:  # (B, N, C) tokens
        n = t.shape[1]
        side = int(round(n**0.5))
        if side * side != n:
            side = int(round((n - 1) ** 0.5))
            if side * side != n - 1:
                raise ValueError(f"gradcam: cannot reshape {n} tokens to a square grid")
            t = t[:, 1:]
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)
    raise ValueError(f"gradcam: layer output must be (B, C, h, w) or (B, N, C), got {tuple(t.shape)}")


class SaliencyAspect(Aspect):
    """An aspect whose heatmap is the saliency of its own scalar reward.

    Args:
        name: aspect name.
        reward_model: module called as ``reward_model(images, prompts) -> (B,)``, higher is better.
        method: ``"input_gradient"``, ``"smoothgrad"`` or ``"gradcam"``.
        layer: for Grad-CAM, the dotted name of a submodule of ``reward_model``.
        smooth_samples: SmoothGrad copies (only for ``"smoothgrad"``; default 8).
        noise_std: SmoothGrad noise in image units (only for ``"smoothgrad"``; default 0.1).
        blur_sigma: blur of the saliency map in pixels; raw gradients are speckled, a blur of a
            few pixels turns them into regions.
    """

    def __init__(
        self,
        name: str,
        reward_model: nn.Module,
        method: SaliencyMethod = "input_gradient",
        layer: str | None = None,
        smooth_samples: int | None = None,
        noise_std: float | None = None,
        blur_sigma: float = 1.0,
    ) -> None:
        super().__init__()
        if method not in ("input_gradient", "smoothgrad", "gradcam"):
            raise ValueError(f"saliency method must be input_gradient, smoothgrad or gradcam, got {method!r}")
        # options of another method would be ignored: refuse them
        if layer is not None and method != "gradcam":
            raise ValueError(f"saliency layer {layer!r} is a Grad-CAM option; method {method!r} takes none")
        if (smooth_samples is not None or noise_std is not None) and method != "smoothgrad":
            raise ValueError(f"smooth_samples and noise_std are SmoothGrad options; method {method!r} takes neither")
        smooth_samples = 8 if smooth_samples is None else smooth_samples
        noise_std = 0.1 if noise_std is None else noise_std
        if method == "gradcam":
            if not layer:
                raise ValueError("saliency method 'gradcam' needs a layer name")
            try:
                reward_model.get_submodule(layer)
            except AttributeError as err:
                raise ValueError(f"gradcam layer {layer!r} is not a submodule of the reward model") from err
        self.name = name
        self.reward_model = reward_model
        self.method = method
        self.layer = layer
        self.smooth_samples = smooth_samples
        self.noise_std = noise_std
        self.blur_sigma = blur_sigma

    def reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.reward_model(images, prompts)

    def heatmap(self, images: torch.Tensor, prompts: list[str], seeds: Sequence[int] | None = None) -> torch.Tensor:
        if self.method == "gradcam":
            layer = self.reward_model.get_submodule(self.layer)
            return gradcam_saliency(self.reward, layer, images, prompts, self.blur_sigma)
        smooth = self.smooth_samples if self.method == "smoothgrad" else 0
        generator = torch.Generator().manual_seed(0)
        return input_gradient_saliency(
            self.reward, images, prompts, smooth, self.noise_std, self.blur_sigma, generator
        )
