"""Backbones: one adapter per diffusers pipeline family, chosen from ``model_index.json``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from focusnfix.backbones.base import Backbone, Conditioning, make_ddim_scheduler
from focusnfix.backbones.flux import FluxBackbone
from focusnfix.backbones.sd import StableDiffusionBackbone
from focusnfix.backbones.sd3 import StableDiffusion3Backbone
from focusnfix.backbones.sdxl import StableDiffusionXLBackbone
from focusnfix.errors import InputError
from focusnfix.toyworld import pipeline_path

#: pipeline class name (``model_index.json``'s ``_class_name``) -> backbone class
BACKBONES: dict[str, type[Backbone]] = {
    "StableDiffusionPipeline": StableDiffusionBackbone,
    "StableDiffusionXLPipeline": StableDiffusionXLBackbone,
    "StableDiffusion3Pipeline": StableDiffusion3Backbone,
    "FluxPipeline": FluxBackbone,
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register_backbone(pipeline_class_name: str, backbone: type[Backbone]) -> None:
    """Make ``load_backbone`` accept pipelines of another family."""
    BACKBONES[pipeline_class_name] = backbone


def resolve_model_path(model: str) -> str:
    """``"toy"`` -> the packaged toy pipeline; an existing directory -> itself; else a hub id.

    Raises:
        InputError: a path that looks local (starts with ``.``, ``/`` or ``~``, or has more than
            one ``/``) but does not exist.
    """
    if model == "toy":
        try:
            return str(pipeline_path())
        except FileNotFoundError as err:
            raise InputError(str(err)) from err
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise InputError(f"model directory {path} has no model_index.json (expected a diffusers pipeline)")
        return str(path)
    looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1 or path.exists()
    if looks_local:
        raise InputError(f"model path {model!r} does not exist (expected a diffusers pipeline directory)")
    return model  # a hub id such as "CompVis/stable-diffusion-v1-4"


def load_backbone(
    model: str,
    dtype: str = "float32",
    variant: str | None = None,
    revision: str | None = None,
    device: torch.device | str = "cpu",
) -> Backbone:
    """Load a diffusers pipeline and wrap it in the backbone of its family.

    Args:
        model: ``"toy"``, a local pipeline directory, or a hub id.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the base weights (LoRA stays fp32).
        variant, revision: passed to ``from_pretrained`` (e.g. ``variant="fp16"``).
        device: where to put the pipeline.
    """
    if dtype not in DTYPES:
        raise InputError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_device(device)
    source = resolve_model_path(model)
    class_name = _pipeline_class_name(source)
    if class_name is not None and class_name not in BACKBONES:
        raise InputError(
            f"model {model!r} is a {class_name}; supported pipelines: {', '.join(sorted(BACKBONES))}"
        )
    kwargs: dict = {"dtype": DTYPES[dtype]}
    if variant:
        kwargs["variant"] = variant
    if revision:
        kwargs["revision"] = revision
    if class_name in ("StableDiffusionPipeline", None):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    kwargs.update({name: None for name in _absent_components(source)})  # e.g. SD3 saved without T5
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except OSError as err:
        raise InputError(f"could not load model {model!r}: {err}") from err
    except ValueError as err:
        if variant and "variant" in str(err):
            raise InputError(f"model {model!r} has no weights of variant {variant!r} (model.variant): {err}") from err
        raise
    name = type(pipe).__name__
    if name not in BACKBONES:
        raise InputError(f"model {model!r} is a {name}; supported pipelines: {', '.join(sorted(BACKBONES))}")
    pipe.set_progress_bar_config(disable=True)
    backbone = BACKBONES[name](pipe)
    return backbone.to(device)


def check_device(device: torch.device | str) -> None:
    """Fail with a clear error when ``device`` is not one torch can use here (e.g. cuda on a CPU build)."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise InputError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r}: torch sees no CUDA GPU here (a CPU build of torch, or no visible device)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r}: MPS is not available on this machine")


def _absent_components(source: str) -> list[str]:
    """Components a local pipeline was saved without (``[null, null]`` in model_index.json)."""
    index = Path(source) / "model_index.json"
    if not index.is_file():
        return []
    try:
        doc = json.loads(index.read_text())
    except json.JSONDecodeError:
        return []
    return [k for k, v in doc.items() if not k.startswith("_") and isinstance(v, list) and v == [None, None]]


def _pipeline_class_name(source: str) -> str | None:
    index = Path(source) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as err:
        raise InputError(f"{index} is not a valid diffusers model_index.json: {err}") from err


__all__ = [
    "BACKBONES",
    "Backbone",
    "Conditioning",
    "StableDiffusionBackbone",
    "load_backbone",
    "make_ddim_scheduler",
    "register_backbone",
    "resolve_model_path",
]
