"""Every form a defect takes once a fine-tuned model has worked on it, with exact masks.

The base pipeline draws each defect one way (a dark mark, a speckled patch, a confused colour).
Reward fine-tuning rarely removes a defect cleanly: it lightens, recolours, fades, blurs, moves or
merges it, or removes only part of it. What a defect *is* does not depend on how it is drawn:

* **safety**: any small blob the caption did not ask for, beside, attached to or inset in the
  object's edge, of any colour or shade. Dark is only how the base model draws it.
* **plausibility**: any part of the object whose surface is corrupted (speckled, smeared or
  blotched) instead of flat; a faded or partial corruption is still one.
* **alignment**: an object drawn otherwise than its caption says (colour or shape); a partly
  recoloured object, or a tone between the asked and a wrong colour that is closer to the wrong
  one, is misaligned.

:func:`render_form` draws a scene with one aspect's defect in one form. The mask of every form is
the set of pixels whose colour differs from the defect-free render of the same scene by more than
:data:`MASK_TOLERANCE` in some channel (exact for hard-edged forms; for blurred and faded forms it
leaves out tails no one can see). :func:`render_fixed` draws the scene with the defect gone and
the background restored.
"""

from __future__ import annotations

import numpy as np
import torch

from focusnfix.ops import dilate_4n
from focusnfix.toyworld import generator as gen

#: a pixel belongs to a defect when some channel differs from the clean render by more than this
MASK_TOLERANCE = 6 / 255

FORMS: dict[str, tuple[str, ...]] = {
    "safety": ("dark", "lightened", "recoloured", "faded", "blurred", "detached", "bump", "partial", "inset"),
    "plausibility": ("speckled", "faded", "smeared", "partial", "blotched"),
    "alignment": ("confused", "partial", "tone", "shape"),
}
#: the form the base pipeline's training data uses (:func:`focusnfix.toyworld.generator.render`)
BASE_FORM = {"safety": "dark", "plausibility": "speckled", "alignment": "confused"}

# colours a recoloured mark may take (purple, brown, olive, green, pink, teal, grey, navy)
_MARK_COLOURS = np.array(
    [(0.55, 0.2, 0.6), (0.5, 0.32, 0.16), (0.5, 0.5, 0.12), (0.2, 0.6, 0.25), (0.95, 0.55, 0.7),
     (0.1, 0.55, 0.55), (0.5, 0.5, 0.5), (0.12, 0.15, 0.45)], dtype=np.float32)

# the bluish patch the v3 pipeline leaves inside purple objects (audit batches 6 and 7)
_INSET_BLUE = np.array((0.35, 0.4, 0.85), dtype=np.float32)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a ``(C, H, W)`` array (edge-replicated)."""
    r = max(1, int(3 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float32)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    pad = np.pad(image, ((0, 0), (r, r), (r, r)), mode="edge")
    tmp = sum(k[i] * pad[:, :, i : i + image.shape[2]] for i in range(2 * r + 1))
    return sum(k[i] * tmp[:, i : i + image.shape[1], :] for i in range(2 * r + 1))


def _mask_of(image: np.ndarray, clean: np.ndarray) -> np.ndarray:
    return np.abs(image - clean).max(axis=0) > MASK_TOLERANCE


def _blob(rng: np.random.Generator, cx: float, cy: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0 : gen.SIZE, 0 : gen.SIZE]
    dx, dy = xx - cx, yy - cy
    if rng.random() < 0.5:  # cross
        return ((np.abs(dx) <= 1) & (np.abs(dy) <= size)) | ((np.abs(dy) <= 1) & (np.abs(dx) <= size))
    return dx * dx + dy * dy <= size * size + rng.integers(0, 3)


def _free_spot(rng: np.random.Generator, avoid: np.ndarray, size: int, tries: int = 40) -> tuple[int, int] | None:
    """A centre whose blob of ``size`` stays inside the image and off ``avoid`` (grown by 2 px)."""
    grown = dilate_4n(avoid, 2)
    for _ in range(tries):
        mx, my = rng.integers(size + 1, gen.SIZE - 1 - size, size=2)
        yy, xx = np.mgrid[0 : gen.SIZE, 0 : gen.SIZE]
        if not (grown & ((xx - mx) ** 2 + (yy - my) ** 2 <= (size + 1) ** 2)).any():
            return int(mx), int(my)
    return None


def render_fixed(scene: gen.Scene, aspect: str) -> np.ndarray:
    """The scene with ``aspect``'s defect gone and the background restored: ``(3, 64, 64)``."""
    defects = {**scene.defects, aspect: False}
    return gen.render(scene, defects)[0]


def render_form(scene: gen.Scene, aspect: str, form: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``scene`` with ``aspect``'s defect in ``form``; the other aspects' defects as the scene has them.

    Args:
        scene: a generated scene (its own seed fixes object and base-defect geometry).
        aspect: ``"safety"``, ``"plausibility"`` or ``"alignment"``.
        form: one of :data:`FORMS` ``[aspect]``.
        seed: draws of the form itself (shade, colour, amount, place).

    Returns:
        ``(image (3, 64, 64) float32 in [0, 1], mask (64, 64) bool)``; an all-false mask means the
        form found no room in this scene (the image is then the clean render).
    """
    if form not in FORMS.get(aspect, ()):
        raise ValueError(f"form {form!r} is not a form of aspect {aspect!r}; expected one of {FORMS.get(aspect)}")
    rng = np.random.default_rng(seed)
    clean_defects = {**scene.defects, aspect: False}
    clean, parts = gen.render(scene, clean_defects)
    base, base_masks = gen.render(scene, {**scene.defects, aspect: True})
    obj = parts["object"]
    bg = np.asarray(gen.BACKGROUNDS[scene.background], dtype=np.float32)
    image = clean.copy()

    if aspect == "safety":
        mark = base_masks["safety"]
        if not mark.any() and form not in ("detached", "bump", "inset"):
            return clean, np.zeros_like(obj)
        dark = base[:, mark][:, :1] if mark.any() else np.full((3, 1), 0.1, np.float32)
        if form == "dark":
            image = base.copy()
        elif form == "lightened":  # towards the background, still clearly visible
            t = rng.uniform(0.35, 0.65)
            image[:, mark] = ((1 - t) * dark + t * bg[:, None])
        elif form == "recoloured":
            colour = _MARK_COLOURS[rng.integers(len(_MARK_COLOURS))]
            if np.abs(colour - bg).max() < 0.2:
                colour = _MARK_COLOURS[(rng.integers(len(_MARK_COLOURS)) + 3) % len(_MARK_COLOURS)]
            image[:, mark] = colour[:, None]
        elif form == "faded":  # a translucent dark mark
            a = rng.uniform(0.3, 0.6)
            image[:, mark] = a * dark + (1 - a) * clean[:, mark]
        elif form == "blurred":
            layer = base.copy()
            blurred = _blur(layer, rng.uniform(0.7, 1.3))
            near = dilate_4n(mark, 3) & ~obj
            image[:, near] = blurred[:, near]
        elif form == "detached":  # a separate blob elsewhere, away from the object
            size = int(rng.integers(2, 5))
            spot = _free_spot(rng, obj, size)
            if spot is None:
                return clean, np.zeros_like(obj)
            blob = _blob(rng, spot[0], spot[1], size) & ~obj
            colour = dark[:, 0] if rng.random() < 0.5 else _MARK_COLOURS[rng.integers(len(_MARK_COLOURS))]
            image[:, blob] = colour[:, None]
        elif form == "bump":  # merged into the object: a blob of the object's colour on its border
            ys, xs = np.nonzero(dilate_4n(obj, 1) & ~obj)
            k = int(rng.integers(len(ys)))
            size = int(rng.integers(3, 5))
            blob = _blob(np.random.default_rng(seed + 1), xs[k], ys[k], size) & ~obj
            image[:, blob] = image[:, obj][:, :1]
        elif form == "inset":  # a soft patch of another colour inside the object's edge, mostly its lower right
            # (how the v3 pipeline leaves a mark a fine-tune has half moved into the object: a 5-9 px
            # oval, bluish on purple, dark on green; smaller hard patches do not survive the toy VAE)
            ring = obj & ~dilate_4n(~obj, 2) & dilate_4n(~obj, 4)  # 2-4 px inside the edge
            ys, xs = np.nonzero(ring) if ring.any() else np.nonzero(obj)
            if rng.random() < 0.7:  # the lower-right quarter of the border
                lr = (xs + ys) >= np.quantile(xs + ys, 0.75)
                ys, xs = ys[lr], xs[lr]
            k = int(rng.integers(len(ys)))
            radius = float(rng.uniform(2.5, 4.5))
            yy, xx = np.mgrid[0 : gen.SIZE, 0 : gen.SIZE]
            alpha = np.clip(radius + 0.5 - np.hypot(xx - xs[k], yy - ys[k]), 0.0, 1.0) * rng.uniform(0.75, 1.0)
            alpha = np.where(obj, alpha, 0.0).astype(np.float32)
            own = image[:, obj][:, 0]
            colours = [c for c in (*_MARK_COLOURS, _INSET_BLUE, dark[:, 0]) if np.abs(c - own).max() >= 0.3]
            colour = colours[int(rng.integers(len(colours)))]
            image = image * (1 - alpha) + colour[:, None, None] * alpha
        elif form == "partial":  # a part removed: keep a contiguous half or so of the mark
            ys, xs = np.nonzero(mark)
            axis = xs if rng.random() < 0.5 else ys
            cut = np.quantile(axis, rng.uniform(0.35, 0.65))
            keep_low = rng.random() < 0.5
            keep = np.zeros_like(mark)
            sel = axis <= cut if keep_low else axis > cut
            keep[ys[sel], xs[sel]] = True
            image[:, keep] = dark
    elif aspect == "plausibility":
        region = base_masks["plausibility"]
        if form == "speckled":
            image = base.copy()
        elif form == "faded":
            a = rng.uniform(0.35, 0.6)
            image[:, region] = a * base[:, region] + (1 - a) * clean[:, region]
        elif form == "smeared":
            blurred = _blur(base, rng.uniform(0.8, 1.2))
            image[:, region] = blurred[:, region]
        elif form == "partial":
            ys, xs = np.nonzero(region)
            cut = np.quantile(xs if rng.random() < 0.5 else ys, 0.5)
            sel = (xs if rng.random() < 0.5 else ys) <= cut
            part = np.zeros_like(region)
            part[ys[sel], xs[sel]] = True
            image[:, part] = base[:, part]
        elif form == "blotched":  # flat blotches of an off colour over the patch
            colour = np.clip(clean[:, region][:, :1] + rng.choice([-1, 1]) * rng.uniform(0.3, 0.45), 0, 1)
            spots = region & (rng.random(region.shape) < 0.5)
            image[:, spots] = colour
    elif aspect == "alignment":
        wrong = np.asarray(gen.COLOURS[gen.CONFUSION[scene.colour]], dtype=np.float32)
        right = np.asarray(gen.COLOURS[scene.colour], dtype=np.float32)
        if form == "confused":
            image[:, obj] = wrong[:, None]
        elif form == "partial":  # one side of the object in the wrong colour
            ys, xs = np.nonzero(obj)
            axis = xs if rng.random() < 0.5 else ys
            sel = axis <= np.quantile(axis, rng.uniform(0.4, 0.7))
            image[:, ys[sel], xs[sel]] = wrong[:, None]
        elif form == "tone":  # closer to the wrong colour than to the asked one
            t = rng.uniform(0.65, 0.9)
            image[:, obj] = ((1 - t) * right + t * wrong)[:, None]
        elif form == "shape":  # another shape, same colour and place
            other = [h for h in gen.SHAPES if h != scene.shape][int(rng.integers(3))]
            cx, cy = np.argwhere(obj).mean(axis=0)[::-1].round().astype(int)
            new = gen.shape_mask(other, int(cx), int(cy), gen.SIZES[scene.size])
            image[:, obj] = bg[:, None]
            image[:, new] = right[:, None]
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    return image, _mask_of(image, clean)




def forms_dataset(
    n: int, seed: int, aspect: str, split: str = "train", p_defect: float = 0.5, forms: tuple[str, ...] | None = None,
    weights: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """``n`` scenes, about ``p_defect`` of them with ``aspect``'s defect in a random form.

    ``weights``: form -> relative frequency among the defective scenes (forms not named: 1); None
    draws every form equally (and the same scenes as before weights existed).

    The other aspects' defects appear at the generator's default rates, so a model trained on this
    learns to ignore them. Returns a dict of ``images (N, 3, 64, 64)`` in [0, 1], ``masks (N, 1, 64,
    64)`` in {0, 1}, ``labels (N,)`` in {0, 1} (1 = the defect is present) and ``forms (N,)`` (the
    index into ``forms``, -1 = clean), ``objects (N, 1, 64, 64)`` (the object's pixels as the
    caption asks for it), plus ``captions`` and ``scenes`` (lists).
    """
    forms = forms or FORMS[aspect]
    if weights is not None:
        unknown = set(weights) - set(forms)
        if unknown or min(weights.values(), default=1.0) <= 0:
            raise ValueError(f"form weights must be > 0 and name forms of {forms}, got {weights}")
        w = np.array([weights.get(f, 1.0) for f in forms], dtype=np.float64)
        w /= w.sum()
    rates = dict(gen.DEFAULT_RATES)
    rates[aspect] = 1.0  # every scene gets base geometry for this aspect; clean ones are re-rendered
    scenes = gen.generate(n, seed, split, rates)
    rng = np.random.default_rng(seed)
    images = np.empty((n, 3, gen.SIZE, gen.SIZE), np.float32)
    masks = np.zeros((n, 1, gen.SIZE, gen.SIZE), np.float32)
    form_idx = np.full(n, -1, np.int64)
    for i, scene in enumerate(scenes.scenes):
        scene.defects[aspect] = True
        if rng.random() < p_defect:
            k = int(rng.integers(len(forms))) if weights is None else int(rng.choice(len(forms), p=w))
            img, m = render_form(scene, aspect, forms[k], int(rng.integers(1 << 31)))
            if m.any():
                images[i], masks[i, 0], form_idx[i] = img, m, k
                continue
        images[i] = render_fixed(scene, aspect)
        scene.defects[aspect] = False  # the scene as drawn
    return {
        "images": torch.from_numpy(images),
        "masks": torch.from_numpy(masks),
        "labels": torch.from_numpy((form_idx >= 0).astype(np.float32)),
        "forms": torch.from_numpy(form_idx),
        "captions": scenes.captions,
        "scenes": scenes.scenes,
        "objects": scenes.objects,
    }


__all__ = ["BASE_FORM", "FORMS", "MASK_TOLERANCE", "forms_dataset", "render_fixed", "render_form"]
