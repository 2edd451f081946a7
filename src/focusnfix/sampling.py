"""Differentiable DDIM sampling (eta = 0) with classifier-free guidance and truncated backprop.

Gradient modes (how much of the sampling chain carries gradient to the LoRA):

* ``draft_k``: DRaFT-K. The first N - K steps run under ``torch.no_grad``; only the last K
  UNet calls are in the autograd graph. Running the early steps without autograd gives the
  same LoRA gradient as detaching their outputs and is cheaper.
* ``draft_lv``: DRaFT-LV. K = 1, plus ``lv_n`` re-noisings of the final sample to the last
  timestep, each denoised again with gradient; the reward is averaged over the 1 + n images.
* ``full``: backprop through all N steps; with ``checkpoint_unet`` each UNet call is recomputed in
  backward (memory of one call's activations), without it every call's activations are kept.

Calls without gradient (the first N - K of DRaFT-K, every call of plain inference) run with the
LoRA merged into the base weights (``SamplingOptions.merge_lora``, on by default), so they cost
what the pretrained model costs; the result equals the unmerged LoRA's up to float rounding.

The initial noise is drawn per seed on the CPU exactly as diffusers' pipelines draw it for
``generator=torch.Generator().manual_seed(seed)``, so the frozen model's image Î0 and the
fine-tuned image Î share x_T, and ``focusnfix sample`` reproduces ``pipe(...)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from focusnfix.backbones.base import Backbone, Conditioning

GradMode = Literal["draft_k", "draft_lv", "full"]


@dataclass
class SamplingOptions:
    """How to sample. Every field has the meaning of the config's ``sampling`` section."""

    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""
    grad_mode: GradMode = "draft_k"
    k: int = 2
    lv_n: int = 2
    checkpoint_unet: bool = False
    checkpoint_vae: bool = False
    merge_lora: bool = True
    compile_unet: bool = False
    lora_steps: int | None = None


def initial_noise(
    backbone: Backbone, seeds: list[int], height: int, width: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x_T for each seed: ``(B, C, h, w)`` standard normal, drawn on the CPU per seed."""
    shape = backbone.latent_shape(1, height, width)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    x = torch.cat(noise).to(backbone.device, dtype or backbone.dtype)
    return x * getattr(backbone.scheduler, "init_noise_sigma", 1.0)  # flow schedulers start at sigma 1


def _image_size(backbone: Backbone, options: SamplingOptions) -> tuple[int, int]:
    default_h, default_w = backbone.default_size
    return options.height or default_h, options.width or default_w


def denoise(
    backbone: Backbone,
    cond: Conditioning,
    latents: torch.Tensor,
    options: SamplingOptions,
    grad_steps: int,
    on_unet_call: Callable[[int, bool], None] | None = None,
    start: int = 0,
    stop: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Run the DDIM chain from ``latents`` = x_T (or, with ``start`` > 0, = x at the chain's
    ``start``-th timestep: image-to-image), up to the end (or, with ``stop``, the latents before
    the ``stop``-th timestep; gradient then follows ``grad_steps`` counted from the chain's end).

    Args:
        grad_steps: how many of the last UNet calls carry gradient (0 = none, N = all).
        on_unet_call: optional ``(step_index, with_grad)`` callback, for tests and profiling.
        start: index of the first timestep to run (0 = all of them).

    Returns:
        ``(x0, t_last)``: the final latents and the last timestep (DRaFT-LV re-noises to it).
    """
    timesteps = backbone.set_timesteps(options.num_inference_steps, latents)
    end = len(timesteps) if stop is None else stop
    n = len(timesteps)
    # with lora_steps = L the adapter acts only on the last L calls: the ones before are the frozen
    # model's (they do not depend on the LoRA, so no gradient is lost by running them without one)
    lora_from = start if options.lora_steps is None else max(start, n - options.lora_steps)
    grad_allowed = torch.is_grad_enabled()
    first_grad = max(n - grad_steps, lora_from) if grad_allowed else n
    lora_from = min(lora_from, end)
    first_grad = min(first_grad, end)
    if lora_from > start:
        compiled = backbone.unet_compiled() if options.compile_unet else contextlib.nullcontext()
        with backbone.adapters_disabled(), compiled, torch.no_grad():
            for i in range(start, lora_from):
                if on_unet_call is not None:
                    on_unet_call(i, False)
                latents = _step(backbone, cond, latents, timesteps[i], options, checkpoint_it=False)
    # the calls without gradient run with the LoRA merged into the base weights (the plain model's cost)
    merged = backbone.lora_merged() if options.merge_lora and first_grad > lora_from else contextlib.nullcontext()
    compiled = backbone.unet_compiled() if options.compile_unet and first_grad > lora_from else contextlib.nullcontext()
    with merged, compiled, torch.no_grad():
        for i in range(lora_from, first_grad):
            if on_unet_call is not None:
                on_unet_call(i, False)
            latents = _step(backbone, cond, latents, timesteps[i], options, checkpoint_it=False)
    for i in range(max(lora_from, first_grad), end):
        if on_unet_call is not None:
            on_unet_call(i, True)
        latents = _step(backbone, cond, latents, timesteps[i], options, checkpoint_it=options.checkpoint_unet)
    return latents, int(timesteps[end - 1])


def _step(
    backbone: Backbone,
    cond: Conditioning,
    latents: torch.Tensor,
    t: torch.Tensor,
    options: SamplingOptions,
    checkpoint_it: bool,
) -> torch.Tensor:
    def eps_fn(x: torch.Tensor) -> torch.Tensor:
        return backbone.predict_noise(x, t, cond, options.guidance_scale)

    eps = checkpoint(eps_fn, latents, use_reentrant=False) if checkpoint_it else eps_fn(latents)
    # DDIM with eta = 0 (or a flow model's Euler step) is a deterministic, differentiable function of eps and x_t
    return backbone.scheduler_step(eps, t, latents)


def decode(backbone: Backbone, latents: torch.Tensor, checkpoint_vae: bool = False) -> torch.Tensor:
    """Latents -> images ``(B, 3, H, W)`` in [0, 1], optionally with a checkpointed decoder."""
    if checkpoint_vae and torch.is_grad_enabled():
        return checkpoint(backbone.decode, latents, use_reentrant=False)
    return backbone.decode(latents)


@dataclass
class SampleOutput:
    """Images and latents of one sampling call.

    Attributes:
        images: ``(B, 3, H, W)`` in [0, 1], the main chain's images (what inference draws).
        latents: ``(B, C, h, w)`` their latents.
        extra_images: DRaFT-LV's re-noised images ``(n, B, 3, H, W)``, or None.
        prefix_latents: with ``lora_steps = L``, the latents ``(B, C, h, w)`` after the first N - L
            steps (the frozen model's, the same for the policy and Î0), else None.
    """

    images: torch.Tensor
    latents: torch.Tensor
    extra_images: torch.Tensor | None = None
    prefix_latents: torch.Tensor | None = None


def prefix_length(options: SamplingOptions) -> int | None:
    """How many first steps are the frozen model's (``num_inference_steps - lora_steps``), or None."""
    if options.lora_steps is None:
        return None
    return max(options.num_inference_steps - options.lora_steps, 0)


def sample(
    backbone: Backbone,
    prompts: list[str],
    seeds: list[int],
    options: SamplingOptions,
    cond: Conditioning | None = None,
    generator: torch.Generator | None = None,
    on_unet_call: Callable[[int, bool], None] | None = None,
    prefix_latents: torch.Tensor | None = None,
) -> SampleOutput:
    """Sample images for (prompt, seed) pairs with the backbone's current UNet.

    Gradient flows as ``options.grad_mode`` says when autograd is enabled; call under
    ``torch.no_grad()`` for plain inference.

    Args:
        prompts, seeds: B prompts and B seeds (x_T is drawn per seed).
        cond: precomputed conditioning of ``prompts`` (else encoded here).
        generator: RNG for DRaFT-LV re-noising (CPU generator).
        prefix_latents: with ``options.lora_steps``, the frozen prefix's latents
            (``SampleOutput.prefix_latents`` of the reference): the chain starts there and skips
            the N - L frozen steps (the same result: those steps do not depend on the LoRA).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    height, width = _image_size(backbone, options)
    guidance = options.guidance_scale > 1.0
    if cond is None:
        cond = backbone.encode_prompts(prompts, options.negative_prompt, guidance)
    n = options.num_inference_steps
    grad_steps = {"draft_k": min(options.k, n), "draft_lv": 1, "full": n}[options.grad_mode]
    split = prefix_length(options)
    if prefix_latents is not None:
        if split is None:
            raise ValueError("prefix_latents need options.lora_steps (the LoRA's active steps)")
        prefix = prefix_latents.to(backbone.device, backbone.dtype)
    elif split is not None:  # run the frozen prefix once and keep its latents for the reference cache
        prefix, _ = denoise(backbone, cond, initial_noise(backbone, seeds, height, width), options, 0,
                            on_unet_call, stop=split)
    if split is not None:
        x0, t_last = denoise(backbone, cond, prefix, options, grad_steps, on_unet_call, start=split)
    else:
        prefix = None
        x0, t_last = denoise(backbone, cond, initial_noise(backbone, seeds, height, width), options, grad_steps,
                             on_unet_call)
    images = decode(backbone, x0, options.checkpoint_vae)
    extra = None
    if options.grad_mode == "draft_lv" and options.lv_n > 0 and torch.is_grad_enabled():
        extra = _renoise_last_step(backbone, cond, x0, t_last, options, generator, on_unet_call)
    return SampleOutput(images=images, latents=x0, extra_images=extra,
                        prefix_latents=None if prefix is None else prefix.detach())


def _renoise_last_step(
    backbone: Backbone,
    cond: Conditioning,
    x0: torch.Tensor,
    t_last: int,
    options: SamplingOptions,
    generator: torch.Generator | None,
    on_unet_call: Callable[[int, bool], None] | None,
) -> torch.Tensor:
    """DRaFT-LV: ``lv_n`` times, re-noise the final latents to ``t_last`` and denoise once."""
    t = torch.tensor([t_last], device=x0.device)
    images = []
    for _ in range(options.lv_n):
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        x_t = backbone.add_noise(x0.detach(), noise, t)
        if on_unet_call is not None:
            on_unet_call(options.num_inference_steps, True)
        x = _step(backbone, cond, x_t, t[0], options, checkpoint_it=options.checkpoint_unet)
        images.append(decode(backbone, x, options.checkpoint_vae))
    return torch.stack(images)
