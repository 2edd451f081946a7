"""Saliency localizers, user mask files, and the aspect registry."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from focusnfix.aspects import SaliencyAspect
from focusnfix.aspects.registry import build_aspect
from focusnfix.aspects.saliency import input_gradient_saliency
from focusnfix.errors import InputError
from focusnfix.ops import gaussian_blur

from toy_aspects import RedClassifier


def red_patch_images():
    """Teal images with a red square at rows/cols 4..8 (image 0) and 10..14 (image 1)."""
    x = torch.tensor([0.2, 0.5, 0.5]).view(1, 3, 1, 1).repeat(2, 1, 16, 16)
    x[0, :, 4:8, 4:8] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    x[1, :, 10:14, 10:14] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    truth = torch.zeros(2, 1, 16, 16)
    truth[0, :, 4:8, 4:8] = 1
    truth[1, :, 10:14, 10:14] = 1
    return x, truth


@pytest.mark.parametrize("method", ["input_gradient", "smoothgrad", "gradcam"])
def test_saliency_finds_the_defect(method):
    images, truth = red_patch_images()
    options = {"gradcam": {"layer": "features"}, "smoothgrad": {"smooth_samples": 4, "noise_std": 0.05}}.get(method, {})
    aspect = SaliencyAspect("safety", RedClassifier(), method=method, blur_sigma=0.0, **options)
    hm = aspect.heatmap(images, ["", ""])
    assert hm.shape == (2, 1, 16, 16) and hm.min() >= 0 and hm.max() == 1
    inside = (hm * truth).sum() / truth.sum()
    outside = (hm * (1 - truth)).sum() / (1 - truth).sum()
    assert inside > 5 * outside
    assert not images.requires_grad  # the caller's images are untouched


def test_saliency_is_zero_where_the_reward_is_flat():
    flat = torch.full((1, 3, 8, 8), 0.5)  # no red anywhere: relu is off, gradient is zero
    hm = input_gradient_saliency(RedClassifier(), flat, [""])
    assert torch.equal(hm, torch.zeros(1, 1, 8, 8))


def test_reward_is_differentiable_and_lower_with_the_defect():
    images, _ = red_patch_images()
    clean = torch.full((1, 3, 16, 16), 0.5)
    aspect = SaliencyAspect("safety", RedClassifier())
    x = images.clone().requires_grad_(True)
    r = aspect.reward(x, ["", ""])
    r.sum().backward()
    assert x.grad.abs().sum() > 0
    assert (r.detach() < aspect.reward(clean, [""])).all()


def test_gaussian_blur_preserves_mass_and_shape():
    x = torch.zeros(1, 1, 15, 15)
    x[0, 0, 7, 7] = 1
    y = gaussian_blur(x, 1.0)
    assert y.shape == x.shape and y.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert y[0, 0, 7, 7] == y.max()


def test_gradcam_records_no_graph_before_its_layer_and_matches_the_full_graph():
    """Grad-CAM needs the gradient at its layer only: the layers before it run without a graph
    (their activations are not kept), and the heatmap is, bit for bit, the one a graph from the
    input gives."""
    from focusnfix.aspects.saliency import normalize_per_image
    from focusnfix.toyworld import load_aspect

    aspect = load_aspect("safety", localizer="gradcam")  # the packaged safety classifier, Grad-CAM
    layer = aspect.reward_model.get_submodule(aspect.layer)
    first = aspect.reward_model.get_submodule("features.0")
    recorded = []
    handle = first.register_forward_hook(lambda m, i, o: recorded.append(o.requires_grad))
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle"] * 3
    try:
        heatmap = aspect.heatmap(images, prompts)
    finally:
        handle.remove()
    assert recorded == [False]
    # the same map from a graph that starts at the input, as Grad-CAM is usually written
    captured = {}
    hook = layer.register_forward_hook(lambda m, i, o: captured.setdefault("act", o))
    try:
        with torch.enable_grad():
            x = images.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(-aspect.reward(x, prompts).sum(), captured["act"])
    finally:
        hook.remove()
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * captured["act"].detach()).sum(dim=1, keepdim=True))
    assert torch.equal(heatmap, normalize_per_image(gaussian_blur(cam, aspect.blur_sigma)))


def test_gradcam_on_a_layer_whose_output_the_model_changes_in_place():
    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            h = self.a(x)
            y = self.b(h)
            y += h  # a residual added in place to the hooked layer's output (as torchvision's ResNet blocks do)
            return -torch.relu(y).mean(dim=(1, 2, 3))

    torch.manual_seed(0)
    model = Residual().requires_grad_(False)
    hm = SaliencyAspect("s", model, method="gradcam", layer="b").heatmap(torch.rand(2, 3, 8, 8), ["", ""])
    assert hm.shape == (2, 1, 8, 8) and torch.isfinite(hm).all()


def test_gradcam_needs_a_real_layer():
    with pytest.raises(ValueError, match="layer"):
        SaliencyAspect("s", RedClassifier(), method="gradcam")
    with pytest.raises(ValueError, match="not a submodule"):
        SaliencyAspect("s", RedClassifier(), method="gradcam", layer="nope")


def test_mask_files_single_image_and_directory(tmp_path):
    arr = np.zeros((8, 8), np.uint8)
    arr[:, :4] = 255
    Image.fromarray(arr).save(tmp_path / "left.png")
    with pytest.raises(InputError, match="resize: true"):  # an 8x8 mask for 16x16 images
        build_aspect("mask_files", {"path": str(tmp_path / "left.png")}).heatmap(torch.zeros(1, 3, 16, 16), ["a"])
    one = build_aspect("mask_files", {"path": str(tmp_path / "left.png"), "resize": True})
    hm = one.heatmap(torch.zeros(2, 3, 16, 16), ["a", "b"])
    assert hm.shape == (2, 1, 16, 16)
    assert hm[..., :7].min() == 1 and hm[..., 9:].max() == 0
    assert torch.equal(one.reward(torch.zeros(2, 3, 4, 4), ["a", "b"]), torch.zeros(2))

    (tmp_path / "index.json").write_text(json.dumps({"a cat": "left.png"}))
    by_prompt = build_aspect("mask_files", {"path": str(tmp_path)})
    assert by_prompt.heatmap(torch.zeros(1, 3, 8, 8), ["a cat"]).sum() == 32
    with pytest.raises(InputError, match="no mask image for prompt"):
        by_prompt.heatmap(torch.zeros(1, 3, 8, 8), ["a dog"])


def test_mask_files_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        build_aspect("mask_files", {"path": str(tmp_path / "nope.png")})
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(InputError, match="bad.png"):
        build_aspect("mask_files", {"path": str(tmp_path / "bad.png")})
    (tmp_path / "index.json").write_text(json.dumps({"x": "missing.png"}))
    with pytest.raises(InputError, match="missing.png"):
        build_aspect("mask_files", {"path": str(tmp_path)})


def test_registry_errors():
    with pytest.raises(InputError, match="unknown aspect type"):
        build_aspect("nope", {})
    with pytest.raises(InputError, match="cannot import"):
        build_aspect("python", {"target": "no_such_module:thing"})
    with pytest.raises(InputError, match="expected a focusnfix Aspect"):
        build_aspect("python", {"target": "toy_aspects:red_classifier"})
    aspect = build_aspect("saliency", {"target": "toy_aspects:red_classifier", "method": "gradcam",
                                       "layer": "features"}, name="safety")
    assert aspect.name == "safety" and not any(p.requires_grad for p in aspect.parameters())


def test_a_toyworld_aspect_loads_from_another_build_and_names_a_bad_root(tmp_path):
    import shutil

    from focusnfix import toyworld

    build = tmp_path / "build"
    shutil.copytree(toyworld.pipeline_path().parent, build)
    packaged = build_aspect("toyworld", {"aspect": "safety"})
    other = build_aspect("toyworld", {"aspect": "safety", "root": str(build)})
    assert all(torch.equal(a, b) for a, b in zip(packaged.state_dict().values(), other.state_dict().values(), strict=True))
    with pytest.raises(InputError, match="args.root.*pipeline/model_index.json"):
        build_aspect("toyworld", {"aspect": "safety", "root": str(tmp_path / "nowhere")})


def _half_mask(path, side):
    arr = np.zeros((8, 8), np.uint8)
    if side == "left":
        arr[:, :4] = 255
    else:
        arr[:, 4:] = 255
    Image.fromarray(arr).save(path)


def test_mask_files_keyed_by_prompt_and_seed(tmp_path):
    _half_mask(tmp_path / "left.png", "left")
    _half_mask(tmp_path / "right.png", "right")
    index = {"a cat": "left.png", "a dog": {"0": "left.png", "7": "right.png"}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    aspect = build_aspect("mask_files", {"path": str(tmp_path)})
    x = torch.zeros(3, 3, 8, 8)
    hm = aspect.heatmap(x, ["a dog", "a dog", "a cat"], seeds=[7, 0, 123])  # a prompt-wide mask fits any seed
    assert hm[0, 0, :, 4:].eq(1).all() and hm[0, 0, :, :4].eq(0).all()
    assert hm[1, 0, :, :4].eq(1).all() and hm[1, 0, :, 4:].eq(0).all()
    assert torch.equal(hm[2], hm[1])
    with pytest.raises(InputError, match=r"prompt 'a dog' and seed 3 .*seeds \[0, 7\]"):
        aspect.heatmap(x[:1], ["a dog"], seeds=[3])
    with pytest.raises(InputError, match="keys the masks of prompt 'a dog' by seed, but these images come without"):
        aspect.heatmap(x[:1], ["a dog"])


@pytest.mark.parametrize("index, match", [
    ({"a dog": {"zero": "left.png"}}, "must map a seed"),
    ({"a dog": {"0": 3}}, "must map a seed"),
    ({"a dog": {"\u00b2": "left.png"}}, "must map a seed"),  # a digit to str.isdigit, not to int()
    ({"a dog": {"9" * 5000: "left.png"}}, "must map a seed"),
    ({"a dog": {"01": "left.png", "1": "left.png"}}, "gives seed 1 twice"),
    ({"a dog": {}}, "maps to {}"),
    ({"a dog": ["left.png"]}, "maps to"),
    ({}, "must be an object mapping prompt"),
    ({"a dog": {"0": "gone.png"}}, "gone.png, which does not exist"),
    ({"a dog": ""}, "names ''; expected the name of an image file inside"),
    ({"a dog": "../left.png"}, "names '../left.png'; expected the name of an image file inside"),
])
def test_mask_files_bad_index_entries_are_named(tmp_path, index, match):
    masks = tmp_path / "masks"
    masks.mkdir()
    _half_mask(masks / "left.png", "left")
    _half_mask(tmp_path / "left.png", "left")
    (masks / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=match):
        build_aspect("mask_files", {"path": str(masks)})


def test_mask_files_refuse_a_prompt_given_twice_and_a_coloured_palette(tmp_path):
    _half_mask(tmp_path / "left.png", "left")
    (tmp_path / "index.json").write_text('{"a dog": "left.png", "a dog": "left.png"}')
    with pytest.raises(InputError, match=r"keys given twice: \['a dog'\]"):  # json.loads kept the last
        build_aspect("mask_files", {"path": str(tmp_path)})
    red = Image.new("P", (8, 8))
    red.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    red.save(tmp_path / "red.png")
    with pytest.raises(InputError, match="is in colour"):  # it read as 0.298 everywhere
        build_aspect("mask_files", {"path": str(tmp_path / "red.png")})
    grey = Image.new("P", (8, 8))
    grey.putpalette([255, 255, 255] + [0, 0, 0] * 255)
    grey.save(tmp_path / "grey.png")
    assert build_aspect("mask_files", {"path": str(tmp_path / "grey.png")}).heatmap(torch.zeros(1, 3, 8, 8), ["a"]).min() == 1


def test_mask_files_resize_must_be_a_boolean(tmp_path):
    _half_mask(tmp_path / "left.png", "left")
    with pytest.raises(InputError, match="resize must be true or false, got 'false'"):  # a truthy string
        build_aspect("mask_files", {"path": str(tmp_path / "left.png"), "resize": "false"})


def test_an_aspect_written_without_seeds_is_still_called():
    from focusnfix.aspects import Aspect, aspect_heatmap

    class TwoArguments(Aspect):
        def reward(self, images, prompts):
            return images.new_zeros(images.shape[0])

        def heatmap(self, images, prompts):
            return images[:, :1]

    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(aspect_heatmap(TwoArguments(), x, ["a", "b"], seeds=[0, 1]), x[:, :1])
    with pytest.raises(ValueError, match="1 seeds for 2 prompts"):
        aspect_heatmap(TwoArguments(), x, ["a", "b"], seeds=[0])
