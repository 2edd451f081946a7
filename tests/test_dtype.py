"""Base weights in bfloat16 (model.dtype), LoRA in float32, backward through DRaFT-K on the CPU."""

from __future__ import annotations

import torch

from focusnfix.backbones import load_backbone
from focusnfix.lora import add_lora
from focusnfix.sampling import SamplingOptions, sample

from tiny import non_lora_parameters


def test_bf16_base_weights_fp32_lora_and_backward(tiny_sd_dir):
    bb = load_backbone(str(tiny_sd_dir), dtype="bfloat16")
    assert bb.unet.dtype == torch.bfloat16
    assert bb.vae.dtype == torch.bfloat16 and bb.pipe.text_encoder.dtype == torch.bfloat16
    params = add_lora(bb.unet, rank=4)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    frozen = [p for n, p in bb.unet.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = sample(bb, ["a red circle", "a blue square"], [1, 2],
                 SamplingOptions(num_inference_steps=3, guidance_scale=3.0, k=2))
    assert out.images.dtype == torch.float32 and out.images.shape == (2, 3, 32, 32)
    assert torch.isfinite(out.images).all()
    out.images.mean().backward()
    grads = [p.grad for p in params]
    assert all(gr is not None and gr.dtype == torch.float32 and torch.isfinite(gr).all() for gr in grads)
    assert sum(gr.abs().sum() for gr in grads) > 0
    # only the LoRA is trained: no other weight of the pipeline (the VAE the images were decoded
    # through, the text encoder, the UNet's base) takes part in the backward or keeps a gradient
    others = non_lora_parameters(bb.pipe)
    assert len(others) > len(frozen) and all(not p.requires_grad and p.grad is None for p in others)
