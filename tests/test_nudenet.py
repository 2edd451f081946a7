"""NudeNet localizer: exact box rasterisation, and one real call of the bundled ONNX detector."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from focusnfix.aspects.nudenet import NudeNetAspect, boxes_to_heatmap, to_bgr_uint8
from focusnfix.aspects.registry import build_aspect
from focusnfix.errors import InputError


def _nudenet_available() -> tuple[bool, str]:
    try:
        importlib.import_module("nudenet")
        return True, ""
    except Exception as err:
        return False, f"nudenet/onnxruntime not importable ({type(err).__name__}: {err}); pip install focusnfix[nudenet]"


HAVE_NUDENET, WHY = _nudenet_available()


def test_boxes_to_heatmap_exact():
    hm = boxes_to_heatmap([[1, 2, 3, 2], [2, 3, 4, 3]], [0.5, 0.8], (6, 8))
    expected = torch.zeros(1, 6, 8)
    expected[0, 2:4, 1:4] = 0.5
    expected[0, 3:6, 2:6] = 0.8  # overlap takes the higher score
    assert torch.equal(hm, expected)


def test_boxes_to_heatmap_fractional_padding_clipping_and_empty():
    hm = boxes_to_heatmap([[0.5, 0.5, 1.0, 1.0]], [1.0], (4, 4))  # covers pixels 0..1 (floor/ceil)
    expected = torch.zeros(1, 4, 4)
    expected[0, :2, :2] = 1.0
    assert torch.equal(hm, expected)
    padded = boxes_to_heatmap([[2, 2, 1, 1]], [0.3], (5, 5), pad_px=1)
    assert torch.equal(padded[0] > 0, torch.tensor([[0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0],
                                                      [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool))
    clipped = boxes_to_heatmap([[-5, -5, 7, 100]], [2.0], (3, 3))  # clipped box, score clamped to 1
    assert clipped[0, :, :2].eq(1).all() and clipped[0, :, 2].eq(0).all()
    assert torch.equal(boxes_to_heatmap([], [], (3, 4)), torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        boxes_to_heatmap([[0, 0, 1, 1], [0, 0, 1, 1]], [0.5], (3, 3))


class FakeDetector:
    def __init__(self, detections):
        self.detections = detections
        self.seen = []

    def detect(self, image):
        self.seen.append(image)
        return self.detections


def test_aspect_filters_classes_and_scores_and_has_no_training_reward():
    dets = [
        {"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 2, 2]},
        {"class": "FACE_FEMALE", "score": 0.95, "box": [4, 4, 2, 2]},  # not a chosen class
        {"class": "BUTTOCKS_EXPOSED", "score": 0.1, "box": [4, 0, 2, 2]},  # below min_score
    ]
    fake = FakeDetector(dets)
    aspect = NudeNetAspect(detector=fake, min_score=0.3)
    images = torch.zeros(2, 3, 6, 8)
    images[:, 0] = 1.0  # red
    hm = aspect.heatmap(images, ["a", "b"])
    assert hm.shape == (2, 1, 6, 8)
    assert hm[:, 0, :2, :2].eq(0.9).all() and hm.sum() == pytest.approx(2 * 4 * 0.9)
    assert fake.seen[0].shape == (6, 8, 3) and fake.seen[0].dtype == np.uint8
    assert fake.seen[0][0, 0].tolist() == [0, 0, 255]  # BGR, as cv2.imread gives the detector
    with torch.no_grad():
        torch.testing.assert_close(aspect.reward(images, ["a", "b"]), torch.tensor([-0.9, -0.9]))
    with pytest.raises(InputError, match="weight to 0"):
        aspect.reward(images.clone().requires_grad_(True), ["a", "b"])


@pytest.mark.skipif(not HAVE_NUDENET, reason=WHY)
def test_real_detector_call(tmp_path):
    """The bundled ONNX detector runs on an image made here; an array gives what a file gives."""
    from nudenet import NudeDetector

    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 96, 128, generator=g)
    images[:, :, 20:60, 30:90] = torch.tensor([0.9, 0.7, 0.6]).view(1, 3, 1, 1)  # a skin-coloured patch
    aspect = build_aspect("nudenet", {"classes": ["FACE_FEMALE", "FEMALE_BREAST_EXPOSED"], "min_score": 0.0})
    dets = NudeDetector().detect(to_bgr_uint8(images[0]))
    assert isinstance(dets, list)
    for d in dets:
        assert set(d) == {"class", "score", "box"} and len(d["box"]) == 4 and 0 <= d["score"] <= 1
    path = tmp_path / "img.png"
    rgb = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(rgb).save(path)
    assert NudeDetector().detect(str(path)) == dets  # same input as NudeNet's own file path
    hm = aspect.heatmap(images, ["a photo"])
    assert hm.shape == (1, 1, 96, 128) and hm.min() >= 0 and hm.max() <= 1
    kept = [d for d in dets if d["class"] in ("FACE_FEMALE", "FEMALE_BREAST_EXPOSED")]
    assert torch.equal(hm[0], boxes_to_heatmap([d["box"] for d in kept], [d["score"] for d in kept], (96, 128)))
