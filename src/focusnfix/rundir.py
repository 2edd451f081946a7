"""A training run's folder: who holds it, whether it may be reused, what a resume must match.

Layout (``train.output_dir``)::

    .lock, .lock.owner          held while a training runs (the owner file names its PID)
    config.yaml                 resolved config
    log.jsonl                   one JSON line per step
    checkpoints/step_000050/    lora.safetensors, optimizer.pt, scheduler.pt, scaler.pt, rng.pt, state.json
    reference_cache/            Î0, latents, heatmap and mask per (prompt, seed), content-keyed
    samples/step_000050.png     mask overlay / reference / fine-tuned / |difference| rows
    lora/pytorch_lora_weights.safetensors   final LoRA (diffusers format)
    lora_superseded/            the final LoRA of the config a resume replaced (steps changed)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from focusnfix.config import Config, dump_config
from focusnfix.errors import InputError
from focusnfix.files import atomic_write_text, remove_partials
from focusnfix.reference import changed_fields

#: config fields that may change between a run and its resume
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "sample_every", "keep_checkpoints", "num_sample_images", "output_dir")
#: what a finished or started run leaves behind (the reference cache is content-keyed, so it may stay)
RUN_OUTPUTS = ("config.yaml", "log.jsonl", "checkpoints", "lora", "lora_superseded", "samples")


class RunLock:
    """An exclusive lock on a run folder, so two trainings never write into one folder at once."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.lock = FileLock(str(run_dir / ".lock"))
        self.owner = run_dir / ".lock.owner"

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            holder = self.owner.read_text().strip() if self.owner.is_file() else "unknown"
            raise InputError(
                f"{self.run_dir} is in use by another training (PID {holder}); wait for it to finish "
                "or choose another train.output_dir"
            ) from None
        self.owner.write_text(f"{os.getpid()}\n")

    def release(self) -> None:
        if self.lock.is_locked:
            self.owner.unlink(missing_ok=True)
            self.lock.release()


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Remove the half-written files and folders (checkpoints, LoRA, samples, logs, reference items)
    that a killed training left in its run folder; call it holding the folder's :class:`RunLock`,
    before any process of the run writes (the other processes of a multi-GPU run wait for the main
    one then)."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "lora", run_dir / "samples",
                   run_dir / "reference_cache"):
        removed += remove_partials(folder)
    # checkpoints of earlier versions were written as .tmp_step_N
    for old in sorted((run_dir / "checkpoints").glob(".tmp_step_*")) if (run_dir / "checkpoints").is_dir() else []:
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


def same_config(config: Config) -> bool:
    """Whether the run folder's config.yaml is ``config``'s (as training writes it), but for
    ``train.output_dir``: the folder is the run itself, however its path was spelled (relative or
    absolute, from another working directory), as a resume treats it."""
    path = Path(config.train.output_dir) / "config.yaml"
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    wanted = yaml.safe_load(dump_config(config))
    if not isinstance(stored, dict) or not isinstance(stored.get("train"), dict):
        return False
    stored["train"].pop("output_dir", None)
    wanted["train"].pop("output_dir", None)
    return stored == wanted


def set_aside_superseded_lora(config: Config) -> Path | None:
    """Before a resume writes a changed config.yaml (e.g. more ``train.steps``): move the folder's
    final LoRA, trained with the config being replaced, to ``lora_superseded/``. Left in ``lora/``,
    a kill before the resumed run writes its own would leave the old LoRA beside the new config,
    read by ``eval`` and by demo and sweep reruns as that config's finished result. Returns the
    new place, or None when there was nothing to move."""
    run_dir = Path(config.train.output_dir)
    lora = run_dir / "lora"
    if not lora.exists() or not (run_dir / "config.yaml").is_file() or same_config(config):
        return None
    aside = run_dir / "lora_superseded"
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(lora, aside)
    return aside


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Finished checkpoints (``state.json`` written last), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [d for d in root.glob("step_*") if (d / "state.json").is_file()]
    return sorted(done, key=lambda d: int(d.name.split("_")[1]))


def prepare(run_dir: Path, resume: bool | str, overwrite: bool) -> Path | None:
    """Check that the folder may be used this way and clear what ``overwrite`` replaces.

    Args:
        resume: False, True / ``"latest"`` (the folder's last checkpoint), or the path of one
            checkpoint directory (``RUN/checkpoints/step_000020``).

    Returns:
        The checkpoint to resume from, or None (start at step 0).

    Raises:
        InputError: the folder holds a run and neither ``resume`` nor ``overwrite`` was given, or
            the named checkpoint does not exist.
    """
    if isinstance(resume, str) and resume != "latest":
        ckpt = Path(resume)
        if not (ckpt / "state.json").is_file():
            raise InputError(f"--resume {resume}: not a checkpoint directory (expected {ckpt / 'state.json'})")
        if overwrite:
            raise InputError("--resume and --overwrite exclude each other: continue the run or replace it")
        return ckpt
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other: continue the run or replace it")
    used = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if used and not (resume or overwrite):
        raise InputError(
            f"{run_dir} already holds a run ({', '.join(used)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another train.output_dir"
        )
    if overwrite:
        for name in used:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if resume:
        ckpts = checkpoint_dirs(run_dir)
        return ckpts[-1] if ckpts else None
    return None


def truncate_log(log_path: Path, step: int) -> None:
    """Keep only the log lines of steps <= ``step`` (a resumed run rewrites the rest)."""
    if not log_path.is_file():
        return
    keep = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            if line.strip() and json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a line cut by a kill: nothing after it is trusted
    atomic_write_text(log_path, "".join(line + "\n" for line in keep))


def run_fields(config: Config, prompts: list[str], model: dict[str, str]) -> dict[str, Any]:
    """What a resume must match: the config (less the fields in :data:`RESUMABLE_CHANGES`),
    the prompts' content and the model's weights."""
    data = config.model_dump(mode="json")
    for key in RESUMABLE_CHANGES:
        data["train"].pop(key, None)
    data["data"]["prompts_sha256"] = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    data["model"]["weights"] = model
    return data


def check_resume(state: dict[str, Any], fields: dict[str, Any], checkpoint: Path) -> None:
    """Refuse a resume whose config, prompts or weights differ from the checkpoint's, naming the fields."""
    old = state.get("fields")
    if old is None:
        raise InputError(f"checkpoint {checkpoint} predates content fingerprints; start a new run with --overwrite")
    diff = changed_fields(old, fields)
    if diff:
        shown = ", ".join(diff[:6]) + (" ..." if len(diff) > 6 else "")
        raise InputError(
            f"cannot resume from {checkpoint}: {shown} changed since it was written; resume needs the same "
            f"config, prompts and model (only train.{', train.'.join(RESUMABLE_CHANGES)} may change), "
            "or start again with --overwrite"
        )
