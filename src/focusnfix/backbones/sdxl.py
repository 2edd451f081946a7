"""Stable Diffusion XL: two text encoders, pooled text embeddings and micro-conditioning.

The UNet of SDXL takes, besides the concatenated penultimate hidden states of its two CLIP
text encoders (``encoder_hidden_states``, ``(B, 77, 2048)`` for SDXL base), two *added*
conditions:

* ``text_embeds``: the pooled, projected output of the second text encoder, ``(B, 1280)``;
* ``time_ids``: the micro-conditioning ``(original_size, crop_top_left, target_size)`` as six
  numbers per image, ``(B, 6)``. We always use ``original_size = target_size = (H, W)`` of the
  sampled image and crop ``(0, 0)``, which is what ``StableDiffusionXLPipeline.__call__`` does by
  default, so our samples match ``pipe(...)``.

Prompts are encoded with the pipeline's public ``encode_prompt``, so tokenisation, truncation,
clip-skip and the SDXL negative-prompt rule (an empty negative prompt gives all-zero embeddings
when ``force_zeros_for_empty_prompt`` is set, the default of SDXL base) are the pipeline's own.

fp16: the SDXL VAE overflows in float16 (``force_upcast`` in its config); when the pipeline is
loaded in float16 and the VAE asks for it, this backbone keeps the VAE in float32 (about 160 MB).
Not handled: the SDXL refiner (``StableDiffusionXLImg2ImgPipeline``), ``guidance_rescale``,
and the invisible watermark that ``pipe(...)`` adds when ``invisible-watermark`` is installed.
"""

from __future__ import annotations

from typing import Any

import torch

from focusnfix.backbones.base import Backbone, Conditioning


class StableDiffusionXLBackbone(Backbone):
    """Backbone over a ``StableDiffusionXLPipeline``.

    Conditioning keys (each with leading dimension B):

    * ``encoder_hidden_states``: ``(B, L, D1 + D2)`` concatenated text-encoder hidden states;
    * ``text_embeds``: ``(B, P)`` pooled text embedding of the second text encoder.

    ``unet_inputs`` adds ``added_cond_kwargs = {"text_embeds", "time_ids"}`` with time ids
    ``(B, 6)`` computed from the image size.
    """

    family = "sdxl"

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self._upcast_vae_if_needed()

    def to(self, device: torch.device | str) -> StableDiffusionXLBackbone:
        super().to(device)
        self._upcast_vae_if_needed()
        return self

    def _upcast_vae_if_needed(self) -> None:
        vae = self.pipe.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(dtype=torch.float32)

    def encode_prompts(
        self, prompts: list[str], negative_prompt: str = "", guidance: bool = True
    ) -> Conditioning:
        # An empty negative prompt is passed as None, as pipe(prompt) does: with
        # force_zeros_for_empty_prompt (SDXL base) the unconditional embeddings are zeros.
        negative = [negative_prompt] * len(prompts) if (guidance and negative_prompt) else None
        with torch.no_grad():
            cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
                list(prompts),
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=guidance,
                negative_prompt=negative,
            )
        return Conditioning(
            cond={"encoder_hidden_states": cond, "text_embeds": pooled},
            uncond={"encoder_hidden_states": uncond, "text_embeds": uncond_pooled} if guidance else None,
        )

    def time_ids(self, batch: int, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Micro-conditioning ``(B, 6)``: original size (H, W), crop (0, 0), target size (H, W).

        Raises:
            ValueError: the UNet's added-embedding input size does not match six time ids plus
                the pooled text embedding (a mismatched SDXL checkpoint).
        """
        ids = [height, width, 0, 0, height, width]
        unet_cfg = self.unet.config
        add_embedding = getattr(self.unet, "add_embedding", None)
        if add_embedding is not None and self.pipe.text_encoder_2 is not None:
            expected = add_embedding.linear_1.in_features
            passed = unet_cfg.addition_time_embed_dim * len(ids) + self.pipe.text_encoder_2.config.projection_dim
            if expected != passed:
                raise ValueError(
                    f"SDXL UNet expects an added embedding of size {expected}, but 6 time ids and the text "
                    f"encoder's projection give {passed}; check the checkpoint's configs"
                )
        return torch.tensor([ids], dtype=dtype, device=self.device).repeat(batch, 1)

    def unet_inputs(self, cond: dict[str, Any], batch: int, height: int, width: int) -> dict[str, Any]:
        hidden = cond["encoder_hidden_states"]
        return {
            "encoder_hidden_states": hidden,
            "added_cond_kwargs": {
                "text_embeds": cond["text_embeds"],
                "time_ids": self.time_ids(batch, height, width, hidden.dtype),
            },
        }

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode in the graph: latents -> ``(B, 3, H, W)`` in [0, 1].

        Uses the VAE's ``latents_mean``/``latents_std`` when its config has them (as the SDXL
        pipeline does), else the plain scaling factor.
        """
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None or std is None:
            return super().decode(latents)
        c = latents.shape[1]
        mean_t = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, c, 1, 1)
        std_t = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, c, 1, 1)
        latents = latents * std_t / cfg.scaling_factor + mean_t
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0.0, 1.0)
