"""User-given masks as a localizer: the user paints the region to fix.

``path`` is either one image (the same region for every prompt) or a directory with an
``index.json`` mapping each prompt to an image file in that directory. White (255) = may
change, black (0) = keep; grey levels give a soft heatmap. The reward is zero: combine this
aspect (``weight: 0``) with a reward aspect that has ``localize: false``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from focusnfix.aspects.base import Aspect
from focusnfix.errors import InputError


def read_mask_image(path: Path) -> torch.Tensor:
    """A grayscale image file -> ``(1, 1, h, w)`` in [0, 1]."""
    if not path.is_file():
        raise InputError(f"mask image {path} does not exist")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except OSError as err:
        raise InputError(f"mask image {path} is not a readable image: {err}") from err
    return torch.from_numpy(arr)[None, None]


class MaskFileAspect(Aspect):
    """Heatmaps from mask images; zero reward."""

    def __init__(self, path: str | Path, name: str = "user_mask") -> None:
        super().__init__()
        self.name = name
        root = Path(path)
        self.single: torch.Tensor | None = None
        self.by_prompt: dict[str, Path] = {}
        if root.is_file():
            self.single = read_mask_image(root)
        elif root.is_dir():
            index = root / "index.json"
            if not index.is_file():
                raise InputError(f"mask directory {root} needs an index.json mapping prompts to image files")
            try:
                mapping = json.loads(index.read_text())
            except json.JSONDecodeError as err:
                raise InputError(f"{index} is not valid JSON: {err}") from err
            if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
                raise InputError(f"{index} must be an object mapping prompt -> image file name")
            self.by_prompt = {p: root / f for p, f in mapping.items()}
            for f in self.by_prompt.values():
                if not f.is_file():
                    raise InputError(f"{index} names {f.name}, which does not exist in {root}")
        else:
            raise InputError(f"mask path {root} does not exist (expected an image or a directory with index.json)")

    def reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.new_zeros(images.shape[0])

    def heatmap(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        size = images.shape[-2:]
        maps = []
        for prompt in prompts:
            if self.single is not None:
                m = self.single
            elif prompt in self.by_prompt:
                m = read_mask_image(self.by_prompt[prompt])
            else:
                raise InputError(f"no mask image for prompt {prompt!r} in the mask directory's index.json")
            maps.append(torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False))
        return torch.cat(maps).to(images.device).clamp(0, 1)
