"""The claim's statistics: removal / new-defect / hack-gap shares, noise floors, PSNR of the mean
MSE, the clustered bootstrap and paired differences, localizer calibration and beta selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from focusnfix.calibration import calibrate, choose, grid, mask_coverage
from focusnfix.config import MaskConfig
from focusnfix.metrics import (
    PSNR_CAP,
    clustered_stat,
    method_metrics,
    noise_floor,
    paired_comparison,
    psnr_of_mse,
)
from focusnfix.sweep import run_overrides, select_beta


def test_clustered_stat_weighted_mean_and_determinism():
    v = np.array([[1.0, 0.0, 1.0, 1.0]])
    w = np.array([1.0, 1.0, 0.0, 1.0])  # the third image does not count
    s = clustered_stat(v, np.array([0, 0, 1, 1]), w, n_bootstrap=300, seed=1)
    assert s["mean"] == pytest.approx(2 / 3)
    assert s == clustered_stat(v, np.array([0, 0, 1, 1]), w, n_bootstrap=300, seed=1)
    assert s["ci95"][0] <= s["mean"] <= s["ci95"][1]
    # NaN entries are left out; no weight at all gives None
    assert clustered_stat(np.array([np.nan, 2.0]), np.array([0, 1]))["mean"] == 2.0
    assert clustered_stat(np.array([1.0, 1.0]), np.array([0, 1]), np.zeros(2)) is None


def test_clustered_bootstrap_resamples_whole_prompts():
    # two prompts whose seeds agree perfectly: resampling prompts can only give 0, 0.5 or 1
    v = np.array([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    s = clustered_stat(v, np.array([0, 0, 0, 1, 1, 1]), n_bootstrap=2000, seed=0)
    assert s["mean"] == 0.5 and s["ci95"] == [0.0, 1.0]
    # treated as independent images the interval would be far narrower
    indep = clustered_stat(v, np.arange(6), n_bootstrap=2000, seed=0)
    assert indep["ci95"][1] - indep["ci95"][0] < 0.9


def test_clustered_bootstrap_resamples_training_runs():
    # run 0 fixes everything, run 1 nothing: the interval must reflect the runs' disagreement
    v = np.array([[1.0] * 8, [0.0] * 8])
    s = clustered_stat(v, np.arange(8), n_bootstrap=2000, seed=0)
    assert s["mean"] == 0.5 and s["ci95"][0] == 0.0 and s["ci95"][1] == 1.0


def test_paired_difference_cancels_shared_variation():
    rng = np.random.default_rng(0)
    a = rng.random((3, 40))
    same = clustered_stat(a, np.arange(40) // 4, minus=(a, None), n_bootstrap=200)
    assert same == {"mean": 0.0, "ci95": [0.0, 0.0]}
    b = a - 0.1  # B is A less a constant: the paired difference is exactly 0.1 on every resample
    d = clustered_stat(a, np.arange(40) // 4, minus=(b, None), n_bootstrap=200)
    assert d["mean"] == pytest.approx(0.1) and d["ci95"] == pytest.approx([0.1, 0.1])
    with pytest.raises(ValueError, match="same runs"):
        clustered_stat(a, np.arange(40) // 4, minus=(a[:2], None))


def test_psnr_is_of_the_mean_mse():
    mse = np.array([[0.01, 0.0001]])
    s = clustered_stat(mse, np.arange(2), transform=psnr_of_mse, n_bootstrap=0)
    assert s["mean"] == pytest.approx(10 * math.log10(1 / 0.00505))  # not the mean of 20 and 40 dB
    assert float(psnr_of_mse(0.0)) == PSNR_CAP and float(psnr_of_mse(1e-20)) == PSNR_CAP


def test_noise_floor_is_pooled_within_prompt_std():
    r = np.array([1.0, 3.0, 10.0, 10.0])  # prompt 0: var 2 (1 dof); prompt 1: var 0 (1 dof)
    assert noise_floor(r, np.array([0, 0, 1, 1])) == pytest.approx(math.sqrt(2 / 2))
    assert noise_floor(r, np.arange(4)) is None  # one image per prompt: no seed-to-seed variation
    assert noise_floor(np.ones(4), np.array([0, 0, 1, 1]), eps=0.01) == 0.01


def _case():
    """6 images (3 prompts x 2 seeds). Base judge: defect on images 0-3, clean on 4, 5."""
    base_p = {"safety": np.array([0.9, 0.9, 0.9, 0.9, 0.1, 0.1]), "other": np.full(6, 0.1)}
    base_r = {"safety": np.array([-3.0, -3.0, -3.0, -3.0, 0.0, 0.0]), "other": np.array([0, 0.1, 0, 0.1, 0, 0.1])}
    # after: image 0 fixed; 1 'fixed' by the reward only (hack); 2, 3 still defect; 5 gets a new
    # defect; image 4's other-aspect judge flips clean -> defect
    probs = {"safety": np.array([[0.1, 0.9, 0.9, 0.9, 0.1, 0.9]]),
             "other": np.array([[0.1, 0.1, 0.1, 0.1, 0.9, 0.1]])}
    rewards = {"safety": np.array([[0.0, 0.0, -3.0, -3.0, 0.0, -2.0]]),
               "other": np.array([[0, 0.1, 0, 0.1, -1.0, 0.1]])}
    cmp = {"outside_mse": np.zeros((1, 6)), "outside_ssim": np.ones((1, 6)), "inside_change": np.zeros((1, 6))}
    return base_r, base_p, rewards, probs, cmp


def test_method_metrics_removal_new_defect_hack_gap_flips():
    base_r, base_p, rewards, probs, cmp = _case()
    groups = np.array([0, 0, 1, 1, 2, 2])
    thr = {"safety": math.log(0.5), "other": math.log(0.5)}
    entry, per = method_metrics("safety", rewards, probs, base_r, base_p, cmp, groups, thr, n_bootstrap=100)
    assert entry["removal_share"]["mean"] == pytest.approx(1 / 4)
    assert entry["new_defect_share"]["mean"] == pytest.approx(1 / 2)
    assert entry["hack_gap"]["mean"] == pytest.approx(1 / 4)  # image 1: reward says clean, judge says defect
    assert entry["others_degraded_share"]["mean"] == pytest.approx(1 / 6)  # image 4's judge flip
    # noise floor of 'other' = pooled std of (0, 0.1) pairs = sqrt(0.005); only image 4 drops beyond it
    assert entry["noise_floor"]["other"] == pytest.approx(math.sqrt(0.005))
    assert entry["others_reward_drop_share"]["mean"] == pytest.approx(1 / 6)
    assert entry["outside_psnr"]["mean"] == PSNR_CAP
    # base: the reward's own miss rate, no comparisons
    base, _ = method_metrics("safety", base_r, base_p, None, None, None, groups, thr, n_bootstrap=100)
    assert base["hack_gap"]["mean"] == 0.0 and base["removal_share"] is None
    missed = {**base_r, "safety": np.array([-0.1, -3.0, -3.0, -3.0, 0.0, 0.0])}  # image 0: judged defect, reward calls it clean
    base, _ = method_metrics("safety", missed, base_p, None, None, None, groups, thr, n_bootstrap=100)
    assert base["hack_gap"]["mean"] == pytest.approx(1 / 4)  # the reward's miss rate on the 4 judged defects
    # a method against itself: every paired difference is exactly 0
    pc = paired_comparison(per, per, groups, n_bootstrap=50)
    assert pc["removal_share"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    assert set(pc) >= {"removal_share", "new_defect_share", "hack_gap", "others_degraded_share", "outside_psnr"}


def test_no_reward_threshold_no_hack_gap():
    base_r, base_p, rewards, probs, cmp = _case()
    entry, _ = method_metrics("safety", rewards, probs, base_r, base_p, cmp, None, None, n_bootstrap=10)
    assert entry["hack_gap"] is None and entry["removal_share"]["mean"] == pytest.approx(0.25)


def test_mask_coverage_exact():
    truth = torch.zeros(2, 1, 4, 4)
    truth[0, 0, :2, :2] = 1  # 4 defect pixels; image 1 is clean and does not count
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2, :1] = 1
    mask[0, 0, 3, 3] = 1
    mask[1] = 1
    c = mask_coverage(mask, truth)
    assert c == {"recall": 0.5, "area_ratio": 0.75, "image_recall_95": 0.0}


def test_calibrate_gate_and_choice():
    truth = torch.zeros(2, 1, 8, 8)
    truth[0, 0, 2:4, 2:4] = 1
    heat = torch.zeros(2, 1, 8, 8)
    heat[0, 0, 2:4, 2:4] = 1.0
    heat[1, 0, 5, 5] = 1.0  # a clean image with a heatmap blob: the gate must empty its mask
    rewards = torch.tensor([-3.0, 0.0])
    rows = calibrate(heat, rewards, truth, [MaskConfig(threshold_mode="absolute", threshold=0.5, dilate_px=d)
                                             for d in (0, 1)], gate=math.log(0.5))
    assert rows[0]["recall"] == 1.0 and rows[0]["area_ratio"] == 1.0
    assert rows[1]["recall"] == 1.0 and rows[1]["area_ratio"] > 1.0
    assert all(r["clean_empty_share"] == 1.0 and r["defect_masked_share"] == 1.0 for r in rows)
    assert choose(rows)["mask"]["dilate_px"] == 0
    ungated = calibrate(heat, rewards, truth, [MaskConfig(threshold_mode="absolute", threshold=0.5, dilate_px=0)], None)
    assert ungated[0]["clean_empty_share"] == 0.0
    # nothing reaches the recall floor: the highest recall wins
    low = [{"recall": 0.5, "area_ratio": 1.0, "image_recall_95": 0.0}, {"recall": 0.8, "area_ratio": 3.0,
                                                                        "image_recall_95": 0.5}]
    assert choose(low)["recall"] == 0.8
    assert len(grid()) == 30


def _point(beta, reward, psnr, drop):
    return {"beta": beta, "method": f"beta_{beta:g}", "target_reward": {"mean": reward, "ci95": [reward, reward]},
            "outside_psnr": {"mean": psnr, "ci95": [psnr, psnr]},
            "others_reward_drop_share": {"mean": drop, "ci95": [drop, drop]}}


def test_select_beta_rule():
    points = [_point(0, -0.1, 20, 0.3), _point(0.1, -0.2, 30, 0.0), _point(0.3, -0.5, 36, 0.05),
              _point(1.0, -0.9, 40, 0.0)]
    sel = select_beta(points)
    assert sel["beta"] == 0.3 and sel["qualified"] == [0.3, 1.0]  # beta 0 (DRaFT) is never chosen
    assert select_beta([_point(0.1, 0, 20, 0), _point(0.5, -1, 25, 0)])["beta"] == 0.5  # none qualifies
    # DRaFT measured on the same validation images raises the others' limit to half its own share
    grid = [_point(0.5, -0.2, 36, 0.20), _point(8.0, -0.8, 38, 0.22)]
    assert select_beta(grid)["beta"] == 8.0 and select_beta(grid)["qualified"] == []
    sel = select_beta(grid, draft=_point(0, 0.0, 20, 0.44))
    assert sel["beta"] == 0.5 and sel["qualified"] == [0.5, 8.0] and sel["others_limit"] == pytest.approx(0.22)
    assert select_beta(grid, draft=_point(0, 0.0, 20, 0.06))["others_limit"] == 0.10  # never below the floor


def test_select_combines_sweeps(tmp_path):
    import json

    from focusnfix.cli import main
    from focusnfix.errors import InputError
    from focusnfix.sweep import combine_sweeps

    def write(name, points, prompts=("a red circle",), overrides=(), draft_overrides=()):
        d = tmp_path / name
        d.mkdir()
        (d / "sweep.json").write_text(json.dumps({"aspect": "safety", "prompts": list(prompts), "judges": False,
                                                   "overrides": list(overrides),
                                                   "draft_overrides": list(draft_overrides), "points": points}))
        return d

    const = write("c05", [_point(0.5, -0.2, 36, 0.20) | {"run_dir": "c05/beta_0.5"}], overrides=["objective.beta_end=null"])
    ramp = write("r8", [_point(0.5, -0.8, 38, 0.05) | {"run_dir": "r8/beta_0.5"}])
    draft = write("draft", [_point(0, 0.0, 20, 0.44) | {"run_dir": "draft/beta_0"}], draft_overrides=["sampling.k=2"])
    doc = combine_sweeps([const, ramp / "sweep.json"], tmp_path / "sel")
    assert doc["selection"]["run_dir"] == "r8/beta_0.5" and doc["selection"]["others_limit"] == 0.10
    assert main(["select", str(const), str(ramp), str(draft), "--out", str(tmp_path / "sel2")]) == 0
    doc = json.loads((tmp_path / "sel2" / "sweep.json").read_text())
    assert doc["selection"]["run_dir"] == "c05/beta_0.5"  # DRaFT's 0.44 lets the higher reward in
    assert [p["overrides"] for p in doc["points"]] == [["objective.beta_end=null"], [], ["sampling.k=2"]]
    other = write("other", [_point(0.5, 0, 40, 0)], prompts=("a blue square",))
    with pytest.raises(InputError, match="different prompts"):
        combine_sweeps([const, other], tmp_path / "sel3")
    with pytest.raises(InputError, match="one DRaFT"):
        combine_sweeps([const, draft, draft], tmp_path / "sel4")
    with pytest.raises(InputError, match="no sweep.json"):
        combine_sweeps([tmp_path / "missing"], tmp_path / "sel5")


def test_blind_votes_fold_relative_to_the_base(tmp_path):
    import json

    from focusnfix.errors import InputError
    from focusnfix.rating import fold_votes, read_votes

    votes = [  # the method's image is chosen on the target aspect whichever side it was shown on
        {"example": 0, "method": "m", "aspect": "t", "choice": "B", "left": "base"},
        {"example": 1, "method": "m", "aspect": "t", "choice": "A", "left": "candidate"},
        {"example": 2, "method": "m", "aspect": "t", "choice": "A", "left": "base"},  # base preferred
        {"example": 2, "method": "m", "aspect": "o", "choice": "same", "left": "base"},
    ]
    (tmp_path / "v.json").write_text(json.dumps({"format": "focusnfix-votes/2", "rater": "r", "votes": votes}))
    read = read_votes([tmp_path / "v.json"])
    assert [v["vote"] for v in read] == ["improved", "improved", "worse", "same"]
    h = fold_votes(read, "t", n_bootstrap=10)["m"]
    assert h["improved_share"]["mean"] == pytest.approx(2 / 3) and h["degraded_share"]["mean"] == pytest.approx(1 / 3)
    bad = [{**votes[0], "vote": "worse"}]  # contradicts its own choice and order
    (tmp_path / "bad.json").write_text(json.dumps({"rater": "r", "votes": bad}))
    with pytest.raises(InputError, match="contradicts"):
        read_votes([tmp_path / "bad.json"])


def test_plot_ticks_are_round_and_survive_float_noise():
    from focusnfix.report import _ticks, ema, svg_plot

    assert _ticks(0.0, 1.0) == [0.0, 0.5, 1.0] and _ticks(0.475, 0.525) == [0.48, 0.5, 0.52]
    assert _ticks(-0.467, 1.0) == [0.0, 0.5, 1.0]
    flat = ema([0.01] * 4, 0.3)  # differs by one ulp: must not loop or produce thousands of ticks
    assert len(_ticks(min(flat), max(flat))) <= 2
    assert "<svg" in svg_plot([("run", [1, 2, 3, 4], flat)], "flat", "step", "value")
    assert _ticks(1.0, 1.0) == [1.0] and _ticks(0.0, float("inf")) == [0.0]


def test_a_sweep_at_beta_zero_is_draft_even_under_a_beta_schedule(tmp_path):
    """Under a config that ramps beta to beta_end, the sweep's beta-0 run must not ramp from 0."""
    from pathlib import Path

    from focusnfix.config import load_config

    preset = Path(__file__).resolve().parents[1] / "configs" / "toy_safety.yaml"
    ramped = ["objective.beta_end=8"]
    assert load_config(preset, ramped).objective.beta_end == 8.0
    draft = load_config(preset, run_overrides(0.0, ramped, tmp_path))
    assert draft.objective.beta == 0 and draft.objective.beta_end is None
    assert draft.train.output_dir == str(tmp_path / "beta_0")
    kept = load_config(preset, run_overrides(0.5, ["objective.beta_end=4"], tmp_path))
    assert kept.objective.beta == 0.5 and kept.objective.beta_end == 4.0


def test_markdown_table_rows_columns_and_paired_cells():
    from focusnfix.report import markdown_table

    def st(m, lo, hi):
        return {"mean": m, "ci95": [lo, hi]}

    metrics = {"aspect": "safety", "comparisons": {"focusnfix - draft": {"removal_share": st(-0.1, -0.2, 0.0)}},
               "methods": {"draft": {"removal_share": st(1.0, 1.0, 1.0), "judge_defect_rate": {"safety": st(0, 0, 0)}},
                           "focusnfix": {"removal_share": st(0.9, 0.8, 0.99), "outside_psnr": st(35.51, 34.0, 37.0)},
                           "base": {"removal_share": None, "judge_defect_rate": {"safety": st(0.45, 0.3, 0.6)},
                                    "other_rewards": {"plausibility": st(-0.7, -1.4, -0.2)}}}}
    lines = markdown_table(metrics).splitlines()
    assert lines[0] == "|  | base | Focus-N-Fix | DRaFT | Focus-N-Fix - DRaFT (paired) |"
    assert lines[1] == "|---|---|---|---|---|"
    assert lines[2] == "| defect removed (judge) ↑ | – | 0.90 [0.80, 0.99] | 1.00 [1.00, 1.00] | -0.10 [-0.20, 0.00] |"
    assert "| outside-mask PSNR vs base (dB) ↑ | – | 35.5 [34.0, 37.0] | – | – |" in lines
    assert "| judge: safety defect rate | 0.45 [0.30, 0.60] | – | 0.00 [0.00, 0.00] | – |" in lines
    assert lines[-1] == "| plausibility reward | -0.70 [-1.40, -0.20] | – | – | – |"


def test_without_judges_the_judge_metrics_are_null_not_zero():
    """A real model has no judges: nothing measured the other aspects' flips, removal or hack gap."""
    base_r, _, rewards, _, cmp = _case()
    groups = np.array([0, 0, 1, 1, 2, 2])
    thr = {"safety": math.log(0.5), "other": math.log(0.5)}
    entry, _ = method_metrics("safety", rewards, {}, base_r, {}, cmp, groups, thr, n_bootstrap=50)
    for key in ("others_degraded_share", "removal_share", "new_defect_share", "hack_gap"):
        assert entry[key] is None, key
    assert entry["others_reward_drop_share"]["mean"] == pytest.approx(1 / 6)  # the rewards still measure it
