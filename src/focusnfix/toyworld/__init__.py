"""The toy world: the embedded default world that runs Focus-N-Fix end to end on a CPU.

* :func:`generate` - procedural 64x64 scenes with captions and exact ground-truth defect masks;
* :func:`prompts` - the fixed train / held-out prompt lists;
* :func:`pipeline_path` - the packaged tiny Stable Diffusion pipeline (diffusers layout);
* :func:`load_aspect` / :func:`load_judge` - the packaged training-time aspect models and the
  independent evaluation judges.

Importing this package is cheap: nothing is trained or loaded until asked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from focusnfix.aspects.base import Aspect, CalibratedJudge, Judge
from focusnfix.aspects.saliency import SaliencyAspect
from focusnfix.toyworld import models as M
from focusnfix.toyworld.generator import (
    ASPECTS,
    PROMPT_SPLITS,
    Scene,
    Scenes,
    generate,
    parse_caption,
    prompts,
)

__all__ = ["ASPECTS", "ASPECT_MODELS", "SALIENCY_LOCALIZERS", "Scene", "Scenes", "assets_path", "generate", "load_aspect", "judge_threshold", "load_attribute_reader", "load_judge",
           "parse_caption", "pipeline_path", "prompts", "PROMPT_SPLITS"]

_ASSETS = Path(__file__).resolve().parent / "assets"


def assets_path() -> Path:
    """Directory of the packaged weights (``pipeline/``, ``aspects/``, ``judges/``, ``build.json``)."""
    return _ASSETS


def _root(root: str | Path | None) -> Path:
    path = Path(root) if root is not None else _ASSETS
    if not (path / "pipeline" / "model_index.json").is_file():
        raise FileNotFoundError(
            f"toy world weights not found under {path}: expected pipeline/model_index.json "
            "(build them with `focusnfix toyworld build --out DIR`)"
        )
    return path


def pipeline_path(root: str | Path | None = None) -> Path:
    """The toy pipeline directory, loadable by ``StableDiffusionPipeline.from_pretrained(path, safety_checker=None)``."""
    return _root(root) / "pipeline"


#: aspect models that can be loaded: the three aspects plus ``safety_narrow``, the v1 safety reward
#: that only learned dark marks (kept for the reward-hacking experiment)
ASPECT_MODELS = (*ASPECTS, "safety_narrow")


def _check(name: str, allowed: tuple[str, ...] = ASPECTS) -> None:
    if name not in allowed:
        raise ValueError(f"toy world aspect must be one of {allowed}, got {name!r}")


def _load(module: torch.nn.Module, path: Path, device) -> torch.nn.Module:
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    module.load_state_dict(state)
    return M.freeze(module.to(device))


#: alternative localizers of the scalar safety rewards (name -> SaliencyAspect options); the build
#: packages the one with the best heatmap AUC on renders, ``toyworld calibrate`` measures them all
SALIENCY_LOCALIZERS: dict[str, dict] = {
    "gradcam": {"method": "gradcam", "layer": "features.3", "blur_sigma": 1.0},
    "smoothgrad": {"method": "smoothgrad", "blur_sigma": 2.0},
    "input_gradient": {"method": "input_gradient", "blur_sigma": 1.5},
}


def load_aspect(name: str, device: str | torch.device = "cpu", root: str | Path | None = None,
                localizer: str | None = None) -> Aspect:
    """The packaged training-time aspect model ``name`` (eval mode, frozen parameters).

    ``safety`` is a scalar classifier wrapped in :class:`~focusnfix.aspects.saliency.SaliencyAspect`
    (reward ``log(1 - p_unsafe)``), trained on every form a mark takes (dark, lightened, recoloured,
    faded, blurred, detached, merged, partial; a full build also inset); ``safety_narrow`` is the same classifier trained on
    dark marks only, the hackable reward of the reward-hacking experiment; ``plausibility`` and
    ``alignment`` are RAHF-like models with a native heatmap (reward ``log p_good``).

    ``localizer``: for the safety rewards, one of :data:`SALIENCY_LOCALIZERS` instead of the
    packaged saliency method (the one ``focusnfix toyworld calibrate`` chose, say).
    """
    _check(name, ASPECT_MODELS)
    base = _root(root) / "aspects"
    if localizer is not None and (name not in ("safety", "safety_narrow") or localizer not in SALIENCY_LOCALIZERS):
        raise ValueError(f"localizer {localizer!r}: only the safety rewards take one, one of "
                         f"{sorted(SALIENCY_LOCALIZERS)} (or none: the packaged one)")
    if name in ("safety", "safety_narrow"):
        clf = _load(M.SafetyClassifier(), base / f"{name}.safetensors", device)
        cfg = json.loads((base / "config.json").read_text())[name]["saliency"]
        cfg = {"layer": None, **SALIENCY_LOCALIZERS[localizer]} if localizer else cfg
        aspect: Aspect = SaliencyAspect(name, clf, method=cfg["method"], layer=cfg["layer"],
                                        blur_sigma=cfg["blur_sigma"])
    else:
        net = _load(M.RAHFNet(text=name == "alignment"), base / f"{name}.safetensors", device)
        aspect = M.RAHFAspect(name, net)
    aspect.reward_threshold = math.log(0.5)  # every toy reward is log p(no defect)
    return M.freeze(aspect)


def load_judge(name: str, device: str | torch.device = "cpu", root: str | Path | None = None, raw: bool = False,
               person_tuned: bool | None = None, audit_trained: bool | None = None) -> Judge:
    """The packaged evaluation judge of aspect ``name`` (independent of the aspect models; eval, frozen).

    ``safety`` and ``plausibility`` are :class:`~focusnfix.toyworld.models.LocalizingJudge`s
    (presence and a defect heatmap, trained on every form of the defect); ``alignment`` is the
    :class:`~focusnfix.toyworld.scene_fit.SceneFitAlignmentJudge`: it fits the clean scene to the
    image and compares the object's nearest named colour and best-fitting shape with the caption's
    words (untrained; it replaced the learned attribute reader by the rule in docs/toyworld.md,
    "Scene-fit judges"; it does not localize). ``safety_narrow`` names the safety judge (one judge
    per aspect, whichever reward was trained).

    The shipped safety and plausibility judges are the generator-trained ones fine-tuned on every
    label a person has given (the audit set's batches 1-11 and the labelled samples outside it;
    ``judges/<name>_audit.safetensors``, written by ``python experiments/audit_trained_judge.py
    --aspect NAME --holdout 12 13 --install``: batch 13 was labelled after them; they replaced the judges before them by the rule in
    docs/toyworld.md, "Batch 12"), at 0.5, as they were trained; the alignment judge's decision is
    likewise fitted to the person's alignment labels of audit batches 6-12
    (``judges/alignment_decision.json``; "Batch 13"). ``audit_trained``: None takes them where the
    assets hold them and no other version is asked for (a fresh build does not hold them), False
    never (the alignment judge is then the plain scene fit), True requires them. Before them the safety judge was the one fine-tuned on
    320 person-labelled samples outside the audit set (``judges/safety_person.safetensors``,
    ``python experiments/person_labelled_judge.py --install``; "Batch 11"), at 0.5:
    ``person_tuned=True`` requires it, False asks for the generator-trained judge, None takes it
    where the assets hold it. The generator-trained judges come at their operating point
    (:func:`judge_threshold`); ``raw=True`` gives them at 0.5 (and never the audit-trained ones).
    """
    _check(name, ASPECT_MODELS)
    name = "safety" if name == "safety_narrow" else name
    if person_tuned and name != "safety":
        raise ValueError(f"person_tuned: only the safety judge has a person-tuned version, not {name!r}")
    if name == "alignment":
        from focusnfix.toyworld.scene_fit import SceneFitAlignmentJudge

        decision = _root(root) / "judges" / "alignment_decision.json"  # fitted to a person's labels
        if audit_trained and not decision.is_file():
            raise FileNotFoundError(f"{decision}: no fitted alignment decision in these assets; `python "
                                    f"experiments/alignment_calibration.py fit --batches 6,7,8,9,10,11,12 --install` writes it")
        if audit_trained is False or raw or not decision.is_file():
            return M.freeze(SceneFitAlignmentJudge())
        params = json.loads(decision.read_text())["params"]
        return M.freeze(SceneFitAlignmentJudge({k: torch.tensor(v, dtype=torch.float32) for k, v in params.items()}))
    audit = _root(root) / "judges" / f"{name}_audit.safetensors"
    if audit_trained and (person_tuned is not None or raw):
        raise ValueError("audit_trained=True: the audit-trained judge is one version; person_tuned and raw ask for another")
    if audit_trained and not audit.is_file():
        raise FileNotFoundError(f"{audit}: no audit-trained {name} judge in these assets; "
                                f"`python experiments/audit_trained_judge.py --aspect {name} --holdout 12 13 --install` writes it")
    if audit_trained is not False and person_tuned is None and not raw and audit.is_file():
        return M.freeze(M.LocalizingJudge(name, _load(M.LocalizingJudgeNet(), audit, device)))
    tuned = _root(root) / "judges" / f"{name}_person.safetensors"
    if person_tuned and not tuned.is_file():
        raise FileNotFoundError(f"{tuned}: no person-tuned {name} judge in these assets; "
                                f"`python experiments/person_labelled_judge.py --install` writes it")
    if name == "safety" and person_tuned is not False and tuned.is_file():
        return M.freeze(M.LocalizingJudge(name, _load(M.LocalizingJudgeNet(), tuned, device)))
    path = _root(root) / "judges" / f"{name}.safetensors"
    judge: Judge = M.LocalizingJudge(name, _load(M.LocalizingJudgeNet(), path, device))
    threshold = 0.5 if raw else judge_threshold(name, root)
    if threshold != 0.5:
        judge = CalibratedJudge(judge, threshold)
    return M.freeze(judge)


def audit_training_batches(name: str, root: str | Path | None = None) -> list[int] | None:
    """The audit batches whose labels the shipped judge ``name`` was trained on (``judges/audit_trained.json``,
    written with the audit-trained judges), or None where the shipped judge saw no audit label: its
    agreement with those batches is with its own training data, not a test."""
    _check(name, ASPECT_MODELS)
    name = "safety" if name == "safety_narrow" else name
    judges = _root(root) / "judges"
    record = judges / "audit_trained.json"
    shipped = judges / ("alignment_decision.json" if name == "alignment" else f"{name}_audit.safetensors")
    if not shipped.is_file() or not record.is_file():
        return None
    batches = json.loads(record.read_text()).get(name, {}).get("trained_on_audit_batches")
    if not isinstance(batches, list) or not all(isinstance(b, int) for b in batches):
        raise ValueError(f"{record}: {name}.trained_on_audit_batches must be a list of batch numbers, got {batches!r}")
    return batches


def judge_threshold(name: str, root: str | Path | None = None) -> float:
    """The operating point of the generator-trained judge ``name`` (``judges/thresholds.json``; 0.5 where
    it names none; the person-tuned safety judge runs at 0.5, as it was trained).

    :func:`load_judge` returns a judge whose probability is moved so that 0.5 is this threshold
    (:class:`~focusnfix.aspects.base.CalibratedJudge`; its AUCs are the raw judge's)."""
    path = _root(root) / "judges" / "thresholds.json"
    if not path.is_file():
        return 0.5
    value = json.loads(path.read_text()).get(name, 0.5)
    if not isinstance(value, int | float) or not 0.0 < value < 1.0:
        raise ValueError(f"{path}: the threshold of {name!r} must be a number in (0, 1), got {value!r}")
    return float(value)


def load_attribute_reader(device: str | torch.device = "cpu", root: str | Path | None = None) -> M.AlignmentJudge:
    """The learned attribute classifier that reads the drawn object's colour, shape, position and
    size; ``defect_probability`` = 1 - P(colour and shape match). It was the alignment judge and
    the caption-accuracy reader until the scene fit replaced it (docs/toyworld.md); the build still
    trains it, for comparison."""
    path = _root(root) / "judges" / "alignment.safetensors"
    return M.freeze(M.AlignmentJudge(_load(M.AttributeNet(), path, device)))
