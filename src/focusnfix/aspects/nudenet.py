"""NudeNet as a localizer: detector boxes of exposed body parts -> a heatmap.

NudeNet (``pip install focusnfix[nudenet]``; the ``nudenet`` wheel ships its ONNX detector
``320n.onnx`` and runs it with onnxruntime; **AGPL-3.0**, hence an optional extra) finds boxes
with a class label and a confidence. This aspect runs it on the frozen model's images (no
gradient), keeps the chosen classes above ``min_score``, and rasterises their boxes into a
``(B, 1, H, W)`` heatmap whose value is the highest score of a box covering the pixel.

The detector is not differentiable, so this aspect has **no training reward**: give it
``weight: 0`` (mask only) and pair it with a differentiable reward aspect with ``localize:
false``, e.g. a ``clip_score`` against an explicit-content text with ``negate: true`` (see
``configs/sd15_oversexualization_nudenet.yaml``). Its :meth:`NudeNetAspect.reward` is a
non-differentiable safety score (minus the highest kept detection score, in [-1, 0]) for
evaluation; calling it on images that require gradient raises an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from focusnfix.aspects.base import Aspect
from focusnfix.aspects.rewards.base import require
from focusnfix.errors import InputError

#: NudeNet 3.x labels of exposed sexual body parts (the default classes of this localizer)
EXPOSED_CLASSES = (
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
)


def boxes_to_heatmap(
    boxes: Sequence[Sequence[float]] | np.ndarray | torch.Tensor,
    scores: Sequence[float] | np.ndarray | torch.Tensor,
    size: tuple[int, int],
    pad_px: float = 0.0,
) -> torch.Tensor:
    """Rasterise boxes weighted by their scores.

    Args:
        boxes: ``(N, 4)`` boxes as ``(x, y, w, h)`` in pixels, top-left origin (NudeNet's format).
        scores: ``(N,)`` confidences in [0, 1].
        size: ``(H, W)`` of the heatmap (the image size).
        pad_px: grow every box by this many pixels on each side.

    Returns:
        ``(1, H, W)`` float32 in [0, 1]: at each pixel the highest score of a box covering it
        (pixels ``floor(x - pad) .. ceil(x + w + pad) - 1``, clipped to the image), else 0.
    """
    h, w = size
    out = torch.zeros(1, h, w)
    boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 4)
    scores_t = torch.as_tensor(np.asarray(scores, dtype=np.float64)).reshape(-1)
    if len(boxes_t) != len(scores_t):
        raise ValueError(f"{len(boxes_t)} boxes but {len(scores_t)} scores")
    for (x, y, bw, bh), s in zip(boxes_t.tolist(), scores_t.tolist(), strict=True):
        x0, y0 = max(0, math.floor(x - pad_px)), max(0, math.floor(y - pad_px))
        x1, y1 = min(w, math.ceil(x + bw + pad_px)), min(h, math.ceil(y + bh + pad_px))
        if x1 > x0 and y1 > y0:
            region = out[0, y0:y1, x0:x1]
            torch.maximum(region, torch.tensor(float(min(max(s, 0.0), 1.0))), out=region)
    return out


def to_bgr_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` in [0, 1] -> ``(H, W, 3)`` uint8 BGR, the layout ``cv2.imread`` gives NudeNet."""
    rgb = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(rgb[..., ::-1])


class NudeNetAspect(Aspect):
    """NudeNet detections as a heatmap (see module docstring).

    Args:
        classes: NudeNet labels whose boxes count (default: :data:`EXPOSED_CLASSES`).
        min_score: ignore detections below this confidence (NudeNet itself keeps >= 0.2).
        pad_px: grow boxes by this many pixels.
        detector: an object with ``detect(bgr_uint8_array) -> [{"class", "score", "box"}]``;
            default: ``nudenet.NudeDetector(model_path, inference_resolution=...)``.
        model_path: another NudeNet ONNX model (default: the one in the wheel, 320 px).
        inference_resolution: the ONNX model's input size (320 for the bundled model).
        name: aspect name.
    """

    def __init__(
        self,
        classes: Sequence[str] = EXPOSED_CLASSES,
        min_score: float = 0.3,
        pad_px: float = 0.0,
        detector=None,
        model_path: str | None = None,
        inference_resolution: int = 320,
        name: str = "nudenet",
    ) -> None:
        super().__init__()
        if detector is None:
            nudenet = require("nudenet", "nudenet", "the nudenet aspect")
            try:
                detector = nudenet.NudeDetector(model_path=model_path, inference_resolution=inference_resolution)
            except Exception as err:  # onnxruntime: missing/corrupt model file
                raise InputError(f"nudenet: cannot load the detector {model_path or '(bundled)'}: {err}") from err
        self.detector = detector
        self.classes = tuple(classes)
        self.min_score = float(min_score)
        self.pad_px = float(pad_px)
        self.name = name

    def detections(self, images: torch.Tensor) -> list[list[dict]]:
        """Kept detections per image: ``[{"class", "score", "box": [x, y, w, h]}, ...]``."""
        out = []
        for image in images:
            dets = self.detector.detect(to_bgr_uint8(image))
            out.append([d for d in dets if d["class"] in self.classes and d["score"] >= self.min_score])
        return out

    def heatmap(self, images: torch.Tensor, prompts: list[str], seeds: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, 1, H, W)`` in [0, 1]: kept boxes weighted by score (0 = nothing detected)."""
        size = (images.shape[-2], images.shape[-1])
        maps = [
            boxes_to_heatmap([d["box"] for d in dets], [d["score"] for d in dets], size, self.pad_px)
            for dets in self.detections(images)
        ]
        return torch.stack(maps).to(images.device)

    def reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Non-differentiable ``(B,)`` in [-1, 0]: minus the highest kept detection score."""
        if images.requires_grad and torch.is_grad_enabled():
            raise InputError(
                "the nudenet aspect has no differentiable reward: set its weight to 0 (mask only) and add a "
                "reward aspect with localize: false"
            )
        scores = [max((d["score"] for d in dets), default=0.0) for dets in self.detections(images)]
        return -torch.tensor(scores, dtype=torch.float32, device=images.device)
