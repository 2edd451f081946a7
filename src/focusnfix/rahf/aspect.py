"""A trained RAHF model as a focusnfix aspect (aspect type ``rahf``).

reward = one predicted score ``(B,)`` in [0, 1] (``plausibility`` for artifacts, ``alignment``
for text-image misalignment; differentiable w.r.t. the image); heatmap = one predicted map
``(B, 1, S, S)`` in [0, 1] (``implausibility`` or ``misalignment``; 1 = problem).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from focusnfix.aspects.base import Aspect
from focusnfix.errors import InputError
from focusnfix.rahf.model import HEATMAPS, SCORES, RAHFModel


class RAHFAspect(Aspect):
    """See the module docstring.

    Args:
        model: a :class:`RAHFModel`.
        score: which score is the reward (``plausibility``, ``alignment``, ``aesthetics``, ``overall``).
        heatmap: which map localizes (``implausibility`` or ``misalignment``).
    """

    def __init__(self, model: RAHFModel, score: str = "plausibility", heatmap: str = "implausibility",
                 name: str | None = None) -> None:
        super().__init__()
        if score not in SCORES:
            raise InputError(f"rahf: score must be one of {list(SCORES)}, got {score!r}")
        if heatmap not in HEATMAPS:
            raise InputError(f"rahf: heatmap must be one of {list(HEATMAPS)}, got {heatmap!r}")
        self.model = model
        self.score = score
        self.map = heatmap
        self.name = name or score

    def reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``(B,)`` in [0, 1], higher is better; differentiable."""
        return self.model(images, prompts)[self.score]

    def heatmap(self, images: torch.Tensor, prompts: list[str], seeds: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, 1, S, S)`` in [0, 1], 1 = problem."""
        with torch.no_grad():
            return self.model(images, prompts)[self.map]


def from_pretrained(model: str, score: str = "plausibility", heatmap: str = "implausibility",
                    name: str | None = None) -> RAHFAspect:
    """Aspect type ``rahf``: ``args: {model: DIR (from focusnfix rahf train), score: ..., heatmap: ...}``."""
    return RAHFAspect(RAHFModel.from_pretrained(model), score, heatmap, name)
