"""FLUX backbone (packed latents, embedded guidance, flow Euler sampler) on a tiny random FLUX pipeline.

The tiny components follow diffusers' own FLUX pipeline tests (CLIP + T5 text encoders, a
transformer with one double- and one single-stream block), with tokenizers written offline.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from focusnfix.backbones import load_backbone
from focusnfix.backbones.flux import FluxBackbone, pack, unpack
from focusnfix.config import config_from_dict
from focusnfix.errors import InputError
from focusnfix.lora import add_lora, lora_parameters
from focusnfix.sampling import SamplingOptions, sample
from focusnfix.train import FocusNFixTrainer

from conftest import base_config
from tiny import WORDS, write_t5_tokenizer, write_tokenizer

PROMPTS = ["a red circle", "a blue square"]
SEEDS = [3, 7]
OPTS = dict(num_inference_steps=4, guidance_scale=3.5)
SIZE = dict(height=16, width=16)


def tiny_flux_pipeline(tmp: Path, guidance_embeds: bool = True) -> FluxPipeline:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds,
    )
    clip = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16,
                                        intermediate_size=32, layer_norm_eps=1e-5, num_attention_heads=2,
                                        num_hidden_layers=2, vocab_size=len(WORDS) + 3, max_position_embeddings=12,
                                        projection_dim=16, hidden_act="gelu"))
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    vae = AutoencoderKL(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(4, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=1, norm_num_groups=1,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae, text_encoder=clip,
        tokenizer=write_tokenizer(tmp / "clip_tok"), text_encoder_2=t5, tokenizer_2=write_t5_tokenizer(tmp / "t5_tok"),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("flux")
    tiny_flux_pipeline(tmp).save_pretrained(tmp / "tiny-flux")
    return tmp / "tiny-flux"


def _pipe_images(pipe, prompt: str, seed: int) -> torch.Tensor:
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", max_sequence_length=512,
                **OPTS, **SIZE).images


def test_packing_round_trip():
    x = torch.randn(2, 3, 8, 6)
    assert torch.equal(unpack(pack(x), 8, 6), x)


@pytest.mark.parametrize("guidance_embeds", [True, False])  # dev, schnell
def test_flow_sampler_matches_the_flux_pipeline(tmp_path, guidance_embeds):
    tiny_flux_pipeline(tmp_path, guidance_embeds).save_pretrained(tmp_path / "p")
    bb = load_backbone(str(tmp_path / "p"))
    assert isinstance(bb, FluxBackbone)
    with torch.no_grad():
        ours = sample(bb, PROMPTS[:1], SEEDS[:1], SamplingOptions(**OPTS, **SIZE)).images
        theirs = _pipe_images(bb.pipe, PROMPTS[0], SEEDS[0])
    assert ours.shape == theirs.shape == (1, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_a_negative_prompt_is_refused_not_dropped(tiny_flux_dir):
    bb = load_backbone(str(tiny_flux_dir))
    with pytest.raises(InputError, match="FLUX pipelines take no negative prompt"):
        bb.encode_prompts(PROMPTS, "blurry")
    assert bb.encode_prompts(PROMPTS, "").cond["encoder_hidden_states"].shape[0] == len(PROMPTS)


def test_zero_lora_exact_and_gradient_through_the_last_k(tiny_flux_dir):
    bb = load_backbone(str(tiny_flux_dir))
    opts = SamplingOptions(**OPTS, **SIZE, k=2)
    params = add_lora(bb.unet, rank=4, target_modules=bb.default_lora_targets)
    with torch.no_grad(), bb.adapters_disabled():
        reference = sample(bb, PROMPTS, SEEDS, opts).images
    assert torch.equal(sample(bb, PROMPTS, SEEDS, opts).images.detach(), reference)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(bb.unet):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    calls = []
    handle = bb.unet.register_forward_hook(lambda m, i, o: calls.append(o[0].requires_grad))
    sample(bb, PROMPTS, SEEDS, opts).images.mean().backward()
    handle.remove()
    assert calls == [False, False, True, True]
    assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0


def test_focusnfix_on_flux_lora_loads_in_fluxpipeline_and_reproduces_sampling(tiny_flux_dir, tmp_path):
    cfg = base_config(str(tiny_flux_dir), str(tmp_path / "run"), steps=2)
    cfg["sampling"] = {**OPTS, **SIZE, "k": 2}
    cfg["lora"]["target_modules"] = list(FluxBackbone.default_lora_targets)
    trainer = FocusNFixTrainer(config_from_dict(cfg), progress=False)
    assert torch.equal(trainer.loss_on(0, 0)["constraint"], torch.zeros(2))
    result = trainer.train()
    with torch.no_grad():
        ours = sample(trainer.backbone, PROMPTS[:1], SEEDS[:1], SamplingOptions(**OPTS, **SIZE)).images
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_dir))
    pipe.set_progress_bar_config(disable=True)
    plain = _pipe_images(pipe, PROMPTS[0], SEEDS[0])
    pipe.load_lora_weights(str(result.lora_dir))
    theirs = _pipe_images(pipe, PROMPTS[0], SEEDS[0])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (theirs - plain).abs().max() > 0
    # `focusnfix sample` with the run's LoRA (settings from the run's config.yaml) draws the same picture
    import numpy as np
    from PIL import Image

    from focusnfix.cli import main

    assert main(["sample", "--lora", str(result.lora_dir), "--prompt", PROMPTS[0], "--seed", str(SEEDS[0]),
                 "--out", str(tmp_path / "x.png")]) == 0
    png = np.asarray(Image.open(tmp_path / "x.png")).astype(np.int16)
    want = (theirs[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
    assert np.abs(png - want).max() <= 1
