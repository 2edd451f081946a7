"""Two CPU processes through accelerate: LoRA gradients averaged, weights identical on ranks,
and one step's gradient equal to the single-process gradient on the same global batch."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from focusnfix.config import config_from_dict
from focusnfix.lora import lora_parameters
from focusnfix.train import FocusNFixTrainer

from conftest import base_config

WORKER = Path(__file__).parent / "mp_worker.py"


def _launch(tiny_sd_dir: Path, out: Path) -> None:
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate CLI not on PATH")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(WORKER.parent))
    # `--cpu --num_processes 2` would start ONE process; --multi_gpu with ACCELERATE_USE_CPU=1
    # starts two CPU processes with the gloo backend.
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(WORKER), str(tiny_sd_dir), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_match_one(tiny_sd_dir, tmp_path):
    out = tmp_path / "mp"
    out.mkdir()
    _launch(tiny_sd_dir, out)
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    assert json.loads((out / "rank0.json").read_text())["num_processes"] == 2
    assert torch.equal(ranks[0]["init"], ranks[1]["init"])
    assert torch.equal(ranks[0]["grad0"], ranks[1]["grad0"])  # averaged, so identical
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])
    assert not torch.equal(ranks[0]["final"], ranks[0]["init"])

    # single process, same global batch of 4
    cfg = config_from_dict(base_config(str(tiny_sd_dir), str(tmp_path / "single"), steps=3, batch_size=4))
    single = FocusNFixTrainer(cfg, progress=False)
    terms = single.loss_on(step=0, micro=0)
    terms["loss"].backward()
    grad = torch.cat([p.grad.reshape(-1) for p in lora_parameters(single.backbone.unet)])
    torch.testing.assert_close(ranks[0]["init"], torch.cat([p.detach().reshape(-1) for p in lora_parameters(single.backbone.unet)]))
    assert grad.abs().sum() > 0
    torch.testing.assert_close(ranks[0]["grad0"], grad, rtol=1e-4, atol=1e-7)
