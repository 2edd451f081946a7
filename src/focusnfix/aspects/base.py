"""The aspect interface: one quality aspect = a differentiable reward + a localizer.

An aspect answers two questions about a batch of images and their prompts:

* ``reward(images, prompts) -> (B,)``: how good the image is on this aspect, higher is
  better, differentiable with respect to ``images`` (the trainer backpropagates it through
  the VAE decoder and the last sampling steps);
* ``heatmap(images, prompts, seeds) -> (B, 1, h, w)`` in [0, 1]: where the image is bad on this
  aspect (1 = problematic). It is only ever called on the frozen model's images, under
  ``torch.no_grad`` or with its own local autograd (saliency), and never backpropagated.
  ``seeds`` are the images' initial-noise seeds (None where the images were not sampled from
  seeds), so a localizer can be keyed by (prompt, seed), as user mask files are.

Images are always ``(B, 3, H, W)`` float tensors in [0, 1]; prompts are a list of B strings.
Each aspect resizes and normalises images itself (in torch, so gradients flow).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn


class Aspect(nn.Module, ABC):
    """Base class of every aspect (reward model + localizer).

    Subclasses implement :meth:`reward` and :meth:`heatmap`. An aspect is an ``nn.Module``
    so ``.to(device)`` and ``.eval()`` work; its own parameters are frozen by the trainer.

    Attributes:
        name: short identifier used in logs and metrics (``"safety"``, ``"plausibility"``).
    """

    name: str = "aspect"
    #: reward at or above which an image has no defect of this aspect (e.g. ``log 0.5`` for a
    #: reward ``log p_good``); with it, the aspect's mask is empty on images it calls clean (the
    #: mask gate, ``aspects[].gate: auto``). None: the aspect gives no such threshold.
    reward_threshold: float | None = None

    @abstractmethod
    def reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Differentiable reward.

        Args:
            images: ``(B, 3, H, W)`` in [0, 1].
            prompts: B prompts.

        Returns:
            ``(B,)`` float tensor, higher is better.
        """

    @abstractmethod
    def heatmap(self, images: torch.Tensor, prompts: list[str], seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Where the image is bad on this aspect.

        Args:
            images: ``(B, 3, H, W)`` in [0, 1].
            prompts: B prompts.
            seeds: the B images' initial-noise seeds, or None where the images were not sampled
                from seeds (generator scenes); most localizers ignore them.

        Returns:
            ``(B, 1, h, w)`` in [0, 1], any resolution (the mask code resizes it).
        """

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.reward(images, prompts)


def aspect_heatmap(aspect: Aspect, images: torch.Tensor, prompts: list[str],
                   seeds: Sequence[int] | None = None) -> torch.Tensor:
    """``aspect.heatmap`` with the images' seeds, for an aspect whose ``heatmap`` takes them.

    An aspect written for the two-argument signature of earlier releases
    (``heatmap(images, prompts)``) is called without them; it cannot key by seed anyway.
    """
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    params = inspect.signature(aspect.heatmap).parameters
    takes_seeds = "seeds" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if takes_seeds:
        return aspect.heatmap(images, prompts, seeds=None if seeds is None else [int(s) for s in seeds])
    return aspect.heatmap(images, prompts)


class Judge(nn.Module, ABC):
    """An evaluation-only model of one aspect, independent of the training reward.

    ``defect_probability(images, prompts) -> (B,)`` in [0, 1]: the probability that the image
    has the aspect's defect. Judges are never used in training, so reward hacking of the
    training-time aspect model shows up as a gap between reward and judge.
    """

    name: str = "judge"

    @abstractmethod
    def defect_probability(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``images: (B, 3, H, W)`` in [0, 1] -> ``(B,)`` in [0, 1]."""

    def defect_heatmap(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor | None:
        """Where the defect is: ``(B, 1, h, w)`` in [0, 1], or None for a judge that does not localize."""
        return None

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.defect_probability(images, prompts)


class CalibratedJudge(Judge):
    """A judge whose operating point was set on labelled data: ``judge`` with threshold ``threshold``.

    Every consumer calls a defect where the probability exceeds 0.5, so the probability is moved
    instead: ``p' = sigmoid(logit(p) - logit(threshold))``, so ``p' > 0.5`` exactly when
    ``p > threshold``. The map is monotone, so every AUC of the judge is unchanged; the heatmap is
    the wrapped judge's.
    """

    def __init__(self, judge: Judge, threshold: float) -> None:
        super().__init__()
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"a judge's threshold must be in (0, 1), got {threshold}")
        self.judge = judge
        self.threshold = threshold
        self.name = judge.name

    def defect_probability(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        p = self.judge.defect_probability(images, prompts).clamp(1e-7, 1 - 1e-7)
        shift = torch.logit(torch.tensor(self.threshold, dtype=p.dtype, device=p.device))
        return torch.sigmoid(torch.logit(p) - shift)

    def defect_heatmap(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor | None:
        return self.judge.defect_heatmap(images, prompts)
