"""The quick experiment scripts reproduce the figures docs/evaluation.md and the README quote."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], capture_output=True, text=True,
                          cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout)


def test_the_blind_validation_look_gives_the_table_docs_quote():
    out = _run("validation_look.py")
    first, second = out["first_look"], out["second_look"]
    assert (first["base"]["marked"], first["base"]["inside_only"], first["base"]["outside_or_both"]) == (24, 8, 16)
    assert first["focusnfix/shipped"]["base_marks_gone"] == "6/24"
    assert first["focusnfix/region"]["base_marks_gone"] == "7/24"
    for run in (first["focusnfix/shipped"], first["focusnfix/region"], second["focusnfix/person"]):
        assert run["base_inside_marks_gone"] == "0/8"  # no run removes a mark drawn inside the object
    assert (first["focusnfix/shipped"]["of_which_now_inside"], first["focusnfix/region"]["of_which_now_inside"]) == (5, 6)
    assert second["focusnfix/person"]["base_marks_gone"] == "5/24"
    assert out["retest_agreement_shipped"] == "31/32"


def test_the_reward_calls_most_marks_a_person_sees_after_training_clean():
    out = _run("reward_on_audit.py")["by_source"]
    assert (out["base"]["person_marked"], out["base"]["person_marked_reward_calls_clean"]) == (22, 2)
    assert (out["focusnfix/safety"]["person_marked"], out["focusnfix/safety"]["person_marked_reward_calls_clean"]) == (13, 9)
    assert (out["draft/safety"]["person_marked"], out["draft/safety"]["person_marked_reward_calls_clean"]) == (15, 15)


def test_the_scene_fit_judges_agree_with_the_audit_as_docs_quote(tmp_path):
    out_file = tmp_path / "scene_fit.json"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "scene_fit_audit.py"), "--json", str(out_file)],
                   capture_output=True, text=True, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = json.loads(out_file.read_text())
    kappa = {(a, j): round(out[a][j]["batches_6_8"], 3) for a in out for j in out[a]}
    assert kappa == {("safety", "learned"): 0.574, ("safety", "scene_fit"): 0.470,
                     ("alignment", "learned"): 0.486, ("alignment", "scene_fit"): 0.807}
    assert round(out["alignment"]["scene_fit"]["by_batch"]["9"], 3) == 0.672  # the fresh batch, colours by eye
    assert out["alignment"]["scene_fit"]["batches_6_8_counts"] == {"both": 71, "human_only": 13, "judge_only": 9}


def test_audit_batch_9_gives_the_person_removal_shares_docs_quote():
    out = _run("audit_batch.py", "--batch", "9", "--demo-batches", "7,8,9")
    assert out["n"] == 144
    assert out["kappa"]["safety"]["learned at 0.5"]["kappa"] == 0.453
    assert out["kappa"]["safety"]["learned at 0.2"]["kappa"] == 0.542  # the generator-trained judge at its threshold
    assert out["kappa"]["alignment"]["scene fit (before)"]["kappa"] == 0.672
    pooled = out["person"]["batches_7_8_9"]
    assert (pooled["focusnfix/safety"]["removed"], pooled["focusnfix/safety"]["base_marked"]) == (21, 47)
    assert (pooled["draft/safety"]["removed"], pooled["draft/safety"]["base_marked"]) == (26, 47)
    assert (pooled["focusnfix/safety"]["new"], pooled["draft/safety"]["new"], pooled["draft/safety"]["base_clean"]) == (0, 9, 61)
    assert out["person"]["pooled_paired_focusnfix_minus_draft"] == {"n": 47, "mean": -0.106, "ci95": [-0.234, 0.001]}
    assert out["judge_on_same_images"]["batches_7_8_9"]["focusnfix/safety"]["removal_share"] == 0.846


def test_audit_batch_10_gives_the_kappas_and_person_removal_shares_docs_quote():
    out = _run("audit_batch.py", "--batch", "10", "--demo-batches", "7,8,9,10")
    safety = out["kappa"]["safety"]
    assert out["n"] == 144 and out["human_defect_rate"]["safety"] == 0.382
    assert (safety["learned at 0.2"]["kappa"], safety["scene_fit_mark"]["kappa"], safety["person_tuned"]["kappa"]) == (
        0.55, 0.586, 0.679)
    assert out["kappa"]["alignment"]["scene fit (before)"]["kappa"] == 0.767
    pooled = out["person"]["batches_7_8_9_10"]
    assert (pooled["focusnfix/safety"]["removed"], pooled["draft/safety"]["removed"], pooled["draft/safety"]["base_marked"]) == (27, 36, 64)
    assert (pooled["focusnfix/safety"]["new"], pooled["draft/safety"]["new"], pooled["draft/safety"]["base_clean"]) == (1, 12, 80)
    assert out["person"]["pooled_paired_focusnfix_minus_draft"] == {"n": 64, "mean": -0.141, "ci95": [-0.25, -0.031]}
    assert (pooled["focusnfix/safety_narrow"]["removed"], pooled["focusnfix/safety_narrow"]["base_marked"]) == (2, 17)


def test_audit_batch_11_decides_the_person_tuned_judge_as_docs_quote():
    out = _run("audit_batch.py", "--batch", "11", "--demo-batches", "7,8,9,10,11")
    safety = out["kappa"]["safety"]
    assert out["n"] == 144 and out["human_defect_rate"]["safety"] == 0.222
    assert (safety["person_tuned"]["kappa"], safety["learned at 0.2"]["kappa"]) == (0.579, 0.473)  # +0.106 >= 0.10
    pooled = out["person"]["batches_7_8_9_10_11"]
    assert (pooled["focusnfix/safety"]["removed"], pooled["draft/safety"]["removed"], pooled["draft/safety"]["base_marked"]) == (34, 45, 78)
    assert (pooled["focusnfix/safety"]["new"], pooled["draft/safety"]["new"], pooled["draft/safety"]["base_clean"]) == (3, 16, 114)
    assert out["person"]["pooled_paired_focusnfix_minus_draft"] == {"n": 78, "mean": -0.141, "ci95": [-0.244, -0.051]}


def test_audit_batch_12_decides_the_audit_trained_judges_as_docs_quote():
    out = _run("audit_batch.py", "--batch", "12", "--demo-batches", "7,8,9,10,11,12")
    safety, plausibility = out["kappa"]["safety"], out["kappa"]["plausibility"]
    assert out["n"] == 144 and out["human_defect_rate"]["safety"] == 0.243
    assert (safety["audit_trained"]["kappa"], safety["person_tuned"]["kappa"]) == (0.701, 0.607)  # not below: replaced
    assert (plausibility["shipped"]["kappa"], plausibility["before (at 0.7)"]["kappa"]) == (0.464, 0.316)
    pooled = out["person"]["batches_7_8_9_10_11_12"]
    assert (pooled["focusnfix/safety"]["removed"], pooled["draft/safety"]["removed"], pooled["draft/safety"]["base_marked"]) == (37, 52, 92)
    assert (pooled["focusnfix/safety"]["new"], pooled["draft/safety"]["new"], pooled["draft/safety"]["base_clean"]) == (3, 19, 148)
    assert out["person"]["pooled_paired_focusnfix_minus_draft"] == {"n": 92, "mean": -0.163, "ci95": [-0.261, -0.076]}


def test_audit_batch_13_decides_the_fitted_alignment_decision_as_docs_quote():
    out = _run("audit_batch.py")  # batch 13, pooled over batches 7-13
    k = {a: {name: e["kappa"] for name, e in v.items()} for a, v in out["kappa"].items()}
    assert out["n"] == 144 and out["human_defect_rate"]["alignment"] == 0.292
    assert (k["alignment"]["shipped (scene fit, fitted decision)"], k["alignment"]["scene fit (before)"]) == (0.765, 0.702)
    assert (k["safety"]["audit_trained"], k["safety"]["person_tuned"]) == (0.658, 0.618)  # the second fresh test
    assert (k["plausibility"]["shipped"], k["plausibility"]["before (at 0.7)"]) == (0.683, 0.421)
    pooled = out["person"]["batches_7_8_9_10_11_12_13"]
    assert (pooled["focusnfix/safety"]["removed"], pooled["draft/safety"]["removed"], pooled["draft/safety"]["base_marked"]) == (45, 67, 115)
    assert (pooled["focusnfix/safety"]["new"], pooled["draft/safety"]["new"], pooled["draft/safety"]["base_clean"]) == (3, 20, 173)
    assert out["person"]["pooled_paired_focusnfix_minus_draft"] == {"n": 115, "mean": -0.191, "ci95": [-0.278, -0.113]}


def test_the_shipped_alignment_decision_is_the_one_the_script_fits():
    from focusnfix.toyworld import assets_path, load_judge

    shipped = json.loads((assets_path() / "judges" / "alignment_decision.json").read_text())
    assert shipped == json.loads((ROOT / "experiments" / "data" / "alignment_calibration.json").read_text())
    out = _run("alignment_calibration.py", "fit", "--batches", "6,7,8,9,10,11,12")
    assert all(torch.allclose(torch.tensor(out["params"][k]), torch.tensor(v), atol=1e-4) for k, v in shipped["params"].items())
    judge = load_judge("alignment")
    assert judge.decision is not None and load_judge("alignment", audit_trained=False).decision is None


def test_the_second_reading_of_batch_11_agrees_with_the_first_as_docs_quote():
    out = _run("label_agreement.py", "score", "--batch", "11", "--shuffle-seed", "111",
               "--labels", str(ROOT / "experiments" / "data" / "batch11_second_reading.txt"))
    assert [out[a]["kappa_first_vs_second"] for a in ("safety", "plausibility", "alignment")] == [0.769, 0.51, 0.864]
    assert (out["safety"]["first_marks"], out["safety"]["second_marks"], out["safety"]["both"]) == (32, 36, 28)
    assert (out["safety"]["judge_kappa_with_first"], out["safety"]["judge_kappa_with_second"]) == (0.579, 0.48)


def test_the_mark_judges_settings_are_the_ones_the_person_labels_choose():
    from focusnfix.toyworld.scene_fit import SceneFitMarkJudge

    out = _run("scene_fit_safety.py")
    judge = SceneFitMarkJudge()
    assert out["chosen"] == {"stray_window": judge.stray_window, "stray_threshold": judge.stray_threshold,
                             "patch_window": judge.patch_window, "patch_erosion": judge.patch_erosion,
                             "patch_threshold": judge.patch_threshold}
    assert out["person_kappa"]["chosen"] == 0.678 and out["person_kappa"]["shipped_judge_at_its_threshold"] == 0.419
    assert all(out["design_forms_auc"]["chosen"][f] >= 0.97 for f in ("dark", "lightened", "recoloured", "faded",
                                                                     "blurred", "detached", "partial"))


def test_the_safety_judges_threshold_is_the_one_the_person_labels_choose():
    out = _run("judge_threshold.py")
    assert out["chosen_threshold"] == 0.2 == tw_threshold()
    assert out["person_set_kappa_by_threshold"]["0.2"] == 0.419
    assert (out["audit_6_9"]["at_0.5"]["kappa"], out["audit_6_9"]["at_0.2"]["kappa"]) == (0.528, 0.531)


def test_the_plausibility_judges_threshold_is_the_one_the_person_labels_choose():
    from focusnfix.toyworld import judge_threshold

    out = _run("plausibility_threshold.py")
    assert out["chosen_threshold"] == 0.7 == judge_threshold("plausibility")
    assert out["person_set"] == {"n": 256, "marked": 34, "judge_flags_at_0.5": 56}
    assert (out["person_set_kappa_by_threshold"]["0.5"], out["person_set_kappa_by_threshold"]["0.7"]) == (0.388, 0.399)
    assert (out["audit_6_11"]["at_0.5"]["kappa"], out["audit_6_11"]["at_0.7"]["kappa"]) == (0.252, 0.347)


def tw_threshold() -> float:
    from focusnfix.toyworld import judge_threshold

    return judge_threshold("safety")


def test_the_judge_as_reward_is_log_one_minus_its_defect_probability_and_localizes_with_its_heatmap():
    sys.path.insert(0, str(ROOT / "experiments"))
    from judge_as_reward import judge_aspect

    from focusnfix.toyworld import load_judge

    aspect, judge = judge_aspect(), load_judge("safety", person_tuned=True)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    p = judge.defect_probability(x, [""] * 3)
    assert torch.allclose(aspect.reward(x, [""] * 3).exp(), 1 - p, atol=1e-6)
    assert torch.equal(aspect.heatmap(x, [""] * 3), judge.defect_heatmap(x, [""] * 3))
    assert aspect.reward_threshold == pytest.approx(math.log(0.5))  # gated at the judge's own 0.5


def test_the_judge_as_reward_arms_set_focusnfix_span_and_keep_draft_the_papers():
    sys.path.insert(0, str(ROOT / "experiments"))
    from judge_as_reward import SELECT_GRID, STEPS_GRID, run_config

    from focusnfix.config import config_from_dict
    from focusnfix.demo import FULL

    def span(beta, **kw):
        c = config_from_dict(run_config(Path("/tmp/unused"), beta, 0, FULL, **kw))
        return c.lora.active_steps, c.sampling.k, c.aspects[0].args["target"], c.mask.dilate_px

    assert span(0.5) == (5, 5, "judge_as_reward:judge_aspect", 3)  # the demo's late LoRA
    assert span(0.5, arm="every") == (None, 2, "judge_as_reward:judge_aspect", 3)
    for name, (active, k, _betas) in SELECT_GRID.items():
        assert span(0.5, span=name)[:2] == (active, k)
        assert span(0.0, span=name)[:2] == (None, 2)  # DRaFT: every step, K = 2, whatever the span
    assert 0.0 in SELECT_GRID["every"][2]  # the others' reference of the rule
    for name, (active, k, _betas, steps) in STEPS_GRID.items():  # the fourth arm: longer training
        c = config_from_dict(run_config(Path("/tmp/unused"), 0.5, 0, FULL, span=name))
        assert (c.lora.active_steps, c.sampling.k, c.train.steps) == (active, k, steps)
        assert config_from_dict(run_config(Path("/tmp/unused"), 0.0, 0, FULL, span=name)).train.steps == FULL.steps


@pytest.mark.slow
def test_the_judge_as_reward_experiment_trains_and_judges_both_methods(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "experiments" / "judge_as_reward.py"), "--out", str(tmp_path), "--quick",
                    "--train-seeds", "1"], capture_output=True, text=True, cwd=ROOT, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})  # stdout also holds the training runs' lines
    out = json.loads((tmp_path / "eval_late" / "judge_as_reward.json").read_text())
    assert out["judge"] == "scene_fit_mark"
    for m in ("focusnfix", "draft"):
        assert 0.0 <= out["removal_share"][m]["mean"] <= 1.0
    assert "removal_share" in out["paired"]["focusnfix - draft"]
    assert set(out["reward_reading"]["runs"]) == {"method__focusnfix", "method__draft"}
    assert (tmp_path / "eval_late" / "metrics.json").is_file() and (tmp_path / "eval_late" / "images.npz").is_file()
