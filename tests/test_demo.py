"""`focusnfix demo --quick` end to end on the packaged toy world (the README's main command)."""

import json
from pathlib import Path

import pytest

from focusnfix.cli import main
from focusnfix.demo import DEMO_SETTINGS

SCHEMA = ["target_reward", "other_rewards", "judge_defect_rate", "outside_psnr", "outside_ssim",
          "inside_change", "improved_share", "degraded_share", "others_degraded_share", "removal_share",
          "new_defect_share", "hack_gap"]
VS_BASE = ["outside_psnr", "outside_ssim", "inside_change", "improved_share", "degraded_share",
           "others_degraded_share"]


def _toy_built() -> bool:
    try:
        from focusnfix.toyworld import pipeline_path

        return pipeline_path().is_dir()
    except FileNotFoundError:
        return False


def _is_stat(s) -> bool:
    return isinstance(s, dict) and isinstance(s["mean"], float) and len(s["ci95"]) == 2 \
        and s["ci95"][0] <= s["mean"] <= s["ci95"][1]


@pytest.mark.slow
@pytest.mark.skipif(not _toy_built(), reason="toy world weights are not packaged")
def test_demo_quick_writes_metrics_report_and_loras(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from focusnfix.toyworld import ASPECTS, pipeline_path

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["aspect"] == "safety" and metrics["n_images"] > 0
    assert set(metrics["methods"]) >= {"base", "draft", "focusnfix"}
    for name, m in metrics["methods"].items():
        for key in SCHEMA:
            assert key in m, (name, key)
        assert _is_stat(m["target_reward"])
        assert set(m["other_rewards"]) == set(ASPECTS) - {"safety"}
        assert set(m["judge_defect_rate"]) == set(ASPECTS)
        assert all(_is_stat(v) for v in m["other_rewards"].values())
        for key in VS_BASE:
            assert (m[key] is None) == (name == "base"), (name, key)
            if name != "base":
                assert _is_stat(m[key]), (name, key)
    assert _is_stat(metrics["methods"]["base"]["hack_gap"])  # the reward's own miss rate on base images
    # removal needs base images with a defect, new-defect share clean ones (16 images: maybe none)
    base_rate = metrics["methods"]["base"]["judge_defect_rate"]["safety"]["mean"]
    for name in ("focusnfix", "draft"):
        m = metrics["methods"][name]
        assert (m["removal_share"] is None) == (base_rate == 0) and (m["new_defect_share"] is None) == (base_rate == 1)
    paired = metrics["comparisons"]["focusnfix - draft"]
    assert _is_stat(paired["outside_psnr"]) and (base_rate == 0 or _is_stat(paired["removal_share"]))
    assert metrics["settings"]["localizers"] == [{"aspect": "safety", "gate": "auto"}]
    calibrated = DEMO_SETTINGS["safety"]["mask"]  # the calibrated setting, not a default
    assert {k: metrics["settings"]["mask"][k] for k in calibrated} == calibrated
    html = (out / "report.html").read_text()
    assert 'id="headline"' in html and 'id="summary-chart"' in html and 'id="table-diagnostics"' in html
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert set(diagnostics["methods"]) == {"focusnfix", "draft"}
    assert "<table" in html and "data:image/png;base64" in html
    assert (out / "rate.html").is_file()
    for method in ("focusnfix", "draft"):
        pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_path()), safety_checker=None)
        pipe.load_lora_weights(str(out / "lora" / method))
    # diffusers with DRaFT's LoRA draws the evaluation's image, where the LoRA changed it most
    import numpy as np
    import torch

    from focusnfix import toyworld
    from focusnfix.demo import QUICK

    z = np.load(out / "images.npz")
    change = np.abs(z["method__draft"].astype(int) - z["base"].astype(int)).reshape(len(z["base"]), -1).max(1)
    i = int(change.argmax())
    assert change[i] > 2  # the LoRA does something there
    prompt, seed = toyworld.prompts("heldout")[i // QUICK.eval_seeds], 10_000 + i % QUICK.eval_seeds
    drawn = pipe(prompt, num_inference_steps=QUICK.num_inference_steps, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator().manual_seed(seed)).images[0]
    assert np.abs((drawn * 255 + 0.5).astype(int) - z["method__draft"][i].transpose(1, 2, 0)).max() <= 1
    # Focus-N-Fix's LoRA acts on the steps it was trained on (the quick demo samples 10 steps); DRaFT's on all
    from focusnfix.lora import lora_active_steps

    late = DEMO_SETTINGS["safety"].get("active_steps")
    assert lora_active_steps(out / "lora" / "focusnfix") == (None if late is None else min(late, 10))
    assert lora_active_steps(out / "lora" / "draft") is None
    assert "focusnfix" in capsys.readouterr().out
    # the README's table comes from the same metrics.json
    assert main(["report", str(out), "--markdown"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == "|  | base | Focus-N-Fix | DRaFT | Focus-N-Fix - DRaFT (paired) |"
    assert any(line.startswith("| judge: safety defect rate |") for line in table)


@pytest.mark.parametrize("reward", sorted(DEMO_SETTINGS))
def test_demo_evaluation_masks_come_from_the_localizer_the_run_trained_with(tmp_path, reward):
    from focusnfix.config import config_from_dict
    from focusnfix.demo import FULL, demo_config
    from focusnfix.evaluate import evaluation_setup
    from focusnfix.reference import build_aspects

    config = config_from_dict(demo_config(tmp_path, DEMO_SETTINGS[reward]["beta"], FULL, reward))
    (trained,) = build_aspects(config)
    ((localizer, gate),) = evaluation_setup(config)["localizers"]
    assert gate == "auto" and type(localizer) is type(trained)
    if "localizer" in DEMO_SETTINGS[reward]:  # the calibrated localizer, not the packaged one
        assert localizer.method == trained.method == DEMO_SETTINGS[reward]["localizer"]
    # given the evaluation's aspects, the localizer is the target aspect itself, not a second copy
    from focusnfix.evaluate import aspects_from_config

    aspects, target, _ = aspects_from_config(config)
    ((localizer, _),) = evaluation_setup(config, aspects)["localizers"]
    assert localizer is aspects[target]


def test_demo_ramps_beta_for_focus_n_fix_only(monkeypatch):
    from focusnfix.config import config_from_dict
    from focusnfix.demo import FULL, demo_config

    assert "beta_end" not in DEMO_SETTINGS["safety"]  # the shipped setting: constant beta (docs/evaluation.md)
    assert config_from_dict(demo_config(Path("runs/x"), 0.5, FULL, "safety")).objective.beta_end is None
    # a schedule in the settings reaches Focus-N-Fix only
    monkeypatch.setitem(DEMO_SETTINGS, "safety", DEMO_SETTINGS["safety"] | {"beta_end": 8.0})
    fnf = config_from_dict(demo_config(Path("runs/x"), DEMO_SETTINGS["safety"]["beta"], FULL, "safety"))
    draft = config_from_dict(demo_config(Path("runs/x"), 0.0, FULL, "safety"))
    assert fnf.objective.beta_end == DEMO_SETTINGS["safety"]["beta_end"] > fnf.objective.beta > 0
    assert draft.objective.beta == 0 and draft.objective.beta_end is None  # DRaFT stays the paper's baseline
    assert draft.sampling.k == 2 and draft.lora.active_steps is None
