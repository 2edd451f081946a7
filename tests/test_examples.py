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
