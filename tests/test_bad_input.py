"""Bad input gets one clear line naming what is wrong and what was expected, before any long work."""

import json
import os

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from focusnfix.aspects.registry import build_aspect
from focusnfix.backbones import load_backbone
from focusnfix.cli import main
from focusnfix.config import load_config
from focusnfix.errors import InputError
from focusnfix.files import read_json, read_npz
from focusnfix.lora import add_lora, load_lora_into, save_lora_weights
from focusnfix.rating import apply_votes
from focusnfix.train import FocusNFixTrainer

from conftest import base_config


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("focusnfix: error:"), err
    return err


# ---------------------------------------------------------------------------------------------
# files users hand in
# ---------------------------------------------------------------------------------------------
def test_the_json_and_npz_readers_name_the_file_and_the_fault(tmp_path):
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xe9"}')
    (tmp_path / "random.npz").write_bytes(os.urandom(256))
    np.save(tmp_path / "one.npy", np.zeros(3))
    np.savez(tmp_path / "good.npz", images=np.ones((2, 3), dtype=np.uint8))
    cases = [(lambda: read_json(tmp_path / "list.json", "metrics"), "must hold an object"),
             (lambda: read_json(tmp_path / "bad.json", "metrics"), "not valid JSON"),
             (lambda: read_json(tmp_path / "latin1.json", "metrics"), "not UTF-8"),
             (lambda: read_json(tmp_path, "metrics"), "is a directory"),
             (lambda: read_json(tmp_path / "none.json", "metrics"), "does not exist"),
             (lambda: read_npz(tmp_path / "random.npz", "images"), "not an npz archive"),
             (lambda: read_npz(tmp_path / "one.npy", "images"), "holds one array")]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()
    assert read_json(tmp_path / "list.json", "votes", expect=(dict, list)) == []
    np.testing.assert_array_equal(read_npz(tmp_path / "good.npz", "images")["images"], np.ones((2, 3)))


def _eval_dir(tmp_path, metrics) -> str:
    d = tmp_path / "eval"
    d.mkdir(exist_ok=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    return str(d)


def test_result_commands_refuse_corrupt_side_files_with_one_line(tmp_path, capsys):
    d = _eval_dir(tmp_path, [])
    assert main(["report", d]) == 2
    assert "must hold an object" in _one_error_line(capsys)
    assert main(["report", d, "--markdown"]) == 2
    _one_error_line(capsys)
    d = _eval_dir(tmp_path, {})
    assert main(["diagnose", d]) == 2
    assert "'aspect'" in _one_error_line(capsys)
    assert main(["report", d]) == 2  # it wrote an empty report
    assert "lacks 'aspect' and 'methods': not the metrics.json of a focusnfix evaluation" in _one_error_line(capsys)
    d = _eval_dir(tmp_path, {"aspect": "safety", "methods": {"base": {}}})
    (tmp_path / "notes.txt").write_text("not a log\n")
    assert main(["report", d, "--train-log", f"run={tmp_path / 'notes.txt'}"]) == 2  # its plots were left out
    assert "holds no step records" in _one_error_line(capsys)
    (tmp_path / "sweep.json").write_text("{")
    assert main(["select", str(tmp_path / "sweep.json"), "--out", str(tmp_path / "sel")]) == 2
    assert "not valid JSON" in _one_error_line(capsys)
    (tmp_path / "sweep.json").write_text(json.dumps({"points": "x"}))
    assert main(["select", str(tmp_path / "sweep.json"), "--out", str(tmp_path / "sel")]) == 2
    assert "'points' list" in _one_error_line(capsys)


def test_votes_must_name_an_evaluated_image_and_aspect(tmp_path):
    d = _eval_dir(tmp_path, {"aspect": "safety", "aspects": ["safety", "plausibility"], "n_images": 4,
                             "methods": {"base": {}, "focusnfix": {}}, "settings": {"n_bootstrap": 10}})

    def votes(**vote):
        path = tmp_path / "votes.json"
        path.write_text(json.dumps({"rater": "r", "votes": [{"example": 0, "method": "focusnfix", "aspect": "safety",
                                                               "vote": "improved"} | vote]}))
        return [path]

    assert apply_votes(d, votes())["methods"]["focusnfix"]["human"]["n_ratings"] == 1
    for bad, message in ((dict(example=4), "holds 4 images"), (dict(example="x"), "image index"),
                         (dict(example=None), "image index"), (dict(example=-1), "image index"),
                         (dict(aspect="bogus"), "names aspect 'bogus'")):
        with pytest.raises(InputError, match=message):
            apply_votes(d, votes(**bad))


def test_votes_of_another_evaluation_are_refused(tmp_path):
    d = _eval_dir(tmp_path, {"aspect": "safety", "aspects": ["safety"], "n_images": 4, "eval_id": "e1",
                             "prompts": ["a cat", "a dog"], "seeds": [0, 1],
                             "methods": {"base": {}, "focusnfix": {}}, "settings": {"n_bootstrap": 10}})

    def votes(doc=None, **vote):
        path = tmp_path / f"votes{len(list(tmp_path.glob('votes*')))}.json"
        one = {"example": 3, "prompt": "a dog", "seed": 1, "method": "focusnfix", "aspect": "safety",
               "vote": "improved"} | vote
        path.write_text(json.dumps({"format": "focusnfix-votes/2", "target": "safety", "eval_id": "e1",
                                    "rater": "r", "votes": [one]} | (doc or {})))
        return [path]

    assert apply_votes(d, votes())["methods"]["focusnfix"]["human"]["n_ratings"] == 1
    assert apply_votes(d, votes(seed="1"))["methods"]["focusnfix"]["human"]["n_ratings"] == 1  # a huge seed's form
    for bad, message in (
        (votes(prompt="a cat"), "example 3 of .* is prompt 'a dog', seed 1: votes of another evaluation"),
        (votes(seed=0), "as prompt 'a dog', seed 0, but example 3"),
        (votes({"eval_id": "e0"}), "page of evaluation e0, but .* now holds evaluation e1"),
        (votes({"target": "plausibility"}), "rates target 'plausibility'; .* evaluated target 'safety'"),
        (votes({"format": "focusnfix-votes/9"}), "format 'focusnfix-votes/9' is not one this version reads"),
        (votes(seed=1.9), "seed 1.9, but example 3"),  # int() truncated it to 1
        (votes(seed=True), "seed True, but example 3"),
        (votes(seed=float("inf")), "seed inf, but example 3"),  # an OverflowError traceback before
        (votes(example="\u00b2"), "image index"),  # a digit to str.isdigit, a traceback in int()
        (votes(method="base"), "cannot be voted on"),  # silently dropped before
    ):
        with pytest.raises(InputError, match=message):
            apply_votes(d, bad)
    # two unnamed raters' files of the same name (every page downloads votes.json) stay two raters
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder, vote in (("a", "improved"), ("b", "worse")):
        (tmp_path / folder / "votes.json").write_text(json.dumps({"votes": [
            {"example": 3, "method": "focusnfix", "aspect": "safety", "vote": vote}]}))
    human = apply_votes(d, [tmp_path / "a" / "votes.json", tmp_path / "b" / "votes.json"])["methods"]["focusnfix"]["human"]
    assert human["n_ratings"] == 2 and human["n_raters"] == 2 and human["improved_share"]["mean"] == 0.5


def test_sweep_overrides_that_would_be_ignored_are_refused_before_training(tiny_sd_dir, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(str(tiny_sd_dir), str(tmp_path / "run"))))
    out = tmp_path / "sweep"
    for extra, message in ((["--betas", "0.5", "--draft-set", "sampling.k=1"], "has no beta 0"),
                           (["--betas", "0,1", "--set", "train.output_dir=elsewhere"], "sets each run's objective.beta"),
                           (["--betas", "0,1", "--draft-set", "objective.beta=2"], "cannot be overridden")):
        assert main(["sweep", "--config", str(cfg), "--out", str(out), *extra]) == 2
        assert message in _one_error_line(capsys)
    assert not any(out.glob("beta_*"))  # nothing trained


# ---------------------------------------------------------------------------------------------
# flags: refused by the parser, before anything loads
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["eval", "--lora", "a=x", "--max-prompts", "-1", "--out", "o"],
    ["eval", "--lora", "a=x", "--steps", "0", "--out", "o"],
    ["eval", "--lora", "a=x", "--batch-size", "0", "--out", "o"],
    ["sweep", "--config", "c.yaml", "--betas", "0", "--seeds", "0", "--out", "o"],
    ["oracle", "--config", "c.yaml", "--lr", "-1", "--out", "o"],
    ["sample", "--prompt", "a", "--device", "gpu", "--out", "o.png"],
    ["toyworld", "build", "--out", "o", "--device", "gpux"],
    ["toyworld", "build", "--out", "o", "--device", "cuda:99"],  # a device this machine lacks
    ["mask", "--config", "c.yaml", "--prompt", "a", "--scale", "0", "--out", "o.png"],
    ["diagnose", "d", "--min-psnr", "nan"],
    ["toyworld", "stats", "--n", "0"],
])
def test_out_of_range_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "argument" in capsys.readouterr().err


def test_oracle_betas_and_picture_names_are_checked_first(tiny_sd_dir, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(str(tiny_sd_dir), str(tmp_path / "run"))))
    assert main(["oracle", "--config", str(cfg), "--betas", "-1", "--out", str(tmp_path / "o")]) == 2
    assert "finite numbers >= 0" in _one_error_line(capsys)
    assert main(["sample", "--model", str(tiny_sd_dir), "--prompt", "a", "--out", str(tmp_path / "x.jpg")]) == 2
    assert "must end in .png" in _one_error_line(capsys)
    assert main(["eval", "--lora", f"a={tmp_path / 'nope'}", "--out", str(tmp_path / "e")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert "is a folder; expected a YAML file" in _one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# LoRA files that only partly fit
# ---------------------------------------------------------------------------------------------
def test_a_lora_that_fits_only_partly_is_refused_and_left_unloaded(tiny_sd_dir, tmp_path):
    bb = load_backbone(str(tiny_sd_dir))
    add_lora(bb.unet, 4)
    save_lora_weights(bb.unet, type(bb.pipe), tmp_path / "good")
    state = load_file(str(tmp_path / "good" / "pytorch_lora_weights.safetensors"))
    (tmp_path / "renamed").mkdir()
    save_file({k.replace(".to_q.", ".to_zz."): v for k, v in state.items()},
              str(tmp_path / "renamed" / "pytorch_lora_weights.safetensors"))
    (tmp_path / "up_only").mkdir()
    save_file({k: v for k, v in state.items() if not (".to_q." in k and "down" in k)},
              str(tmp_path / "up_only" / "pytorch_lora_weights.safetensors"))
    fresh = load_backbone(str(tiny_sd_dir))
    with pytest.raises(InputError, match=r"name layers the model lacks, e\.g\. unet\..*to_zz"):
        load_lora_into(fresh.pipe, tmp_path / "renamed", adapter_name="x")
    with pytest.raises(InputError, match="needs its down and up weight"):
        load_lora_into(fresh.pipe, tmp_path / "up_only", adapter_name="y")
    assert not getattr(fresh.unet, "peft_config", None)  # nothing half-loaded stays behind
    load_lora_into(fresh.pipe, tmp_path / "good", adapter_name="z")
    assert list(fresh.unet.peft_config) == ["z"]


def test_a_lora_of_the_wrong_shape_is_one_error_without_a_log_line_per_layer(tiny_sd_dir, tmp_path, capsys):
    import logging

    bb = load_backbone(str(tiny_sd_dir))
    add_lora(bb.unet, 4)
    save_lora_weights(bb.unet, type(bb.pipe), tmp_path / "good")
    state = load_file(str(tmp_path / "good" / "pytorch_lora_weights.safetensors"))
    (tmp_path / "wide").mkdir()
    save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if "up" in k else v for k, v in state.items()},
              str(tmp_path / "wide" / "pytorch_lora_weights.safetensors"))
    records: list[logging.LogRecord] = []
    seen = logging.Handler()
    seen.emit = records.append  # what diffusers' own handler would print (a line per mismatched layer)
    logging.getLogger("diffusers.loaders.peft").addHandler(seen)
    try:
        assert main(["sample", "--model", str(tiny_sd_dir), "--lora", str(tmp_path / "wide"), "--prompt", "a",
                     "--steps", "2", "--out", str(tmp_path / "s.png")]) == 2
    finally:
        logging.getLogger("diffusers.loaders.peft").removeHandler(seen)
    assert not records, [r.getMessage()[:80] for r in records]
    err = capsys.readouterr().err
    assert "does not fit this StableDiffusionPipeline: Error(s) in loading state_dict" in _one_error_line_of(err)


def _one_error_line_of(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("focusnfix: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# config fields whose fault shows only when used
# ---------------------------------------------------------------------------------------------
def test_aspect_targets_that_are_not_importable_factories(tmp_path):
    for target, message in ((":f", "must look like"), (".rel:f", "must look like"), ("os:sep", "expected a class")):
        with pytest.raises(InputError, match=message):
            build_aspect("python", {"target": target})


def test_a_saliency_reward_whose_forward_cannot_take_prompts_is_named_when_built():
    with pytest.raises(InputError, match=r"called as model\(images, prompts\).*forward\(images"):
        build_aspect("saliency", {"target": "toy_aspects:ImagesOnlyReward"})


def test_picture_paths_and_sizes_are_checked(tmp_path, capsys):
    from focusnfix.images import grid

    for bad, message in ((str(tmp_path), "is a folder; expected a PNG file"), ("g.jpg", "must end in .png")):
        assert main(["toyworld", "stats", "--n", "4", "--grid", bad]) == 2  # before the 192 samples
        assert message in _one_error_line(capsys)
    with pytest.raises(InputError, match="would be 13500000 px, above 16384: use a scale of at most 121"):
        grid([torch.zeros(1, 3, 131, 131)], scale=100_000)  # a 494 TiB array before


def test_a_mask_picture_too_large_is_refused_before_sampling(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    from focusnfix import commands

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(str(tiny_sd_dir), str(tmp_path / "run"))))
    monkeypatch.setattr(commands, "compute_reference", lambda *a, **k: pytest.fail("sampled before the check"))
    assert main(["mask", "--config", str(cfg), "--prompt", "a", "--scale", "1000", "--out", str(tmp_path / "m.png")]) == 2
    assert "use a scale of at most" in _one_error_line(capsys)


def test_relative_prompt_files_are_read_beside_the_config_by_every_command(tiny_sd_dir, tmp_path, monkeypatch):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "prompts.txt").write_text("a red circle\n")
    data = base_config(str(tiny_sd_dir), str(tmp_path / "run"))
    data["data"] = {"prompts_file": "prompts.txt", "seeds_per_prompt": 1}
    (tmp_path / "cfgs" / "c.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    config = load_config("cfgs/c.yaml")
    assert config.data.prompts_file == str((tmp_path / "cfgs" / "prompts.txt").resolve())


def test_image_sizes_that_the_vae_cannot_take_name_the_fields(tiny_sd_dir):
    bb = load_backbone(str(tiny_sd_dir))
    with pytest.raises(InputError, match=r"sampling\.height x sampling\.width"):
        bb.latent_shape(1, 63, 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_a_cuda_run_without_a_gpu_is_refused_not_moved_to_cpu(tiny_sd_dir, tmp_path):
    from focusnfix.config import config_from_dict

    with pytest.raises(InputError, match="train.device is cuda"):
        FocusNFixTrainer(config_from_dict(base_config(str(tiny_sd_dir), str(tmp_path / "run"), device="cuda")))
    with pytest.raises(InputError, match="no CUDA GPU"):
        load_backbone(str(tiny_sd_dir), device="cuda")


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_tracker_that_is_not_installed_is_refused_before_training(tiny_sd_dir, tmp_path):
    from focusnfix.config import config_from_dict

    with pytest.raises(InputError, match=r"pip install 'focusnfix\[wandb\]'"):
        FocusNFixTrainer(config_from_dict(base_config(str(tiny_sd_dir), str(tmp_path / "run"), report_to="wandb")))
