"""Tiny Stable Diffusion pipelines built from configs, as diffusers' own tests build them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

WORDS = ["a", "red", "blue", "green", "circle", "square", "on", "the", "left", "right", "big", "small"]


def non_lora_parameters(pipe) -> list[torch.nn.Parameter]:
    """Every weight of the pipeline's components but the LoRA's (what training must leave frozen)."""
    return [p for c in pipe.components.values() if isinstance(c, torch.nn.Module)
            for n, p in c.named_parameters() if "lora_" not in n]


def write_tokenizer(path: Path) -> CLIPTokenizer:
    """A word-level CLIP tokenizer written offline (no hub)."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for w in WORDS:
        vocab[w + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=12)


def tiny_sd_pipeline(tmp: Path, seed: int = 0) -> StableDiffusionPipeline:
    """Random-init SD pipeline: 32x32 images, 8x8x4 latents, 2-layer text encoder."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=16,
            intermediate_size=32,
            layer_norm_eps=1e-5,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(WORDS) + 3,
            max_position_embeddings=12,
            projection_dim=16,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=write_tokenizer(tmp / "tok"),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd(path: Path, seed: int = 0) -> Path:
    pipe = tiny_sd_pipeline(path.parent, seed)
    pipe.save_pretrained(path)
    return path


def write_t5_tokenizer(path: Path):
    """A T5 tokenizer of :data:`WORDS` written offline (Unigram vocabulary, T5's metaspace pieces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    t5.save_pretrained(path)
    return T5TokenizerFast.from_pretrained(path)
