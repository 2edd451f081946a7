"""SD3 backbone (MMDiT transformer, rectified-flow Euler sampler) on a tiny random SD3 pipeline.

The tiny components follow diffusers' own SD3 pipeline tests (two CLIP text encoders with
projection, no T5: the pipeline then uses zeros for it), shrunk further.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from focusnfix.backbones import load_backbone
from focusnfix.backbones.sd3 import StableDiffusion3Backbone
from focusnfix.config import config_from_dict
from focusnfix.errors import InputError
from focusnfix.lora import add_lora, lora_parameters
from focusnfix.sampling import SamplingOptions, sample
from focusnfix.train import FocusNFixTrainer

from conftest import base_config
from tiny import WORDS, non_lora_parameters, write_tokenizer

PROMPTS = ["a red circle", "a blue square"]
SEEDS = [3, 7]
OPTS = dict(num_inference_steps=4, guidance_scale=3.0)


def tiny_sd3_pipeline(tmp: Path, shift_dynamic: bool = False) -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    text_cfg = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32,
                    layer_norm_eps=1e-5, num_attention_heads=2, num_hidden_layers=2, vocab_size=len(WORDS) + 3,
                    max_position_embeddings=12, projection_dim=16, hidden_act="gelu")
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16,
        shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=shift_dynamic)
    tok = write_tokenizer(tmp / "tok")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sd3")
    path = tmp / "tiny-sd3"
    tiny_sd3_pipeline(tmp).save_pretrained(path)
    return path


@pytest.fixture()
def backbone(tiny_sd3_dir) -> StableDiffusion3Backbone:
    bb = load_backbone(str(tiny_sd3_dir))
    assert isinstance(bb, StableDiffusion3Backbone)
    return bb


@pytest.mark.parametrize("dynamic", [False, True])
def test_flow_sampler_matches_the_sd3_pipeline(tmp_path, dynamic):
    pipe = tiny_sd3_pipeline(tmp_path, shift_dynamic=dynamic)
    pipe.save_pretrained(tmp_path / "p")
    bb = load_backbone(str(tmp_path / "p"))
    with torch.no_grad():
        ours = sample(bb, PROMPTS[:1], SEEDS[:1], SamplingOptions(**OPTS)).images
        theirs = bb.pipe(PROMPTS[0], height=16, width=16, generator=torch.Generator().manual_seed(SEEDS[0]),
                         output_type="pt", **OPTS).images
    assert ours.shape == theirs.shape == (1, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_zero_lora_is_the_frozen_model_and_gradient_only_through_the_last_k_calls(backbone):
    opts = SamplingOptions(**OPTS, k=2)
    params = add_lora(backbone.unet, rank=4, target_modules=backbone.default_lora_targets)
    assert any("add_q_proj" in n for n, _ in backbone.unet.named_parameters() if "lora_" in n)  # joint attention
    with torch.no_grad(), backbone.adapters_disabled():
        reference = sample(backbone, PROMPTS, SEEDS, opts).images
    policy = sample(backbone, PROMPTS, SEEDS, opts).images
    assert torch.equal(policy.detach(), reference)  # a zero LoRA draws the frozen model's image, bit for bit
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(backbone.unet):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    calls = []
    handle = backbone.unet.register_forward_hook(lambda m, i, o: calls.append(o[0].requires_grad))
    out = sample(backbone, PROMPTS, SEEDS, opts)
    handle.remove()
    assert calls == [False, False, True, True]
    out.images.mean().backward()
    assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0
    assert all(not p.requires_grad and p.grad is None for p in non_lora_parameters(backbone.pipe))
    with pytest.raises(InputError, match="draft_lv"):
        sample(backbone, PROMPTS, SEEDS, SamplingOptions(**OPTS, grad_mode="draft_lv"))


def test_focusnfix_trains_on_sd3_and_its_lora_loads_in_the_pipeline(tiny_sd3_dir, tmp_path):
    cfg = base_config(str(tiny_sd3_dir), str(tmp_path / "run"), steps=2)
    cfg["sampling"] = {"num_inference_steps": 4, "guidance_scale": 3.0, "k": 2, "height": 16, "width": 16}
    cfg["lora"]["target_modules"] = list(StableDiffusion3Backbone.default_lora_targets)
    trainer = FocusNFixTrainer(config_from_dict(cfg), progress=False)
    terms = trainer.loss_on(0, 0)
    assert torch.equal(terms["constraint"], torch.zeros(2))  # zero LoRA: the constraint is exactly 0
    result = trainer.train()
    opts = SamplingOptions(**OPTS, height=16, width=16)
    with torch.no_grad():
        ours = sample(trainer.backbone, PROMPTS[:1], SEEDS[:1], opts).images
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(result.lora_dir))
    theirs = pipe(PROMPTS[0], height=16, width=16, generator=torch.Generator().manual_seed(SEEDS[0]),
                  output_type="pt", **OPTS).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    base = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir), text_encoder_3=None, tokenizer_3=None)
    base.set_progress_bar_config(disable=True)
    plain = base(PROMPTS[0], height=16, width=16, generator=torch.Generator().manual_seed(SEEDS[0]),
                 output_type="pt", **OPTS).images
    assert (theirs - plain).abs().max() > 0  # the LoRA changed something
