"""SDXL backbone on a tiny random SDXL pipeline (and SD 2.x v-prediction on the tiny SD pipeline).

The tiny SDXL components follow diffusers' own SDXL pipeline tests (two CLIP text encoders, the
second with projection; a UNet with ``addition_embed_type="text_time"``), shrunk further.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from focusnfix.backbones import BACKBONES, load_backbone
from focusnfix.backbones.sd import StableDiffusionBackbone
from focusnfix.backbones.sdxl import StableDiffusionXLBackbone
from focusnfix.config import config_from_dict
from focusnfix.lora import add_lora, lora_parameters
from focusnfix.sampling import SamplingOptions, sample
from focusnfix.train import FocusNFixTrainer

from tiny import WORDS, non_lora_parameters, tiny_sd_pipeline, write_tokenizer
from toy_aspects import BrightnessAspect

PROMPTS = ["a red circle", "a blue square"]
SEEDS = [3, 7]


def tiny_sdxl_pipeline(tmp: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """Random-init SDXL pipeline: 32x32 images, 8x8x4 latents, two 16-wide text encoders."""
    torch.manual_seed(seed)
    text_cfg = dict(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32,
        layer_norm_eps=1e-5, num_attention_heads=2, num_hidden_layers=2, vocab_size=len(WORDS) + 3,
        max_position_embeddings=12, projection_dim=16, hidden_act="gelu",
    )
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 16,  # six time ids x 8 + pooled text (16)
        cross_attention_dim=32,  # 16 + 16: the two text encoders' hidden states, concatenated
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4, norm_num_groups=8, sample_size=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )
    tok = write_tokenizer(tmp / "tok")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sdxl")
    path = tmp / "tiny-sdxl"
    tiny_sdxl_pipeline(tmp).save_pretrained(path)
    return path


@pytest.fixture()
def backbone(tiny_sdxl_dir) -> StableDiffusionXLBackbone:
    bb = load_backbone(str(tiny_sdxl_dir))
    assert isinstance(bb, StableDiffusionXLBackbone)
    return bb


def _perturb_lora(unet, scale=0.05):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.add_(scale * torch.randn(p.shape, generator=g))


def _pipe_images(pipe, prompt, seed, steps, guidance):
    return pipe(
        [prompt], num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed), output_type="pt",
    ).images


def test_registered_for_the_sdxl_pipeline():
    assert BACKBONES["StableDiffusionXLPipeline"] is StableDiffusionXLBackbone


def test_conditioning_and_time_ids(backbone):
    cond = backbone.encode_prompts(PROMPTS)
    assert cond.cond["encoder_hidden_states"].shape == (2, 12, 32)
    assert cond.cond["text_embeds"].shape == (2, 16)
    # force_zeros_for_empty_prompt (SDXL default): an empty negative prompt is all zeros
    assert torch.count_nonzero(cond.uncond["encoder_hidden_states"]) == 0
    kwargs = backbone.unet_inputs(cond.cond, 2, 32, 48)
    ids = kwargs["added_cond_kwargs"]["time_ids"]
    assert ids.tolist() == [[32, 48, 0, 0, 32, 48]] * 2


@pytest.mark.parametrize("negative", ["", "blue"])
def test_matches_the_diffusers_sdxl_pipeline(backbone, negative):
    opts = SamplingOptions(num_inference_steps=4, guidance_scale=4.0, negative_prompt=negative)
    with torch.no_grad():
        ours = sample(backbone, PROMPTS[:1], SEEDS[:1], opts).images
        theirs = backbone.pipe(
            PROMPTS[:1], num_inference_steps=4, guidance_scale=4.0, negative_prompt=negative or None,
            generator=torch.Generator().manual_seed(SEEDS[0]), output_type="pt",
        ).images
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_zero_lora_reproduces_the_frozen_image_bit_for_bit(backbone):
    opts = SamplingOptions(num_inference_steps=3, guidance_scale=3.0, k=2)
    with torch.no_grad():
        before = sample(backbone, PROMPTS, SEEDS, opts).images
    params = add_lora(backbone.unet, rank=4)
    with torch.no_grad(), backbone.adapters_disabled():
        reference = sample(backbone, PROMPTS, SEEDS, opts).images
    policy = sample(backbone, PROMPTS, SEEDS, opts).images
    assert torch.equal(policy.detach(), reference)
    assert torch.equal(reference, before)
    _perturb_lora(backbone.unet)
    sample(backbone, PROMPTS, SEEDS, opts).images.mean().backward()
    assert sum(p.grad.abs().sum() for p in params) > 0
    assert all(not p.requires_grad and p.grad is None for p in non_lora_parameters(backbone.pipe))  # both text encoders, VAE


def test_trainer_steps_and_lora_loads_into_the_sdxl_pipeline(tiny_sdxl_dir, tmp_path):
    backbone = load_backbone(str(tiny_sdxl_dir))
    config = config_from_dict({
        "model": {"path": str(tiny_sdxl_dir)},
        "lora": {"rank": 4},
        "sampling": {"num_inference_steps": 3, "guidance_scale": 3.0, "k": 2},
        "objective": {"beta": 1.0},
        "mask": {"threshold_mode": "absolute", "threshold": 0.5, "dilate_px": 0},
        "aspects": [{"type": "python", "args": {"target": "toy_aspects:brightness"}}],
        "data": {"prompts": PROMPTS, "seeds_per_prompt": 1},
        "train": {"output_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "learning_rate": 5e-2,
                  "checkpoint_every": 0, "weight_decay": 0.0, "device": "cpu"},
    })
    trainer = FocusNFixTrainer(config, aspects=[BrightnessAspect("left")], backbone=backbone, progress=False)
    result = trainer.train()
    assert result.steps_done == 2
    lora = torch.cat([p.detach().reshape(-1) for p in lora_parameters(backbone.unet)])
    assert torch.isfinite(lora).all()
    assert (result.lora_dir / "pytorch_lora_weights.safetensors").is_file()

    # Our sampler with the trained LoRA == the plain SDXL pipeline after load_lora_weights of the
    # trainer's own file (its lora/ directory)
    out = result.lora_dir
    opts = SamplingOptions(num_inference_steps=3, guidance_scale=3.0)
    with torch.no_grad():
        ours = sample(backbone, PROMPTS[:1], SEEDS[:1], opts).images
        with backbone.adapters_disabled():
            frozen = sample(backbone, PROMPTS[:1], SEEDS[:1], opts).images
    assert not torch.equal(ours, frozen)  # the LoRA changed something
    plain = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(out))
    with torch.no_grad():
        theirs = _pipe_images(plain, PROMPTS[0], SEEDS[0], 3, 3.0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# ---- SD 2.x v-prediction ------------------------------------------------------------------
@pytest.fixture(scope="module")
def vpred_backbone(tmp_path_factory) -> StableDiffusionBackbone:
    tmp = tmp_path_factory.mktemp("sd2v")
    pipe: StableDiffusionPipeline = tiny_sd_pipeline(tmp)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    pipe.save_pretrained(tmp / "tiny-sd2-v")
    bb = load_backbone(str(tmp / "tiny-sd2-v"))
    assert bb.scheduler.config.prediction_type == "v_prediction"
    return bb


def test_v_prediction_matches_the_pipeline_and_zero_lora_is_exact(vpred_backbone):
    bb = vpred_backbone
    opts = SamplingOptions(num_inference_steps=4, guidance_scale=4.0)
    with torch.no_grad():
        ours = sample(bb, PROMPTS[:1], SEEDS[:1], opts).images
        theirs = _pipe_images(bb.pipe, PROMPTS[0], SEEDS[0], 4, 4.0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    add_lora(bb.unet, rank=4)
    with torch.no_grad(), bb.adapters_disabled():
        reference = sample(bb, PROMPTS, SEEDS, opts).images
    policy = sample(bb, PROMPTS, SEEDS, opts).images
    assert torch.equal(policy.detach(), reference)
    # v-prediction and epsilon interpret the same UNet output differently
    eps_sched = DDIMScheduler.from_config(bb.scheduler.config, prediction_type="epsilon")
    bb.scheduler, v_sched = eps_sched, bb.scheduler
    try:
        with torch.no_grad():
            as_eps = sample(bb, PROMPTS[:1], SEEDS[:1], opts).images
    finally:
        bb.scheduler = v_sched
    assert not torch.allclose(as_eps, ours)
