import pytest
import torch

from focusnfix import masks


def test_threshold_modes():
    hm = torch.tensor([0.0, 0.2, 0.4, 0.8]).view(1, 1, 1, 4)
    assert masks.threshold_heatmap(hm, "absolute", 0.4).flatten().tolist() == [0, 0, 1, 1]
    # relative to the per-image max 0.8: >= 0.4
    assert masks.threshold_heatmap(hm, "relative", 0.5).flatten().tolist() == [0, 0, 1, 1]
    assert masks.threshold_heatmap(hm * 0.5, "relative", 0.5).flatten().tolist() == [0, 0, 1, 1]
    # top quarter of the pixels
    assert masks.threshold_heatmap(hm, "quantile", 0.75).flatten().tolist() == [0, 0, 0, 1]


def test_all_zero_heatmap_gives_empty_mask_in_every_mode():
    hm = torch.zeros(2, 1, 4, 4)
    for mode in ("absolute", "relative", "quantile"):
        t = 0.5 if mode != "absolute" else 0.1
        assert masks.threshold_heatmap(hm, mode, t).sum() == 0


def test_dilation_grows_by_a_disk():
    m = torch.zeros(1, 1, 9, 9)
    m[0, 0, 4, 4] = 1
    d = masks.dilate(m, 2)
    assert d[0, 0, 4, 2] == 1 and d[0, 0, 2, 4] == 1 and d[0, 0, 3, 3] == 1
    assert d[0, 0, 2, 2] == 0  # corner of the square is outside the disk
    assert d.sum() == 13
    assert torch.equal(masks.dilate(m, 0), m)


def test_feather_keeps_region_and_softens_outside():
    m = torch.zeros(1, 1, 16, 16)
    m[..., 4:12, 4:12] = 1
    f = masks.feather(m, 1.5)
    assert torch.equal(f[m.bool()], torch.ones(64))
    outside = f[~m.bool()]
    assert outside.max() < 1 and outside.max() > 0.2 and f.min() >= 0


def test_heatmap_to_mask_resizes_and_union():
    hm = torch.zeros(1, 1, 4, 4)
    hm[..., :2] = 1.0
    m = masks.heatmap_to_mask(hm, (16, 16), "absolute", 0.5)
    assert m.shape == (1, 1, 16, 16)
    assert m[..., :7].min() == 1 and m[..., 9:].max() == 0
    other = torch.zeros_like(m)
    other[..., -1] = 1
    u = masks.union([m, other])
    assert torch.equal(u, torch.maximum(m, other))
    assert masks.mask_area(u).item() == pytest.approx(u.mean().item())


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\(B, 1, h, w\)"):
        masks.threshold_heatmap(torch.zeros(4, 4), "absolute", 0.5)
    with pytest.raises(ValueError, match="threshold must be in"):
        masks.threshold_heatmap(torch.zeros(1, 1, 4, 4), "absolute", 2.0)
    with pytest.raises(ValueError, match="mode"):
        masks.threshold_heatmap(torch.zeros(1, 1, 4, 4), "bogus", 0.5)
