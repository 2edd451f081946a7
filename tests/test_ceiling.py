"""The outside-PSNR ceiling of a perfect regional fix through the toy VAE, and the decoder footprint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from focusnfix.toyworld.ceiling import (
    decoder_footprint,
    outside_psnr_pooled,
    paste_latents,
    perfect_fix_ceiling,
)


def _nearest_decoder(z: torch.Tensor) -> torch.Tensor:
    """A perfectly local 'decoder': each latent cell becomes its own 4x4 pixels."""
    return F.interpolate(z[:, :3], scale_factor=4, mode="nearest").sigmoid()


def test_a_local_decoder_changes_nothing_beyond_the_block_and_a_blurring_one_does():
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    rows = decoder_footprint(_nearest_decoder, z, block=2)
    assert rows[0]["from_px"] == 0 and rows[0]["psnr_db"] < 40  # the block itself changed
    assert all(r["psnr_db"] == 100.0 and r["mean_abs"] == 0.0 for r in rows[1:])  # nothing else, exactly

    def blurring(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(_nearest_decoder(x), 9, stride=1, padding=4)

    spread = decoder_footprint(blurring, z, block=2)
    assert spread[1]["psnr_db"] < 100.0 and spread[-1]["psnr_db"] == 100.0  # 4 px of blur reach the next ring only
    with pytest.raises(ValueError, match="at least 2"):
        decoder_footprint(_nearest_decoder, z[:1])


def test_paste_latents_takes_the_fixed_cells_under_the_mask_only():
    base, fixed = torch.zeros(1, 4, 16, 16), torch.ones(1, 4, 16, 16)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 9:11, 20:22] = 1  # inside latent cell (2, 5)
    out = paste_latents(base, fixed, mask)
    assert out.sum() == 4 and torch.equal(out[0, :, 2, 5], torch.ones(4))
    assert paste_latents(base, fixed, mask, grow_cells=1).sum() == 4 * 9
    a, b = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    b[..., 0, 0] = 1.0  # the only difference lies inside the mask
    m = torch.zeros(1, 1, 4, 4)
    m[..., 0, 0] = 1
    assert outside_psnr_pooled(a, b, m) == 100.0 and outside_psnr_pooled(a, b, torch.zeros_like(m)) < 20


def test_perfect_fix_ceiling_on_the_packaged_toy_world():
    out = perfect_fix_ceiling("safety", n=24, dilations=(3, 8))
    assert out["pairs"] > 0 and 0 < out["defect_area"] < 0.1
    r3, r8 = out["rows"]
    assert 1 < r3["area_ratio"] < r8["area_ratio"]
    for r in (r3, r8):  # the VAE spreads even a perfect fix a little: finite, but well above a redraw
        assert 25 < r["pasted_psnr_db"] < 100 and 25 < r["twin_encoded_psnr_db"] < 100
    assert out["decoder_footprint"][0]["psnr_db"] < out["decoder_footprint"][-1]["psnr_db"]
