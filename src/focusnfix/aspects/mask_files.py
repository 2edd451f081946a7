"""User-given masks as a localizer: the user paints the region to fix.

``path`` is either one image (the same region for every prompt) or a directory with an
``index.json`` that maps each prompt to an image file in that directory, or to an object that maps
initial-noise seeds to image files (one mask per (prompt, seed): the frozen model draws a
different image for each seed, so the defect sits elsewhere)::

    {"a red circle on a white background": "circle.png",
     "a blue square on a grey background": {"0": "square_seed0.png", "1": "square_seed1.png"}}

White = may change,
black = keep; grey levels give a soft heatmap. Accepted: 8-bit grey (``L``, ``1``),
16-bit grey (``I;16``, scaled by 65535), 32-bit float grey (``F``, values in [0, 1]) and RGB(A)
or palette images whose three channels are equal. The files must lie inside the folder (they
are what identifies its masks in the reference cache). A mask must have the image's size unless ``resize: true``
(bilinear). The reward is zero: combine this aspect (``weight: 0``) with a reward aspect that
has ``localize: false``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from focusnfix.aspects.base import Aspect
from focusnfix.errors import InputError


def read_mask_image(path: Path) -> torch.Tensor:
    """A greyscale image file -> ``(1, 1, h, w)`` in [0, 1] (see the module docstring for modes)."""
    if not path.is_file():
        raise InputError(f"mask image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("L", "1"):
                arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
            elif mode.startswith("I;16") or mode == "I":
                arr = np.asarray(im, dtype=np.float64)
                if arr.min() < 0 or arr.max() > 65535:
                    raise InputError(f"mask image {path}: {mode} values must lie in 0..65535")
                arr = (arr / 65535.0).astype(np.float32)
            elif mode == "F":
                arr = np.asarray(im, dtype=np.float32)
                if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
                    raise InputError(f"mask image {path}: float masks must hold values in [0, 1]")
            elif mode in ("RGB", "RGBA", "LA", "P", "PA"):  # a palette may hold colours: checked as RGB
                rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise InputError(f"mask image {path} is in colour; a mask must be greyscale (white = may change)")
                arr = rgb[..., 0] / 255.0
            else:
                raise InputError(f"mask image {path} has mode {mode}; expected 8- or 16-bit greyscale")
    except (OSError, Image.DecompressionBombError) as err:
        raise InputError(f"mask image {path} is not a readable image: {err}") from err
    return torch.from_numpy(np.ascontiguousarray(arr))[None, None]


#: a seed key of index.json: ASCII digits of a seed that fits torch's generator (< 2**63)
_SEED_KEY = re.compile(r"[0-9]{1,19}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"keys given twice: {twice}")
    return dict(pairs)


def _mask_path(root: Path, index: Path, name: str, where: str) -> Path:
    """``root / name`` for a plain file name inside ``root``: a path outside it (``..``, absolute)
    would escape the reference cache's identity of the folder, which lists the folder's files."""
    if not name or name in (".", "..") or Path(name).is_absolute() or ".." in Path(name).parts:
        raise InputError(f"{index}: {where} names {name!r}; expected the name of an image file inside {root}")
    return root / name


def _read_index(root: Path) -> dict[str, Path | dict[int, Path]]:
    """``root/index.json`` -> prompt -> mask file, or prompt -> {seed: mask file}; every file checked."""
    index = root / "index.json"
    if not index.is_file():
        raise InputError(f"mask directory {root} needs an index.json mapping prompts to image files")
    try:
        mapping = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"{index} is not valid JSON: {err}") from err
    expected = 'an object mapping prompt -> image file name, or prompt -> {"<seed>": image file name}'
    if not isinstance(mapping, dict) or not mapping:
        raise InputError(f"{index} must be {expected}")
    out: dict[str, Path | dict[int, Path]] = {}
    for prompt, entry in mapping.items():
        if isinstance(entry, str):
            out[prompt] = _mask_path(root, index, entry, f"prompt {prompt!r}")
        elif isinstance(entry, dict) and entry:
            by_seed: dict[int, Path] = {}
            for seed, name in entry.items():
                if not (_SEED_KEY.fullmatch(seed) and int(seed) < 2**63 and isinstance(name, str)):
                    raise InputError(f"{index}: prompt {prompt!r}: {seed!r}: {name!r} must map a seed (a "
                                     f"non-negative integer below 2**63, in ASCII digits) to an image file name")
                if int(seed) in by_seed:
                    raise InputError(f"{index}: prompt {prompt!r} gives seed {int(seed)} twice (as {seed!r} too)")
                by_seed[int(seed)] = _mask_path(root, index, name, f"prompt {prompt!r}, seed {seed}")
            out[prompt] = by_seed
        else:
            raise InputError(f"{index}: prompt {prompt!r} maps to {entry!r}; the index must be {expected}")
    for entry in out.values():
        for f in entry.values() if isinstance(entry, dict) else [entry]:
            if not f.is_file():
                raise InputError(f"{index} names {f.relative_to(root)}, which does not exist in {root}")
    return out


class MaskFileAspect(Aspect):
    """Heatmaps from mask images; zero reward."""

    def __init__(self, path: str | Path, name: str = "user_mask", resize: bool = False) -> None:
        super().__init__()
        if not isinstance(resize, bool):  # YAML `resize: "false"` is a string, and a string is truthy
            raise InputError(f"mask_files: resize must be true or false, got {resize!r}")
        self.name = name
        self.resize = resize
        root = Path(path)
        self.single: torch.Tensor | None = None
        self.by_prompt: dict[str, Path | dict[int, Path]] = {}
        if root.is_file():
            self.single = read_mask_image(root)
        elif root.is_dir():
            self.by_prompt = _read_index(root)
        else:
            raise InputError(f"mask path {root} does not exist (expected an image or a directory with index.json)")

    def reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.new_zeros(images.shape[0])

    def mask_file(self, prompt: str, seed: int | None) -> Path:
        """The mask image of (prompt, seed) in the index (``seed`` None: images not sampled from seeds)."""
        if prompt not in self.by_prompt:
            raise InputError(f"no mask image for prompt {prompt!r} in the mask directory's index.json")
        entry = self.by_prompt[prompt]
        if not isinstance(entry, dict):
            return entry
        if seed is None:
            raise InputError(f"the index.json keys the masks of prompt {prompt!r} by seed, but these images "
                             "come without seeds")
        if seed not in entry:
            raise InputError(f"no mask image for prompt {prompt!r} and seed {seed} in the mask directory's "
                             f"index.json (it has seeds {sorted(entry)})")
        return entry[seed]

    def heatmap(self, images: torch.Tensor, prompts: list[str], seeds: Sequence[int] | None = None) -> torch.Tensor:
        size = images.shape[-2:]
        maps = []
        for i, prompt in enumerate(prompts):
            if self.single is not None:
                m = self.single
            else:
                m = read_mask_image(self.mask_file(prompt, None if seeds is None else int(seeds[i])))
            if tuple(m.shape[-2:]) != tuple(size):
                if not self.resize:
                    raise InputError(
                        f"mask for prompt {prompt!r} is {m.shape[-1]}x{m.shape[-2]} but the images are "
                        f"{size[1]}x{size[0]}; give masks of the image size or set resize: true in the aspect's args"
                    )
                m = torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)
            maps.append(m)
        return torch.cat(maps).to(images.device).clamp(0, 1)
