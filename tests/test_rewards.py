"""Reward-model adapters on tiny random CLIP models (no weights available offline).

Checked: shapes (B,), finiteness, gradients reaching the input image, heatmaps (B, 1, h, w) in
[0, 1], loading by path through the aspect registry, clear errors for missing weights/packages.
HPSv2 (open_clip) and ImageReward need torchvision, which cannot import beside this project's
CPU torch build: their model tests skip with that reason.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

from focusnfix.aspects.registry import ASPECT_TYPES, build_aspect
from focusnfix.aspects.rewards.aesthetic import LaionAestheticHead, load_head
from focusnfix.aspects.rewards.base import CLIP_MEAN, CLIP_STD, clip_preprocess
from focusnfix.errors import InputError

from tiny import WORDS, write_tokenizer

PROMPTS = ["a red circle", "a blue square"]


def _importable(name: str) -> tuple[bool, str]:
    try:
        importlib.import_module(name)
        return True, ""
    except Exception as err:  # ImportError, or torchvision's RuntimeError at import
        return False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random CLIPModel (32 px images, 8 px patches: a 4 x 4 grid) and its tokenizer, saved."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(WORDS) + 3, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    write_tokenizer(path / "tok").save_pretrained(path)
    return path


@pytest.fixture()
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 40, 48, generator=g)


def _check_reward_and_heatmap(aspect, images, grid=4):
    x = images.clone().requires_grad_(True)
    r = aspect.reward(x, PROMPTS)
    assert r.shape == (2,) and torch.isfinite(r).all()
    r.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    hm = aspect.heatmap(images, PROMPTS)
    assert hm.shape == (2, 1, grid, grid)
    assert torch.isfinite(hm).all() and hm.min() >= 0 and hm.max() <= 1
    assert hm.flatten(1).amax(1).gt(0).all()  # the patch tokens reach the score: Grad-CAM is not empty
    assert not images.requires_grad
    return r.detach(), hm


def test_all_types_are_registered():
    for name in ("clip_score", "pickscore", "aesthetic", "hpsv2", "imagereward", "nudenet", "rahf"):
        assert name in ASPECT_TYPES


def test_clip_preprocess_matches_the_clip_processor():
    """Torch preprocessing == CLIPImageProcessor (PIL) up to the resampling kernel."""
    from transformers import CLIPImageProcessorPil

    y, x = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 48), indexing="ij")
    img = torch.stack([x, y, (x + y) / 2])[None]  # smooth (1, 3, 40, 48) in [0, 1]
    ours = clip_preprocess(img, 32)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    array = (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    theirs = proc(images=array, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert (ours - theirs).abs().mean() < 0.03


def test_clip_preprocess_is_differentiable_and_crops_the_center():
    img = torch.zeros(1, 3, 32, 64)
    img[..., 16:48] = 1.0  # white center square
    out = clip_preprocess(img.requires_grad_(True), 32)
    white = (torch.ones(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, :, 8:24, 8:24].mean(dim=(1, 2)), white, atol=1e-3, rtol=0)
    out.sum().backward()
    assert img.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["cosine", "logit"])
def test_clip_score(tiny_clip_dir, images, mode):
    aspect = build_aspect("clip_score", {"model": str(tiny_clip_dir), "mode": mode})
    r, _ = _check_reward_and_heatmap(aspect, images)
    if mode == "cosine":
        assert r.abs().max() <= 1.0
        return
    # the CLIP logit of each image with its own prompt, as transformers' CLIPModel computes it
    from transformers import CLIPModel, CLIPTokenizer

    model, tok = CLIPModel.from_pretrained(str(tiny_clip_dir)).eval(), CLIPTokenizer.from_pretrained(str(tiny_clip_dir))
    with torch.no_grad():
        n = model.config.text_config.max_position_embeddings  # the tiny CLIP's context
        out = model(**tok(PROMPTS, padding="max_length", truncation=True, max_length=n, return_tensors="pt"),
                    pixel_values=clip_preprocess(images, model.config.vision_config.image_size))
    torch.testing.assert_close(r.detach(), out.logits_per_image.diag(), atol=1e-4, rtol=1e-4)


def test_clip_score_target_text_and_negate(tiny_clip_dir, images):
    plain = build_aspect("clip_score", {"model": str(tiny_clip_dir), "target_text": "red"})
    neg = build_aspect("clip_score", {"model": str(tiny_clip_dir), "target_text": "red", "negate": True})
    torch.testing.assert_close(neg.reward(images, PROMPTS), -plain.reward(images, PROMPTS))
    _check_reward_and_heatmap(neg, images)
    # with a fixed text the prompts do not matter
    torch.testing.assert_close(plain.reward(images, ["a", "b"]), plain.reward(images, PROMPTS))


@pytest.mark.parametrize("localizer", ["input_gradient", "smoothgrad"])
def test_gradient_localizers(tiny_clip_dir, images, localizer):
    aspect = build_aspect("clip_score", {"model": str(tiny_clip_dir), "localizer": localizer})
    hm = aspect.heatmap(images, PROMPTS)
    assert hm.shape == (2, 1, 40, 48) and hm.min() >= 0 and hm.max() <= 1


def test_pickscore(tiny_clip_dir, images):
    aspect = build_aspect("pickscore", {"model": str(tiny_clip_dir), "tokenizer": str(tiny_clip_dir)})
    r, _ = _check_reward_and_heatmap(aspect, images)
    cos = build_aspect("clip_score", {"model": str(tiny_clip_dir)}).reward(images, PROMPTS)
    scale = aspect.model.logit_scale.exp().item()
    torch.testing.assert_close(r, scale * cos)


def test_aesthetic(tiny_clip_dir, images, tmp_path):
    torch.manual_seed(1)
    head = LaionAestheticHead(16)
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    torch.save(head.state_dict(), str(tmp_path / "head.pth"))
    assert set(head.state_dict()) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    aspect = build_aspect("aesthetic", {"head": str(tmp_path / "head.safetensors"), "clip": str(tiny_clip_dir)})
    r, _ = _check_reward_and_heatmap(aspect, images)
    from_pth = build_aspect("aesthetic", {"head": str(tmp_path / "head.pth"), "clip": str(tiny_clip_dir)})
    torch.testing.assert_close(from_pth.reward(images, PROMPTS), r)


def test_aesthetic_bad_head_files(tmp_path):
    with pytest.raises(InputError, match="do not exist"):
        load_head(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(InputError, match="not a LAION aesthetic head"):
        load_head(tmp_path / "wrong.safetensors")


def test_missing_clip_weights_are_an_input_error(tmp_path):
    with pytest.raises(InputError, match="clip_score: cannot load a CLIPModel"):
        build_aspect("clip_score", {"model": str(tmp_path / "nothing")})


# ---- optional packages -----------------------------------------------------------------------
OPEN_CLIP, OPEN_CLIP_WHY = _importable("open_clip")
IMAGE_REWARD, IMAGE_REWARD_WHY = _importable("ImageReward")


@pytest.mark.skipif(OPEN_CLIP, reason="open_clip is importable here; the missing-package path is not reachable")
def test_hpsv2_without_open_clip_names_the_extra(tmp_path):
    ckpt = tmp_path / "hps.pt"
    ckpt.write_bytes(b"")
    with pytest.raises(InputError, match=r"pip install focusnfix\[clip\]"):
        build_aspect("hpsv2", {"checkpoint": str(ckpt)})


@pytest.mark.skipif(IMAGE_REWARD, reason="ImageReward is importable here; the missing-package path is not reachable")
def test_imagereward_without_the_package_names_the_extra():
    with pytest.raises(InputError, match=r"pip install focusnfix\[imagereward\]"):
        build_aspect("imagereward", {})


@pytest.mark.skipif(not OPEN_CLIP, reason=f"open_clip cannot be imported ({OPEN_CLIP_WHY}); it needs torchvision, "
                    "whose PyPI builds fail to import beside torch 2.13.0+cpu")
def test_hpsv2_on_a_tiny_open_clip_model(images):
    import open_clip

    from focusnfix.aspects.rewards.hpsv2 import HPSv2Aspect

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval().requires_grad_(False)
    aspect = HPSv2Aspect(model, open_clip.get_tokenizer("ViT-B-32"))
    _check_reward_and_heatmap(aspect, images)
