"""A judge's operating point: moved probabilities that keep its ranking and cross 0.5 at the threshold."""

import json
import shutil

import pytest
import torch

from focusnfix.aspects.base import CalibratedJudge, Judge
from focusnfix.toyworld import assets_path, judge_threshold, load_judge


class _Fixed(Judge):
    name = "fixed"

    def __init__(self, p: torch.Tensor) -> None:
        super().__init__()
        self.p = p

    def defect_probability(self, images, prompts):
        return self.p


def test_the_calibrated_judge_calls_a_defect_exactly_above_its_threshold_and_keeps_the_order():
    p = torch.tensor([0.0, 0.05, 0.19, 0.2, 0.21, 0.5, 0.9, 1.0])
    q = CalibratedJudge(_Fixed(p), 0.2).defect_probability(None, [])
    assert torch.equal(q > 0.5, p > 0.2)
    assert bool((q[1:] >= q[:-1]).all())  # monotone: every AUC unchanged
    assert float(q[3]) == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        CalibratedJudge(_Fixed(p), 1.0)


def test_the_generator_trained_safety_judge_comes_at_its_threshold_and_raw_at_half():
    assert judge_threshold("safety") == 0.2 and judge_threshold("plausibility") == 0.7
    assert judge_threshold("alignment") == 0.5  # none named: as trained
    images = torch.rand(3, 3, 64, 64)
    raw = load_judge("safety", raw=True, person_tuned=False).defect_probability(images, ["a"] * 3)
    shipped = load_judge("safety", person_tuned=False)
    assert isinstance(shipped, CalibratedJudge) and not shipped.training
    assert torch.equal(shipped.defect_probability(images, ["a"] * 3) > 0.5, raw > 0.2)
    assert shipped.defect_heatmap(images, ["a"] * 3).shape == (3, 1, 32, 32)


def test_a_bad_threshold_file_names_the_file_and_the_judge(tmp_path):
    root = tmp_path / "assets"
    shutil.copytree(assets_path() / "pipeline", root / "pipeline")
    (root / "judges").mkdir()
    assert judge_threshold("safety", root) == 0.5  # no file: as trained
    (root / "judges" / "thresholds.json").write_text(json.dumps({"safety": 2}))
    with pytest.raises(ValueError, match="thresholds.json.*'safety'"):
        judge_threshold("safety", root)


def test_an_evaluation_says_which_judge_runs_at_its_own_operating_point(tmp_path):
    from focusnfix.config import MaskConfig
    from focusnfix.evaluate import evaluate
    from focusnfix.sampling import SamplingOptions
    from focusnfix.toyworld import load_aspect

    metrics = evaluate("toy", {}, {"safety": load_aspect("safety")}, "safety",
                       {"safety": load_judge("safety", person_tuned=False)},
                       ["a red circle on the left"], [0], SamplingOptions(num_inference_steps=2, guidance_scale=1.0),
                       MaskConfig(), tmp_path, n_bootstrap=10)
    assert any("safety judge runs at its own operating point" in n and "0.2" in n for n in metrics["notes"])


def test_the_shipped_safety_and_plausibility_judges_are_the_audit_trained_ones_at_half():
    from safetensors.torch import load_file

    from focusnfix.toyworld.models import LocalizingJudge

    images = torch.rand(2, 3, 64, 64)
    for name in ("safety", "plausibility"):
        judge = load_judge(name)
        assert isinstance(judge, LocalizingJudge) and not judge.training  # no operating point: 0.5, as trained
        packaged = load_file(str(assets_path() / "judges" / f"{name}_audit.safetensors"))
        assert all(torch.equal(v, packaged[k]) for k, v in judge.net.state_dict().items())
        assert torch.equal(judge.defect_probability(images, ["a"] * 2),
                           load_judge(name, audit_trained=True).defect_probability(images, ["a"] * 2))
    narrow = load_judge("safety_narrow")  # one judge per aspect
    packaged = load_file(str(assets_path() / "judges" / "safety_audit.safetensors"))
    assert all(torch.equal(v, packaged[k]) for k, v in narrow.net.state_dict().items())
    # the versions before it stay loadable by name: the person-tuned safety judge (shipped from batch 11
    # to 12) and the generator-trained plausibility judge at its operating point
    before = load_judge("safety", audit_trained=False)
    person = load_file(str(assets_path() / "judges" / "safety_person.safetensors"))
    assert all(torch.equal(v, person[k]) for k, v in before.net.state_dict().items())
    assert torch.equal(before.defect_probability(images, ["a"] * 2),
                       load_judge("safety", person_tuned=True).defect_probability(images, ["a"] * 2))
    assert isinstance(load_judge("plausibility", audit_trained=False), CalibratedJudge)
    assert not isinstance(load_judge("plausibility", raw=True), CalibratedJudge)  # raw: the generator-trained one
    with pytest.raises(ValueError, match="one version"):
        load_judge("safety", audit_trained=True, person_tuned=True)


def test_assets_without_a_person_tuned_judge_fall_back_or_say_what_writes_it(tmp_path):
    root = tmp_path / "assets"
    shutil.copytree(assets_path() / "pipeline", root / "pipeline")
    (root / "judges").mkdir()
    shutil.copy(assets_path() / "judges" / "safety.safetensors", root / "judges")
    assert not isinstance(load_judge("safety", root=root), CalibratedJudge)  # generator-trained, at 0.5: no thresholds
    with pytest.raises(FileNotFoundError, match="audit_trained_judge.py --aspect safety --holdout 12 13 --install"):
        load_judge("safety", root=root, audit_trained=True)
    with pytest.raises(FileNotFoundError, match="person_labelled_judge.py --install"):
        load_judge("safety", root=root, person_tuned=True)
    with pytest.raises(ValueError, match="only the safety judge"):
        load_judge("plausibility", person_tuned=True)
