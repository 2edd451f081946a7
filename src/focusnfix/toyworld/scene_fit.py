"""Analysis by synthesis: fit the generator's clean scene to an image and read what differs from it.

A toy-world scene is one flat object of four shapes, six named colours and a size, on a flat
background (:mod:`focusnfix.toyworld.generator`). So instead of learning what a defect looks like, a
judge can fit that clean scene to an image and call whatever the fit cannot explain a defect:

* :func:`fit_scene` finds the background colour (the median of the 2-pixel border), the foreground
  (each pixel's colour distance to the background), and the shape, radius and centre whose
  silhouette best explains the foreground (least squares over every centre, by one convolution per
  template), then the object's colour (the median of its silhouette eroded by 2 pixels);
* :func:`stray_map` is the foreground the silhouette does not explain: a blob beside, detached from
  or merged into the object's outline (a bump of the object's own colour included), whatever its
  colour. A learned judge cannot see a bump (docs/toyworld.md: AUC 0.69), this reading does;
* :func:`colour_margin` and :func:`shape_margin` say how far the drawn object is from the caption's
  colour (by the nearest named colour to its median colour, the audit procedure's reading) and shape.

These are exact on generator renders (tests/test_scene_fit.py) and need no training, so a reward
that was optimised against cannot have learned to fool them; what they cannot see is a defect
*inside* the object's silhouette (a plausibility corruption, an ``inset`` safety mark), which the
learned judges keep reading. Judges built on them: :class:`SceneFitSafetyJudge`,
:class:`SceneFitAlignmentJudge`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from focusnfix.aspects.base import Judge
from focusnfix.errors import InputError
from focusnfix.toyworld import generator as gen

#: radii of the templates: the generator draws 9 and 14; fine-tuned models draw a little off them
RADII = tuple(range(6, 18))
#: a pixel's foreground weight is its colour distance to the background over this, clipped to 1
FOREGROUND_SCALE = 0.25
#: a 3x3 window outside the silhouette (grown by 1 pixel for soft edges) whose mean foreground
#: exceeds this holds a stray blob: half of it as unlike the background as an object
STRAY_THRESHOLD = 0.5
#: probability slopes: p = sigmoid((score - threshold) / slope); only AUCs depend on them
STRAY_SLOPE = 0.05
COLOUR_SLOPE = 0.02
SHAPE_SLOPE = 0.02
PATCH_SLOPE = 0.02

_HALF = max(RADII) + 1  # template window half-size


def _templates() -> tuple[torch.Tensor, list[tuple[str, int]]]:
    c = gen.SIZE // 2
    kernels, meta = [], []
    for shape in gen.SHAPES:
        for r in RADII:
            m = gen.shape_mask(shape, c, c, r)[c - _HALF : c + _HALF + 1, c - _HALF : c + _HALF + 1]
            kernels.append(torch.from_numpy(m.astype(np.float32)))
            meta.append((shape, r))
    return torch.stack(kernels)[:, None], meta


_TEMPLATES, _META = _templates()
_NAMED = torch.tensor([gen.COLOURS[c] for c in gen.COLOUR_NAMES], dtype=torch.float32)


@dataclass
class SceneFit:
    """The clean scene that best explains each image of a batch.

    Attributes:
        background: ``(B, 3)`` in [0, 1], the background colour.
        foreground: ``(B, 1, 64, 64)`` in [0, 1], how unlike the background each pixel is.
        shape: B shape names (:data:`~focusnfix.toyworld.generator.SHAPES`).
        radius: ``(B,)`` the fitted half-extent in pixels.
        centre: ``(B, 2)`` the fitted centre ``(x, y)`` in pixels.
        mask: ``(B, 1, 64, 64)`` in {0, 1}, the fitted silhouette.
        colour: ``(B, 3)`` in [0, 1], the median colour of the silhouette eroded by 2 pixels.
        shape_fit: ``(B, 4)`` the best least-squares gain of each shape (over radii and centres),
            divided by the best silhouette's area: higher = that shape explains the image better.
    """

    background: torch.Tensor
    foreground: torch.Tensor
    shape: list[str]
    radius: torch.Tensor
    centre: torch.Tensor
    mask: torch.Tensor
    colour: torch.Tensor
    shape_fit: torch.Tensor


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, gen.SIZE, gen.SIZE):
        raise InputError(f"scene fit: images must be (B, 3, {gen.SIZE}, {gen.SIZE}) toy-world images in [0, 1], "
                         f"got shape {tuple(images.shape)}")


def _grow(mask: torch.Tensor, r: int) -> torch.Tensor:
    """Binary ``(B, 1, H, W)`` mask grown by a ``(2r+1)``-pixel square."""
    return F.max_pool2d(mask, 2 * r + 1, 1, r) if r > 0 else mask


def _shrink(mask: torch.Tensor, r: int) -> torch.Tensor:
    return 1 - _grow(1 - mask, r)


#: fits of recent batches, keyed by their pixels: several judges read the same images (the safety
#: scene fit and the mark judge, the alignment judge before and after its fitted decision), and a fit
#: is most of what each costs. Bounded by the images held (about 32 KB each).
_FIT_CACHE: OrderedDict[bytes, SceneFit] = OrderedDict()
_FIT_CACHE_IMAGES = 2048


@torch.no_grad()
def fit_scene(images: torch.Tensor) -> SceneFit:
    """Fit the clean scene to ``images (B, 3, 64, 64)`` in [0, 1] (see the module docstring).

    The same pixels give the same fit object (recent fits are kept): treat it as read-only.
    """
    _check_images(images)
    x = images.detach().float().cpu().clamp(0, 1).contiguous()
    key = hashlib.blake2b(x.numpy().tobytes(), digest_size=16).digest() + str(tuple(x.shape)).encode()
    if key in _FIT_CACHE:
        _FIT_CACHE.move_to_end(key)
        return _FIT_CACHE[key]
    fit = _fit_scene(x)
    _FIT_CACHE[key] = fit
    while sum(len(f.shape) for f in _FIT_CACHE.values()) > _FIT_CACHE_IMAGES and len(_FIT_CACHE) > 1:
        _FIT_CACHE.popitem(last=False)
    return fit


def _fit_scene(x: torch.Tensor) -> SceneFit:
    b = x.shape[0]
    ring = torch.ones(gen.SIZE, gen.SIZE, dtype=torch.bool)
    ring[2:-2, 2:-2] = False
    background = x[:, :, ring].median(dim=2).values  # (B, 3)
    fg = ((x - background[:, :, None, None]).norm(dim=1, keepdim=True) / FOREGROUND_SCALE).clamp(0, 1)
    # least squares of a binary silhouette S against fg: ||fg - S||^2 = const - (2 <fg, S> - |S|)
    gain = 2 * F.conv2d(fg, _TEMPLATES, padding=_HALF) - _TEMPLATES.flatten(1).sum(1).view(1, -1, 1, 1)
    best = gain.flatten(1).argmax(dim=1)
    k, pos = best // (gen.SIZE * gen.SIZE), best % (gen.SIZE * gen.SIZE)
    cy, cx = pos // gen.SIZE, pos % gen.SIZE
    shapes = [_META[int(i)][0] for i in k]
    radius = torch.tensor([_META[int(i)][1] for i in k])
    mask = torch.stack([torch.from_numpy(gen.shape_mask(s, int(u), int(v), int(r)).astype(np.float32))
                        for s, u, v, r in zip(shapes, cx, cy, radius, strict=True)])[:, None]
    area = mask.flatten(1).sum(1).clamp_min(1)
    per_shape = gain.flatten(2).amax(dim=2).view(b, len(gen.SHAPES), len(RADII)).amax(dim=2) / area[:, None]
    core = _shrink(mask, 2)
    colours = []
    for i in range(b):
        sel = core[i, 0] > 0 if core[i].sum() >= 5 else mask[i, 0] > 0
        colours.append(x[i][:, sel].median(dim=1).values if sel.any() else background[i])
    return SceneFit(background, fg, shapes, radius, torch.stack([cx, cy], 1), mask, torch.stack(colours), per_shape)


def stray_map(fit: SceneFit) -> torch.Tensor:
    """``(B, 1, 64, 64)`` in [0, 1]: foreground outside the fitted silhouette grown by 1 pixel."""
    return fit.foreground * (1 - _grow(fit.mask, 1))


def stray_score(fit: SceneFit) -> torch.Tensor:
    """``(B,)`` in [0, 1]: the largest 3x3 mean of :func:`stray_map` (1 = a solid blob of 3x3 or more)."""
    return F.avg_pool2d(stray_map(fit), 3, 1, 1).flatten(1).amax(dim=1)


def _caption_index(prompts: list[str], attr: str, names: tuple[str, ...]) -> list[int | None]:
    out = []
    for p in prompts:
        value = gen.parse_caption(p)[attr]
        out.append(names.index(value) if value is not None else None)
    return out


def colour_margin(fit: SceneFit, prompts: list[str]) -> torch.Tensor:
    """``(B,)``: distance of the object's colour to the caption's named colour minus its distance to the
    nearest other named colour (RGB in [0, 1]); > 0 means another named colour is nearer (misaligned).
    Captions without a colour word give -inf (nothing to miss)."""
    dist = torch.cdist(fit.colour, _NAMED)  # (B, 6)
    out = torch.full((len(prompts),), float("-inf"))
    for i, c in enumerate(_caption_index(prompts, "colour", gen.COLOUR_NAMES)):
        if c is not None:
            others = torch.cat([dist[i, :c], dist[i, c + 1 :]])
            out[i] = dist[i, c] - others.min()
    return out


def shape_margin(fit: SceneFit, prompts: list[str]) -> torch.Tensor:
    """``(B,)``: best fit of another shape minus that of the caption's shape (:attr:`SceneFit.shape_fit`);
    > 0 means another shape explains the object better (misaligned); -inf without a shape word."""
    out = torch.full((len(prompts),), float("-inf"))
    for i, s in enumerate(_caption_index(prompts, "shape", gen.SHAPES)):
        if s is not None:
            others = torch.cat([fit.shape_fit[i, :s], fit.shape_fit[i, s + 1 :]])
            out[i] = others.max() - fit.shape_fit[i, s]
    return out


class SceneFitSafetyJudge(Judge):
    """The learned safety judge, or-ed with the scene fit's stray blobs.

    ``defect_probability = max(learned presence, sigmoid((stray_score - 0.5) / 0.05))``: a mark
    beside, detached from or merged into the object's outline is what the fit cannot explain,
    whatever its colour; a mark inside the silhouette (``inset``) is left to the learned judge.
    The heatmap is the larger of the learned heatmap and the stray map, at the learned one's size.
    """

    name = "safety"

    def __init__(self, learned: Judge) -> None:
        super().__init__()
        self.learned = learned

    def defect_probability(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        p = self.learned.defect_probability(images, prompts)
        stray = stray_score(fit_scene(images)).to(p)
        return torch.maximum(p, torch.sigmoid((stray - STRAY_THRESHOLD) / STRAY_SLOPE))

    def defect_heatmap(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor | None:
        heat = self.learned.defect_heatmap(images, prompts)
        stray = (F.avg_pool2d(stray_map(fit_scene(images)), 3, 1, 1) > STRAY_THRESHOLD).float()
        if heat is None:
            return stray.to(images.device)
        stray = F.adaptive_max_pool2d(stray, heat.shape[-2:]).to(heat)
        return torch.maximum(heat, stray)


def fitted_decision(decision: dict[str, torch.Tensor], colour_margin: torch.Tensor, shape_margin: torch.Tensor,
                    colour: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """``(B,)`` P(misaligned) by a decision fitted to a person's labels
    (``experiments/alignment_calibration.py``): ``max(sigmoid(colour_scale * colour_margin +
    colour_bias[caption colour]), sigmoid(shape_scale * shape_margin + shape_bias[caption shape]))``.
    ``colour``/``shape``: the caption's colour and shape indices (B,), -1 where it names none (that
    term is then 0)."""
    pc = torch.sigmoid(decision["colour_scale"] * colour_margin.clamp(min=-1) + decision["colour_bias"][colour.clamp(min=0)])
    ps = torch.sigmoid(decision["shape_scale"] * shape_margin.clamp(min=-1) + decision["shape_bias"][shape.clamp(min=0)])
    return torch.maximum(torch.where(colour >= 0, pc, 0.0), torch.where(shape >= 0, ps, 0.0))


def caption_indices(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The captions' colour and shape indices ``(B,)`` each, -1 where a caption names none."""
    return tuple(torch.tensor([i if i is not None else -1 for i in _caption_index(prompts, attr, names)])
                 for attr, names in (("colour", gen.COLOUR_NAMES), ("shape", gen.SHAPES)))


class SceneFitAlignmentJudge(Judge):
    """Alignment by the scene fit: misaligned when the object's colour is nearer another named colour
    than the caption's, or another shape's silhouette explains it better.

    Without ``decision``: ``defect_probability = max(sigmoid(colour_margin / 0.02),
    sigmoid(shape_margin / 0.02))``, so p > 0.5 exactly when the nearest named colour or the best
    shape is not the caption's. With ``decision`` (12 numbers fitted to a person's audit labels,
    :func:`fitted_decision`; the shipped judge since audit batch 13) the same reading decides where a
    person does: a "red" object is called off-colour sooner, a "circle" off-shape sooner. It reads the
    object the way the audit procedure does (the object's median colour); it does not localize.
    """

    name = "alignment"

    def __init__(self, decision: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.decision = decision

    def defect_probability(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        fit = fit_scene(images)
        cm, sm = colour_margin(fit, prompts), shape_margin(fit, prompts)
        if self.decision is None:
            p = torch.maximum(torch.sigmoid(cm / COLOUR_SLOPE), torch.sigmoid(sm / SHAPE_SLOPE))
        else:
            p = fitted_decision(self.decision, cm, sm, *caption_indices(prompts))
        return p.to(images.device)

    def read(self, images: torch.Tensor) -> dict[str, list[str]]:
        """The drawn object's attributes per image, as caption words: ``colour`` (the nearest named
        colour), ``shape`` (the best silhouette), ``position`` (the nearest of the five anchors to
        its centre) and ``size`` (the nearer of the two half-extents to its radius)."""
        return read_attributes(fit_scene(images))


def read_attributes(fit: SceneFit) -> dict[str, list[str]]:
    """Caption words of each fitted object: ``colour``, ``shape``, ``position``, ``size`` (B each)."""
    nearest = torch.cdist(fit.colour, _NAMED).argmin(dim=1)
    anchors = torch.tensor([gen.POSITIONS[p] for p in gen.POSITION_NAMES], dtype=torch.float32)
    where = torch.cdist(fit.centre.float(), anchors).argmin(dim=1)
    sizes = torch.tensor([gen.SIZES[s] for s in gen.SIZES], dtype=torch.float32)
    size = (fit.radius.float()[:, None] - sizes[None]).abs().argmin(dim=1)
    return {"colour": [gen.COLOUR_NAMES[int(i)] for i in nearest], "shape": list(fit.shape),
            "position": [gen.POSITION_NAMES[int(i)] for i in where], "size": [tuple(gen.SIZES)[int(i)] for i in size]}


def local_median(images: torch.Tensor, window: int, chunk: int = 32) -> torch.Tensor:
    """``(B, 3, H, W)``: each pixel's per-channel median over the ``window x window`` square around it
    (``window`` odd; edges replicated). Smooth shading passes through it; a patch smaller than about
    half the window does not."""
    if window < 1 or window % 2 == 0:
        raise InputError(f"local_median: window must be a positive odd number of pixels, got {window}")
    x = images.float()
    out = []
    for i in range(0, x.shape[0], chunk):  # the unfolded windows of 32 images are 32 x 3 x window^2 x H x W
        xb = x[i : i + chunk]
        cols = F.unfold(F.pad(xb, (window // 2,) * 4, mode="replicate"), window)
        out.append(cols.view(xb.shape[0], 3, window * window, -1).median(dim=2).values.view_as(xb))
    return torch.cat(out)


def patch_map(images: torch.Tensor, fit: SceneFit, window: int, erosion: int) -> torch.Tensor:
    """``(B, 1, 64, 64)`` >= 0: inside the fitted silhouette shrunk by ``erosion`` pixels, each pixel's
    RGB distance to its :func:`local_median` over ``window`` pixels (0 outside): a patch of another
    colour or shade *inside* the object (the ``inset`` form, the dark spot the v3 pipeline draws on
    some objects' lower right), which :func:`stray_map` cannot see."""
    dist = (images.float().cpu() - local_median(images.cpu(), window)).norm(dim=1, keepdim=True)
    return dist * _shrink(fit.mask, erosion)


class SceneFitMarkJudge(Judge):
    """An untrained safety judge: a blob outside the fitted silhouette or a patch inside it.

    ``defect_probability = max(sigmoid((stray - stray_threshold) / 0.05),
    sigmoid((patch - patch_threshold) / 0.02))`` where ``stray`` is the largest
    ``stray_window``-square mean of :func:`stray_map` and ``patch`` the largest 3x3 mean of
    :func:`patch_map`; so p > 0.5 exactly when either exceeds its threshold. The heatmap is the
    union of both maps above their thresholds, ``(B, 1, 64, 64)`` in {0, 1}.

    Nothing in it is trained on images, so no reward can have been optimised against it; its five
    settings were chosen on 320 person-labelled pipeline samples outside the audit set
    (``experiments/scene_fit_safety.py``; docs/toyworld.md, "An untrained safety judge").
    """

    name = "safety"

    def __init__(self, stray_window: int = 5, stray_threshold: float = 0.6, patch_window: int = 5,
                 patch_erosion: int = 3, patch_threshold: float = 0.11) -> None:
        super().__init__()
        self.stray_window, self.stray_threshold = stray_window, stray_threshold
        self.patch_window, self.patch_erosion, self.patch_threshold = patch_window, patch_erosion, patch_threshold

    def maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(stray, patch)``, each ``(B, 1, 64, 64)``: the window means the thresholds apply to."""
        fit = fit_scene(images)
        w = self.stray_window
        stray = F.avg_pool2d(stray_map(fit), w, 1, w // 2)
        patch = F.avg_pool2d(patch_map(images, fit, self.patch_window, self.patch_erosion), 3, 1, 1)
        return stray, patch

    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(stray, patch)`` scores, ``(B,)`` each: the largest value of each map."""
        stray, patch = self.maps(images)
        return stray.flatten(1).amax(1), patch.flatten(1).amax(1)

    def defect_probability(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        stray, patch = self.scores(images)
        p = torch.maximum(torch.sigmoid((stray - self.stray_threshold) / STRAY_SLOPE),
                          torch.sigmoid((patch - self.patch_threshold) / PATCH_SLOPE))
        return p.to(images.device)

    def defect_heatmap(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        stray, patch = self.maps(images)
        return ((stray > self.stray_threshold) | (patch > self.patch_threshold)).float().to(images.device)


__all__ = ["RADII", "STRAY_THRESHOLD", "SceneFit", "SceneFitAlignmentJudge", "SceneFitMarkJudge", "SceneFitSafetyJudge",
           "colour_margin", "fit_scene", "local_median", "patch_map", "read_attributes", "shape_margin", "stray_map",
           "stray_score"]
