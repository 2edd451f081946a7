"""Image helpers: tensors <-> PNG, grids, heatmap colouring. No gradients here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from focusnfix.errors import InputError
from focusnfix.files import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in [0, 1] (C = 1 or 3) -> ``(B, H, W, 3)`` uint8."""
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def colorize(heatmap: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` in [0, 1] -> ``(B, 3, H, W)`` with a black-red-yellow-white ramp."""
    h = heatmap.detach().float().clamp(0, 1)
    r = (h * 3).clamp(0, 1)
    g = (h * 3 - 1).clamp(0, 1)
    b = (h * 3 - 2).clamp(0, 1)
    return torch.cat([r, g, b], dim=1)


def overlay(images: torch.Tensor, mask: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Tint the masked region red: images ``(B, 3, H, W)``, mask ``(B, 1, H, W)`` in [0, 1]."""
    red = torch.zeros_like(images)
    red[:, 0] = 1.0
    m = alpha * mask.to(images)
    return images * (1 - m) + red * m


#: the longest side a picture may have after upscaling (browsers and viewers refuse larger images)
MAX_PICTURE_SIDE = 16384


def check_picture_size(rows: int, cols: int, size: tuple[int, int], pad: int = 2, scale: int = 1) -> None:
    """Raise :class:`InputError` when a :func:`grid` of ``rows x cols`` images of ``size`` (h, w)
    upscaled by ``scale`` would exceed :data:`MAX_PICTURE_SIDE` a side (callable before any sampling)."""
    h, w = size
    side = max(rows * (h + pad) + pad, cols * (w + pad) + pad)
    if side * scale > MAX_PICTURE_SIDE:
        raise InputError(f"a picture {side} px a side at scale {scale} would be {side * scale} px, above "
                         f"{MAX_PICTURE_SIDE}: use a scale of at most {max(MAX_PICTURE_SIDE // side, 1)}")


def grid(rows: list[torch.Tensor], pad: int = 2, scale: int = 1) -> np.ndarray:
    """Rows of ``(B, C, H, W)`` images (same B, H, W) -> one ``(h, w, 3)`` uint8 grid.

    Raises:
        InputError: the grid upscaled by ``scale`` would exceed :data:`MAX_PICTURE_SIDE` a side.
    """
    if not rows:
        raise ValueError("grid of no rows")
    cols = rows[0].shape[0]
    h, w = rows[0].shape[-2:]
    check_picture_size(len(rows), cols, (h, w), pad, scale)
    out = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(to_uint8(row)):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            out[y : y + h, x : x + w] = img
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out


def save_png(array: np.ndarray | torch.Tensor, path: str | Path) -> Path:
    """Write an ``(h, w, 3)`` uint8 array or a ``(3, H, W)`` tensor in [0, 1] as PNG, atomically.

    Raises:
        InputError: ``path`` does not end in ``.png`` (the file would hold PNG bytes under another name).
    """
    if Path(path).suffix.lower() != ".png":
        raise InputError(f"{path}: the output is a PNG image, its name must end in .png")
    if isinstance(array, torch.Tensor):
        array = to_uint8(array[None])[0]
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"), suffix=".png")

