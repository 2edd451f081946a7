"""GPU check: bf16 Focus-N-Fix training steps on a random-init SD-1.5-size pipeline.

No weights are downloaded: the UNet, VAE and text encoder have Stable Diffusion 1.5's
architecture (860M-parameter UNet) with random weights, which is enough to measure what the
real model costs: seconds per training step and peak GPU memory for each gradient mode, and to
check on real bf16 kernels that a zero LoRA reproduces the frozen image and gradients are finite.

    python benchmarks/gpu_check.py --out results.json            # on a CUDA machine
    python benchmarks/gpu_check.py --tiny --device cpu            # smoke test of the script

Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from focusnfix.aspects.base import Aspect


class Brightness(Aspect):
    """Reward = mean brightness; heatmap = the left half (a fixed problem region)."""

    name = "brightness"

    def reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.float().mean(dim=(1, 2, 3))

    def heatmap(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        hm = torch.zeros_like(images[:, :1])
        hm[..., : images.shape[-1] // 2] = 1
        return hm


def write_tokenizer(path: Path, max_length: int):
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    words = "a photo of red blue green cat dog on the beach in city at night".split()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for w in words:
        vocab[w + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length), len(vocab)


def build_pipeline(tmp: Path, tiny: bool):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer, vocab = write_tokenizer(tmp / "tok", 77 if not tiny else 16)
    if tiny:
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
        vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                            num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=16,
                                            bos_token_id=0, eos_token_id=1, pad_token_id=1))
    else:  # Stable Diffusion 1.5's architecture
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512, scaling_factor=0.18215)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, vocab_size=vocab, max_position_embeddings=77,
                                            bos_token_id=0, eos_token_id=1, pad_token_id=1))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = tmp / "pipe"
    pipe.save_pretrained(out)
    return out, sum(p.numel() for p in unet.parameters())


def run_mode(model_dir: Path, out_dir: Path, device: str, dtype: str, grad_mode: str, k: int,
             checkpoint: bool, steps: int, batch: int, n_steps: int) -> dict:
    from focusnfix.config import config_from_dict
    from focusnfix.train import FocusNFixTrainer

    cfg = {
        "model": {"path": str(model_dir), "dtype": dtype},
        "lora": {"rank": 64},
        "sampling": {"num_inference_steps": n_steps, "guidance_scale": 7.5, "grad_mode": grad_mode, "k": k,
                     "checkpoint_unet": checkpoint, "checkpoint_vae": checkpoint},
        "objective": {"beta": 0.05},
        "mask": {"threshold_mode": "absolute", "threshold": 0.5, "dilate_px": 0},
        "aspects": [{"type": "python", "args": {"target": "gpu_check:Brightness"}}],
        "data": {"prompts": ["a photo of a red cat", "a blue dog on the beach"], "seeds_per_prompt": 2},
        "train": {"output_dir": str(out_dir), "steps": steps, "batch_size": batch, "learning_rate": 1e-4,
                  "checkpoint_every": 0, "device": "cuda" if device == "cuda" else "cpu"},
    }
    trainer = FocusNFixTrainer(config_from_dict(cfg), aspects=[Brightness()], progress=False)
    lora_dtypes = sorted({str(p.dtype) for p in trainer.params})
    base_dtype = str(trainer.backbone.unet.conv_in.weight.dtype)
    # zero LoRA: the policy image equals the frozen image bit for bit, the constraint is 0
    first = trainer.loss_on(0, 0)
    zero_constraint = float(first["constraint"].abs().max())
    first["loss"].backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    records = []
    for step in range(steps):
        t0 = time.perf_counter()
        rec = trainer.train_step(step)
        if device == "cuda":
            torch.cuda.synchronize()
        rec["wall"] = time.perf_counter() - t0
        records.append(rec)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del trainer
    if device == "cuda":
        torch.cuda.empty_cache()
    timed = [r["wall"] for r in records[1:]] or [records[0]["wall"]]
    return {
        "grad_mode": grad_mode, "k": k, "checkpoint": checkpoint, "base_dtype": base_dtype, "lora_dtypes": lora_dtypes,
        "zero_lora_constraint": zero_constraint,
        "losses_finite": all(r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in records),
        "grad_norms": [round(r["grad_norm"], 6) for r in records],
        "skipped": sum(r["skipped"] for r in records),
        "seconds_per_step": round(sum(timed) / len(timed), 4),
        "peak_gib": round(peak, 2) if peak is not None else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--n-steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    model_dir, unet_params = build_pipeline(tmp, args.tiny)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "unet_params": unet_params, "build_seconds": round(time.perf_counter() - t0, 1),
              "image_size": 64 if args.tiny else 512, "batch": args.batch, "ddim_steps": args.n_steps, "modes": []}
    modes = [("draft_k", 1, False), ("draft_k", 2, False), ("draft_k", 2, True), ("draft_lv", 1, False),
             ("full", args.n_steps, True)]
    for i, (mode, k, ckpt) in enumerate(modes):
        try:
            r = run_mode(model_dir, tmp / f"run{i}", args.device, args.dtype, mode, k, ckpt,
                         args.train_steps, args.batch, args.n_steps)
        except torch.OutOfMemoryError as err:  # report, keep going
            r = {"grad_mode": mode, "k": k, "checkpoint": ckpt, "error": f"OOM: {str(err)[:200]}"}
        result["modes"].append(r)
        print(json.dumps(r), flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
