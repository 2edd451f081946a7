"""Experiment tracking through accelerate, and mixed precision taken from accelerate's settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from focusnfix.config import config_from_dict
from focusnfix.errors import InputError
from focusnfix.train import FocusNFixTrainer

from conftest import base_config


def test_tensorboard_scalars_equal_the_log(tiny_sd_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"), steps=3, report_to="tensorboard", validation_every=2)
    cfg["data"]["validation_prompts"] = ["a green triangle"]
    cfg["data"]["validation_seeds"] = [5, 6]
    FocusNFixTrainer(config_from_dict(cfg), progress=False).train()
    for name in ("validation_step_000002.png", "validation_final.png"):  # base above current, 2 seeds
        assert (tmp_path / "run" / "samples" / name).is_file()
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    events = list((tmp_path / "run" / "trackers").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = set(acc.Tags()["scalars"])
    for key in ("loss", "reward", "constraint", "mask_area", "outside_change", "grad_norm", "lr"):
        assert key in tags, key
        logged = [(e.step, e.value) for e in acc.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-12)) for r in records], key
    assert {"samples", "validation"} <= set(acc.Tags()["images"])  # the sample and validation grids
    assert [e.step for e in acc.Images("validation")] == [2, 3]
    cfg["data"]["validation_prompts"] = ["a red circle"]  # a training prompt: refused
    with pytest.raises(InputError, match="never be trained on"):
        FocusNFixTrainer(config_from_dict(cfg), progress=False)


@pytest.mark.slow
def test_accelerate_launch_mixed_precision_sets_the_runs_precision(tiny_sd_dir, tmp_path):
    """`accelerate launch --mixed_precision bf16` changes the precision of a run whose config leaves it
    unset (a bf16 autocast run on the CPU); a config that sets it wins."""
    import os
    import subprocess
    import sys

    import yaml

    def launch(name: str, **train) -> dict:
        cfg = base_config(str(tiny_sd_dir), str(tmp_path / name), steps=1, **train)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                               "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "bf16", "-m",
                               "focusnfix.cli", "train", "--config", str(tmp_path / f"{name}.yaml")],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        manifest = json.loads((tmp_path / name / "reference_cache" / "manifest.json").read_text())
        return manifest["fields"]["precision"]

    assert launch("from_accelerate")["mixed_precision"] == "bf16"
    assert launch("from_config", mixed_precision="no")["mixed_precision"] == "no"


def test_prompts_from_a_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    from focusnfix.config import ConfigError, resolve_prompts

    ds = datasets.Dataset.from_dict({"text": ["a red circle", "a blue square", ""], "id": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "p.jsonl").write_text('{"text": "a green triangle"}\n{"text": "a grey star"}\n')

    def data(**kw):
        return config_from_dict({"aspects": [{"type": "python", "args": {"target": "x:y"}}],
                                 "data": {"prompts_column": "text", **kw}}).data

    assert resolve_prompts(data(prompts_dataset=str(tmp_path / "saved"))) == ["a red circle", "a blue square"]
    assert resolve_prompts(data(prompts_dataset=str(tmp_path / "p.jsonl"))) == ["a green triangle", "a grey star"]
    with pytest.raises(ConfigError, match="not a column"):
        resolve_prompts(config_from_dict({"aspects": [{"type": "python", "args": {"target": "x:y"}}],
                                          "data": {"prompts_dataset": str(tmp_path / "saved")}}).data)
    with pytest.raises(ConfigError, match="exactly one"):
        data(prompts_dataset=str(tmp_path / "saved"), prompts=["x"])


def test_8bit_adamw_is_refused_on_the_cpu_with_a_clear_error(tiny_sd_dir, tmp_path):
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"), optimizer="adamw_8bit")
    with pytest.raises(InputError, match="adamw_8bit needs a CUDA GPU"):
        FocusNFixTrainer(config_from_dict(cfg), progress=False)
