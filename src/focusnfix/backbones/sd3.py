"""Stable Diffusion 3 / 3.5: an MMDiT transformer sampled by a rectified-flow Euler sampler.

What differs from the UNet families:

* the denoiser is ``pipe.transformer`` (``SD3Transformer2DModel``); it predicts a velocity, and it
  carries the LoRA (``Backbone.unet`` returns it, so LoRA, merging and "adapters off" work as for
  a UNet);
* the sampler is the pipeline's own ``FlowMatchEulerDiscreteScheduler`` with its shifted sigmas
  (and, where its config asks for it, the dynamic shift from the image's token count), one Euler
  step ``x_{next} = x + (sigma_next - sigma) v`` per timestep: deterministic and differentiable,
  so DRaFT-K and the regional constraint work unchanged;
* prompts go through the pipeline's public ``encode_prompt`` (two CLIP encoders and, when the
  pipeline has it, T5; without T5 the pipeline's zeros), giving ``encoder_hidden_states`` and
  ``pooled_projections``; classifier-free guidance is one batch of 2B as in ``pipe(...)``;
* latents are decoded with the VAE's scaling and shift factors (``Backbone.decode``).

Not handled: skip-layer guidance (``skip_guidance_layers``), IP adapters, DRaFT-LV (a flow chain
has no re-noising to an integer timestep; it is refused).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from focusnfix.backbones.base import Backbone, Conditioning, freeze_components
from focusnfix.errors import InputError


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """The resolution-dependent shift ``mu`` of SD3.5 / FLUX schedulers (linear in the token count)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


class StableDiffusion3Backbone(Backbone):
    """Backbone over a ``StableDiffusion3Pipeline``.

    Conditioning keys: ``encoder_hidden_states`` ``(B, L, D)`` and ``pooled_projections`` ``(B, P)``.
    """

    family = "sd3"
    #: joint attention: the image stream's projections and the text stream's (add_*_proj, to_add_out)
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    #: ``encode_prompt``'s T5 sequence length, as ``pipe(...)``'s default
    max_sequence_length = 256

    def __init__(self, pipe: Any) -> None:  # noqa: D107 - the flow scheduler, not DDIM
        freeze_components(pipe)
        self.pipe = pipe
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser (the MMDiT transformer): what carries the LoRA."""
        return self.pipe.transformer

    @property
    def default_size(self) -> tuple[int, int]:
        s = int(self.unet.config.sample_size) * self.vae_scale_factor
        return (s, s)

    # -- the flow sampler --------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.scheduler.config
        kwargs = {}
        if cfg.get("use_dynamic_shifting", False):
            p = self.unet.config.patch_size
            seq = (latents.shape[-2] // p) * (latents.shape[-1] // p)
            kwargs["mu"] = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device, **kwargs)
        return self.scheduler.timesteps

    def scheduler_step(self, model_output: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # the Euler step x + (sigma_next - sigma) v, in the latents' dtype as the pipeline keeps it
        out = self.scheduler.step(model_output, t, latents, return_dict=False)[0]
        return out.to(latents.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise InputError("sampling.grad_mode draft_lv is not available for flow-matching models (SD3, FLUX); "
                         "use draft_k or full")

    # -- conditioning and the denoiser ----------------------------------------------------------
    def encode_prompts(self, prompts: list[str], negative_prompt: str = "", guidance: bool = True) -> Conditioning:
        with torch.no_grad():
            pe, npe, pooled, npooled = self.pipe.encode_prompt(
                list(prompts), None, None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=guidance,
                negative_prompt=[negative_prompt] * len(prompts) if guidance else None,
                max_sequence_length=self.max_sequence_length,
            )
        return Conditioning(
            cond={"encoder_hidden_states": pe, "pooled_projections": pooled},
            uncond={"encoder_hidden_states": npe, "pooled_projections": npooled} if guidance else None,
        )

    def unet_inputs(self, cond: dict[str, Any], batch: int, height: int, width: int) -> dict[str, Any]:
        return {"encoder_hidden_states": cond["encoder_hidden_states"], "pooled_projections": cond["pooled_projections"]}

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor | int, cond: Conditioning,
                      guidance_scale: float) -> torch.Tensor:
        """Guided velocity for ``latents (B, C, h, w)`` at timestep ``t`` (the pipeline's formula)."""
        b = latents.shape[0]
        if cond.uncond is None:
            x, kw = latents, cond.cond
        else:
            x = torch.cat([latents, latents])
            kw = {k: torch.cat([cond.uncond[k], cond.cond[k]]) for k in cond.cond}
        t = torch.as_tensor(t, device=latents.device).expand(x.shape[0])
        out = self.unet(hidden_states=x, timestep=t, encoder_hidden_states=kw["encoder_hidden_states"],
                        pooled_projections=kw["pooled_projections"], return_dict=False)[0]
        if cond.uncond is None:
            return out
        uncond_out, cond_out = out[:b], out[b:]
        return uncond_out + guidance_scale * (cond_out - uncond_out)
