"""What the toy VAE lets a regional fix keep outside the mask: the ceiling of the outside-PSNR metric.

A diffusion model changes latents, and the decoder spreads a latent change over more pixels than
the latent cells it touched (each 3x3 convolution at latent resolution widens it by 4 pixels, and
GroupNorm statistics shift the whole image a little). So even a *perfect* fix, made only where
the defect is, changes pixels outside a tight mask. Two measurements, both on training captions
and the generator's exact masks, no judge and no held-out prompt:

* :func:`decoder_footprint`: replace a square block of latent cells by another image's and
  report the decoded change (PSNR) in rings of growing distance from the block;
* :func:`perfect_fix_ceiling`: the generator's defect image and its fixed twin (defect gone,
  background restored) through the VAE; the twin's latents pasted into the cells under the mask
  (what a model that fixes only there could at best produce) and the outside-mask PSNR of the
  decoded result against the decoded defect image, for several mask dilations.

``focusnfix toyworld ceiling`` prints both (docs/evaluation.md quotes them). A measured outside
PSNR near the ceiling means the method changed nothing it did not have to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from focusnfix.ops import dilate

#: distance rings (Chebyshev distance in image pixels from the changed block's edge)
RINGS: tuple[tuple[int, int], ...] = ((0, 4), (4, 8), (8, 12), (12, 16), (16, 24), (24, 10_000))


def psnr_db(mse: torch.Tensor) -> float:
    """PSNR (dB, peak 1) of a mean squared error; 100 dB for an exact match."""
    mse = float(mse)
    return 100.0 if mse <= 0 else float(10 * np.log10(1.0 / mse))


def decoder_footprint(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, block: int = 2,
                      at: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """How far a change of ``block x block`` latent cells spreads in the decoded image.

    Args:
        decode: latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` in [0, 1].
        latents: ``(B, C, h, w)``, B >= 2; image i's block is replaced by image (i - 1)'s.
        block: side of the changed square, in latent cells.
        at: its top-left cell (default: the centre).

    Returns:
        One row per ring of :data:`RINGS` that holds pixels: ``{"from_px", "to_px", "psnr_db",
        "mean_abs"}``, distances measured from the block's edge in image pixels (0 = inside it).
    """
    if latents.shape[0] < 2:
        raise ValueError("decoder_footprint needs at least 2 latents (one's block replaces another's)")
    _, _, h, w = latents.shape
    r0, c0 = at if at is not None else ((h - block) // 2, (w - block) // 2)
    changed = latents.clone()
    changed[:, :, r0:r0 + block, c0:c0 + block] = latents.roll(1, 0)[:, :, r0:r0 + block, c0:c0 + block]
    with torch.no_grad():
        base, after = decode(latents), decode(changed)
    H, W = base.shape[-2:]
    sy, sx = H // h, W // w  # image pixels per latent cell
    ys, xs = torch.arange(H).view(-1, 1), torch.arange(W).view(1, -1)
    top, left, bottom, right = r0 * sy, c0 * sx, (r0 + block) * sy - 1, (c0 + block) * sx - 1
    dy = torch.clamp(torch.maximum(top - ys, ys - bottom), min=0)
    dx = torch.clamp(torch.maximum(left - xs, xs - right), min=0)
    dist = torch.maximum(dy, dx)  # (H, W), 0 inside the block
    sq = ((after - base) ** 2).mean(1)  # (B, H, W)
    rows = []
    for lo, hi in RINGS:
        sel = (dist >= lo) & (dist < hi)
        if sel.any():
            rows.append({"from_px": lo, "to_px": min(hi, int(dist.max()) + 1), "psnr_db": round(psnr_db(sq[:, sel].mean()), 2),
                         "mean_abs": round(float((after - base).abs().mean(1)[:, sel].mean()), 5)})
    return rows


def paste_latents(base: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor, grow_cells: int = 0) -> torch.Tensor:
    """``fixed``'s latents in every cell that the image mask touches (grown by ``grow_cells``), ``base``'s elsewhere.

    Args:
        base, fixed: ``(B, C, h, w)`` latents.
        mask: ``(B, 1, H, W)`` image mask, ``> 0`` = may change; H, W multiples of h, w.
    """
    cells = (F.adaptive_max_pool2d((mask > 0).float(), base.shape[-2:]) > 0).to(base.dtype)
    if grow_cells:
        cells = F.max_pool2d(cells, 2 * grow_cells + 1, stride=1, padding=grow_cells)
    return cells * fixed + (1 - cells) * base


def outside_psnr_pooled(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR (dB) of the mean squared difference over every pixel outside ``mask`` (pooled over images)."""
    keep = (mask <= 0).to(a.dtype)
    mse = (((a - b) ** 2) * keep).sum() / (keep.sum() * a.shape[1]).clamp(min=1)
    return psnr_db(mse)


def perfect_fix_ceiling(aspect: str = "safety", n: int = 256, seed: int = 11,
                        dilations: Sequence[int] = (3, 5, 8), root: Any = None) -> dict[str, Any]:
    """The outside-mask PSNR of the generator's own fix, through the toy VAE (see the module docstring).

    Args:
        aspect: toy aspect whose defect is fixed (safety or plausibility).
        n: training-caption scenes drawn with the defect (those whose defect is visible are used).
        dilations: mask dilations (image pixels) around the exact defect mask.

    Returns:
        ``{"aspect", "pairs", "defect_area", "rows": [{"dilate_px", "area_ratio", "twin_encoded_psnr_db",
        "pasted_psnr_db", "pasted_grown_psnr_db"}], "decoder_footprint"}``: the twin's whole latents, its
        latents pasted in the cells under the mask, and pasted in those cells grown by one (PSNR pooled
        over images); and :func:`decoder_footprint` of a 2x2 block on the defect images' latents.
    """
    from focusnfix.toyworld import generator as gen
    from focusnfix.toyworld.forms import render_fixed
    from focusnfix.toyworld.stats import load_pipeline

    rates = {a: 0.0 for a in gen.ASPECTS}
    rates[aspect] = 1.0
    scenes = gen.generate(n, seed, "train", defect_rates=rates).scenes
    defect, fixed, masks = [], [], []
    for scene in scenes:
        image, m = gen.render(scene)
        if m[aspect].any():
            defect.append(image)
            fixed.append(render_fixed(scene, aspect))
            masks.append(m[aspect])
    if not defect:
        raise ValueError(f"no {aspect} defect drawn in {n} scenes")
    x, y = torch.from_numpy(np.stack(defect)), torch.from_numpy(np.stack(fixed))
    exact = torch.from_numpy(np.stack(masks)).float()[:, None]
    vae = load_pipeline(root).vae

    def enc(im: torch.Tensor) -> torch.Tensor:
        return vae.encode(im * 2 - 1).latent_dist.mean

    def dec(z: torch.Tensor) -> torch.Tensor:
        return (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)

    rows = []
    with torch.no_grad():
        zx, zy = enc(x), enc(y)
        dx, dy = dec(zx), dec(zy)
        for d in dilations:
            mask = dilate(exact, d)
            rows.append({
                "dilate_px": d,
                "area_ratio": round(float(mask.sum() / exact.sum()), 2),
                "twin_encoded_psnr_db": round(outside_psnr_pooled(dx, dy, mask), 2),
                "pasted_psnr_db": round(outside_psnr_pooled(dx, dec(paste_latents(zx, zy, mask)), mask), 2),
                "pasted_grown_psnr_db": round(outside_psnr_pooled(dx, dec(paste_latents(zx, zy, mask, 1)), mask), 2),
            })
        footprint = decoder_footprint(dec, zx[:32])
    return {"aspect": aspect, "pairs": len(defect), "defect_area": round(float(exact.mean()), 4), "rows": rows,
            "decoder_footprint": footprint}


__all__ = ["RINGS", "decoder_footprint", "outside_psnr_pooled", "paste_latents", "perfect_fix_ceiling", "psnr_db"]
