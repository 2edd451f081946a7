"""Kohya-format export: diffusers' own kohya loader reads it and draws what our LoRA draws."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from focusnfix.backbones import load_backbone
from focusnfix.errors import InputError
from focusnfix.export import export_kohya, kohya_state_dict
from focusnfix.lora import add_lora, lora_parameters, save_lora_weights

PROMPT = "a red circle"


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
ATTENTION_AND_CONV = (*ATTENTION, "conv1", "conv2")  # the toy presets' targets: 3x3 kernels too


def _random_lora(unet: torch.nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = ATTENTION) -> None:
    add_lora(unet, rank, alpha, target_modules=targets)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _images(pipe, lora_file, **kwargs) -> torch.Tensor:
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="x")
    out = pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
               output_type="pt", **kwargs).images
    pipe.delete_adapters(["x"])
    return out


@pytest.mark.parametrize("rank,alpha,targets", [(4, 4.0, ATTENTION), (4, 16.0, ATTENTION), (4, 8.0, ATTENTION_AND_CONV)])
def test_kohya_export_reproduces_the_lora_through_diffusers_loader_sd(tiny_sd_dir, tmp_path, rank, alpha, targets):
    bb = load_backbone(str(tiny_sd_dir))
    _random_lora(bb.unet, rank, alpha, targets)
    ours = save_lora_weights(bb.unet, type(bb.pipe), tmp_path / "lora")
    kohya = export_kohya(tmp_path / "lora", tmp_path / "kohya.safetensors")
    state = load_file(str(kohya))
    assert all(k.startswith("lora_unet_") for k in state)
    alphas = {float(v) for k, v in state.items() if k.endswith(".alpha")}
    assert alphas == {alpha}  # the real alpha, not the rank
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    a, b = _images(pipe, ours), _images(pipe, kohya)
    base = pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                output_type="pt").images
    assert (a - base).abs().max() > 1e-3  # the LoRA does something
    assert (a - b).abs().max() <= 1e-5


def test_kohya_export_reproduces_the_lora_through_diffusers_loader_sdxl(tmp_path):
    from test_sdxl import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(tmp_path / "sdxl")
    pipe.save_pretrained(tmp_path / "sdxl_dir")
    bb = load_backbone(str(tmp_path / "sdxl_dir"))
    _random_lora(bb.unet, 4, 8.0)
    ours = save_lora_weights(bb.unet, type(bb.pipe), tmp_path / "lora")
    kohya = export_kohya(tmp_path / "lora", tmp_path / "kohya.safetensors")
    fresh = type(bb.pipe).from_pretrained(str(tmp_path / "sdxl_dir"))
    fresh.set_progress_bar_config(disable=True)
    a, b = _images(fresh, ours, height=32, width=32), _images(fresh, kohya, height=32, width=32)
    base = fresh(PROMPT, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                 output_type="pt", height=32, width=32).images
    assert (a - base).abs().max() > 1e-3  # both files were loaded (an unmatched key set would only warn)
    assert (a - b).abs().max() <= 1e-5


def test_export_refuses_unknown_alpha_and_non_lora_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"unet.down_blocks.0.attn.to_q.lora.down.weight": torch.zeros(2, 4),
               "unet.down_blocks.0.attn.to_q.lora.up.weight": torch.zeros(4, 2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(InputError, match="alpha"):
        kohya_state_dict(tmp_path / "bare.safetensors")
    state = kohya_state_dict(tmp_path / "bare.safetensors", alpha=2.0)
    assert float(state["lora_unet_down_blocks_0_attn_to_q.alpha"]) == 2.0
    save_file({"text_encoder.x.lora.down.weight": torch.zeros(2, 4)}, str(tmp_path / "te.safetensors"))
    with pytest.raises(InputError, match="UNet"):
        kohya_state_dict(tmp_path / "te.safetensors", alpha=1.0)


def test_cli_export(tiny_sd_dir, tmp_path, capsys):
    from focusnfix.cli import main

    bb = load_backbone(str(tiny_sd_dir))
    _random_lora(bb.unet, 4, 2.0)
    save_lora_weights(bb.unet, type(bb.pipe), tmp_path / "run" / "lora")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "k.safetensors"), "--fp16"]) == 0
    state = load_file(str(tmp_path / "k.safetensors"))
    assert all(v.dtype == torch.float16 for k, v in state.items() if not k.endswith(".alpha"))
    assert all(float(v) == 2.0 for k, v in state.items() if k.endswith(".alpha"))
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "LoRA weights not found" in capsys.readouterr().err
    lora = tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"
    before = lora.read_bytes()
    assert main(["export", str(tmp_path / "run"), "--out", str(lora)]) == 2  # never over its own input
    assert "is the LoRA being exported" in capsys.readouterr().err and lora.read_bytes() == before
    assert main(["export", str(tmp_path / "k.safetensors"), "--out", str(tmp_path / "k2.safetensors")]) == 2
    assert "is already in kohya format" in capsys.readouterr().err  # not "give --alpha"


def test_push_dry_run_writes_the_card_lora_samples_and_metrics(tiny_sd_dir, tmp_path, capsys):
    import json

    import yaml

    from focusnfix.cli import main

    from conftest import base_config

    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    cfg = base_config(str(tiny_sd_dir), str(run))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    bb = load_backbone(str(tiny_sd_dir))
    _random_lora(bb.unet, 4, 4.0)
    save_lora_weights(bb.unet, type(bb.pipe), run / "lora")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(run / "samples" / "final.png")
    ev = tmp_path / "ev"
    ev.mkdir()
    stat = {"mean": 0.5, "ci95": [0.4, 0.6]}
    from focusnfix.lora import lora_identity

    evaluated = {"base": [None], "focusnfix": [lora_identity(run / "lora")]}
    metrics = {"aspect": "bright", "n_images": 4, "settings": {"lora_identity": evaluated}, "methods": {
        "base": {"target_reward": stat}, "focusnfix": {"removal_share": stat, "outside_psnr": stat}}}
    out = tmp_path / "upload"
    # an evaluation of other LoRA files, or one that does not say which, puts no numbers on this card
    for settings, message in (({"lora_identity": {"focusnfix": ["0123456789abcdef"]}}, "did not evaluate this run's LoRA"),
                              ({}, "does not record which LoRAs it evaluated")):
        (ev / "metrics.json").write_text(json.dumps(metrics | {"settings": settings}))
        assert main(["push", str(run), "--repo-id", "me/fnf-lora", "--eval", str(ev), "--dry-run", str(out)]) == 2
        assert message in capsys.readouterr().err
    (ev / "metrics.json").write_text(json.dumps(metrics))
    assert main(["push", str(run), "--repo-id", "me/fnf-lora", "--eval", str(ev), "--dry-run", str(out)]) == 0
    assert "names no base_model" in capsys.readouterr().out  # the run's model is a local folder
    assert {p.name for p in out.iterdir()} == {"README.md", "pytorch_lora_weights.safetensors", "samples.png",
                                              "metrics_summary.json"}
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers") and "base_model" not in card.split("---")[1]
    assert "Focus-N-Fix" in card and "beta (regional constraint) | 1" in card and "K = 2" in card
    assert "| **focusnfix** (this LoRA) | 0.5 [0.4, 0.6]" in card and 'pipe.load_lora_weights("me/fnf-lora")' in card
    assert main(["push", str(run), "--repo-id", "me/fnf-lora", "--base-model", "sd-legacy/stable-diffusion-v1-5",
                 "--dry-run", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: sd-legacy/stable-diffusion-v1-5\nlibrary_name: diffusers")
    assert main(["push", str(run), "--repo-id", "no-slash", "--dry-run", str(out)]) == 2
    assert main(["push", str(run), "--repo-id", "me/fnf-lora", "--dry-run"]) == 0  # a flag, as train's is
    assert (run / "hub_upload" / "README.md").is_file()
    # written again without --eval (the --base-model push above), the folder keeps no summary of the
    # earlier evaluation, which an upload would have carried beside the new card
    assert not (out / "metrics_summary.json").exists() and "## Evaluation" not in (out / "README.md").read_text()
    assert main(["push", str(run), "--repo-id", "me/fnf-lora", "--dry-run", str(run / "lora")]) == 2
    assert "is the run or its LoRA folder" in capsys.readouterr().err


def test_a_saved_conv_lora_reads_back_into_the_adapter_exactly(tiny_sd_dir, tmp_path):
    """lora.init_from reads our own files, whose conv keys keep PEFT's lora_A/B names."""
    from focusnfix.lora import load_lora_state_dict, lora_state_dict, peft_state_dict_of_file

    bb = load_backbone(str(tiny_sd_dir))
    _random_lora(bb.unet, 4, 8.0, ATTENTION_AND_CONV)
    file = save_lora_weights(bb.unet, type(bb.pipe), tmp_path / "lora")
    keys = set(load_file(str(file)))
    assert any(k.endswith(".lora.down.weight") for k in keys) and any(".conv1.lora_A" in k for k in keys)
    fresh = load_backbone(str(tiny_sd_dir))
    add_lora(fresh.unet, 4, 8.0, target_modules=ATTENTION_AND_CONV)
    load_lora_state_dict(fresh.unet, peft_state_dict_of_file(file))
    want, got = lora_state_dict(bb.unet), lora_state_dict(fresh.unet)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_late_lora_keeps_its_schedule_in_the_upload_card_and_kohya_metadata(tiny_sd_dir, tmp_path, capsys):
    import json

    import yaml
    from safetensors import safe_open

    from focusnfix.cli import main
    from focusnfix.lora import LORA_SCHEDULE_NAME

    from conftest import base_config

    run = tmp_path / "run"
    cfg = base_config(str(tiny_sd_dir), str(run))
    cfg["lora"]["active_steps"] = 2
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    bb = load_backbone(str(tiny_sd_dir))
    _random_lora(bb.unet, 4, 2.0)
    save_lora_weights(bb.unet, type(bb.pipe), run / "lora", {"active_steps": 2, "num_inference_steps": 4})
    out = tmp_path / "upload"
    assert main(["push", str(run), "--repo-id", "me/late", "--dry-run", str(out)]) == 0
    assert json.loads((out / LORA_SCHEDULE_NAME).read_text())["active_steps"] == 2
    card = (out / "README.md").read_text()
    assert "last 2 of 4 sampling steps" in card and "late_lora_callback" in card
    # the card's snippet runs as written: the callback gets a local folder, the sampling is the run's
    assert 'late_lora_callback(pipe, snapshot_download("me/late"), num_inference_steps=4)' in card
    assert "num_inference_steps=4, guidance_scale=3, callback_on_step_end=callback" in card
    assert main(["export", str(run), "--out", str(tmp_path / "k.safetensors")]) == 0
    assert "act on the last 2 sampling steps only" in capsys.readouterr().err
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert f.metadata()["focusnfix_active_steps"] == "2"


def test_lora_identity_is_what_the_lora_applies_not_the_files_bytes(tiny_sd_dir, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from focusnfix.lora import LORA_SCHEDULE_NAME, lora_identity

    bb = load_backbone(str(tiny_sd_dir))
    _random_lora(bb.unet, 4, 4.0)
    file = save_lora_weights(bb.unet, type(bb.pipe), tmp_path / "a")
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    state = load_file(str(file))
    # the same tensors and settings in a file of other bytes (reordered metadata and keys): the same identity
    (tmp_path / "b").mkdir()
    save_file(dict(reversed(list(state.items()))), str(tmp_path / "b" / file.name), metadata=dict(reversed(list(meta.items()))))
    assert lora_identity(tmp_path / "a") == lora_identity(tmp_path / "b")
    # another value, another alpha, another schedule: another identity
    (tmp_path / "c").mkdir()
    key = next(iter(state))
    save_file({**state, key: state[key] + 1e-3}, str(tmp_path / "c" / file.name), metadata=meta)
    adapter = json.loads(meta["lora_adapter_metadata"])
    alpha_key = next(k for k in adapter if k.endswith("lora_alpha"))
    (tmp_path / "d").mkdir()
    save_file(state, str(tmp_path / "d" / file.name),
              metadata={**meta, "lora_adapter_metadata": json.dumps({**adapter, alpha_key: 8.0})})
    (tmp_path / "e").mkdir()
    save_file(state, str(tmp_path / "e" / file.name), metadata=meta)
    (tmp_path / "e" / LORA_SCHEDULE_NAME).write_text(json.dumps({"active_steps": 2}))
    ids = {lora_identity(tmp_path / x) for x in "acde"}
    assert len(ids) == 4
