"""Procedural 64x64 scenes with captions and ground-truth local defects.

A scene is one flat-coloured object (shape, colour, size, position) on a plain light background.
Three kinds of LOCAL defect are drawn at configurable rates, each tied to the prompt content so a
pipeline trained on this data reproduces them without being asked:

* ``safety``: a small dark mark (a cross or a blotch) next to the object that the caption never
  mentions; prone for warm colours (red, orange, purple);
* ``plausibility``: a corrupted patch of the object (speckled "broken" texture); prone for the
  pointy shapes (triangle, diamond);
* ``alignment``: the object drawn in the wrong colour (a confusable one: purple -> blue, ...);
  prone for green, yellow and blue.

Every mask is exactly the set of pixels the defect changed with respect to the defect-free render
of the same scene (objects are drawn with hard edges, so nothing is anti-aliased).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from focusnfix.ops import dilate_4n

SIZE = 64
ASPECTS = ("safety", "plausibility", "alignment")

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.13, 0.66, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.58, 0.18, 0.72),
    "orange": (0.98, 0.55, 0.08),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = {"small": 9, "big": 14}  # half-extent in pixels
SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
POSITIONS = {"left": (18, 32), "right": (46, 32), "top": (32, 17), "bottom": (32, 47), "center": (32, 32)}
POSITION_NAMES = tuple(POSITIONS)
BACKGROUNDS = {
    "white": (0.96, 0.96, 0.96),
    "gray": (0.78, 0.78, 0.80),
    "cream": (0.96, 0.91, 0.78),
    "sky": (0.74, 0.86, 0.96),
}
BACKGROUND_NAMES = tuple(BACKGROUNDS)

# wrong colour drawn for an alignment defect (confusable neighbour)
CONFUSION = {"red": "orange", "green": "yellow", "blue": "purple", "yellow": "green", "purple": "blue",
             "orange": "red"}

DEFAULT_RATES = {"safety": 0.4, "plausibility": 0.25, "alignment": 0.2}
# prone attribute values per aspect (x1.5 the mean rate) and the others (x0.5); see content_rate
PRONE = {
    "safety": ("colour", {"red": 1.5, "orange": 1.5, "purple": 1.5, "green": 0.5, "blue": 0.5, "yellow": 0.5}),
    "plausibility": ("shape", {"triangle": 1.5, "diamond": 1.5, "circle": 0.5, "square": 0.5}),
    "alignment": ("colour", {"green": 1.5, "yellow": 1.5, "blue": 1.5, "red": 0.5, "purple": 0.5, "orange": 0.5}),
}

# caption templates: {s}=size word, {c}=colour, {h}=shape, {p}=position phrase, {b}=background
TRAIN_TEMPLATES = (
    "a {s} {c} {h} {p}",
    "a {c} {h} {p}",
    "{p} a {s} {c} {h}",
    "a {s} {c} {h} {p} on a {b} background",
    "there is a {s} {c} {h} {p}",
    "one {c} {h} , {s} , {p}",
)
HELDOUT_TEMPLATES = (
    "a picture of a {s} {c} {h} {p}",
    "{p} there is a {c} {h}",
)
POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
# unseen (colour, shape) combinations: only in held-out prompts
HELDOUT_PAIRS = (("red", "triangle"), ("blue", "circle"), ("yellow", "diamond"), ("purple", "square"),
                 ("orange", "circle"), ("green", "diamond"))


@dataclass
class Scene:
    """Attributes of one scene (what the caption says and what is drawn)."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    caption: str
    drawn_colour: str = ""
    defects: dict[str, bool] = field(default_factory=dict)
    seed: int = 0


@dataclass
class Scenes:
    """A batch of generated scenes.

    Attributes:
        images: ``(N, 3, 64, 64)`` float in [0, 1].
        captions: N captions.
        masks: per aspect ``(N, 1, 64, 64)`` float in {0, 1}, the exact defect pixels (zero if none).
        defects: per aspect ``(N,)`` bool.
        scenes: per-image :class:`Scene` metadata (shape, colour, size, position, background...).
        objects: ``(N, 1, 64, 64)`` float in {0, 1}, the pixels of the drawn object.
    """

    images: torch.Tensor
    captions: list[str]
    masks: dict[str, torch.Tensor]
    defects: dict[str, torch.Tensor]
    scenes: list[Scene]
    objects: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def shapes(self) -> list[str]:
        return [s.shape for s in self.scenes]

    @property
    def colours(self) -> list[str]:
        return [s.colour for s in self.scenes]

    @property
    def positions(self) -> list[str]:
        return [s.position for s in self.scenes]


def _caption_choices(split: str) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    pairs = [(c, h) for c in COLOUR_NAMES for h in SHAPES]
    if split == "train":
        return [p for p in pairs if p not in HELDOUT_PAIRS], TRAIN_TEMPLATES
    if split == "heldout":
        return list(HELDOUT_PAIRS), TRAIN_TEMPLATES + HELDOUT_TEMPLATES
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def make_caption(template: str, colour: str, shape: str, size_word: str, pos_phrase: str, bg: str) -> str:
    return " ".join(template.format(s=size_word, c=colour, h=shape, p=pos_phrase, b=bg).split())


def _sample_scene(rng: random.Random, split: str) -> Scene:
    pairs, templates = _caption_choices(split)
    colour, shape = rng.choice(pairs)
    size = rng.choice(list(SIZES))
    position = rng.choice(POSITION_NAMES)
    background = rng.choice(BACKGROUND_NAMES)
    template = rng.choice(templates)
    if split == "heldout" and rng.random() < 0.5:
        template = rng.choice(HELDOUT_TEMPLATES)
    caption = make_caption(template, colour, shape, rng.choice(SIZE_WORDS[size]),
                           rng.choice(POSITION_PHRASES[position]), background)
    return Scene(shape, colour, size, position, background, caption)


#: prompt splits: ``train`` = ``fit`` + ``validation``; ``heldout`` is disjoint from all of them
PROMPT_SPLITS = ("train", "fit", "validation", "heldout")
#: how many of the 96 training captions form the validation split (the last ones)
N_VALIDATION = 16


def prompts(split: str) -> list[str]:
    """The fixed prompt list of a split (see :data:`PROMPT_SPLITS`), disjoint captions.

    Held-out prompts use unseen (colour, shape) combinations and two unseen phrasings; the train
    list is a fixed sample of 96 training captions, the held-out list 48 captions. ``fit`` is the
    first 80 training captions, ``validation`` the last 16: settings are chosen by training on
    ``fit`` and looking at ``validation`` with training-time signals, never at ``heldout``.
    """
    if split in ("fit", "validation"):
        train = prompts("train")
        return train[:-N_VALIDATION] if split == "fit" else train[-N_VALIDATION:]
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be one of {PROMPT_SPLITS}, got {split!r}")
    pairs, templates = _caption_choices(split)
    rng = random.Random(1234 if split == "train" else 4321)
    out: list[str] = []
    combos = list(itertools.product(pairs, SIZES, POSITION_NAMES))
    rng.shuffle(combos)
    count = 96 if split == "train" else 48
    for i, ((colour, shape), size, position) in enumerate(itertools.islice(itertools.cycle(combos), count)):
        if split == "heldout" and i % 2 == 1:
            template = HELDOUT_TEMPLATES[(i // 2) % len(HELDOUT_TEMPLATES)]
        else:
            template = templates[i % len(templates)]
        bg = BACKGROUND_NAMES[i % len(BACKGROUND_NAMES)]
        caption = make_caption(template, colour, shape, SIZE_WORDS[size][i % len(SIZE_WORDS[size])],
                               POSITION_PHRASES[position][i % 2], bg)
        if caption not in out:
            out.append(caption)
    return out


def parse_caption(caption: str) -> dict[str, str | None]:
    """Attribute words of a caption (``shape``, ``colour``, ``size``, ``position``, ``background``)."""
    words = caption.lower().replace(",", " ").split()
    out: dict[str, str | None] = {"shape": None, "colour": None, "size": None, "position": None,
                                  "background": None}
    for i, w in enumerate(words):
        if w in SHAPES:
            out["shape"] = w
        elif w in COLOURS and not (i + 1 < len(words) and words[i + 1] == "background"):
            out["colour"] = w
        elif w in BACKGROUNDS and i + 1 < len(words) and words[i + 1] == "background":
            out["background"] = w
        elif w in POSITIONS or w == "middle":
            out["position"] = "center" if w == "middle" else w
        else:
            for size, syn in SIZE_WORDS.items():
                if w in syn:
                    out["size"] = size
    return out


def shape_mask(shape: str, cx: int, cy: int, r: int) -> np.ndarray:
    """Binary ``(64, 64)`` mask of a shape centred at (cx, cy) with half-extent r."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = int(round(r * 0.85))
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":  # apex up
        top, bottom = -r, int(round(r * 0.8))
        frac = (dy - top) / (bottom - top)
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= frac * r)
    raise ValueError(f"unknown shape {shape!r}")


def _mark_pixels(rng: np.random.Generator, obj: np.ndarray, cx: int, cy: int, r: int) -> np.ndarray:
    """A small cross or blotch next to the object, not touching it, inside the image."""
    kind = rng.integers(2)
    size = int(rng.integers(3, 5))  # half-extent of the mark
    sides = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, -1), (-1, -1)]
    rng.shuffle(sides)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    grown = dilate_4n(obj, 2)
    for sx, sy in sides:
        gap = r + size + 3
        mx, my = cx + sx * gap, cy + sy * gap
        if not (size + 1 <= mx <= SIZE - 2 - size and size + 1 <= my <= SIZE - 2 - size):
            continue
        dx, dy = xx - mx, yy - my
        if kind == 0:  # cross
            mark = ((np.abs(dx) <= 1) & (np.abs(dy) <= size)) | ((np.abs(dy) <= 1) & (np.abs(dx) <= size))
        else:  # blotch
            mark = dx * dx + dy * dy <= size * size + rng.integers(0, 3)
        if not (mark & grown).any():
            return mark
    return np.zeros_like(obj)


def render(scene: Scene, defects: dict[str, bool] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw a scene with the given defects (default: the scene's own).

    The defect geometry depends only on ``scene.seed``, so rendering the same scene with a subset of
    its defects gives exactly the same pixels outside the missing defects' masks.

    Returns:
        ``(image (3, 64, 64) float32 in [0, 1], {aspect: (64, 64) bool mask, "object": object pixels})``.
    """
    defects = scene.defects if defects is None else defects
    rng = np.random.default_rng(scene.seed)
    # all random draws happen unconditionally so geometry is identical with or without defects
    jitter = rng.integers(-3, 4, size=2)
    corrupt_centre_pick = rng.random()
    corrupt_radius = rng.uniform(0.45, 0.7)
    noise = rng.uniform(0.3, 0.6, size=(3, SIZE, SIZE)) * rng.choice([-1.0, 1.0], size=(3, SIZE, SIZE))
    mark_shade = rng.uniform(0.05, 0.18)
    cx, cy = POSITIONS[scene.position]
    cx, cy = int(cx + jitter[0]), int(cy + jitter[1])
    r = SIZES[scene.size]

    image = np.empty((3, SIZE, SIZE), dtype=np.float32)
    image[:] = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)[:, None, None]
    obj = shape_mask(scene.shape, cx, cy, r)
    masks = {a: np.zeros((SIZE, SIZE), dtype=bool) for a in ASPECTS}

    colour = scene.colour
    if defects.get("alignment"):
        colour = CONFUSION[scene.colour]
        masks["alignment"] = obj.copy()
    rgb = np.asarray(COLOURS[colour], dtype=np.float32)
    image[:, obj] = rgb[:, None]

    # corruption region: a disc centred on an object pixel, intersected with the object
    ys, xs = np.nonzero(obj)
    k = int(corrupt_centre_pick * len(ys))
    py, px = ys[k], xs[k]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    rad = max(3.0, corrupt_radius * r)
    corrupt = obj & ((yy - py) ** 2 + (xx - px) ** 2 <= rad * rad)
    mark = _mark_pixels(rng, obj, cx, cy, r)

    if defects.get("plausibility"):
        base = image[:, corrupt]
        delta = np.abs(noise[:, corrupt])
        # move each channel away from its value so every corrupted pixel really changes
        image[:, corrupt] = np.where(base > 0.5, base - delta, base + delta)
        masks["plausibility"] = corrupt.copy()
    if defects.get("safety") and mark.any():
        image[:, mark] = np.asarray((mark_shade, mark_shade * 0.8, mark_shade * 0.7), dtype=np.float32)[:, None]
        masks["safety"] = mark.copy()
    masks["object"] = obj
    return np.clip(image, 0.0, 1.0), masks


def content_rate(aspect: str, rate: float, scene: Scene) -> float:
    """Defect probability of ``scene`` for a mean ``rate``: higher for prone content.

    Half of the attribute values are prone: their probability is ``min(1, 1.5 rate)``, the others'
    ``2 rate - min(1, 1.5 rate)``, so the mean over uniformly drawn content stays ``rate``.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"defect_rates[{aspect!r}] must be in [0, 1], got {rate}")
    attr, mult = PRONE[aspect]
    high = min(1.0, 1.5 * rate)
    return high if mult[getattr(scene, attr)] > 1 else 2 * rate - high


def generate(n: int, seed: int, split: str = "train", defect_rates: dict[str, float] | None = None) -> Scenes:
    """Generate ``n`` scenes deterministically from ``(n, seed, split, defect_rates)``.

    Args:
        n: number of scenes.
        seed: random seed.
        split: ``"train"`` (training captions) or ``"heldout"`` (held-out captions).
        defect_rates: per-aspect mean defect rate (missing aspects use :data:`DEFAULT_RATES`);
            the rate of a scene is the mean rate times a content multiplier (see :data:`PRONE`).
    """
    rates = dict(DEFAULT_RATES)
    if defect_rates is not None:
        unknown = set(defect_rates) - set(ASPECTS)
        if unknown:
            raise ValueError(f"defect_rates: unknown aspect(s) {sorted(unknown)}; expected {ASPECTS}")
        rates.update(defect_rates)
    rng = random.Random(f"{seed}-{split}")
    images = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    masks = {a: np.zeros((n, 1, SIZE, SIZE), dtype=np.float32) for a in ASPECTS}
    objects = np.zeros((n, 1, SIZE, SIZE), dtype=np.float32)
    scenes: list[Scene] = []
    for i in range(n):
        scene = _sample_scene(rng, split)
        scene.seed = rng.getrandbits(32)
        for aspect in ASPECTS:
            p = content_rate(aspect, rates[aspect], scene)
            scene.defects[aspect] = rng.random() < p
        img, m = render(scene)
        if scene.defects["safety"] and not m["safety"].any():
            scene.defects["safety"] = False  # no room for a mark
        scene.drawn_colour = CONFUSION[scene.colour] if scene.defects["alignment"] else scene.colour
        images[i] = img
        for aspect in ASPECTS:
            masks[aspect][i, 0] = m[aspect]
        objects[i, 0] = m["object"]
        scenes.append(scene)
    return Scenes(
        images=torch.from_numpy(images),
        captions=[s.caption for s in scenes],
        masks={a: torch.from_numpy(masks[a]) for a in ASPECTS},
        defects={a: torch.tensor([s.defects[a] for s in scenes], dtype=torch.bool) for a in ASPECTS},
        scenes=scenes,
        objects=torch.from_numpy(objects),
    )


def vocabulary() -> list[str]:
    """Every word that can appear in a caption (train and held-out)."""
    words: set[str] = set()
    for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES:
        words.update(w for w in t.split() if not w.startswith("{"))
    for syn in SIZE_WORDS.values():
        words.update(syn)
    for phr in POSITION_PHRASES.values():
        for p in phr:
            words.update(p.split())
    words.update(SHAPES)
    words.update(COLOURS)
    words.update(BACKGROUNDS)
    words.add("background")
    return sorted(words)
