"""Nothing a user sets is dropped silently: every option either acts or is refused with one line."""

import json
import shutil

import pytest
import torch
import yaml

from focusnfix.aspects.saliency import SaliencyAspect
from focusnfix.backbones import load_backbone
from focusnfix.cli import main
from focusnfix.config import ConfigError, config_from_dict, load_config
from focusnfix.errors import InputError
from focusnfix.evaluate import model_loader
from focusnfix.inference import lora_steps_for
from focusnfix.lora import LORA_SCHEDULE_NAME, add_lora, save_lora_weights
from focusnfix.sampling import SamplingOptions
from focusnfix.sweep import sweep

from conftest import base_config


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("focusnfix: error:"), err
    return err


def test_evaluation_loads_the_model_as_training_did(tiny_sd_dir, tmp_path):
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"))
    cfg["model"] |= {"dtype": "bfloat16", "variant": "fp16", "revision": "v1"}
    loader = model_loader(config_from_dict(cfg))
    assert loader.args == (str(tiny_sd_dir), "bfloat16", "fp16", "v1", "cpu")  # train.device cpu
    cfg["train"]["device"] = "auto"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert model_loader(config_from_dict(cfg), "elsewhere").args == ("elsewhere", "bfloat16", "fp16", "v1", expected)


def test_options_that_would_do_nothing_are_refused_in_the_config(tiny_sd_dir, tmp_path):
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"))
    gated = json.loads(json.dumps(cfg))
    gated["aspects"].append({"type": "python", "localize": False, "gate": 0.3,
                             "args": {"target": "toy_aspects:brightness"}})
    with pytest.raises(ConfigError, match="localize is false"):
        config_from_dict(gated)
    masks = json.loads(json.dumps(cfg))
    masks["aspects"].append({"type": "mask_files", "args": {"path": "masks"}})  # weight 1 by default
    with pytest.raises(ConfigError, match="mask_files aspect gives masks only"):
        config_from_dict(masks)
    masks["aspects"][-1]["weight"] = 0.0
    config_from_dict(masks)  # masks beside the reward: fine


def test_saliency_options_of_another_method_are_refused():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3))
    with pytest.raises(ValueError, match="Grad-CAM option"):
        SaliencyAspect("s", model, method="input_gradient", layer="0")
    with pytest.raises(ValueError, match="SmoothGrad options"):
        SaliencyAspect("s", model, method="gradcam", layer="0", smooth_samples=4)
    assert SaliencyAspect("s", model, method="smoothgrad").smooth_samples == 8  # the documented default


def test_commands_refuse_flags_they_would_ignore(tiny_sd_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "lora").mkdir(parents=True)
    assert main(["eval", "--lora", f"a={run}", "--set", "mask.dilate_px=5", "--out", str(tmp_path / "e")]) == 2
    assert "--set overrides the --config file" in _one_error_line(capsys)
    assert main(["report", str(tmp_path), "--markdown", "--out", str(tmp_path / "r.html")]) == 2
    assert "--markdown prints the table only; --out" in _one_error_line(capsys)
    cfg = tmp_path / "cfg.yaml"
    data = base_config(str(tiny_sd_dir), str(tmp_path / "o"))
    data["objective"]["reward_input"] = "composite"
    cfg.write_text(yaml.safe_dump(data))
    assert main(["oracle", "--config", str(cfg), "--betas", "1", "--out", str(tmp_path / "oracle")]) == 2
    assert "reward_input 'composite'" in _one_error_line(capsys)
    data["objective"]["reward_input"] = "image"
    data["aspects"][0]["weight"] = 2.0
    cfg.write_text(yaml.safe_dump(data))
    assert main(["oracle", "--config", str(cfg), "--betas", "1", "--out", str(tmp_path / "oracle")]) == 2
    assert "divide the betas by w" in _one_error_line(capsys)


def test_a_draft_override_that_changes_the_evaluation_setup_is_refused_before_training(tiny_sd_dir, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(str(tiny_sd_dir), str(tmp_path / "unused"))))
    with pytest.raises(InputError, match="mask.dilate_px"):
        sweep(cfg, [0.0, 1.0], tmp_path / "sweep", draft_overrides=["mask.dilate_px=2"])
    assert not (tmp_path / "sweep" / "beta_0").exists()  # nothing trained
    load_config(cfg, [])  # the config itself is fine


def test_a_late_lora_acts_on_the_same_timesteps_at_another_step_count(tiny_sd_dir, tmp_path):
    bb = load_backbone(str(tiny_sd_dir))
    add_lora(bb.unet, 4)
    save_lora_weights(bb.unet, type(bb.pipe), tmp_path / "every")
    late = tmp_path / "late"
    shutil.copytree(tmp_path / "every", late)
    four = [int(t) for t in bb.set_timesteps(4, torch.zeros(bb.latent_shape(1, *bb.default_size)))]
    (late / LORA_SCHEDULE_NAME).write_text(json.dumps({"active_steps": 2, "num_inference_steps": 4,
                                                       "timesteps": four[2:]}))
    eight = [int(t) for t in bb.set_timesteps(8, torch.zeros(bb.latent_shape(1, *bb.default_size)))]
    assert lora_steps_for(bb, late, SamplingOptions(num_inference_steps=4)) == 2
    assert lora_steps_for(bb, late, SamplingOptions(num_inference_steps=8)) == sum(t <= four[2] for t in eight) > 2
    assert lora_steps_for(bb, tmp_path / "every", SamplingOptions(num_inference_steps=8)) is None


def test_a_run_folder_is_read_whole_by_sample_and_eval_needs_prompts_for_a_real_model(tiny_sd_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(base_config(str(tiny_sd_dir), str(run))))
    bb = load_backbone(str(tiny_sd_dir))
    add_lora(bb.unet, 4)
    save_lora_weights(bb.unet, type(bb.pipe), run / "lora")
    # the run's folder (not its lora/): its config.yaml gives the model and sampling settings
    assert main(["sample", "--lora", str(run), "--prompt", "a red circle", "--out", str(tmp_path / "x.png")]) == 0
    assert f"sampling settings from {run / 'config.yaml'}" in capsys.readouterr().out
    # eval's default prompts are the toy world's captions: a real model's run must name its own
    assert main(["eval", "--lora", f"a={run}", "--out", str(tmp_path / "e")]) == 2
    assert "eval needs --prompts FILE" in _one_error_line(capsys)
