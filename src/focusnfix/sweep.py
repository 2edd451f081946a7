"""The beta sweep: one LoRA per constraint weight, trained and then evaluated together.

The only part of evaluation that trains; :mod:`focusnfix.evaluate` itself never imports the trainer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from focusnfix.config import load_config, resolve_prompts
from focusnfix.errors import InputError
from focusnfix.evaluate import aspects_from_config, evaluate
from focusnfix.files import atomic_write_text
from focusnfix.lora import LORA_WEIGHT_NAME
from focusnfix.metrics import json_clean
from focusnfix.reference import sampling_options
from focusnfix.train import FocusNFixTrainer


def sweep(
    config_path: str | Path,
    betas: list[float],
    out_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    prompts: list[str] | None = None,
    seeds: list[int] | None = None,
    batch_size: int = 8,
    n_bootstrap: int = 1000,
    progress: bool = False,
) -> dict[str, Any]:
    """Train one LoRA per beta (``out_dir/beta_<b>/``, beta = 0 is DRaFT) and evaluate them all.

    Each run is the config with ``objective.beta=b`` and ``train.output_dir=out_dir/beta_<b>``
    (plus ``overrides``). All LoRAs are evaluated together against one base in
    ``out_dir/eval/`` (methods ``beta_<b>``), on ``prompts`` (default: the config's training
    prompts) x ``seeds`` (default: 10000, 10001, i.e. noise never used in training).
    A finished run (its ``lora/`` exists) is not retrained; an unfinished one is trained again from
    step 0.

    Writes ``out_dir/sweep.json``: ``{"aspect", "eval_dir", "points": [{"beta", "method",
    "run_dir", "lora_dir", "target_gain": S, "target_reward": S, "outside_psnr": S,
    "outside_ssim": S, "improved_share": S, "degraded_share": S, "others_degraded_share": S}]}``
    with S as in metrics.json; ``target_gain`` = mean per-image target reward change vs base.
    """
    if not betas:
        raise InputError("--betas must list at least one beta")
    if any(not math.isfinite(b) or b < 0 for b in betas):
        raise InputError(f"--betas must be finite and >= 0, got {betas}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[float, Path] = {}
    config = None
    for b in tqdm(betas, desc="sweep runs", unit="run", disable=not progress):
        run_dir = out_dir / f"beta_{b:g}"
        config = load_config(config_path, [*overrides, f"objective.beta={b}", f"train.output_dir={run_dir}"])
        if not (run_dir / "lora" / LORA_WEIGHT_NAME).is_file():  # unfinished runs start again
            FocusNFixTrainer(config, progress=progress).train(overwrite=True)
        runs[b] = run_dir
    assert config is not None
    aspects, target, judges = aspects_from_config(config)
    eval_prompts = prompts or resolve_prompts(config.data, Path(config_path).parent)
    eval_seeds = seeds if seeds is not None else [10000, 10001]
    methods = {f"beta_{b:g}": runs[b] / "lora" for b in betas}
    metrics = evaluate(
        config.model.path, methods, aspects, target, judges, eval_prompts, eval_seeds, sampling_options(config),
        config.mask, out_dir / "eval", batch_size=batch_size, n_bootstrap=n_bootstrap, progress=progress,
    )
    keys = ("target_gain", "target_reward", "outside_psnr", "outside_ssim", "improved_share", "degraded_share",
            "others_degraded_share")
    points = []
    for b in betas:
        name = f"beta_{b:g}"
        entry = metrics["methods"][name]
        points.append({"beta": b, "method": name, "draft": b == 0, "run_dir": str(runs[b]),
                       "lora_dir": str(runs[b] / "lora"), **{k: entry.get(k) for k in keys}})
    doc = {"aspect": target, "eval_dir": str(out_dir / "eval"), "config": str(config_path), "points": points}
    atomic_write_text(out_dir / "sweep.json", json.dumps(json_clean(doc), indent=2))
    return doc


__all__ = ["sweep"]
