"""The backbone interface: what the sampler and trainer need from a diffusers pipeline.

A backbone wraps one loaded diffusers pipeline and exposes four operations, all in torch and
differentiable where the trainer needs gradients:

* ``encode_prompts(prompts)`` -> a :class:`Conditioning` (text embeddings for classifier-free
  guidance, plus whatever extra inputs the UNet of the family needs);
* ``predict_noise(latents, t, cond, guidance_scale)`` -> the guided UNet output;
* ``decode(latents)`` -> images ``(B, 3, H, W)`` in [0, 1];
* ``adapters_disabled()`` -> a context in which the UNet runs without its LoRA (the frozen model);
* ``lora_merged()`` -> a context in which the LoRA is folded into the base weights (no-gradient
  calls then cost what the plain model costs).

One subclass per family (SD 1.x/2.x, SDXL); the toy world is an SD-format pipeline.
"""

from __future__ import annotations

import contextlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMScheduler

from focusnfix.errors import InputError


@dataclass
class Conditioning:
    """UNet conditioning of a batch of B prompts.

    Attributes:
        cond: keyword tensors for the UNet, each with leading dimension B (prompted).
        uncond: the same keys for the negative prompt (classifier-free guidance), or None.
    """

    cond: dict[str, Any]
    uncond: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Backbone(ABC):
    """Adapter over a diffusers pipeline (see module docstring).

    Attributes:
        pipe: the wrapped pipeline (its ``unet`` carries the LoRA).
        scheduler: a DDIM scheduler made from the pipeline's scheduler config; used for all
            sampling in training and ``focusnfix sample``.
    """

    #: the LoRA targets recommended for this family (the presets' ``lora.target_modules``; the trainer
    #: takes the config's, whose default is the UNet's attention projections below)
    default_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipe: Any) -> None:
        freeze_components(pipe)
        self.pipe = pipe
        self.scheduler = make_ddim_scheduler(pipe.scheduler.config)
        self._compiled: tuple[torch.nn.Module, torch.nn.Module] | None = None  # (unet, its torch.compile)
        self._unet_override: torch.nn.Module | None = None

    # -- properties ------------------------------------------------------------------------
    @property
    def unet(self) -> torch.nn.Module:
        """The pipeline's UNet (its ``torch.compile`` inside :meth:`unet_compiled`)."""
        return self._unet_override if self._unet_override is not None else self.pipe.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> tuple[int, int]:
        """``(H, W)`` in pixels that the UNet was configured for."""
        s = self.unet.config.sample_size
        s = s if isinstance(s, (tuple, list)) else (s, s)
        return (int(s[0]) * self.vae_scale_factor, int(s[1]) * self.vae_scale_factor)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.vae_scale_factor
        if height % f or width % f or height < f or width < f:
            raise InputError(f"image size {height}x{width} (sampling.height x sampling.width) must be positive "
                             f"multiples of the model's VAE scale factor {f}")
        return (batch, self.unet.config.in_channels, height // f, width // f)

    def to(self, device: torch.device | str) -> Backbone:
        self.pipe.to(device)
        return self

    # -- family-specific -------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(
        self, prompts: list[str], negative_prompt: str = "", guidance: bool = True
    ) -> Conditioning:
        """Text conditioning of ``prompts`` (and of ``negative_prompt`` when ``guidance``)."""

    @abstractmethod
    def unet_inputs(self, cond: dict[str, Any], batch: int, height: int, width: int) -> dict[str, Any]:
        """Keyword arguments for ``unet(latents, t, **kwargs)`` from one conditioning dict."""

    # -- the sampler (DDIM here; flow-matching backbones override these three) -------------
    def set_timesteps(self, num_inference_steps: int, latents: torch.Tensor) -> torch.Tensor:
        """Prepare the scheduler for a chain of ``num_inference_steps`` on ``latents``; its timesteps."""
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        return self.scheduler.timesteps

    def scheduler_step(self, model_output: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One deterministic, differentiable sampler step x_t -> x_{t-1} (DDIM, eta = 0)."""
        return self.scheduler.step(model_output, t, latents, eta=0.0, return_dict=False)[0]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise clean latents to timestep ``t`` (DRaFT-LV's re-noising)."""
        return self.scheduler.add_noise(x0, noise, t)

    # -- shared ----------------------------------------------------------------------------
    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor | int,
        cond: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Guided UNet output for ``latents (B, C, h, w)`` at timestep ``t``.

        With ``cond.uncond`` the negative and positive halves run as one batch of 2B, as in
        diffusers' pipelines, and are combined as ``u + g (c - u)``.
        """
        b, _, h, w = latents.shape
        height, width = h * self.vae_scale_factor, w * self.vae_scale_factor
        model_in = self.scheduler.scale_model_input(latents, t)
        if cond.uncond is None:
            kwargs = self.unet_inputs(cond.cond, b, height, width)
            return self.unet(model_in, t, **kwargs, return_dict=False)[0]
        both = {k: _cat(cond.uncond[k], cond.cond[k]) for k in cond.cond}
        kwargs = self.unet_inputs(both, 2 * b, height, width)
        out = self.unet(torch.cat([model_in, model_in]), t, **kwargs, return_dict=False)[0]
        uncond_out, cond_out = out.chunk(2)
        return uncond_out + guidance_scale * (cond_out - uncond_out)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode inside the autograd graph: latents -> images ``(B, 3, H, W)`` in [0, 1]."""
        latents = latents / self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift:
            latents = latents + shift
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0.0, 1.0)

    @contextlib.contextmanager
    def lora_merged(self) -> Iterator[None]:
        """Run the UNet with its active LoRA folded into the base weights (calls without gradient).

        Each LoRA layer's base weight W is swapped for ``W + ΔW`` (PEFT's ``get_delta_weight``)
        and the adapters are switched off, so a UNet call skips the LoRA branch; on exit the
        original weight tensors are put back (nothing is subtracted, so W is restored bit for
        bit). The output equals the unmerged LoRA's up to float rounding. A no-op when the UNet
        has no adapters, when they are disabled (the frozen model) or use DoRA. Gradient must
        not be needed inside (the LoRA parameters do not take part).
        """
        from peft.tuners.lora import LoraLayer

        # layers whose active adapters are present (deleted adapters leave empty PEFT wrappers behind)
        layers = [(m, [a for a in m.active_adapters if a in m.lora_A])
                  for m in self.unet.modules() if isinstance(m, LoraLayer)]
        layers = [(m, active) for m, active in layers if active]
        mergeable = bool(layers) and bool(getattr(self.unet, "peft_config", None)) and not any(
            m.disable_adapters or m.merged or any(m.use_dora.get(a, False) for a in active) for m, active in layers
        )
        if not mergeable:
            yield
            return
        saved = []
        try:
            with torch.no_grad():
                for m, active in layers:
                    weight = m.get_base_layer().weight
                    delta = sum(m.get_delta_weight(a) for a in active)
                    saved.append((weight, weight.data))
                    weight.data = (weight.data.float() + delta.float()).to(weight.dtype)
            self.unet.disable_adapters()
            yield
        finally:
            for weight, original in saved:
                weight.data = original
            self.unet.enable_adapters()

    @contextlib.contextmanager
    def unet_compiled(self) -> Iterator[None]:
        """Run UNet calls through ``torch.compile(unet)`` inside this context (calls without gradient).

        Compiled once per UNet object and reused; it shares the UNet's parameters, so the merged
        LoRA weights and disabled adapters of :meth:`lora_merged` / :meth:`adapters_disabled` apply.
        The first call compiles (minutes on CPU); outputs equal eager ones up to float rounding.
        """
        unet = self.pipe.unet
        if self._compiled is None or self._compiled[0] is not unet:
            self._compiled = (unet, torch.compile(unet))
        self._unet_override = self._compiled[1]
        try:
            yield
        finally:
            self._unet_override = None

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the UNet as the frozen pretrained model (LoRA off) inside this context."""
        has_adapters = bool(getattr(self.unet, "peft_config", None))
        if has_adapters:
            self.unet.disable_adapters()
        try:
            yield
        finally:
            if has_adapters:
                self.unet.enable_adapters()


def _cat(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b])


def freeze_components(pipe: Any) -> None:
    """Set ``requires_grad = False`` on every weight of the pipeline's components.

    Only the LoRA the trainer adds is trained. diffusers loads every component with
    ``requires_grad=True``; left so, a pixel reward's backward through the VAE decoder also computes
    the decoder's weight gradients (a third of its backward time) and keeps them in memory.
    """
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)


def make_ddim_scheduler(config: Any) -> DDIMScheduler:
    """A DDIM scheduler (eta = 0 sampling) from any diffusers scheduler config.

    The final DDIM step is an identity (zero derivative w.r.t. the UNet output, so DRaFT-1 gets
    no gradient) when ``set_alpha_to_one=False`` and ``steps_offset=0``: the last timestep is 0
    and its "previous" alpha equals its own. We then switch to ``steps_offset=1`` (the SD
    default) and warn.
    """
    sched = DDIMScheduler.from_config(config)
    if not sched.config.set_alpha_to_one and sched.config.steps_offset == 0:
        warnings.warn(
            "scheduler has set_alpha_to_one=False and steps_offset=0: its last DDIM step would have "
            "zero gradient; using steps_offset=1 (the Stable Diffusion default) instead",
            stacklevel=2,
        )
        sched = DDIMScheduler.from_config(sched.config, steps_offset=1)
    return sched
