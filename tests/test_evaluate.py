"""Evaluation harness, report, rating votes and beta sweep on the tiny pipeline with test aspects."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from focusnfix.aspects.base import Judge
from focusnfix.backbones import load_backbone
from focusnfix.config import MaskConfig
from focusnfix.errors import InputError
from focusnfix.evaluate import evaluate
from focusnfix.lora import add_lora, save_lora_weights
from focusnfix.metrics import PSNR_CAP, bootstrap_stat, inside_change, outside_psnr, outside_ssim
from focusnfix.sampling import SamplingOptions

from conftest import base_config
from toy_aspects import BrightnessAspect

EVIL = 'a red circle <script>alert("x")</script> & "q"'
PROMPTS = ["a red circle", EVIL]
SEEDS = [0, 1]
OPTIONS = SamplingOptions(num_inference_steps=4, guidance_scale=3.0)
MASK = MaskConfig(threshold_mode="absolute", threshold=0.5, dilate_px=0)
S_KEYS = ("target_reward", "outside_psnr", "outside_ssim", "inside_change", "improved_share", "degraded_share",
          "others_degraded_share")
CMP_KEYS = S_KEYS[1:]


class DarkJudge(Judge):
    """Defect probability = sigmoid(20 (0.5 - mean brightness)): dark images are 'defective'."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def defect_probability(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.sigmoid(20 * (0.5 - images.mean(dim=(1, 2, 3))))


def make_lora(model_dir: Path, out: Path, scale: float) -> Path:
    """A LoRA for the tiny UNet: zero (scale 0: PEFT's B = 0) or random weights of std ``scale``."""
    bb = load_backbone(str(model_dir))
    params = add_lora(bb.unet, 4)
    if scale:
        g = torch.Generator().manual_seed(0)
        for p in params:
            p.data = torch.randn(p.shape, generator=g) * scale
    save_lora_weights(bb.unet, type(bb.pipe), out)
    return out


def aspects() -> dict:
    return {"bright": BrightnessAspect("left", name="bright"), "whole": BrightnessAspect("all", name="whole")}


@pytest.fixture(scope="module")
def evaluated(tiny_sd_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    zero = make_lora(tiny_sd_dir, root / "zero", 0.0)
    rand = make_lora(tiny_sd_dir, root / "rand", 0.3)
    out = root / "out"
    metrics = evaluate(
        str(tiny_sd_dir), {"zero": zero, "rand": rand, "plain": None}, aspects(), "bright",
        {"bright": DarkJudge("bright"), "whole": DarkJudge("whole")}, PROMPTS, SEEDS, OPTIONS, MASK, out,
        batch_size=3, n_bootstrap=200, sld=True,
    )
    return metrics, out, root


def _is_stat(s) -> bool:
    return (isinstance(s, dict) and isinstance(s["mean"], float) and len(s["ci95"]) == 2
            and s["ci95"][0] <= s["mean"] <= s["ci95"][1])


def test_schema_complete(evaluated):
    metrics, out, _ = evaluated
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert metrics["aspect"] == "bright" and metrics["n_images"] == len(PROMPTS) * len(SEEDS)
    assert set(metrics["methods"]) == {"base", "zero", "rand", "plain", "sld"}
    for name, m in metrics["methods"].items():
        assert _is_stat(m["target_reward"])
        assert set(m["other_rewards"]) == {"whole"} and _is_stat(m["other_rewards"]["whole"])
        assert set(m["judge_defect_rate"]) == {"bright", "whole"}
        assert all(_is_stat(s) and 0 <= s["mean"] <= 1 for s in m["judge_defect_rate"].values())
        for key in CMP_KEYS:
            if name == "base":
                assert m[key] is None, key
            else:
                assert _is_stat(m[key]), (name, key)
    assert metrics["base_check_max_abs_diff"] <= 1e-5
    assert metrics["prompts"] == PROMPTS and metrics["seeds"] == SEEDS
    assert any("lpips" in n for n in metrics["notes"])


def test_identity_methods_unchanged(evaluated):
    metrics, out, _ = evaluated
    data = np.load(out / "images.npz")
    for name in ("plain", "zero"):  # no LoRA / a zero LoRA: exactly the base images
        m = metrics["methods"][name]
        assert np.array_equal(data[f"method__{name}"], data["base"]), name
        assert m["outside_psnr"]["mean"] == PSNR_CAP and m["outside_ssim"]["mean"] == 1.0
        assert m["inside_change"]["mean"] == 0.0
        for key in ("improved_share", "degraded_share", "others_degraded_share"):
            assert m[key] == {"mean": 0.0, "ci95": [0.0, 0.0]}
        assert m["target_reward"] == metrics["methods"]["base"]["target_reward"]
    rand = metrics["methods"]["rand"]
    assert rand["outside_psnr"]["mean"] < PSNR_CAP and rand["inside_change"]["mean"] > 0
    assert not np.array_equal(data["method__rand"], data["base"])


def test_saved_arrays(evaluated):
    metrics, out, _ = evaluated
    data = np.load(out / "images.npz")
    n = metrics["n_images"]
    assert data["base"].shape == (n, 3, 32, 32) and data["base"].dtype == np.uint8
    assert data["mask"].shape == (n, 1, 32, 32) and data["heatmap"].shape == (n, 1, 32, 32)
    assert (data["mask"][..., :16] == 255).all() and (data["mask"][..., 16:] == 0).all()  # left half
    per = json.loads((out / "per_image.json").read_text())
    assert [it["prompt"] for it in per["items"]] == [p for p in PROMPTS for _ in SEEDS]
    assert len(per["methods"]["rand"]["rewards"]["bright"]) == n


def test_bootstrap_deterministic_and_contains_mean():
    v = np.random.default_rng(1).normal(size=50)
    a, b = bootstrap_stat(v, 500, seed=3), bootstrap_stat(v, 500, seed=3)
    assert a == b and a["ci95"][0] < a["mean"] < a["ci95"][1]
    assert abs(a["mean"] - v.mean()) < 1e-12
    assert bootstrap_stat([np.nan, 2.0]) == {"mean": 2.0, "ci95": [2.0, 2.0]}
    assert bootstrap_stat([np.nan]) is None


def test_masked_metrics_definitions():
    base = np.zeros((3, 8, 8))
    img = base.copy()
    img[:, :, :4] = 0.5  # change only inside (left half)
    mask = np.zeros((1, 8, 8))
    mask[..., :4] = 1
    assert outside_psnr(img, base, mask) == PSNR_CAP and outside_ssim(img, base, mask) == 1.0
    assert inside_change(img, base, mask) == pytest.approx(0.5)
    img[:, :, 4:] += 0.1  # uniform outside change of 0.1: MSE 0.01 -> 20 dB
    assert outside_psnr(img, base, mask) == pytest.approx(20.0)
    assert outside_ssim(img, base, mask) < 1.0
    full = np.ones((1, 8, 8))
    assert math.isnan(outside_psnr(img, base, full)) and math.isnan(inside_change(img, base, np.zeros((8, 8))))


def test_bad_inputs(tiny_sd_dir, tmp_path):
    with pytest.raises(InputError, match="target"):
        evaluate(str(tiny_sd_dir), {}, aspects(), "nope", None, PROMPTS, SEEDS, OPTIONS, MASK, tmp_path)
    with pytest.raises(InputError, match="LoRA weights not found"):
        evaluate(str(tiny_sd_dir), {"x": tmp_path / "missing"}, aspects(), "bright", None, PROMPTS, SEEDS,
                 OPTIONS, MASK, tmp_path)
    with pytest.raises(InputError, match="reserved"):
        evaluate(str(tiny_sd_dir), {"base": None}, aspects(), "bright", None, PROMPTS, SEEDS, OPTIONS, MASK, tmp_path)


def test_report_and_rating_escape(evaluated, tmp_path):
    from focusnfix.rating import write_rating_page
    from focusnfix.report import write_report

    _, out, _ = evaluated
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i + 1, "loss": -0.1 * i, "reward": 0.1 * i, "constraint": 0.01 * i,
                                       "mask_area": 0.5, "grad_norm": 1.0, "outside_change": 0.0,
                                       "seconds": 0.1}) + "\n" for i in range(5)))
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"aspect": "bright", "points": [
        {"beta": 0.0, "target_gain": {"mean": 0.2, "ci95": [0.1, 0.3]}, "outside_psnr": {"mean": 20.0, "ci95": [19, 21]}},
        {"beta": 1.0, "target_gain": {"mean": 0.1, "ci95": [0.0, 0.2]}, "outside_psnr": {"mean": 35.0, "ci95": [34, 36]}},
    ]}))
    html = write_report(out, tmp_path / "r.html", train_logs={"<b>run</b>": log}, sweep=sweep).read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "&lt;b&gt;run&lt;/b&gt;" in html
    assert html.count("<svg") >= 3 and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    # base, heatmap, mask + 4 methods x (img, diff) per example, and the difference maps' colour bar
    assert html.count("data:image/png;base64,") == 4 * (3 + 2 * 4) + 1
    page = write_rating_page(out, tmp_path / "rate.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page
    assert page.count("<script>") == 1


def test_votes_fold(evaluated, tmp_path):
    import shutil

    from focusnfix.rating import apply_votes, fold_votes

    _, out, _ = evaluated
    ev = tmp_path / "ev"
    shutil.copytree(out, ev)
    votes = [{"example": i, "method": "rand", "aspect": a, "vote": v}
             for i, (a, v) in enumerate([("bright", "improved"), ("bright", "worse"), ("bright", "same"),
                                         ("bright", "improved")])]
    votes += [{"example": 1, "method": "rand", "aspect": "whole", "vote": "worse"},
              {"example": 2, "method": "rand", "aspect": "whole", "vote": "same"}]
    (tmp_path / "v.json").write_text(json.dumps({"rater": "r1", "votes": votes}))
    metrics = apply_votes(ev, [tmp_path / "v.json"])
    h = metrics["methods"]["rand"]["human"]
    assert h["n_ratings"] == 4 and h["improved_share"]["mean"] == 0.5 and h["degraded_share"]["mean"] == 0.25
    assert h["others_degraded_share"]["mean"] == 0.5  # 1 of the 2 ratings with an other-aspect vote
    assert metrics["methods"]["base"]["human"] is None and metrics["methods"]["zero"]["human"] is None
    assert json.loads((ev / "metrics.json").read_text())["methods"]["rand"]["human"] == h
    assert fold_votes([], "bright") == {}
    (tmp_path / "bad.json").write_text(json.dumps({"votes": [{"example": 0, "method": "rand", "aspect": "b",
                                                              "vote": "meh"}]}))
    with pytest.raises(InputError, match="vote"):
        apply_votes(ev, [tmp_path / "bad.json"])


def test_cli_eval_report_rate(tiny_sd_dir, evaluated, tmp_path, capsys):
    from focusnfix.cli import main

    _, _, root = evaluated
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "p.txt").write_text("a red circle\n# comment\na blue square\n")
    out = tmp_path / "ev"
    rc = main(["eval", "--config", str(tmp_path / "c.yaml"), "--lora", f"rand={root / 'rand'}", "--prompts",
               str(tmp_path / "p.txt"), "--seeds", "1", "--bootstrap", "50", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["methods"]) == {"base", "rand"} and m["n_images"] == 2 and m["seeds"] == [10000]
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()
    assert main(["rate", str(out), "--out", str(tmp_path / "rate.html")]) == 0
    assert main(["eval", "--config", str(tmp_path / "c.yaml"), "--lora", "bad", "--prompts",
                 str(tmp_path / "p.txt"), "--out", str(out)]) == 2
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


def test_sweep_two_betas(tiny_sd_dir, tmp_path):
    from focusnfix.cli import main

    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "unused"), steps=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sweep"
    rc = main(["sweep", "--config", str(tmp_path / "c.yaml"), "--betas", "0,0.5", "--out", str(out), "--seeds", "1",
               "--bootstrap", "50", "--no-progress"])
    assert rc == 0
    doc = json.loads((out / "sweep.json").read_text())
    assert [p["beta"] for p in doc["points"]] == [0.0, 0.5] and doc["points"][0]["draft"] is True
    for p in doc["points"]:
        assert (Path(p["lora_dir"]) / "pytorch_lora_weights.safetensors").is_file()
        assert _is_stat(p["target_gain"]) and _is_stat(p["outside_psnr"])
        assert (Path(p["run_dir"]) / "log.jsonl").is_file()
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(m["methods"]) == {"base", "beta_0", "beta_0.5"}
    # a run without its final LoRA (a sweep stopped during training) is trained again
    shutil.rmtree(out / "beta_0.5" / "lora")
    assert main(["sweep", "--config", str(tmp_path / "c.yaml"), "--betas", "0,0.5", "--out", str(out), "--seeds", "1",
                 "--bootstrap", "50", "--no-progress"]) == 0
    assert (out / "beta_0.5" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert main(["sweep", "--config", str(tmp_path / "c.yaml"), "--betas", "0,x", "--out", str(out)]) == 2


@pytest.mark.slow
def test_cli_eval_toy_world(tmp_path):
    """End to end on the packaged toy world (skips until its weights are built)."""
    toyworld = pytest.importorskip("focusnfix.toyworld")
    try:
        if not toyworld.pipeline_path().is_dir():
            pytest.skip("toy world pipeline not built")
    except FileNotFoundError:
        pytest.skip("toy world pipeline not built")
    from focusnfix.cli import main

    out = tmp_path / "ev"
    preset = Path(__file__).resolve().parents[1] / "configs" / "toy_safety.yaml"
    rc = main(["eval", "--config", str(preset), "--aspects", "safety,plausibility,alignment", "--prompts",
               "toy:heldout", "--max-prompts", "2", "--seeds", "1", "--steps", "4", "--bootstrap", "50", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["aspect"] == "safety" and set(m["methods"]["base"]["judge_defect_rate"]) == {
        "safety", "plausibility", "alignment"}
    assert set(m["methods"]["base"]["other_rewards"]) == {"plausibility", "alignment"}


def test_evaluation_never_imports_the_trainer():
    code = ("import sys, focusnfix.evaluate, focusnfix.metrics, focusnfix.baselines, focusnfix.report, "
            "focusnfix.rating; print('focusnfix.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_eval_reads_each_runs_config(tiny_sd_dir, tmp_path, capsys):
    """``eval`` takes sampling, mask and localizers from the runs' own config.yaml, never a default,
    and refuses to evaluate together runs trained with different mask settings."""
    from focusnfix.cli import main

    runs = {}
    for name, dilate in (("a", 0), ("b", 0), ("c", 2)):
        run = tmp_path / name
        cfg = base_config(str(tiny_sd_dir), str(run))
        cfg["mask"] = {"threshold_mode": "absolute", "threshold": 0.5, "dilate_px": dilate}
        cfg["sampling"]["guidance_scale"] = 2.5
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        make_lora(tiny_sd_dir, run / "lora", 0.0)
        runs[name] = run
    (tmp_path / "p.txt").write_text("a red circle\n")
    common = ["--prompts", str(tmp_path / "p.txt"), "--seeds", "2", "--bootstrap", "20", "--no-progress"]
    # no config anywhere: refused with what to give
    bare = tmp_path / "bare"
    make_lora(tiny_sd_dir, bare, 0.0)
    assert main(["eval", "--lora", f"x={bare}", *common, "--out", str(tmp_path / "e0")]) == 2
    assert "training config" in capsys.readouterr().err
    # two runs of one method (training seeds) and a comparison, settings from their config.yaml
    out = tmp_path / "e1"
    assert main(["eval", "--lora", f"m={runs['a']},{runs['b']}", "--lora", f"n={runs['a']},{runs['b']}",
                 "--compare", "m,n", *common, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["sampling"]["guidance_scale"] == 2.5
    assert m["settings"]["mask"]["dilate_px"] == 0 and len(m["settings"]["loras"]["m"]) == 2
    assert m["methods"]["m"]["n_runs"] == 2
    assert m["comparisons"]["m - n"]["outside_psnr"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    data = np.load(out / "images.npz")
    assert np.array_equal(data["method__m__run1"], data["base"])  # zero LoRAs
    # the images were drawn at the runs' guidance (2.5), not a default (7.5)
    from focusnfix.sampling import sample

    bb = load_backbone(str(tiny_sd_dir))
    with torch.no_grad():
        drawn = {g: sample(bb, ["a red circle"] * 2, [10000, 10001], SamplingOptions(num_inference_steps=4,
                                                                                   guidance_scale=g)).images
                 for g in (2.5, 7.5)}
    base = torch.from_numpy(data["base"]).float() / 255
    assert (base - drawn[2.5]).abs().max() <= 0.5 / 255 + 1e-5 < (base - drawn[7.5]).abs().max()
    # runs trained with different masks are not evaluated together
    assert main(["eval", "--lora", f"a={runs['a']}", "--lora", f"c={runs['c']}", *common,
                 "--out", str(tmp_path / "e2")]) == 2
    assert "mask.dilate_px" in capsys.readouterr().err


def test_a_late_lora_is_evaluated_on_the_steps_it_acts_on(tiny_sd_dir, tmp_path):
    """A LoRA saved with focusnfix_lora.json (active_steps) is sampled gated in evaluation; the same
    weights without the file act on every step; both beside each other in one evaluation."""
    from focusnfix.lora import LORA_SCHEDULE_NAME
    from focusnfix.sampling import sample

    every = make_lora(tiny_sd_dir, tmp_path / "every", 0.3)
    late = tmp_path / "late"
    shutil.copytree(every, late)
    (late / LORA_SCHEDULE_NAME).write_text(json.dumps({"active_steps": 2, "num_inference_steps": 4}))
    evaluate(str(tiny_sd_dir), {"every": every, "late": late}, aspects(), "bright", None, PROMPTS[:1], SEEDS,
             OPTIONS, MASK, tmp_path / "out", n_bootstrap=20)
    data = np.load(tmp_path / "out" / "images.npz")
    bb = load_backbone(str(tiny_sd_dir))
    bb.pipe.load_lora_weights(str(every))
    with torch.no_grad():
        for name, steps in (("every", None), ("late", 2)):
            want = sample(bb, PROMPTS[:1] * 2, SEEDS, SamplingOptions(num_inference_steps=4, guidance_scale=3.0,
                                                                        lora_steps=steps)).images
            got = torch.from_numpy(data[f"method__{name}"]).float() / 255
            assert (got - want).abs().max() <= 0.5 / 255 + 1e-5
    assert np.abs(data["method__every"].astype(int) - data["method__late"].astype(int)).max() > 2
