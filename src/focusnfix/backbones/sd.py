"""Stable Diffusion 1.x / 2.x (epsilon or v-prediction) and the toy world."""

from __future__ import annotations

from typing import Any

import torch

from focusnfix.backbones.base import Backbone, Conditioning


class StableDiffusionBackbone(Backbone):
    """Backbone over a ``StableDiffusionPipeline`` (one CLIP text encoder, cross-attention)."""

    family = "sd"

    def encode_prompts(
        self, prompts: list[str], negative_prompt: str = "", guidance: bool = True
    ) -> Conditioning:
        # The pipeline's public encode_prompt: same tokenisation, truncation and negative
        # prompt handling as pipe(...), so our samples match the pipeline's.
        with torch.no_grad():
            cond, uncond = self.pipe.encode_prompt(
                list(prompts),
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=guidance,
                negative_prompt=[negative_prompt] * len(prompts) if guidance else None,
            )
        return Conditioning(
            cond={"encoder_hidden_states": cond},
            uncond={"encoder_hidden_states": uncond} if guidance else None,
        )

    def unet_inputs(self, cond: dict[str, Any], batch: int, height: int, width: int) -> dict[str, Any]:
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}
