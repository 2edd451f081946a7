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
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from focusnfix import rundir
from focusnfix.config import Config
from focusnfix.errors import InputError, warn
from focusnfix.lora import LORA_WEIGHT_NAME, restore_replaced


def _train_one(config: Config, threads: int | None, progress: bool) -> str:
    """Train one run: continue it from its last checkpoint where it has one of this config, else
    start it afresh (replacing whatever else the folder holds)."""
    import torch

    from focusnfix.train import FocusNFixTrainer

    if threads:
        torch.set_num_threads(threads)
    run = Path(config.train.output_dir)
    if rundir.same_config(config) and rundir.checkpoint_dirs(run):
        try:
            return str(FocusNFixTrainer(config, progress=progress).train(resume=True).lora_dir)
        except InputError as err:  # e.g. the prompts or the model's weights changed since the checkpoint
            warn(f"{run}: not resumed ({err}); training it again from step 0")
    return str(FocusNFixTrainer(config, progress=progress).train(overwrite=True).lora_dir)


def finished(config: Config) -> bool:
    """Whether the run of ``config`` has its final LoRA, trained from this same config."""
    restore_replaced(Path(config.train.output_dir) / "lora")  # a LoRA swap cut short by a kill
    return (Path(config.train.output_dir) / "lora" / LORA_WEIGHT_NAME).is_file() and rundir.same_config(config)


def _worker_init(parent: int) -> None:
    """In a spawned worker: the CLI's quiet library loading (no loading bars), and exit when the
    process that started it is gone (killed), instead of training on as an orphan that holds its
    run's lock."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def train_runs(configs: list[Config], jobs: int = 1, progress: bool = False, replace: bool = False) -> list[Path]:
    """Train every config whose LoRA does not exist yet; returns each run's ``lora`` directory.

    A run with checkpoints of the same config continues from the last one (a killed batch loses
    no finished step); a run folder that holds a finished run of *another* config is refused
    (``InputError``) unless ``replace``, which trains it again.

    Args:
        configs: one config per run (distinct ``train.output_dir``).
        jobs: runs trained at once; > 1 runs each in its own process with
            ``cpu_count // jobs`` torch threads (spawned, so CUDA and fork never mix).
        progress: progress bars (only with ``jobs == 1``; parallel runs print a line each).
        replace: retrain runs whose folder holds a finished run of another config.
    """
    dirs = [Path(c.train.output_dir) for c in configs]
    if len(set(dirs)) != len(dirs):
        raise ValueError("every run needs its own train.output_dir")
    todo = [c for c in configs if not finished(c)]
    for c in configs:
        if c not in todo:
            print(f"[runs] {c.train.output_dir}: finished with this config, not trained again", flush=True)
    other = [str(c.train.output_dir) for c in todo if (Path(c.train.output_dir) / "lora" / LORA_WEIGHT_NAME).is_file()]
    if other and not replace:
        raise InputError(f"{other[0]} holds a finished run of another config (its config.yaml differs); choose "
                         "another output directory or remove it" + (f" (and {len(other) - 1} more)" if len(other) > 1 else ""))
    if jobs <= 1 or len(todo) <= 1:
        for c in todo:
            _train_one(c, None, progress)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(os.getpid(),)) as pool:
            futures = [pool.submit(_train_one, c, threads, False) for c in todo]
            for c, f in zip(todo, futures, strict=True):
                f.result()  # re-raises a run's error here
                print(f"[runs] finished {c.train.output_dir}", flush=True)
    return [d / "lora" for d in dirs]


__all__ = ["finished", "train_runs"]
