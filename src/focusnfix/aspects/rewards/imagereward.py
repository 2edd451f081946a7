"""ImageReward (Xu et al., 2023): BLIP ViT-L image encoder + BERT cross-attention + MLP.

score = (MLP(text_cls) - 0.167) / 1.033 as ImageReward normalises it (typical range [-2, 2]).
Needs the ``image-reward`` package (import name ``ImageReward``; extra ``imagereward``:
``pip install focusnfix[imagereward]``), which needs torchvision; it is imported only when this
aspect is built. Weights: ``ImageReward-v1.0`` (downloaded by the package) or a local ``.pt``.

This adapter calls the model's public sub-modules (``blip.visual_encoder``, ``blip.text_encoder``,
``blip.tokenizer``, ``mlp``, ``mean``, ``std``) on images preprocessed in torch, so the reward is
differentiable (the package's own ``score`` goes through PIL). Untested here: the package cannot
import beside this project's CPU torch build, and no weights are available offline.
"""

from __future__ import annotations

import torch
from torch import nn

from focusnfix.aspects.rewards.base import Localizer, RewardModelAspect, clip_preprocess, require
from focusnfix.errors import InputError


class ImageRewardAspect(RewardModelAspect):
    """ImageReward ``(B,)`` (about [-2, 2], higher = preferred), Grad-CAM on the BLIP ViT's last
    block's input LayerNorm."""

    def __init__(
        self, model: nn.Module, localizer: Localizer = "gradcam", blur_sigma: float = 0.0,
        name: str = "imagereward", max_length: int = 35,
    ) -> None:
        super().__init__(name, localizer, blur_sigma)
        self.model = model
        self.max_length = max_length

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        blip, device = self.model.blip, images.device
        text = blip.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        image_embeds = blip.visual_encoder(clip_preprocess(images, 224))
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        out = blip.text_encoder(
            text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts, return_dict=True,
        )
        rewards = self.model.mlp(out.last_hidden_state[:, 0, :].float())
        return ((rewards - self.model.mean) / self.model.std).squeeze(-1)

    def gradcam_layer(self) -> nn.Module:
        return self.model.blip.visual_encoder.blocks[-1].norm1


def from_pretrained(model: str = "ImageReward-v1.0", device: str = "cpu", **kwargs) -> ImageRewardAspect:
    """Aspect type ``imagereward``: ``args: {model: 'ImageReward-v1.0' or PATH.pt}``."""
    rm = require("ImageReward", "imagereward", "the imagereward aspect")
    try:
        loaded = rm.load(model, device=device)
    except Exception as err:  # download failure, bad file
        raise InputError(f"imagereward: cannot load {model!r}: {str(err).splitlines()[0]}") from err
    return ImageRewardAspect(loaded.eval().requires_grad_(False), **kwargs)
