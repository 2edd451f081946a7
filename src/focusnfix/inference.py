"""Sampling a trained LoRA with a plain diffusers pipeline, gated as it was trained.

A LoRA trained with ``lora.active_steps = L`` acts only on the last L of the N sampling steps
(the first N - L are the frozen model's). ``pipe.load_lora_weights`` reads its weights like any
other; to draw what training drew, switch the adapter on for those steps only::

    from focusnfix.inference import late_lora_callback

    pipe.load_lora_weights("runs/toy_safety/lora")
    callback = late_lora_callback(pipe, "runs/toy_safety/lora", num_inference_steps=20)
    image = pipe(prompt, num_inference_steps=20, callback_on_step_end=callback).images[0]

A LoRA without ``focusnfix_lora.json`` acts on every step and needs none of this.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from focusnfix.errors import InputError
from focusnfix.lora import LORA_SCHEDULE_NAME, check_lora_file, lora_active_steps


def active_steps_for(lora: str | Path, timesteps: Sequence[int]) -> int | None:
    """How many of a schedule's final steps ``timesteps`` (descending, N of them) the LoRA acts on.

    The LoRA's own schedule (``focusnfix_lora.json``) records the timesteps it was trained on; with
    the training step count this is its ``active_steps``; with another one, the steps whose timestep
    is at most the highest trained one. None: the LoRA acts on every step.
    """
    steps = lora_active_steps(lora)
    if steps is None:
        return None
    schedule = json.loads((check_lora_file(lora).parent / LORA_SCHEDULE_NAME).read_text())
    if schedule.get("num_inference_steps") == len(timesteps) or not schedule.get("timesteps"):
        return min(steps, len(timesteps))
    highest = max(int(t) for t in schedule["timesteps"])
    return sum(int(t) <= highest for t in timesteps)


def lora_steps_for(backbone: Any, lora: str | Path, options: Any) -> int | None:
    """``SamplingOptions.lora_steps`` for sampling ``lora`` on ``backbone`` with ``options``: its
    active steps mapped onto ``options.num_inference_steps`` by timestep (:func:`active_steps_for`);
    None when it acts on every step."""
    if lora_active_steps(lora) is None:
        return None
    import torch

    h, w = options.height or backbone.default_size[0], options.width or backbone.default_size[1]
    latents = torch.zeros(backbone.latent_shape(1, h, w), device=backbone.device)
    timesteps = backbone.set_timesteps(options.num_inference_steps, latents)
    return active_steps_for(lora, [int(t) for t in timesteps])


def _trained_steps(lora: str | Path) -> int | None:
    return json.loads((check_lora_file(lora).parent / LORA_SCHEDULE_NAME).read_text()).get("num_inference_steps")


class late_lora_callback:  # noqa: N801 (used like a function: callback = late_lora_callback(...))
    """A ``callback_on_step_end`` that switches the pipeline's LoRA on for its last active steps.

    Creating it switches the LoRA off (``pipe.disable_lora()``); after the step before the first
    active one it is switched on, and after the last step off again, so the next call starts
    like this one. Use one callback per ``num_inference_steps``.

    Args:
        pipe: a diffusers pipeline with the LoRA loaded (``pipe.load_lora_weights``).
        lora: the LoRA directory or file (its ``focusnfix_lora.json`` says the steps).
        num_inference_steps: the N of the pipeline calls it will be passed to.
    """

    def __init__(self, pipe: Any, lora: str | Path, num_inference_steps: int) -> None:
        if num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.pipe = pipe
        self.n = num_inference_steps
        steps = lora_active_steps(lora)
        if steps is not None and _trained_steps(lora) != num_inference_steps:
            pipe.scheduler.set_timesteps(num_inference_steps)  # another N: gate by timestep
            steps = active_steps_for(lora, [int(t) for t in pipe.scheduler.timesteps])
        self.first_active = 0 if steps is None else self.n - steps
        if self.first_active > 0:
            pipe.disable_lora()

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.first_active > 0:
            if step == self.first_active - 1:
                pipe.enable_lora()
            if step == self.n - 1:
                pipe.disable_lora()
        return callback_kwargs


__all__ = ["active_steps_for", "late_lora_callback", "lora_steps_for"]
