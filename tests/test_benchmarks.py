"""The GPU check runs where no GPU is: a broken script would waste a rare GPU session."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_on_tiny_pipelines(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--archs", "tiny,tiny_sdxl", "--device", "cpu",
         "--dtype", "float32", "--modes", "2c", "--train-steps", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for arch in ("tiny", "tiny_sdxl"):
        (mode,) = result["archs"][arch]["modes"]
        assert mode["k"] == 2 and mode["checkpoint"] and "error" not in mode
        assert mode["zero_lora_constraint"] == 0.0 and mode["losses_finite"] and mode["skipped"] == 0
        assert mode["prefill_items"] > 0 and mode["sampling_seconds"] > 0 and mode["steady_seconds_per_step"] > 0
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--archs", "sd99"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown" in bad.stderr
