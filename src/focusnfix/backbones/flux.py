"""FLUX.1 (dev, schnell): a guidance-distilled MMDiT on packed latents, sampled by a flow Euler sampler.

What differs from SD3 (:mod:`focusnfix.backbones.sd3`):

* no classifier-free guidance: FLUX-dev takes the guidance scale as an *embedding*
  (``guidance_embeds`` in the transformer config; ``sampling.guidance_scale`` is that value, 3.5
  for dev), FLUX-schnell takes none; one transformer call per step;
* latents are *packed*: the transformer sees 2x2 latent patches as tokens, ``(B, h/2 * w/2, 4C)``,
  with their row/column position ids. The sampler keeps unpacked latents ``(B, C, h, w)`` (the Euler
  step is element-wise, so packing commutes with it) and :meth:`predict_noise` packs and unpacks;
* sigmas are ``linspace(1, 1/N, N)`` shifted by ``mu``, computed from the packed token count,
  exactly as ``FluxPipeline.__call__`` does; the transformer's timestep is ``t / 1000``;
* prompts: the pipeline's ``encode_prompt`` (CLIP pooled embedding + T5 sequence, text ids).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from focusnfix.backbones.base import Conditioning
from focusnfix.backbones.sd3 import StableDiffusion3Backbone, calculate_shift
from focusnfix.errors import InputError


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4C)``: 2x2 patches as tokens (FLUX's layout)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for latents of size ``h x w``."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(h/2 * w/2, 3)`` position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxBackbone(StableDiffusion3Backbone):
    """Backbone over a ``FluxPipeline``. Conditioning keys: ``encoder_hidden_states`` ``(B, L, D)``,
    ``pooled_projections`` ``(B, P)``, ``txt_ids`` ``(L, 3)``."""

    family = "flux"
    #: the double-stream blocks' joint attention and the single-stream blocks' projections
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out")
    max_sequence_length = 512

    @property
    def default_size(self) -> tuple[int, int]:
        s = int(self.unet.config.get("sample_size", 128) or 128) * self.vae_scale_factor
        return (s, s)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.vae_scale_factor
        if height % (2 * f) or width % (2 * f):
            raise ValueError(f"image size {height}x{width} must be divisible by {2 * f} (VAE factor x 2x2 packing)")
        return (batch, self.unet.config.in_channels // 4, 2 * (height // (2 * f)), 2 * (width // (2 * f)))

    def set_timesteps(self, num_inference_steps: int, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.scheduler.config
        seq = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        mu = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_inference_steps,
                                                                              num_inference_steps)
        if sigmas is None:
            self.scheduler.set_timesteps(num_inference_steps, device=latents.device, mu=mu)
        else:
            self.scheduler.set_timesteps(sigmas=sigmas, device=latents.device, mu=mu)
        return self.scheduler.timesteps

    def encode_prompts(self, prompts: list[str], negative_prompt: str = "", guidance: bool = True) -> Conditioning:
        if negative_prompt:  # FLUX has no classifier-free guidance: a negative prompt would be dropped silently
            raise InputError(f"sampling.negative_prompt {negative_prompt!r}: FLUX pipelines take no negative prompt "
                             "(they guide by an embedded guidance scale); leave it empty")
        with torch.no_grad():
            pe, pooled, txt_ids = self.pipe.encode_prompt(list(prompts), None, device=self.device,
                                                          num_images_per_prompt=1,
                                                          max_sequence_length=self.max_sequence_length)
        return Conditioning(cond={"encoder_hidden_states": pe, "pooled_projections": pooled}, extra={"txt_ids": txt_ids})

    def unet_inputs(self, cond: dict[str, Any], batch: int, height: int, width: int) -> dict[str, Any]:
        return dict(cond)

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor | int, cond: Conditioning,
                      guidance_scale: float) -> torch.Tensor:
        """Velocity for unpacked ``latents (B, C, h, w)``; ``guidance_scale`` is FLUX-dev's embedded guidance."""
        b, _, h, w = latents.shape
        t = torch.as_tensor(t, device=latents.device, dtype=latents.dtype).expand(b)
        guidance = None
        if self.unet.config.get("guidance_embeds", False):
            guidance = torch.full([b], guidance_scale, device=latents.device, dtype=torch.float32)
        out = self.unet(
            hidden_states=pack(latents), timestep=t / 1000, guidance=guidance,
            pooled_projections=cond.cond["pooled_projections"], encoder_hidden_states=cond.cond["encoder_hidden_states"],
            txt_ids=cond.extra["txt_ids"], img_ids=image_ids(h, w, latents.device, latents.dtype), return_dict=False,
        )[0]
        return unpack(out, h, w)
