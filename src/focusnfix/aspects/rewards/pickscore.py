"""PickScore (Kirstain et al., 2023): a CLIP-H/14 fine-tuned on Pick-a-Pic preferences.

PickScore = ``logit_scale.exp() * cos(E_img, E_txt)`` (about 100 x cosine; typical values
18-23 for SD images). Weights: ``yuvalkirstain/PickScore_v1`` (a ``CLIPModel``); its tokenizer
lives in ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (pass ``tokenizer=``; any ``CLIPTokenizer``
directory works). Images are preprocessed in torch at 224 px with the CLIP mean/std, as its
processor does (bicubic resize, center crop).
"""

from __future__ import annotations

from torch import nn

from focusnfix.aspects.rewards.base import Localizer, load_clip
from focusnfix.aspects.rewards.clip_score import CLIPScoreAspect


class PickScoreAspect(CLIPScoreAspect):
    """PickScore reward ``(B,)`` (higher = more preferred), localized by Grad-CAM."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        localizer: Localizer = "gradcam",
        blur_sigma: float = 0.0,
        name: str = "pickscore",
    ) -> None:
        super().__init__(model, tokenizer, mode="logit", localizer=localizer, blur_sigma=blur_sigma, name=name)


def from_pretrained(
    model: str = "yuvalkirstain/PickScore_v1",
    tokenizer: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    **kwargs,
) -> PickScoreAspect:
    """Aspect type ``pickscore``: ``args: {model: PATH_OR_HUB_ID, tokenizer: PATH_OR_HUB_ID}``."""
    clip, tok = load_clip(model, tokenizer, "pickscore")
    return PickScoreAspect(clip, tok, **kwargs)
