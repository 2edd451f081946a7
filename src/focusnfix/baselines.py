"""Baselines beside DRaFT (which is Focus-N-Fix with beta = 0): Safe Latent Diffusion.

:func:`sld_images` samples SLD (diffusers' ``StableDiffusionPipelineSafe``) on the same
components and x_T as the base images; :func:`focusnfix.evaluate.evaluate` runs it as method
:data:`SLD_METHOD` with ``sld=True``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipelineSafe
from tqdm.auto import tqdm

from focusnfix.backbones import Backbone
from focusnfix.errors import InputError
from focusnfix.sampling import SamplingOptions, initial_noise

#: name of the SLD baseline method
SLD_METHOD = "sld"


def _same_prompt_batches(prompts: list[str], size: int) -> list[slice]:
    """Consecutive runs of one prompt, at most ``size`` long (SLD tokenizes a batch untruncated,
    which fails for prompts of different token lengths beyond the tokenizer's maximum)."""
    out, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start] or i - start == size:
            out.append(slice(start, i))
            start = i
    return out


def sld_images(
    backbone: Backbone,
    prompts: list[str],
    seeds: list[int],
    options: SamplingOptions,
    batch_size: int = 8,
    sld_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Safe Latent Diffusion (diffusers' ``StableDiffusionPipelineSafe``) on the same components.

    SLD runs its own denoising loop (its safety guidance is a third UNet branch), with a DDIM
    scheduler built from the backbone's scheduler config (eta = 0). Its x_T is passed in as
    ``latents``: the same per-seed CPU draw as :func:`focusnfix.sampling.initial_noise`
    (divided by ``init_noise_sigma``, which SLD multiplies back), so SLD starts from exactly
    the base image's x_T. SD backbones only.

    Returns:
        ``(N, 3, H, W)`` float in [0, 1].
    """
    pipe = backbone.pipe
    if type(pipe).__name__ != "StableDiffusionPipeline":
        raise InputError(f"the sld baseline needs a StableDiffusionPipeline, got {type(pipe).__name__}")
    safe = StableDiffusionPipelineSafe(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=DDIMScheduler.from_config(backbone.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    safe.set_progress_bar_config(disable=True)
    h, w = options.height or backbone.default_size[0], options.width or backbone.default_size[1]
    kwargs = dict(sld_kwargs or {})
    kwargs.setdefault("sld_warmup_steps", min(10, max(0, options.num_inference_steps // 5)))
    out = []
    with torch.no_grad():
        for sl in tqdm(_same_prompt_batches(prompts, batch_size), desc=f"sampling {SLD_METHOD}", unit="batch",
                       disable=not progress):
            noise = initial_noise(backbone, seeds[sl], h, w) / safe.scheduler.init_noise_sigma
            imgs = safe(
                prompts[sl],
                height=h,
                width=w,
                num_inference_steps=options.num_inference_steps,
                guidance_scale=options.guidance_scale,
                negative_prompt=[options.negative_prompt] * len(prompts[sl]) if options.negative_prompt else None,
                latents=noise,
                output_type="np",
                **kwargs,
            ).images
            out.append(torch.from_numpy(np.asarray(imgs)).permute(0, 3, 1, 2).float())
    return torch.cat(out).clamp(0, 1)


__all__ = ["SLD_METHOD", "sld_images"]
