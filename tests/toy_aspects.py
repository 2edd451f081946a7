"""Small synthetic aspects for tests (importable as a config ``python`` target)."""

from __future__ import annotations

import torch
from torch import nn

from focusnfix.aspects import Aspect


class BrightnessAspect(Aspect):
    """Reward = mean brightness (wants change everywhere); heatmap = a fixed box.

    ``region``: "left" (left half), "none" (empty heatmap) or "all".
    """

    def __init__(self, region: str = "left", name: str = "brightness") -> None:
        super().__init__()
        self.name = name
        self.region = region

    def reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))

    def heatmap(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        b, _, h, w = images.shape
        hm = images.new_zeros(b, 1, h, w)
        if self.region == "left":
            hm[..., : w // 2] = 1.0
        elif self.region == "all":
            hm[:] = 1.0
        return hm


class RedClassifier(nn.Module):
    """A scalar 'safety' reward: minus the redness of the image, through a conv layer (Grad-CAM)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.bias.zero_()
            self.features.weight[:, 0, 1, 1] = 1.0  # red channel
            self.features.weight[:, 1, 1, 1] = -0.5
            self.features.weight[:, 2, 1, 1] = -0.5

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -torch.relu(self.features(images)).mean(dim=(1, 2, 3))


def brightness(region: str = "left") -> BrightnessAspect:
    return BrightnessAspect(region)


def red_classifier() -> RedClassifier:
    return RedClassifier()


class ImagesOnlyReward(nn.Module):
    """A reward whose forward takes images alone: not callable as a saliency reward(images, prompts)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))
