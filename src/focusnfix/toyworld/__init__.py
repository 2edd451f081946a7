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
from pathlib import Path

import torch
from safetensors.torch import load_file

from focusnfix.aspects.base import Aspect, Judge
from focusnfix.aspects.saliency import SaliencyAspect
from focusnfix.toyworld import models as M
from focusnfix.toyworld.generator import ASPECTS, Scene, Scenes, generate, parse_caption, prompts

__all__ = ["ASPECTS", "Scene", "Scenes", "assets_path", "generate", "load_aspect", "load_judge",
           "parse_caption", "pipeline_path", "prompts"]

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


def _check(name: str) -> None:
    if name not in ASPECTS:
        raise ValueError(f"toy world aspect must be one of {ASPECTS}, got {name!r}")


def _load(module: torch.nn.Module, path: Path, device) -> torch.nn.Module:
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    module.load_state_dict(state)
    return M.freeze(module.to(device))


def load_aspect(name: str, device: str | torch.device = "cpu", root: str | Path | None = None) -> Aspect:
    """The packaged training-time aspect model ``name`` (eval mode, frozen parameters).

    ``safety`` is a scalar classifier wrapped in :class:`~focusnfix.aspects.saliency.SaliencyAspect`
    (reward ``log(1 - p_unsafe)``); ``plausibility`` and ``alignment`` are RAHF-like models with a
    native heatmap (reward ``log p_good``).
    """
    _check(name)
    base = _root(root) / "aspects"
    if name == "safety":
        clf = _load(M.SafetyClassifier(), base / "safety.safetensors", device)
        cfg = json.loads((base / "config.json").read_text())["safety"]["saliency"]
        aspect: Aspect = SaliencyAspect("safety", clf, method=cfg["method"], layer=cfg["layer"],
                                        blur_sigma=cfg["blur_sigma"])
    else:
        net = _load(M.RAHFNet(text=name == "alignment"), base / f"{name}.safetensors", device)
        aspect = M.RAHFAspect(name, net)
    return M.freeze(aspect)


def load_judge(name: str, device: str | torch.device = "cpu", root: str | Path | None = None) -> Judge:
    """The packaged evaluation judge ``name`` (independent of the aspect model; eval, frozen)."""
    _check(name)
    path = _root(root) / "judges" / f"{name}.safetensors"
    if name == "alignment":
        judge: Judge = M.AlignmentJudge(_load(M.AttributeNet(), path, device))
    else:
        judge = M.ClassifierJudge(name, _load(M.JudgeNet(), path, device))
    return M.freeze(judge)
