"""LoRA on the UNet through PEFT, saved in diffusers' format.

The adapter starts at zero (PEFT's default init: ``lora_B = 0``), so before the first update
the fine-tuned UNet computes exactly what the frozen one does. Only LoRA parameters train;
they are kept in fp32 even when the base weights are bf16/fp16.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from focusnfix.errors import InputError
from focusnfix.files import partial_name, sync_tree

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: beside the weights: on which sampling steps the adapter acts (``lora.active_steps``); absent = all
LORA_SCHEDULE_NAME = "focusnfix_lora.json"


def add_lora(
    unet: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    target_modules: list[str] | tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    dropout: float = 0.0,
) -> list[torch.nn.Parameter]:
    """Freeze the UNet, add a zero-initialised LoRA adapter, return its (fp32) parameters."""
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights=True,  # A ~ kaiming, B = 0: the adapter's output is exactly zero
        target_modules=list(target_modules),
    )
    try:
        unet.add_adapter(config)
    except ValueError as err:  # PEFT: target modules not found
        raise InputError(f"lora.target_modules {list(target_modules)} do not match the UNet: {err}") from err
    params = lora_parameters(unet)
    for p in params:
        p.data = p.data.float()
    return params


@contextlib.contextmanager
def lora_dropout_off(module: torch.nn.Module) -> Iterator[None]:
    """Every submodule of ``module`` in eval mode inside, each one's own mode restored on exit.

    PEFT makes its LoRA wrappers in train mode inside a UNet that diffusers loaded in eval mode, so
    with ``lora.dropout > 0`` an image sampled outside the graded training calls (training samples,
    validation images) would be drawn with dropout: a different picture every call.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters, in a stable order (by name)."""
    return [p for n, p in sorted(unet.named_parameters()) if "lora_" in n and p.requires_grad]


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-format state dict of the adapter (names as PEFT writes them)."""
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict from :func:`lora_state_dict` back into the adapter (for resume)."""
    own = get_peft_model_state_dict(unet)
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise InputError(f"LoRA weights {key}: shape {tuple(value.shape)} does not fit the adapter's "
                             f"{tuple(own[key].shape)} (another lora.rank or model?)")
    missing = sorted(set(own) - set(state))
    if missing:
        raise InputError(f"LoRA weights lack {len(missing)} of the adapter's tensors, e.g. {missing[:2]} "
                         "(other lora.target_modules?)")
    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise InputError(f"LoRA checkpoint has keys the UNet's adapter lacks, e.g. {unexpected[:3]}")


def peft_state_dict_of_file(lora: str | Path) -> dict[str, torch.Tensor]:
    """A diffusers-format UNet LoRA file (or its directory) as the PEFT state dict
    :func:`load_lora_state_dict` takes (``unet.X.lora.down.weight`` -> ``X.lora_A.weight``).

    Raises:
        InputError: not a LoRA file, or keys that are not UNet LoRA down/up weights.
    """
    path = check_lora_file(lora)
    # diffusers renames only attention projections to lora.down/up; other modules keep lora_A/B
    suffixes = {".lora.down.weight": ".lora_A.weight", ".lora.up.weight": ".lora_B.weight",
                ".lora_A.weight": ".lora_A.weight", ".lora_B.weight": ".lora_B.weight"}
    out = {}
    for key, value in load_file(str(path)).items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if not key.startswith("unet.") or suffix is None:
            raise InputError(f"{path}: key {key!r} is not a UNet LoRA weight "
                             "(expected unet.<module>.lora.down/up.weight or .lora_A/B.weight)")
        out[key[len("unet."):-len(suffix)] + suffixes[suffix]] = value.float()
    return out


def save_lora_weights(
    unet: torch.nn.Module, pipeline_class: Any, out_dir: str | Path, schedule: dict[str, Any] | None = None
) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` as ``pipe.load_lora_weights`` reads it.

    ``schedule`` (a LoRA trained with ``lora.active_steps``): ``{"active_steps": L,
    "num_inference_steps": N, "timesteps": [...]}`` goes to ``out_dir/focusnfix_lora.json``, so that
    evaluation, ``focusnfix sample`` and :func:`focusnfix.inference.late_lora_callback` gate the
    adapter as training did. Written into a temporary directory beside ``out_dir`` and moved into
    place, so a crash never leaves a half-written LoRA.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    metadata = unet.peft_config["default"].to_dict()
    # UNet pipelines (SD, SDXL) take unet_lora_layers in diffusers' key format; transformer pipelines
    # (SD3, FLUX) take transformer_lora_layers as PEFT writes them (what diffusers' training scripts do)
    if "transformer_lora_layers" in inspect.signature(pipeline_class.save_lora_weights).parameters:
        kwargs = {"transformer_lora_layers": lora_state_dict(unet), "transformer_lora_adapter_metadata": metadata}
    else:
        kwargs = {"unet_lora_layers": convert_state_dict_to_diffusers(lora_state_dict(unet)),
                  "unet_lora_adapter_metadata": metadata}
    tmp = Path(tempfile.mkdtemp(prefix=partial_name(out_dir.name), dir=out_dir.parent))
    try:
        pipeline_class.save_lora_weights(tmp, safe_serialization=True, **kwargs)
        if schedule is not None:
            (tmp / LORA_SCHEDULE_NAME).write_text(json.dumps(schedule, indent=1) + "\n")
        sync_tree(tmp)  # the files reach the disk before the rename publishes them
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / LORA_WEIGHT_NAME


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``, replacing ``dst`` if it exists.

    Two renames: ``dst`` aside to ``.NAME.old-PID``, ``src`` in. A kill between them leaves only the
    old copy aside, which :func:`restore_replaced` (called here and by ``runs.finished``) puts back.
    """
    restore_replaced(dst)
    os.chmod(src, 0o755)  # mkdtemp's 0700 would stay on the final folder
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def restore_replaced(dst: Path) -> bool:
    """Put back the newest ``.NAME.old-*`` copy of ``dst`` where :func:`replace_dir` was cut short
    (``dst`` missing); returns whether it did. Copies left beside an existing ``dst`` are removed."""
    dst = Path(dst)
    olds = sorted(dst.parent.glob(f".{dst.name}.old-*"), key=lambda p: p.stat().st_mtime) if dst.parent.is_dir() else []
    if not olds:
        return False
    restored = False
    if not dst.exists():
        os.replace(olds.pop(), dst)
        restored = True
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    return restored


def _or_replaced_copy(path: Path) -> Path:
    """``path``, or where it is missing because :func:`replace_dir` was cut short between its two
    renames, the copy set aside then (read in place: a writer may be about to finish the swap)."""
    if path.exists() or not path.parent.is_dir():
        return path
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    return olds[-1] if olds else path


def check_lora_file(lora_dir: str | Path) -> Path:
    """Validate a LoRA directory or file (or a run directory holding ``lora/``); return the safetensors path.

    Raises:
        InputError: missing path, no ``pytorch_lora_weights.safetensors``, or a file that is
            not a readable safetensors file of LoRA weights.
    """
    path = _or_replaced_copy(Path(lora_dir))
    if path.is_dir() and not (path / LORA_WEIGHT_NAME).exists():
        inner = _or_replaced_copy(path / "lora")
        if (inner / LORA_WEIGHT_NAME).exists():
            path = inner  # a training run's directory
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise InputError(f"LoRA weights not found: {path} (expected a directory holding {LORA_WEIGHT_NAME})")
    if path.suffix != ".safetensors":
        raise InputError(f"LoRA weights must be a .safetensors file, got {path}")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises several error types on corrupt files
        raise InputError(f"LoRA weights {path} are not a readable safetensors file: {err}") from err
    if not any("lora" in k for k in state):
        raise InputError(f"{path} holds no LoRA weights (no key contains 'lora')")
    return path


def lora_identity(lora: str | Path) -> str:
    """What a LoRA (directory or file) applies, as 16 hex digits: a sha256 of its tensors (names,
    dtypes, shapes, values), its scale settings (``lora_alpha``, ``r`` and their per-module patterns)
    and its step schedule. Two trainings that end with the same weights get the same identity,
    though their files' bytes differ (PEFT's ``target_modules`` is a set and the safetensors header's
    metadata order varies from process to process)."""
    file = check_lora_file(lora)
    h = hashlib.sha256()
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata() or {}
        for key in sorted(f.keys()):  # noqa: SIM118 - safe_open has no iteration
            t = f.get_tensor(key).contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    try:
        adapter = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError:
        adapter = {"unreadable": metadata.get("lora_adapter_metadata")}
    scale_keys = ("lora_alpha", "r", "alpha_pattern", "rank_pattern", "use_rslora", "use_dora")
    scale = {k: v for k, v in adapter.items() if k.rsplit(".", 1)[-1] in scale_keys} if isinstance(adapter, dict) else adapter
    h.update(json.dumps({"scale": scale, "active_steps": lora_active_steps(file.parent)}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def lora_active_steps(lora: str | Path) -> int | None:
    """How many final sampling steps a LoRA (directory or file) acts on; None = every step.

    Read from ``focusnfix_lora.json`` beside the weights (written for ``lora.active_steps`` runs).

    Raises:
        InputError: the file exists but does not hold a positive integer ``active_steps``.
    """
    path = check_lora_file(lora).parent / LORA_SCHEDULE_NAME
    if not path.is_file():
        return None
    try:
        steps = json.loads(path.read_text())["active_steps"]
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: expected JSON with an integer 'active_steps' ({err})") from None
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"{path}: active_steps must be a positive integer, got {steps!r}")
    return steps


def _drop_failed_load_record(record: logging.LogRecord) -> bool:
    return "was unsuccessful with the following error" not in record.getMessage()


def load_lora_into(pipe: Any, lora: str | Path, adapter_name: str | None = None) -> Path:
    """Validate a LoRA (directory or file) and load it with ``pipe.load_lora_weights``.

    Returns:
        The safetensors file that was loaded.

    Raises:
        InputError: the file is missing or not LoRA safetensors (see :func:`check_lora_file`),
            or its layers do not fit the pipeline (a LoRA trained for another model).
    """
    path = check_lora_file(lora)
    kwargs = {"weight_name": path.name}
    if adapter_name is not None:
        kwargs["adapter_name"] = adapter_name
    before = _adapter_names(pipe)
    # diffusers logs a failed load's whole error (a line per mismatched layer) before raising it; the
    # error is re-raised below in one line, so its log record is dropped
    peft_log = logging.getLogger("diffusers.loaders.peft")
    peft_log.addFilter(_drop_failed_load_record)
    try:
        with warnings.catch_warnings():  # PEFT's key-mismatch warning: checked below, as an error
            warnings.filterwarnings("ignore", message=".*injecting the PEFT adapters", category=RuntimeWarning)
            pipe.load_lora_weights(str(path.parent), **kwargs)
    except (ValueError, KeyError, RuntimeError) as err:  # PEFT's NoMatchingPeftModuleError is a ValueError
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        more = f" (+{len(lines) - 2} more lines)" if len(lines) > 2 else ""
        raise InputError(f"LoRA {path} does not fit this {type(pipe).__name__}: {' '.join(lines[:2])[:400]}{more}") from None
    finally:
        peft_log.removeFilter(_drop_failed_load_record)
    # inference: PEFT adds its layers in train mode, which would apply a saved lora_dropout to every image
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    added = sorted(_adapter_names(pipe) - before)
    # PEFT only warns about file weights that name no layer of the model (and initialises layers the
    # file lacks at random), then loads the rest: the LoRA would act partly, silently
    in_file = sum(1 for k in load_file(str(path)) if k.endswith(_LORA_WEIGHT_SUFFIXES))
    loaded = sum(_loaded_lora_tensors(pipe, a) for a in added)
    if added and loaded != in_file:
        if hasattr(pipe, "delete_adapters"):
            pipe.delete_adapters(added)
        if loaded < in_file:
            why = (f"{in_file - loaded} of its {in_file} LoRA weights name layers the model lacks"
                   f"{_unmatched_example(pipe, path)} (a LoRA for another model, or renamed keys)")
        else:
            why = (f"it holds {in_file} LoRA weights for layers that need {loaded} (every LoRA layer needs its "
                   "down and up weight; the missing ones would start at random)")
        raise InputError(f"LoRA {path} does not fit this {type(pipe).__name__}: {why}")
    return path


#: key endings of LoRA down / up weights in diffusers', PEFT's and kohya's formats
_LORA_WEIGHT_SUFFIXES = (".lora.down.weight", ".lora.up.weight", ".lora_A.weight", ".lora_B.weight",
                         ".lora_down.weight", ".lora_up.weight")


def _lora_components(pipe: Any) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in getattr(pipe, "components", {}).items()
            if isinstance(m, torch.nn.Module) and getattr(m, "peft_config", None)}


def _adapter_names(pipe: Any) -> set[str]:
    return {a for m in _lora_components(pipe).values() for a in m.peft_config}


def _loaded_lora_tensors(pipe: Any, adapter: str) -> int:
    """How many LoRA A / B weights of ``adapter`` the pipeline's components hold."""
    n = 0
    for m in _lora_components(pipe).values():
        if adapter in m.peft_config:
            n += sum(1 for k in get_peft_model_state_dict(m, adapter_name=adapter)
                     if k.endswith((".lora_A.weight", ".lora_B.weight")))
    return n


def _unmatched_example(pipe: Any, path: Path) -> str:
    """``", e.g. unet.X"`` for a diffusers-format key whose layer the component lacks ('' if none is found)."""
    modules = {name: {n for n, _ in m.named_modules()} for name, m in getattr(pipe, "components", {}).items()
               if isinstance(m, torch.nn.Module)}
    for key in load_file(str(path)):
        prefix, _, rest = key.partition(".")
        suffix = next((s for s in _LORA_WEIGHT_SUFFIXES if rest.endswith(s)), None)
        if prefix in modules and suffix is not None and rest[: -len(suffix)] not in modules[prefix]:
            return f", e.g. {key}"
    return ""


__all__ = [
    "LORA_SCHEDULE_NAME",
    "LORA_WEIGHT_NAME",
    "add_lora",
    "check_lora_file",
    "load_lora_into",
    "load_lora_state_dict",
    "lora_active_steps",
    "lora_dropout_off",
    "lora_identity",
    "lora_parameters",
    "lora_state_dict",
    "replace_dir",
    "restore_replaced",
    "save_file",
    "save_lora_weights",
]
