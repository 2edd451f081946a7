from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from tiny import save_tiny_sd  # noqa: E402

# Tiny models: one thread is fastest and does not fight other processes for the 2 cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny random-init Stable Diffusion pipeline saved in diffusers layout."""
    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


def base_config(model: str, out: str, **train) -> dict:
    """A small training config dict on the tiny pipeline with the brightness test aspect."""
    t = {"output_dir": out, "steps": 4, "batch_size": 2, "learning_rate": 5e-3, "checkpoint_every": 0,
         "weight_decay": 0.0, "device": "cpu"}
    t.update(train)
    return {
        "model": {"path": model},
        "lora": {"rank": 4},
        "sampling": {"num_inference_steps": 4, "guidance_scale": 3.0, "k": 2},
        "objective": {"beta": 1.0},
        "mask": {"threshold_mode": "absolute", "threshold": 0.5, "dilate_px": 0},
        "aspects": [{"type": "python", "args": {"target": "toy_aspects:brightness", "kwargs": {"region": "left"}}}],
        "data": {"prompts": ["a red circle", "a blue square"], "seeds_per_prompt": 2},
        "train": t,
    }


def train_until_crash(trainer, monkeypatch, crash_step: int) -> None:
    """Run ``trainer.train()`` with a simulated crash at 0-based step ``crash_step``."""
    real_step = trainer.train_step

    def crashing(step):
        if step == crash_step:
            raise RuntimeError("simulated crash")
        return real_step(step)

    monkeypatch.setattr(trainer, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train()
