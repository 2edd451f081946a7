"""Run state you can trust: content-keyed references, run-folder rules, fp16 loss scaling.

Each test here failed on the trainer before the reference cache was keyed by content (pool
index keys, path-only fingerprints), before run folders had a lock and --overwrite, and before
the fp16 update went through the loss scaler.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from focusnfix.config import config_from_dict
from focusnfix.errors import InputError
from focusnfix.rundir import RunLock
from focusnfix.train import FocusNFixTrainer, lora_vector

from conftest import base_config, train_until_crash
from tiny import save_tiny_sd


def _trainer(cfg: dict, **kw) -> FocusNFixTrainer:
    return FocusNFixTrainer(config_from_dict(cfg), progress=False, **kw)


def _log(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def workspace(tiny_sd_dir, tmp_path):
    """A private copy of the tiny model, a prompts file and a 1-step config over both."""
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    cfg = base_config(str(model), str(tmp_path / "run"), steps=1, checkpoint_every=1)
    cfg["data"] = {"prompts_file": str(prompts), "seeds_per_prompt": 2}
    return cfg, model, prompts


CHANGES = {
    "seed_offset": "data.seed_offset",
    "mask_dilation": "mask.dilate_px",
    "prompts_file": "data.prompts_sha256",
    "model_weights": "model.weights.unet",
}


def _apply(change: str, cfg: dict, model, prompts) -> None:
    if change == "seed_offset":
        cfg["data"]["seed_offset"] = 7
    elif change == "mask_dilation":  # a change the toy heatmap (0 or 1) shows: the mask grows
        cfg["mask"]["dilate_px"] = 2
    elif change == "prompts_file":
        prompts.write_text("a green circle\na big square\n")
    elif change == "model_weights":
        save_tiny_sd(model, seed=1)  # other weights, same path


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_reusing_a_run_folder_after_a_change_that_determines_the_reference(change, workspace, tmp_path, capsys):
    cfg, model, prompts = workspace
    _trainer(cfg).train()
    first = _log(tmp_path / "run")[0]
    assert first["constraint"] == 0.0
    _apply(change, cfg, model, prompts)

    # --resume with a checkpoint: refused, naming the changed field
    with pytest.raises(InputError, match=CHANGES[change].replace(".", r"\.")):
        _trainer(cfg).train(resume=True)
    # --overwrite: the first step is exactly what a fresh folder gives, zero constraint included
    capsys.readouterr()
    _trainer(cfg).train(overwrite=True)
    if change == "mask_dilation":
        assert "mask.dilate_px changed" in capsys.readouterr().err
    reused = _log(tmp_path / "run")
    assert len(reused) == 1 and reused[0]["constraint"] == 0.0
    fresh_cfg = json.loads(json.dumps(cfg))
    fresh_cfg["train"]["output_dir"] = str(tmp_path / "fresh")
    _trainer(fresh_cfg).train()
    fresh = _log(tmp_path / "fresh")
    for key in ("loss", "reward", "constraint", "mask_area", "outside_change"):
        assert reused[0][key] == fresh[0][key], key
    if change == "mask_dilation":  # the stale items (the old mask) were not read
        assert reused[0]["mask_area"] > first["mask_area"]


def test_a_used_folder_is_not_overwritten_silently(workspace, tmp_path):
    cfg, *_ = workspace
    _trainer(cfg).train()
    with pytest.raises(InputError, match="--overwrite"):
        _trainer(cfg).train()
    with pytest.raises(InputError, match="exclude each other"):
        _trainer(cfg).train(resume=True, overwrite=True)


def test_a_second_training_into_a_held_folder_is_refused_with_the_holders_pid(workspace, tmp_path):
    cfg, *_ = workspace
    holder = RunLock(tmp_path / "run")
    holder.acquire()
    try:
        with pytest.raises(InputError, match=f"in use by another training \\(PID {os.getpid()}\\)"):
            _trainer(cfg).train()
    finally:
        holder.release()
    _trainer(cfg).train()  # free again


def test_resume_before_the_first_checkpoint_restarts_the_log(tiny_sd_dir, tmp_path, monkeypatch):
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"), steps=3, checkpoint_every=0)
    crashed = _trainer(cfg)
    train_until_crash(crashed, monkeypatch, crash_step=2)
    assert [r["step"] for r in _log(tmp_path / "run")] == [1, 2]
    _trainer(cfg).train(resume=True)
    assert [r["step"] for r in _log(tmp_path / "run")] == [1, 2, 3]


def _overflow_at(trainer: FocusNFixTrainer, bad_step: int) -> None:
    """Make the loss of 0-based step ``bad_step`` infinite, as an fp16 overflow does."""
    real = trainer.loss_on

    def loss_on(step, micro):
        terms = real(step, micro)
        if step == bad_step:
            terms["loss"] = terms["loss"] * float("inf")
        return terms

    trainer.loss_on = loss_on


def test_fp16_overflow_is_skipped_through_the_scaler_and_resume_keeps_the_scale(tiny_sd_dir, tmp_path, monkeypatch):
    def make(name):
        cfg = base_config(str(tiny_sd_dir), str(tmp_path / name), steps=5, checkpoint_every=3, mixed_precision="fp16")
        # the test's Accelerator: accelerate makes no GradScaler on CPU, the trainer makes its own
        trainer = _trainer(cfg, accelerator=Accelerator(cpu=True))
        assert trainer.scaler.is_enabled()
        _overflow_at(trainer, bad_step=1)
        return trainer

    straight = make("straight")
    straight.train()
    log = _log(tmp_path / "straight")
    assert [r["skipped"] for r in log] == [False, True, False, False, False]
    scales = [r["loss_scale"] for r in log]
    assert scales[1] == scales[0] / 2 and scales[2:] == [scales[1]] * 3  # backed off once, then trained on
    assert torch.isfinite(lora_vector(straight.backbone.unet)).all()

    crashed = make("crashed")
    train_until_crash(crashed, monkeypatch, crash_step=4)
    resumed = make("crashed")
    resumed.train(resume=True)
    assert _log(tmp_path / "crashed")[-1]["loss_scale"] == scales[-1]  # the saved scale, not the initial one
    assert torch.equal(lora_vector(resumed.backbone.unet), lora_vector(straight.backbone.unet))


def test_a_lora_made_for_another_model_is_a_one_line_error(tiny_sd_dir, tmp_path):
    from focusnfix.backbones import load_backbone
    from focusnfix.lora import load_lora_into

    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"), steps=1)
    _trainer(cfg).train()
    toy = load_backbone("toy")  # the packaged toy pipeline: another UNet architecture
    with pytest.raises(InputError, match="does not fit this StableDiffusionPipeline"):
        load_lora_into(toy.pipe, tmp_path / "run" / "lora")


def test_long_prompts_are_reported_not_truncated_silently(tiny_sd_dir, tmp_path, capsys):
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"), steps=1)
    cfg["data"]["prompts"] = ["a red circle " * 500]
    _trainer(cfg)
    err = capsys.readouterr().err
    assert "exceed the text encoder's 12 tokens and are truncated" in err


@pytest.mark.parametrize("field", ["objective.beta", "train.learning_rate", "train.max_grad_norm"])
def test_infinite_numbers_are_refused_by_the_config(field, tiny_sd_dir, tmp_path):
    from focusnfix.errors import ConfigError

    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ".*finite"):
        config_from_dict(cfg, [f"{field}=.inf"])


def test_a_config_without_any_weighted_reward_is_refused(tiny_sd_dir, tmp_path):
    from focusnfix.errors import ConfigError

    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="every weight is 0"):  # it would train with loss 0, silently
        config_from_dict(cfg, ["aspects.0.weight=0"])


@pytest.mark.parametrize("override, expected", [
    ("train.steps=true", r"train\.steps: expected an integer, got a boolean"),  # pydantic read it as 1
    ("train.learning_rate=yes", r"train\.learning_rate: expected a number, got a boolean"),
    ("aspects.0.gate=true", r"aspects\.0\.gate: expected a number or 'auto' or 'off', got a boolean"),
    ("train.adam_betas=[true, 0.9]", r"train\.adam_betas: expected a list of numbers, got a boolean"),
    ("data.validation_seeds=[false]", r"data\.validation_seeds: expected a list of integers, got a boolean"),
    ("aspects.0.localize=1", r"aspects\.0\.localize: expected true or false"),  # read as true before
    ("data.cache_on_disk='no'", r"data\.cache_on_disk: expected true or false"),
])
def test_a_boolean_where_a_number_is_expected_is_refused(override, expected, tiny_sd_dir, tmp_path):
    from focusnfix.errors import ConfigError

    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=expected):
        config_from_dict(cfg, [override])
    assert config_from_dict(cfg, ["sampling.checkpoint_unet=true"]).sampling.checkpoint_unet is True
    # YAML 1.1 reads an unquoted `gate: off` as false, which pydantic turned into the gate 0.0 (every
    # image whose reward is >= 0 lost its mask); it is the documented "off"
    assert config_from_dict(cfg, ["aspects.0.gate=off"]).aspects[0].gate == "off"
    assert config_from_dict(cfg, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # an error before


def test_a_path_of_the_wrong_kind_and_an_out_of_range_seed_are_one_line_errors(tiny_sd_dir, tmp_path, capsys):
    from focusnfix.cli import main

    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    cfg = base_config(str(tiny_sd_dir), str(a_file))  # train.output_dir names a file
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "taken.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(tiny_sd_dir), "--prompt", "a", "--seed", str(2**64), "--out", "x.png"])
    assert "2**63" in capsys.readouterr().err


def test_a_prompts_file_that_is_not_utf8_is_a_one_line_error(tiny_sd_dir, tmp_path):
    from focusnfix.config import resolve_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes("a red circle\nune île\n".encode("latin-1"))
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"))
    cfg["data"] = {"prompts_file": str(path)}
    with pytest.raises(InputError, match="data.prompts_file: .* is not UTF-8 text"):
        resolve_prompts(config_from_dict(cfg).data)


def _png(path, array, mode=None):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.asarray(array), mode=mode).save(path)
    return path


def test_mask_files_read_16_bit_refuse_colour_and_wrong_sizes(tmp_path):
    import numpy as np

    from focusnfix.aspects.mask_files import MaskFileAspect

    images = torch.zeros(1, 3, 8, 8)
    half = np.zeros((8, 8), dtype=np.uint16)
    half[:, :4] = 65535
    heat = MaskFileAspect(_png(tmp_path / "m16.png", half)).heatmap(images, ["p"])
    assert heat[0, 0, :, :4].eq(1).all() and heat[0, 0, :, 4:].eq(0).all()  # not an all-ones mask

    colour = np.zeros((8, 8, 3), dtype=np.uint8)
    colour[..., 0] = 255
    with pytest.raises(InputError, match="colour"):
        MaskFileAspect(_png(tmp_path / "rgb.png", colour))

    small = _png(tmp_path / "small.png", np.full((4, 4), 255, dtype=np.uint8))
    with pytest.raises(InputError, match="4x4 but the images are 8x8.*resize: true"):
        MaskFileAspect(small).heatmap(images, ["p"])
    assert MaskFileAspect(small, resize=True).heatmap(images, ["p"]).shape == (1, 1, 8, 8)


def test_the_mask_gate_empties_the_mask_of_images_the_aspect_calls_clean(tiny_sd_dir, tmp_path):
    from focusnfix.backbones import load_backbone
    from focusnfix.config import MaskConfig
    from focusnfix.reference import compute_reference
    from focusnfix.sampling import SamplingOptions

    from toy_aspects import BrightnessAspect

    backbone = load_backbone(str(tiny_sd_dir))
    aspect = BrightnessAspect("left")
    opts = SamplingOptions(num_inference_steps=3, guidance_scale=3.0)
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    mask_cfg = MaskConfig(threshold_mode="absolute", threshold=0.5, dilate_px=0)
    ungated = compute_reference(backbone, [aspect], [True], prompts, seeds, opts, mask_cfg, ["off"])
    brightness = ungated.images.mean(dim=(1, 2, 3))
    cut = float(brightness.mean())  # one image above (clean), one below (defect)
    assert (brightness >= cut).tolist().count(True) == 1
    gated = compute_reference(backbone, [aspect], [True], prompts, seeds, opts, mask_cfg, [cut])
    clean = brightness >= cut
    assert gated.mask[clean].sum() == 0 and torch.equal(gated.mask[~clean], ungated.mask[~clean])
    assert torch.equal(gated.heatmap, ungated.heatmap)  # the picture keeps the heatmap
    aspect.reward_threshold = cut  # "auto" takes the aspect's own threshold
    auto = compute_reference(backbone, [aspect], [True], prompts, seeds, opts, mask_cfg)
    assert torch.equal(auto.mask, gated.mask)


def test_lora_active_steps_beyond_the_schedule_and_a_bad_schedule_file_are_one_line_errors(tiny_sd_dir, tmp_path):
    from focusnfix.errors import ConfigError
    from focusnfix.lora import LORA_SCHEDULE_NAME, lora_active_steps

    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"lora\.active_steps=9 exceeds sampling\.num_inference_steps=4"):
        config_from_dict(cfg, ["lora.active_steps=9"])
    with pytest.raises(ConfigError, match=r"lora\.active_steps"):
        config_from_dict(cfg, ["lora.active_steps=0"])
    trainer = _trainer(base_config(str(tiny_sd_dir), str(tmp_path / "run"), steps=1))
    lora_dir = trainer.train().lora_dir
    assert lora_active_steps(lora_dir) is None  # every step: no schedule file written
    (lora_dir / LORA_SCHEDULE_NAME).write_text('{"active_steps": "five"}')
    with pytest.raises(InputError, match="active_steps must be a positive integer"):
        lora_active_steps(lora_dir)
    (lora_dir / LORA_SCHEDULE_NAME).write_text("not json")
    with pytest.raises(InputError, match="expected JSON with an integer 'active_steps'"):
        lora_active_steps(lora_dir)


# ---------------------------------------------------------------------------------------------
# batches of runs (sweeps, the demo) and result folders after a kill
# ---------------------------------------------------------------------------------------------
def test_a_killed_run_of_a_batch_continues_from_its_checkpoint_to_the_uninterrupted_lora(
        tiny_sd_dir, tmp_path, monkeypatch):
    from focusnfix import runs

    straight = base_config(str(tiny_sd_dir), str(tmp_path / "straight"), steps=4, checkpoint_every=2)
    _trainer(straight).train()
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "killed"), steps=4, checkpoint_every=2)
    train_until_crash(_trainer(cfg), monkeypatch, crash_step=3)  # killed after the step-2 checkpoint
    monkeypatch.undo()
    steps_run = []
    real = FocusNFixTrainer.train_step
    monkeypatch.setattr(FocusNFixTrainer, "train_step", lambda self, step: steps_run.append(step) or real(self, step))
    runs.train_runs([config_from_dict(cfg)])
    assert steps_run == [2, 3]  # steps 3 and 4, not all four again
    assert [r["step"] for r in _log(tmp_path / "killed")] == [1, 2, 3, 4]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "killed" / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_to_more_steps_killed_midway_leaves_no_old_lora_beside_the_new_config(
        tiny_sd_dir, tmp_path, monkeypatch):
    from focusnfix import runs

    short = base_config(str(tiny_sd_dir), str(tmp_path / "run"), steps=2, checkpoint_every=2)
    _trainer(short).train()
    old_lora = (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    longer = {**short, "train": {**short["train"], "steps": 4}}
    resumed = _trainer(longer)
    real = resumed.train_step
    monkeypatch.setattr(resumed, "train_step", lambda step: real(step) if step < 3 else 1 / 0)
    with pytest.raises(ZeroDivisionError):  # resumed from step 2, killed in step 4
        resumed.train(resume=True)
    monkeypatch.undo()
    # the 2-step LoRA is kept, but not where a 4-step run's result is looked for
    assert not (tmp_path / "run" / "lora").exists()
    assert (tmp_path / "run" / "lora_superseded" / "pytorch_lora_weights.safetensors").read_bytes() == old_lora
    assert not runs.finished(config_from_dict(longer))
    runs.train_runs([config_from_dict(longer)])  # continues from its step-2 checkpoint to the end
    assert runs.finished(config_from_dict(longer))
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").read_bytes() != old_lora


def test_a_batch_refuses_a_finished_run_of_another_config_unless_told_to_replace_it(tiny_sd_dir, tmp_path, monkeypatch):
    from focusnfix import runs

    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"), steps=1)
    runs.train_runs([config_from_dict(cfg)])
    lora = tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"
    first = lora.stat().st_mtime_ns
    runs.train_runs([config_from_dict(cfg)])  # the same config: reused
    assert lora.stat().st_mtime_ns == first
    # the same folder spelled relative to another working directory is the same run, not another config
    relative = base_config(str(tiny_sd_dir), "run", steps=1)
    monkeypatch.chdir(tmp_path)
    assert runs.finished(config_from_dict(relative))
    runs.train_runs([config_from_dict(relative)], replace=True)
    assert lora.stat().st_mtime_ns == first
    other = base_config(str(tiny_sd_dir), str(tmp_path / "run"), steps=1, learning_rate=1e-2)
    with pytest.raises(InputError, match="finished run of another config"):
        runs.train_runs([config_from_dict(other)])
    runs.train_runs([config_from_dict(other)], replace=True)
    assert runs.finished(config_from_dict(other)) and not runs.finished(config_from_dict(cfg))


def test_a_lora_swap_cut_short_between_its_renames_is_put_back(tmp_path):
    from focusnfix.lora import replace_dir, restore_replaced

    dst, new = tmp_path / "lora", tmp_path / ".lora.new"
    dst.mkdir()
    (dst / "w").write_text("old")
    os.replace(dst, tmp_path / ".lora.old-123")  # killed after the first rename of replace_dir
    assert restore_replaced(dst) and (dst / "w").read_text() == "old"
    new.mkdir()
    (new / "w").write_text("new")
    replace_dir(new, dst)
    assert (dst / "w").read_text() == "new" and not list(tmp_path.glob(".lora.*"))
    assert oct(dst.stat().st_mode & 0o777) == "0o755"


def test_a_lora_cut_short_in_its_swap_is_still_read_by_eval_export_and_sample(tiny_sd_dir, tmp_path):
    from focusnfix.lora import check_lora_file

    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"), steps=1)
    _trainer(cfg).train()
    weights = (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    os.replace(tmp_path / "run" / "lora", tmp_path / "run" / ".lora.old-123")  # killed between the renames
    for given in (tmp_path / "run", tmp_path / "run" / "lora"):  # a run directory, its LoRA directory
        assert check_lora_file(given).read_bytes() == weights
    assert not (tmp_path / "run" / "lora").exists()  # read in place: a writer may be finishing the swap


def test_an_evaluation_folder_with_files_of_two_evaluations_is_refused(tmp_path):
    import numpy as np

    from focusnfix.evaluate import load_eval

    (tmp_path / "metrics.json").write_text(json.dumps({"eval_id": "a", "aspect": "x", "methods": {}}))
    (tmp_path / "per_image.json").write_text(json.dumps({"eval_id": "a", "items": []}))
    np.savez(tmp_path / "images.npz", base=np.zeros((1, 3, 2, 2), np.uint8), eval_id=np.array("a"))
    metrics, arrays, _ = load_eval(tmp_path)
    assert set(arrays) == {"base"}
    np.savez(tmp_path / "images.npz", base=np.zeros((1, 3, 2, 2), np.uint8), eval_id=np.array("b"))
    with pytest.raises(InputError, match="images.npz come from another evaluation"):
        load_eval(tmp_path)


def test_a_resume_removes_what_killed_writers_left_and_keeps_every_finished_file(tiny_sd_dir, tmp_path, monkeypatch):
    from focusnfix.files import atomic_write, partial_name

    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"), steps=2, checkpoint_every=1)
    trainer = _trainer(cfg)
    real = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda step: real(step) if step < 1 else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        trainer.train()
    monkeypatch.undo()
    run = tmp_path / "run"
    # what a kill -9 leaves: a checkpoint folder, a LoRA folder and a file caught mid-write
    half_ckpt = run / "checkpoints" / f"{partial_name('step_000002')}123"
    half_ckpt.mkdir()
    (half_ckpt / "optimizer.pt").write_bytes(b"\0" * 10)
    (run / f"{partial_name('lora')}abc").mkdir()
    (run / f"{partial_name('config.yaml')}xyz").write_text("half")
    (run / "checkpoints" / ".tmp_step_000002").mkdir()  # an earlier version's name
    (run / "reference_cache" / f"{partial_name('abc.safetensors')}q").write_bytes(b"\0")
    (run / ".notes").write_text("a user's file")
    finished = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert finished == ["step_000001"]
    _trainer(cfg).train(resume=True)
    left = sorted(p.name for p in run.rglob("*") if "partial" in p.name or "tmp_step" in p.name)
    assert left == []
    assert (run / ".notes").read_text() == "a user's file"
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # an atomic write's temporary file carries the mark that finds it
    seen = []
    atomic_write(run / "x.txt", lambda tmp: seen.append(Path(tmp).name) or Path(tmp).write_text("x"))
    assert seen[0].startswith(partial_name("x.txt"))
