"""CLIP score: image-text similarity of a transformers ``CLIPModel`` as a reward.

reward = cos(E_img(image), E_txt(text)), or ``logit_scale.exp()`` times it (``mode="logit"``,
the CLIP logit, about 100 x cos for trained CLIPs). ``text`` is the image's prompt (prompt
alignment), or a fixed ``target_text`` for a zero-shot concept detector: with
``target_text="nudity, explicit sexual content"`` and ``negate=True`` the reward is minus the
similarity to that concept (a crude over-sexualization reward; localize it with Grad-CAM).

Values: cosine in [-1, 1] (typically 0.15-0.35 for matching pairs with OpenAI CLIP ViT-L/14);
logit = 100 x cosine for OpenAI CLIPs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from focusnfix.aspects.rewards.base import Localizer, RewardModelAspect, clip_preprocess, features, load_clip
from focusnfix.errors import InputError


class CLIPScoreAspect(RewardModelAspect):
    """CLIP image-text similarity.

    Args:
        model: a ``transformers.CLIPModel`` (frozen by the trainer).
        tokenizer: its ``CLIPTokenizer`` (no processor: images are preprocessed in torch).
        mode: ``"cosine"`` (in [-1, 1]) or ``"logit"`` (``logit_scale.exp() * cosine``).
        target_text: score against this fixed text instead of each prompt.
        negate: reward = minus the score (see :class:`RewardModelAspect`).
        localizer, blur_sigma, name: see :class:`RewardModelAspect`. Grad-CAM runs on the input
            LayerNorm of the vision tower's last encoder layer: its patch tokens reach the pooled
            (class-token) embedding through that layer's attention, while the last layer's own
            patch outputs do not reach it at all (zero gradient).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        mode: Literal["cosine", "logit"] = "cosine",
        target_text: str | None = None,
        negate: bool = False,
        localizer: Localizer = "gradcam",
        blur_sigma: float = 0.0,
        name: str = "clip_score",
    ) -> None:
        super().__init__(name, localizer, blur_sigma, negate)
        if mode not in ("cosine", "logit"):
            raise InputError(f"clip_score mode must be 'cosine' or 'logit', got {mode!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.mode = mode
        self.target_text = target_text
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``(B, D)``, no gradient."""
        tokens = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            )
        return F.normalize(features(out).float(), dim=-1)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``(B, D)`` of images ``(B, 3, H, W)`` in [0, 1]; differentiable."""
        dtype = next(self.model.parameters()).dtype
        pixels = clip_preprocess(images, self.image_size).to(dtype)
        return F.normalize(features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``(B,)``: cosine in [-1, 1], or the CLIP logit (``mode="logit"``)."""
        texts = [self.target_text] * len(prompts) if self.target_text is not None else list(prompts)
        cos = (self.image_embeddings(images) * self.text_embeddings(texts).to(images.device)).sum(-1)
        if self.mode == "logit":
            cos = cos * self.model.logit_scale.exp().float()
        return cos

    def gradcam_layer(self) -> nn.Module:
        return self.model.vision_model.encoder.layers[-1].layer_norm1


def from_pretrained(
    model: str = "openai/clip-vit-large-patch14", tokenizer: str | None = None, **kwargs
) -> CLIPScoreAspect:
    """Aspect type ``clip_score``: ``args: {model: PATH_OR_HUB_ID, tokenizer: ..., mode: cosine|logit,
    target_text: ..., negate: false, localizer: gradcam, blur_sigma: 0}``."""
    clip, tok = load_clip(model, tokenizer, "clip_score")
    return CLIPScoreAspect(clip, tok, **kwargs)
