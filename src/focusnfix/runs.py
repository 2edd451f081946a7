"""Train several runs (training seeds, betas) one after another or side by side.

Small models train faster as several one-thread processes than as one process with several
threads (on a 2-core CPU, two one-thread runs finish in about the time of one two-thread run).
:func:`train_runs` does that with ``jobs > 1``; every run is an ordinary training run with its
own output directory, so a killed batch of runs loses no finished LoRA, and runs whose LoRA
exists are not trained again.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from focusnfix.config import Config
from focusnfix.lora import LORA_WEIGHT_NAME


def _train_one(config: Config, threads: int | None, progress: bool) -> str:
    import torch

    from focusnfix.train import FocusNFixTrainer

    if threads:
        torch.set_num_threads(threads)
    return str(FocusNFixTrainer(config, progress=progress).train(overwrite=True).lora_dir)


def finished(config: Config) -> bool:
    """Whether the run of ``config`` has its final LoRA."""
    return (Path(config.train.output_dir) / "lora" / LORA_WEIGHT_NAME).is_file()


def train_runs(configs: list[Config], jobs: int = 1, progress: bool = False) -> list[Path]:
    """Train every config whose LoRA does not exist yet; returns each run's ``lora`` directory.

    Args:
        configs: one config per run (distinct ``train.output_dir``).
        jobs: runs trained at once; > 1 runs each in its own process with
            ``cpu_count // jobs`` torch threads (spawned, so CUDA and fork never mix).
        progress: progress bars (only with ``jobs == 1``; parallel runs print a line each).
    """
    dirs = [Path(c.train.output_dir) for c in configs]
    if len(set(dirs)) != len(dirs):
        raise ValueError("every run needs its own train.output_dir")
    todo = [c for c in configs if not finished(c)]
    if jobs <= 1 or len(todo) <= 1:
        for c in todo:
            _train_one(c, None, progress)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_train_one, c, threads, False) for c in todo]
            for c, f in zip(todo, futures, strict=True):
                f.result()  # re-raises a run's error here
                print(f"[runs] finished {c.train.output_dir}", flush=True)
    return [d / "lora" for d in dirs]


__all__ = ["finished", "train_runs"]
