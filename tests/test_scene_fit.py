"""The scene fit reads generator renders exactly; its judges say what the docs say they say."""

import pytest
import torch

from focusnfix.errors import InputError
from focusnfix.toyworld import generator as gen
from focusnfix.toyworld import load_judge
from focusnfix.toyworld.forms import render_form
from focusnfix.toyworld.scene_fit import (
    STRAY_THRESHOLD,
    SceneFitAlignmentJudge,
    SceneFitMarkJudge,
    SceneFitSafetyJudge,
    colour_margin,
    fit_scene,
    local_median,
    patch_map,
    read_attributes,
    shape_margin,
    stray_score,
)


def _clean(n: int = 24, split: str = "heldout", seed: int = 5) -> gen.Scenes:
    return gen.generate(n, seed, split, {"safety": 0.0, "plausibility": 0.0, "alignment": 0.0})


def test_the_fit_recovers_every_clean_render_exactly():
    scenes = _clean()
    fit = fit_scene(scenes.images)
    for i, s in enumerate(scenes.scenes):
        assert fit.shape[i] == s.shape and int(fit.radius[i]) == gen.SIZES[s.size]
        truth = scenes.objects[i, 0]
        assert torch.equal(fit.mask[i, 0], truth)  # the exact silhouette, centre included
        assert torch.allclose(fit.colour[i], torch.tensor(gen.COLOURS[s.colour]))
        assert torch.allclose(fit.background[i], torch.tensor(gen.BACKGROUNDS[s.background]))
    read = read_attributes(fit)
    assert read["colour"] == scenes.colours and read["shape"] == scenes.shapes
    assert read["position"] == scenes.positions and read["size"] == [s.size for s in scenes.scenes]


def test_nothing_strays_from_a_clean_render_and_every_mark_outside_the_object_does():
    scenes = _clean(16)
    assert torch.equal(stray_score(fit_scene(scenes.images)), torch.zeros(16))
    for form in ("dark", "recoloured", "lightened", "detached", "bump"):
        marked = []
        for s in scenes.scenes:
            img, mask = render_form(s, "safety", form, seed=3)
            if mask.any():
                marked.append(torch.from_numpy(img))
        assert marked, form
        assert bool((stray_score(fit_scene(torch.stack(marked))) > STRAY_THRESHOLD).all()), form


def test_the_safety_judge_adds_stray_blobs_to_the_learned_judge():
    learned = load_judge("safety")
    judge = SceneFitSafetyJudge(learned)
    scenes = _clean(8)
    bumps = torch.stack([torch.from_numpy(render_form(s, "safety", "bump", seed=4)[0]) for s in scenes.scenes])
    with torch.no_grad():
        p_learned = learned.defect_probability(bumps, scenes.captions)
        p = judge.defect_probability(bumps, scenes.captions)
        heat = judge.defect_heatmap(bumps, scenes.captions)
    assert bool((p >= p_learned).all()) and bool((p > 0.5).all())
    assert heat.shape == (8, 1, 32, 32) and float(heat.min()) >= 0 and float(heat.max()) <= 1


def test_the_alignment_judge_flags_a_wrong_colour_or_shape_and_nothing_else():
    judge = load_judge("alignment")
    assert isinstance(judge, SceneFitAlignmentJudge) and not judge.training
    scenes = _clean(16)
    with torch.no_grad():
        assert bool((judge.defect_probability(scenes.images, scenes.captions) < 0.5).all())
        for form in ("confused", "shape", "tone"):
            wrong = torch.stack([torch.from_numpy(render_form(s, "alignment", form, seed=2)[0]) for s in scenes.scenes])
            assert bool((judge.defect_probability(wrong, scenes.captions) > 0.5).all()), form


def test_margins_are_minus_infinity_where_the_caption_names_no_colour_or_shape():
    scenes = _clean(2)
    fit = fit_scene(scenes.images)
    caps = ["a thing on the left", scenes.captions[1]]
    assert colour_margin(fit, caps)[0] == float("-inf") and shape_margin(fit, caps)[0] == float("-inf")
    assert float(colour_margin(fit, caps)[1]) < 0 and float(shape_margin(fit, caps)[1]) < 0


def test_the_fit_rejects_images_that_are_not_toy_world_images():
    with pytest.raises(InputError, match=r"\(B, 3, 64, 64\)"):
        fit_scene(torch.rand(2, 3, 32, 32))


def test_the_mark_judge_sees_nothing_on_a_clean_render_and_a_spot_inside_or_a_blob_beside_it():
    scenes = _clean(16)
    judge = SceneFitMarkJudge()
    fit = fit_scene(scenes.images)
    assert torch.equal(patch_map(scenes.images, fit, 5, 3), torch.zeros(16, 1, 64, 64))  # flat objects: exactly 0
    stray, patch = judge.scores(scenes.images)
    assert torch.equal(stray, torch.zeros(16)) and torch.equal(patch, torch.zeros(16))
    spotted = scenes.images.clone()
    for i in range(16):  # a dark 3x3 spot at the object's centre: inside the silhouette, no stray pixel
        cx, cy = (int(v) for v in fit.centre[i])
        spotted[i, :, cy - 1 : cy + 2, cx - 1 : cx + 2] = 0.1
    p = judge.defect_probability(spotted, scenes.captions)
    assert bool((p > 0.5).all())
    heat = judge.defect_heatmap(spotted, scenes.captions)
    assert heat.shape == (16, 1, 64, 64)
    for i in range(16):  # the heatmap lies on the spot
        cx, cy = (int(v) for v in fit.centre[i])
        assert heat[i, 0, cy, cx] == 1
    beside = torch.stack([torch.from_numpy(render_form(s, "safety", "detached", seed=3)[0]) for s in scenes.scenes])
    assert bool((judge.defect_probability(beside, scenes.captions) > 0.5).all())


def test_the_local_median_passes_shading_and_removes_a_small_spot():
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64).contiguous()
    assert torch.allclose(local_median(ramp, 5)[..., 2:-2], ramp[..., 2:-2])  # a linear ramp is its own median
    spot = torch.full((1, 3, 64, 64), 0.5)
    spot[..., 30:32, 30:32] = 0.0
    assert torch.equal(local_median(spot, 5), torch.full((1, 3, 64, 64), 0.5))
    with pytest.raises(InputError, match="odd"):
        local_median(spot, 4)
