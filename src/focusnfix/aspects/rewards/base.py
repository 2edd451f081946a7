"""Shared pieces of the reward-model adapters: CLIP-style preprocessing in torch, localizers.

Every adapter turns images ``(B, 3, H, W)`` in [0, 1] into a reward ``(B,)`` (higher is better)
that is differentiable with respect to the images. Preprocessing therefore happens in torch,
never through PIL or a ``*Processor``: bicubic resize with antialiasing
(``F.interpolate(..., antialias=True)``), center crop, normalisation with the CLIP mean/std.
This matches ``CLIPImageProcessor`` up to the resampling kernel (PIL and torch bicubic differ
in the last decimals), which is what reward fine-tuning code (AlignProp, DRaFT re-implementations,
ReNO) does.
"""

from __future__ import annotations

import importlib
from abc import abstractmethod
from collections.abc import Sequence
from types import ModuleType
from typing import Literal

import torch
from torch import nn
from transformers import CLIPModel, CLIPTokenizer

from focusnfix.aspects.base import Aspect
from focusnfix.aspects.saliency import gradcam_saliency, input_gradient_saliency
from focusnfix.errors import InputError
from focusnfix.ops import resize

#: OpenAI CLIP normalisation (also used by open_clip ViT-H/14, PickScore, HPSv2, ImageReward's BLIP)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Localizer = Literal["gradcam", "input_gradient", "smoothgrad"]


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> torch.Tensor:
    """CLIP-style preprocessing, differentiable.

    Args:
        images: ``(B, 3, H, W)`` in [0, 1].
        size: output side; the shorter image side is resized to ``size`` (bicubic, antialiased),
            then the center ``size x size`` square is cropped.

    Returns:
        ``(B, 3, size, size)`` normalised with ``mean``/``std`` (roughly in [-2, 2.2]).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = images.float()
    x = resize(x, (new_h, new_w), mode="bicubic", antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency or raise :class:`InputError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # ImportError, or a broken torchvision raising RuntimeError at import
        raise InputError(
            f"{purpose} needs the optional package {module!r}, which failed to import ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); install it with: pip install focusnfix[{extra}]"
        ) from err


def features(out: object) -> torch.Tensor:
    """``CLIPModel.get_*_features`` output -> ``(B, D)`` tensor (transformers 4.x returns a tensor,
    5.x an output object whose ``pooler_output`` is the projected embedding)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")
    return pooled


class RewardModelAspect(Aspect):
    """Base of the reward-model adapters: a scalar score, localized by saliency of that score.

    Subclasses implement :meth:`score` and :meth:`gradcam_layer`.

    Args:
        name: aspect name in logs.
        localizer: ``"gradcam"`` (default; Grad-CAM of ``-score`` on :meth:`gradcam_layer`),
            ``"input_gradient"`` or ``"smoothgrad"`` (gradient of ``-score`` w.r.t. the image).
        blur_sigma: Gaussian blur of the map in map pixels (0 = none).
        negate: reward = ``-score`` (for "unwanted concept" detectors, e.g. a CLIP score against
            the text "nudity": lower similarity is better). The heatmap always shows where the
            *reward* is low, i.e. where the defect is.
    """

    def __init__(
        self, name: str, localizer: Localizer = "gradcam", blur_sigma: float = 0.0, negate: bool = False
    ) -> None:
        super().__init__()
        if localizer not in ("gradcam", "input_gradient", "smoothgrad"):
            raise InputError(f"localizer must be gradcam, input_gradient or smoothgrad, got {localizer!r}")
        self.name = name
        self.localizer = localizer
        self.blur_sigma = blur_sigma
        self.negate = negate

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw model score ``(B,)`` of images ``(B, 3, H, W)`` in [0, 1]; differentiable."""

    @abstractmethod
    def gradcam_layer(self) -> nn.Module:
        """The module whose output Grad-CAM uses (tokens ``(B, N, C)`` or maps ``(B, C, h, w)``)."""

    def reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``(B,)``: the score (or minus the score with ``negate``), higher is better."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        s = self.score(images, prompts)
        return -s if self.negate else s

    def heatmap(self, images: torch.Tensor, prompts: list[str], seeds: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, 1, h, w)`` in [0, 1]: where the reward is lowered (Grad-CAM: the layer's patch
        grid, e.g. 16 x 16 for ViT-L/14 at 224 px; gradients: the image size)."""
        if self.localizer == "gradcam":
            return gradcam_saliency(self.reward, self.gradcam_layer(), images, prompts, self.blur_sigma)
        smooth = 8 if self.localizer == "smoothgrad" else 0
        return input_gradient_saliency(
            self.reward, images, prompts, smooth, 0.1, self.blur_sigma, torch.Generator().manual_seed(0)
        )


def load_clip(path: str, tokenizer: str | None = None, what: str = "CLIP model"):
    """``CLIPModel`` and ``CLIPTokenizer`` from a local directory or hub id.

    Args:
        path: a ``CLIPModel`` saved with ``save_pretrained`` or a hub id (e.g.
            ``openai/clip-vit-large-patch14``).
        tokenizer: where the tokenizer lives if not beside the model (PickScore's is
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).

    Raises:
        InputError: the model or tokenizer cannot be loaded (path, hub access, format).
    """
    try:
        model = CLIPModel.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise InputError(f"{what}: cannot load a CLIPModel from {path!r}: {str(err).splitlines()[0]}") from err
    try:
        tok = CLIPTokenizer.from_pretrained(tokenizer or path)
    except (OSError, ValueError, TypeError) as err:
        raise InputError(
            f"{what}: cannot load a CLIPTokenizer from {tokenizer or path!r}: {str(err).splitlines()[0]}"
        ) from err
    return model.eval().requires_grad_(False), tok
