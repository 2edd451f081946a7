"""Export a LoRA for other UIs: the kohya ("lora_unet_*") format ComfyUI and AUTOMATIC1111 read.

Our LoRA files are diffusers-format (``unet.<module>.lora.down.weight`` / ``.lora.up.weight`` for
attention projections, PEFT's ``.lora_A`` / ``.lora_B`` for other modules such as convolutions,
exactly as diffusers' converter writes them, with PEFT's adapter config, alpha included, in the safetensors metadata). The kohya format names
each module ``lora_unet_<module path, dots as underscores>`` and stores, per module,
``.lora_down.weight`` (= PEFT's lora_A), ``.lora_up.weight`` (= lora_B) and ``.alpha`` (a scalar):
the applied update is ``alpha / rank * up @ down``, the same scale PEFT applies (``lora_alpha / r``).
Writing the real alpha matters: a converter that writes ``alpha = rank`` (what a missing alpha
means) silently rescales every LoRA trained with ``alpha != rank``.

Module paths are diffusers' UNet names (``lora_unet_down_blocks_0_attentions_0_..._attn1_to_q``),
the naming kohya's sd-scripts uses for SD 1.x/2.x and that diffusers' kohya loader, ComfyUI and
AUTOMATIC1111 read; the round trip through diffusers' own loader is tested for SD and SDXL.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from focusnfix.errors import InputError, warn
from focusnfix.files import atomic_write
from focusnfix.lora import check_lora_file, lora_active_steps

_PREFIX = "unet."
# diffusers' converter renames attention projections only (to_q.lora_A -> to_q.lora.down); other
# modules (convolutions, feed-forward) keep PEFT's names, so one file can hold both
_SUFFIXES = {".lora.down.weight": "lora_down.weight", ".lora.up.weight": "lora_up.weight",
             ".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight"}


def _adapter_config(metadata: dict[str, str] | None) -> tuple[float | None, int | None, dict, dict]:
    """``(lora_alpha, r, alpha_pattern, rank_pattern)`` from a diffusers LoRA file's metadata."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None, None, {}, {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as err:
        raise InputError(f"the LoRA file's lora_adapter_metadata is not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise InputError("the LoRA file's lora_adapter_metadata must be a JSON object")
    get = lambda k: cfg.get(f"unet.{k}", cfg.get(k))  # noqa: E731 - written with or without the prefix
    return get("lora_alpha"), get("r"), get("alpha_pattern") or {}, get("rank_pattern") or {}


def _pattern_value(module: str, pattern: dict, default):
    """PEFT's per-module override: the value of the longest pattern key that ends the module path."""
    hits = [k for k in pattern if module == k or module.endswith("." + k)]
    return pattern[max(hits, key=len)] if hits else default


def kohya_state_dict(path: str | Path, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The kohya-format state dict of a diffusers-format LoRA file (or run / LoRA directory).

    Args:
        path: a ``pytorch_lora_weights.safetensors``, its directory or a run directory.
        alpha: the LoRA's alpha when the file carries no adapter metadata (else it is read there;
            a file with neither is refused, since guessing alpha = rank rescales the LoRA).

    Raises:
        InputError: not a LoRA file, text-encoder LoRA keys (not supported), or alpha unknown.
    """
    file = check_lora_file(path)
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    if state and all(k.startswith("lora_unet_") or k.startswith("lora_te") for k in state):
        raise InputError(f"{file} is already in kohya format (lora_unet_* keys); export reads a focusnfix or "
                         "diffusers LoRA (unet.* keys), e.g. a run directory's lora/pytorch_lora_weights.safetensors")
    lora_alpha, _, alpha_pattern, _ = _adapter_config(metadata)
    if lora_alpha is None:
        lora_alpha = alpha
    elif alpha is not None and float(alpha) != float(lora_alpha):
        warn(f"--alpha {alpha:g} ignored: {file} records its lora_alpha {lora_alpha:g} in its adapter metadata")
    if lora_alpha is None:
        raise InputError(f"{file} carries no adapter metadata with lora_alpha; give --alpha (the training lora.alpha)")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.startswith(_PREFIX):
            raise InputError(f"{file}: key {key!r} is not a UNet LoRA key; only UNet LoRAs can be exported")
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise InputError(f"{file}: key {key!r} is neither a lora.down/lora_A nor a lora.up/lora_B weight")
        module = key[len(_PREFIX) : -len(suffix)]
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{_SUFFIXES[suffix]}"] = tensor.contiguous()
        if _SUFFIXES[suffix] == "lora_down.weight":
            a = float(_pattern_value(module, alpha_pattern, lora_alpha))
            out[f"{name}.alpha"] = torch.tensor(a, dtype=torch.float32)
    return out


def export_kohya(path: str | Path, out: str | Path, alpha: float | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write the kohya-format file of a LoRA (atomically); returns its path.

    ``dtype`` (e.g. ``torch.float16``, what most shared LoRAs use) converts the weights, not alpha.
    """
    state = kohya_state_dict(path, alpha)
    if dtype is not None:
        state = {k: (v if k.endswith(".alpha") else v.to(dtype)) for k, v in state.items()}
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(f"--out must be a .safetensors file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(next(
        v.shape[0] for k, v in state.items() if k.endswith("lora_down.weight"))), "format": "pt",
        "focusnfix_source": str(check_lora_file(path).name)}
    steps = lora_active_steps(path)
    if steps is not None:  # kohya's loaders apply a LoRA on every step: keep the trained gating on record
        meta["focusnfix_active_steps"] = str(steps)
    atomic_write(out, lambda tmp: save_file(state, tmp, metadata=meta), suffix=".safetensors")
    return out


__all__ = ["export_kohya", "kohya_state_dict"]
