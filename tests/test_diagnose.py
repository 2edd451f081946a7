"""After-the-fact fix-locality checks (focusnfix.diagnose), on hand-built images with known answers."""

import json

import numpy as np
import pytest
import torch

from focusnfix.diagnose import composite, diagnose, fix_locality, mask_holds_localized, outside_psnr
from focusnfix.errors import InputError


def _mask(n: int = 4) -> torch.Tensor:
    m = torch.zeros(n, 1, 8, 8)
    m[:, :, :4, :4] = 1  # a quarter of each image may change
    return m


def test_outside_psnr_counts_only_outside_pixels():
    base, m = torch.full((2, 3, 8, 8), 0.5), _mask(2)
    after = base.clone()
    after[0] += 0.3 * m[0]  # inside only: nothing changed outside
    after[1] += 0.1 * (1 - m[1])  # every outside pixel by 0.1: MSE 0.01 -> 20 dB
    psnr = outside_psnr(base, after, m)
    assert psnr[0] == 100.0 and torch.isclose(psnr[1], torch.tensor(20.0), atol=1e-4)


def test_composite_takes_the_method_inside_and_the_base_outside():
    base, after, m = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8), _mask(1)
    c = composite(base, after, m)
    assert torch.equal(c, m.expand(1, 3, 8, 8))


def test_fix_locality_separates_regional_fixes_from_redraws():
    base, m = torch.full((4, 3, 8, 8), 0.5), _mask()
    after = base.clone()
    after[0] += 0.2 * m[0]  # removed, changed inside only: a regional fix
    after[1] += 0.2  # removed by changing everything (outside PSNR ~14 dB)
    after[2] += 0.2 * m[2]  # not removed
    base_defect = torch.tensor([True, True, True, False])
    after_defect = torch.tensor([False, False, True, False])
    composite_defect = torch.tensor([False, True, True, False])
    r = fix_locality(base, after, m, base_defect, after_defect, composite_defect, min_psnr=35)
    assert r["n_base_defect"] == 3
    assert r["removal_share"] == pytest.approx(2 / 3) and r["regional_removal_share"] == pytest.approx(1 / 3)
    assert r["composite_removal_share"] == pytest.approx(1 / 3)
    # squared change inside the mask over all, on the two removals: (16 + 16) / (16 + 64) pixels
    assert r["inside_change_share"] == pytest.approx(32 / 80)
    assert r["median_outside_psnr_of_removals"] == pytest.approx(float(outside_psnr(base, after, m)[[0, 1]].min()))
    none = fix_locality(base, after, m, torch.zeros(4, dtype=torch.bool), after_defect, composite_defect)
    assert none["removal_share"] is None and none["n_base_defect"] == 0


def test_mask_holds_localized_pixels_only_on_defect_images():
    m = _mask(3)
    heat = torch.zeros(3, 1, 8, 8)
    heat[0, :, :2, :2] = 0.9  # 4 px, all inside
    heat[1, :, 2:6, 2:6] = 0.6  # 16 px, 4 inside
    heat[2, :, :, :] = 1.0  # a clean image: ignored
    r = mask_holds_localized(heat, m, torch.tensor([True, True, False]))
    assert r["pooled"] == pytest.approx(8 / 20) and r["images_ge_95"] == 0.5 and r["images_lt_50"] == 0.5
    assert r["n_images"] == 2


class _DarkPixelJudge:
    """Defect = a pixel darker than 0.2 (heatmap: those pixels, at 4x4)."""

    def defect_probability(self, images, prompts):
        return (images.amin(dim=(1, 2, 3)) < 0.2).float()

    def defect_heatmap(self, images, prompts):
        return torch.nn.functional.avg_pool2d((images.amin(1, keepdim=True) < 0.2).float(), 2).ceil()


def test_diagnose_reads_an_evaluation_directory(tmp_path):
    base = np.full((2, 3, 8, 8), 200, np.uint8)
    base[:, :, 1, 1] = 0  # a dark pixel (the defect) inside the mask in both images
    fixed_inside = base.copy()
    fixed_inside[:, :, 1, 1] = 200
    mask = np.zeros((2, 1, 8, 8), np.uint8)
    mask[:, :, :4, :4] = 255
    np.savez(tmp_path / "images.npz", base=base, mask=mask, method__fnf=fixed_inside, method__fnf__run1=base)
    (tmp_path / "per_image.json").write_text(json.dumps({"items": [{"prompt": "p", "seed": 0}] * 2}))
    (tmp_path / "metrics.json").write_text(json.dumps({"aspect": "safety", "methods": {"base": {}}}))
    r = diagnose(tmp_path, _DarkPixelJudge())
    assert r["mask_holds_judge_defect"]["pooled"] == 1.0
    runs = r["methods"]["fnf"]["runs"]
    assert runs[0]["removal_share"] == 1.0 and runs[0]["regional_removal_share"] == 1.0
    assert runs[1]["removal_share"] == 0.0 and r["methods"]["fnf"]["removal_share"] == 0.5
    assert json.loads((tmp_path / "diagnostics.json").read_text())["methods"]["fnf"]["removal_share"] == 0.5
    (tmp_path / "images.npz").unlink()
    with pytest.raises(InputError, match="images.npz"):
        diagnose(tmp_path, _DarkPixelJudge())


def test_the_report_leaves_out_diagnostics_of_another_evaluation(tmp_path):
    from focusnfix.report import write_report

    base = np.full((1, 3, 8, 8), 200, np.uint8)
    mask = np.zeros((1, 1, 8, 8), np.uint8)
    np.savez(tmp_path / "images.npz", base=base, heatmap=mask, mask=mask, method__fnf=base, eval_id=np.array("first"))
    (tmp_path / "per_image.json").write_text(json.dumps({"eval_id": "first", "items": [{"prompt": "p", "seed": 0}]}))
    (tmp_path / "metrics.json").write_text(json.dumps({"eval_id": "first", "aspect": "safety", "methods": {"base": {}}}))
    diagnose(tmp_path, _DarkPixelJudge())
    assert json.loads((tmp_path / "diagnostics.json").read_text())["eval_id"] == "first"
    write_report(tmp_path, tmp_path / "report.html")
    assert 'id="table-diagnostics"' in (tmp_path / "report.html").read_text()
    # an evaluation rerun into the folder (killed before its diagnose, or eval without diagnose)
    np.savez(tmp_path / "images.npz", base=base, heatmap=mask, mask=mask, method__fnf=base, eval_id=np.array("second"))
    (tmp_path / "per_image.json").write_text(json.dumps({"eval_id": "second", "items": [{"prompt": "p", "seed": 0}]}))
    (tmp_path / "metrics.json").write_text(json.dumps({"eval_id": "second", "aspect": "safety", "methods": {"base": {}}}))
    write_report(tmp_path, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert 'id="table-diagnostics"' not in page and "another evaluation" in page
