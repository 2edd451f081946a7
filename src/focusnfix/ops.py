"""Image operations shared by masks, localizers, the toy world and the RAHF model.

Pure tensor (or numpy) functions, no gradients cut and no I/O: blur, binary dilation, resize.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, h, w)`` with reflect padding; ``sigma`` in pixels."""
    if sigma <= 0:
        return maps
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = maps.shape[1]
    kx = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    ky = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    pad_x = min(radius, maps.shape[-1] - 1)
    pad_y = min(radius, maps.shape[-2] - 1)
    if pad_x < radius or pad_y < radius:  # tiny maps: fall back to zero padding
        out = F.conv2d(maps, kx, padding=(0, radius), groups=channels)
        return F.conv2d(out, ky, padding=(radius, 0), groups=channels)
    out = F.conv2d(F.pad(maps, (radius, radius, 0, 0), mode="reflect"), kx, groups=channels)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), ky, groups=channels)


def disk_kernel(radius: int) -> torch.Tensor:
    """``(2r+1, 2r+1)`` float disk of the given pixel radius (1 inside, 0 outside)."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return ((r.view(-1, 1) ** 2 + r.view(1, -1) ** 2) <= radius**2 + 1e-6).float()


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow a binary ``(B, 1, H, W)`` mask by a disk of ``radius`` pixels (0 = unchanged)."""
    if radius < 0:
        raise ValueError(f"dilation radius must be >= 0 pixels, got {radius}")
    if radius == 0:
        return mask
    kernel = disk_kernel(radius).to(mask).view(1, 1, 2 * radius + 1, 2 * radius + 1)
    hits = F.conv2d(mask, kernel, padding=radius)
    return (hits > 0.5).to(mask.dtype)


def dilate_4n(mask: np.ndarray, steps: int) -> np.ndarray:
    """Grow a boolean ``(H, W)`` numpy mask by its 4-neighbours, ``steps`` times (a diamond of that radius)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear", antialias: bool = False) -> torch.Tensor:
    """Resize ``(B, C, h, w)`` to ``size = (H, W)`` (``align_corners=False``); unchanged if already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False, antialias=antialias)


__all__ = ["dilate", "dilate_4n", "disk_kernel", "gaussian_blur", "resize"]
