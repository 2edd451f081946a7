"""CLI: exit codes and one-line errors for bad input, sample/mask outputs, dry run."""

import argparse
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from PIL import Image

from focusnfix import commands
from focusnfix.backbones import load_backbone
from focusnfix.cli import COMMANDS, build_parser, default_threads, main
from focusnfix.lora import add_lora, save_lora_weights

from conftest import base_config


def _toy_built() -> bool:
    try:
        from focusnfix.toyworld import pipeline_path

        return pipeline_path().is_dir()
    except FileNotFoundError:
        return False


def write_config(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda c: c["train"].update(learning_rate=-1), "train.learning_rate"),
        (lambda c: c["train"].update(lr=1e-4), "train.lr"),
        (lambda c: c["sampling"].update(k=10), "sampling"),
        (lambda c: c["mask"].update(threshold_mode="bogus"), "mask.threshold_mode"),
        (lambda c: c.pop("aspects"), "aspects"),
        (lambda c: c["data"].update(prompts=[]), "data"),
    ],
)
def test_bad_config_exits_2_naming_the_field(tiny_sd_dir, tmp_path, capsys, mutate, field):
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"))
    mutate(cfg)
    code = main(["train", "--config", str(write_config(tmp_path, cfg))])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and field in err, err


def test_bad_override_and_missing_files(tiny_sd_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, base_config(str(tiny_sd_dir), str(tmp_path / "run")))
    assert main(["train", "--config", str(cfg), "--set", "train.steps=zero"]) == 2
    assert "train.steps" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("model: [unclosed")
    assert main(["train", "--config", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_missing_model_path_is_named(tmp_path, capsys):
    cfg = write_config(tmp_path, base_config(str(tmp_path / "no-such-model"), str(tmp_path / "run")))
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "does not exist" in err
    assert main(["sample", "--model", str(tmp_path / "missing"), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    assert "missing" in capsys.readouterr().err


def test_dry_run_prints_the_plan_without_loading(tiny_sd_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, base_config(str(tiny_sd_dir), str(tmp_path / "run")))
    assert main(["train", "--config", str(cfg), "--dry-run", "--set", "objective.beta=0"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["method"].startswith("DRaFT") and plan["pool"] == {"prompts": 2, "seeds_per_prompt": 2}
    assert not (tmp_path / "run").exists()
    # an aspect arg its factory does not take is found now, not after the model is loaded
    assert main(["train", "--config", str(cfg), "--dry-run", "--set", "aspects.0.args.targte=x"]) == 2
    assert "aspects[0] (python): bad args ['kwargs', 'target', 'targte']" in capsys.readouterr().err


def test_train_then_sample_matches_diffusers_with_the_lora(tiny_sd_dir, tmp_path, capsys):
    # a large learning rate, so that two steps change the image by more than the comparison's tolerance
    cfg = write_config(tmp_path, base_config(str(tiny_sd_dir), str(tmp_path / "run"), steps=2, learning_rate=0.1))
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    lora = tmp_path / "run" / "lora"
    out = tmp_path / "s.png"
    args = ["sample", "--model", str(tiny_sd_dir), "--lora", str(lora), "--prompt", "a red circle",
            "--seed", "11", "--steps", "4", "--guidance", "3", "--out", str(out)]
    assert main(args) == 0
    ours = np.asarray(Image.open(out)).astype(int)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)
    pipe.load_lora_weights(str(lora))
    theirs = pipe("a red circle", num_inference_steps=4, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(11), output_type="np").images[0]
    theirs = (theirs * 255 + 0.5).astype(int)
    assert ours.shape == theirs.shape == (32, 32, 3)
    assert np.abs(ours - theirs).max() <= 1
    capsys.readouterr()

    # without --steps/--guidance, sample takes them from the run's config.yaml (run/lora -> run/config.yaml)
    inferred = tmp_path / "inferred.png"
    assert main(["sample", "--lora", str(lora), "--prompt", "a red circle", "--seed", "11", "--out", str(inferred)]) == 0
    assert str(tmp_path / "run" / "config.yaml") in capsys.readouterr().out
    assert np.array_equal(np.asarray(Image.open(inferred)), np.asarray(Image.open(out)))
    # explicit flags override the run's settings
    two = tmp_path / "two.png"
    assert main(["sample", "--config", str(tmp_path / "run" / "config.yaml"), "--lora", str(lora), "--prompt",
                 "a red circle", "--seed", "11", "--steps", "2", "--out", str(two)]) == 0
    theirs2 = pipe("a red circle", num_inference_steps=2, guidance_scale=3.0,
                   generator=torch.Generator().manual_seed(11), output_type="np").images[0]
    assert np.abs(np.asarray(Image.open(two)).astype(int) - (theirs2 * 255 + 0.5).astype(int)).max() <= 1
    pipe.unload_lora_weights()
    base = pipe("a red circle", num_inference_steps=4, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(11), output_type="np").images[0]
    assert np.abs(ours - (base * 255 + 0.5).astype(int)).max() > 2  # the two trained steps changed the image


def test_sample_gates_a_late_lora_as_trained_and_matches_diffusers_with_the_callback(tiny_sd_dir, tmp_path):
    """A LoRA that acts on the last 2 of 4 steps: `focusnfix sample` draws what diffusers draws with
    late_lora_callback (4 steps, as trained, and 8 steps, gated by timestep), not the ungated image."""
    from focusnfix.backbones import load_backbone
    from focusnfix.inference import late_lora_callback
    from focusnfix.lora import add_lora, save_lora_weights

    bb = load_backbone(str(tiny_sd_dir))
    g = torch.Generator().manual_seed(0)
    for p in add_lora(bb.unet, 4):
        p.data = torch.randn(p.shape, generator=g) * 0.3
    bb.scheduler.set_timesteps(4)
    trained = [int(t) for t in bb.scheduler.timesteps][2:]
    lora = save_lora_weights(bb.unet, type(bb.pipe), tmp_path / "lora",
                             {"active_steps": 2, "num_inference_steps": 4, "timesteps": trained}).parent
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)
    pipe.load_lora_weights(str(lora))
    for steps in (4, 8):
        out = tmp_path / f"s{steps}.png"
        assert main(["sample", "--model", str(tiny_sd_dir), "--lora", str(lora), "--prompt", "a red circle",
                     "--seed", "11", "--steps", str(steps), "--guidance", "3", "--out", str(out)]) == 0
        ours = np.asarray(Image.open(out)).astype(int)
        callback = late_lora_callback(pipe, lora, num_inference_steps=steps)
        theirs = pipe("a red circle", num_inference_steps=steps, guidance_scale=3.0, callback_on_step_end=callback,
                      generator=torch.Generator().manual_seed(11), output_type="np").images[0]
        assert np.abs(ours - (theirs * 255 + 0.5).astype(int)).max() <= 1
        pipe.enable_lora()  # the callback leaves it off between calls
        ungated = pipe("a red circle", num_inference_steps=steps, guidance_scale=3.0,
                       generator=torch.Generator().manual_seed(11), output_type="np").images[0]
        assert np.abs(ours - (ungated * 255 + 0.5).astype(int)).max() > 2


def test_sample_without_a_run_config_says_which_defaults_it_used(tiny_sd_dir, tmp_path, capsys):
    assert main(["sample", "--model", str(tiny_sd_dir), "--prompt", "a", "--steps", "2", "--out",
                 str(tmp_path / "x.png")]) == 0
    out = capsys.readouterr().out
    assert "--guidance 7.5" in out and "--steps" not in out.split("wrote")[0]


@pytest.mark.parametrize(
    "flags, named",
    [(["--steps", "0"], "--steps"), (["--height", "30"], "--height"), (["--width", "-8"], "--width"),
     (["--height", "0"], "--height")],
)
def test_sample_validates_steps_and_size(tiny_sd_dir, tmp_path, capsys, flags, named):
    code = main(["sample", "--model", str(tiny_sd_dir), "--prompt", "a", *flags, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("focusnfix: error: ") and named in err, err
    assert not (tmp_path / "x.png").exists()


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "focusnfix.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.skipif(not _toy_built(), reason="toy world weights are not packaged")
def test_errors_are_one_line_without_loading_bars(tmp_path):
    res = _cli("sample", "--model", "toy", "--lora", "/nonexistent", "--prompt", "a", "--out", str(tmp_path / "x.png"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    # an error after the model was loaded: no "Loading pipeline components" bar before it either
    res = _cli("sample", "--model", "toy", "--height", "30", "--prompt", "a", "--out", str(tmp_path / "x.png"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--height" in res.stderr


def test_eval_prints_a_summary_table_not_json(tiny_sd_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, base_config(str(tiny_sd_dir), str(tmp_path / "run")))
    bb = load_backbone(str(tiny_sd_dir))
    add_lora(bb.unet, 4)
    save_lora_weights(bb.unet, type(bb.pipe), tmp_path / "zero")
    (tmp_path / "p.txt").write_text("a red circle\n")
    out = tmp_path / "ev"
    assert main(["eval", "--config", str(cfg), "--lora", f"zero={tmp_path / 'zero'}", "--prompts",
                 str(tmp_path / "p.txt"), "--seeds", "1", "--bootstrap", "20", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].split()[0] == "method" and [ln.split()[0] for ln in lines[1:3]] == ["base", "zero"]
    assert str(out / "metrics.json") in lines[-1] and len(lines) == 4
    assert '"methods"' not in captured.out
    assert "scoring" in captured.err and "sampling zero" in captured.err  # progress bars (stderr)
    assert main(["eval", "--config", str(cfg), "--prompts", str(tmp_path / "p.txt"), "--seeds", "1", "--bootstrap",
                 "20", "--no-progress", "--out", str(out)]) == 0
    assert "scoring" not in capsys.readouterr().err


def test_train_passes_resume_and_overwrite(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    calls = []

    class FakeTrainer:
        accelerator = SimpleNamespace(is_main_process=True)

        def __init__(self, config, progress):
            pass

        def train(self, **kwargs):
            calls.append(kwargs)
            return SimpleNamespace(lora_dir="L", steps_done=0, log_path="log")

    monkeypatch.setattr(commands, "FocusNFixTrainer", FakeTrainer)
    cfg = write_config(tmp_path, base_config(str(tiny_sd_dir), str(tmp_path / "run")))
    assert main(["train", "--config", str(cfg), "--overwrite"]) == 0
    assert main(["train", "--config", str(cfg), "--resume"]) == 0
    assert main(["train", "--config", str(cfg), "--resume", "runs/x/checkpoints/step_000004"]) == 0
    assert calls == [{"resume": False, "overwrite": True}, {"resume": "latest", "overwrite": False},
                     {"resume": "runs/x/checkpoints/step_000004", "overwrite": False}]


def test_threads_default_to_the_idle_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 1.0, 1.0))
    assert default_threads(None) == 5
    monkeypatch.setattr(os, "getloadavg", lambda: (11.0, 1.0, 1.0))
    assert default_threads(None) == 1
    assert default_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert default_threads(None) is None


def test_threads_flag_applies_to_the_command_only(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(commands, "cmd_votes", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    assert main(["--threads", "3", "votes", "d", "--votes", "v.json"]) == 0
    assert seen == [3] and torch.get_num_threads() == before
    with pytest.raises(SystemExit):
        main(["--threads", "0", "votes", "d", "--votes", "v.json"])
    assert "--threads" in capsys.readouterr().err


def test_one_parser_lists_every_command():
    parser = build_parser()
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert tuple(choices) == COMMANDS
    assert parser.parse_args(["toyworld", "build", "--out", "x", "--threads", "2"]).recipe_threads == 2
    assert parser.parse_args(["rahf", "eval", "--tfrecords", "t", "--images", "i", "--model", "m"]).batch_size == 8


def test_sample_rejects_bad_lora_and_prompt(tiny_sd_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    base = ["sample", "--model", str(tiny_sd_dir), "--out", str(tmp_path / "o.png")]
    assert main([*base, "--prompt", "a", "--lora", str(bad)]) == 2
    assert "not a readable safetensors" in capsys.readouterr().err
    assert main([*base, "--prompt", "a", "--lora", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([*base, "--prompt", "  "]) == 2


def test_mask_command_writes_the_picture(tiny_sd_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, base_config(str(tiny_sd_dir), str(tmp_path / "run")))
    out = tmp_path / "mask.png"
    assert main(["mask", "--config", str(cfg), "--prompt", "a red circle", "--seed", "1", "--scale", "1",
                 "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mask_area"] == 0.5
    img = np.asarray(Image.open(out))
    assert img.shape == (32 + 4, 4 * 34 + 2, 3)  # Î0 | heatmap | mask | overlay


@pytest.mark.skipif(not _toy_built(), reason="toy world weights are not packaged")
def test_sample_rejects_a_lora_of_another_model(tiny_sd_dir, tmp_path, capsys):
    bb = load_backbone(str(tiny_sd_dir))
    add_lora(bb.unet, 4)
    save_lora_weights(bb.unet, type(bb.pipe), tmp_path / "tiny_lora")
    capsys.readouterr()
    assert main(["sample", "--model", "toy", "--lora", str(tmp_path / "tiny_lora"), "--prompt", "a", "--steps", "1",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit this StableDiffusionPipeline" in err, err
