"""The examples run as users run them (a subprocess, from the repository root)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _toy_built() -> bool:
    try:
        from focusnfix.toyworld import pipeline_path

        return pipeline_path().is_dir()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _toy_built(), reason="toy world weights are not packaged")
def test_custom_reward_example_trains_a_loadable_lora(tmp_path):
    from diffusers import StableDiffusionPipeline

    from focusnfix.toyworld import pipeline_path

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_reward.py"), "--out", str(out),
                           "--steps", "2", "--prompts", "4"], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and "reward/no_dark_spots" in records[0]
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_path()), safety_checker=None)
    pipe.load_lora_weights(str(out / "lora"))


@pytest.mark.skipif(not _toy_built(), reason="toy world weights are not packaged")
def test_user_masks_example_trains_on_masks_keyed_by_prompt_and_seed(tmp_path):
    import numpy as np
    from PIL import Image

    out = tmp_path / "um"
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "user_masks.py"), "--out", str(out),
                           "--steps", "2", "--prompts", "3", "--seeds", "2"], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = json.loads((out / "masks" / "index.json").read_text())
    assert len(index) == 3 and all(set(by_seed) == {"0", "1"} for by_seed in index.values())
    for by_seed in index.values():
        for name in by_seed.values():
            image = np.asarray(Image.open(out / "images" / name))
            mask = np.asarray(Image.open(out / "masks" / name))
            assert image.shape[:2] == mask.shape and set(np.unique(mask)) <= {0, 255}
    records = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and "reward/safety" in records[0]
    assert records[0]["constraint"] == 0.0  # step 0: the zero LoRA draws the reference
    # the same masks given as a painted folder train too
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "user_masks.py"), "--out", str(tmp_path / "again"),
                           "--steps", "1", "--prompts", "3", "--seeds", "2", "--masks", str(out / "masks")],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "again" / "images").exists()  # nothing sampled or painted
