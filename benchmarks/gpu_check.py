"""GPU check: steady-state bf16 Focus-N-Fix training steps on random-init SD-1.5- and SDXL-size pipelines.

No weights are downloaded: the UNet, VAE and text encoders have Stable Diffusion 1.5's (860M-parameter
UNet, 512 px) or SDXL's (2.6B-parameter UNet, two text encoders, 1024 px) architecture with random
weights, which is enough to measure what the real model costs and to check on real bf16 kernels
that a zero LoRA reproduces the frozen image and gradients are finite. Per gradient mode it
separates the three costs a user pays:

* ``prefill_seconds_per_item``: the reference images (Î0, heatmap, mask), filled before training;
* ``sampling_seconds``: plain sampling of one batch, no gradient (the floor of a step);
* ``steady_seconds_per_step``: the median training step once every item is cached, and its
  ratio to ``sampling_seconds``; ``peak_gib`` over the steps (the prefill excluded).

``--batch-search`` also finds the largest batch (draft_k, K = 2, checkpointed UNet and VAE, SD-1.5
size) whose peak fits in 24, 48 and 80 GiB.

    python benchmarks/gpu_check.py --out results.json                       # on a CUDA machine: sd15, sdxl
    python benchmarks/gpu_check.py --archs sd15 --batch-search --out r.json
    python benchmarks/gpu_check.py --archs tiny,tiny_sdxl --device cpu --dtype float32   # smoke test

Prints one JSON line per mode as it goes and one JSON object at the end (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
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


def _text_config(vocab: int, hidden: int, layers: int, heads: int, positions: int, projection: int = 512):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=heads,
                          num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=positions,
                          projection_dim=projection, bos_token_id=0, eos_token_id=1, pad_token_id=1)


#: image size of each architecture
IMAGE_SIZE = {"tiny": 32, "tiny_sdxl": 32, "sd15": 512, "sdxl": 1024}


def build_pipeline(tmp: Path, arch: str) -> tuple[Path, int]:
    """Save a random-init pipeline of ``arch`` (tiny, tiny_sdxl, sd15, sdxl); return its path and UNet size."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tiny = arch.startswith("tiny")
    tokenizer, vocab = write_tokenizer(tmp / f"tok_{arch}", 16 if tiny else 77)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    if tiny:
        vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16)
    else:  # Stable Diffusion's VAE (SD 1.5 and SDXL share the architecture)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=IMAGE_SIZE[arch], scaling_factor=0.18215 if arch == "sd15" else 0.13025)
    latent = IMAGE_SIZE[arch] // (2 ** (len(vae.config.block_out_channels) - 1))
    if arch == "tiny":
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=latent,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
        text = CLIPTextModel(_text_config(vocab, 32, 2, 4, 16))
    elif arch == "sd15":  # Stable Diffusion 1.5's architecture
        unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        text = CLIPTextModel(_text_config(vocab, 768, 12, 12, 77, 768))
    else:  # SDXL's architecture (tiny_sdxl: the same layout, small)
        big = arch == "sdxl"
        h1, h2 = (768, 1280) if big else (16, 32)
        unet = UNet2DConditionModel(
            sample_size=latent, block_out_channels=(320, 640, 1280) if big else (32, 64), layers_per_block=2 if big else 1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D") if big
            else ("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D") if big
            else ("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10) if big else (1, 1), attention_head_dim=(5, 10, 20) if big else (4, 8),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256 if big else 8,
            projection_class_embeddings_input_dim=(6 * 256 + h2) if big else (6 * 8 + h2),
            cross_attention_dim=h1 + h2, norm_num_groups=32 if big else 16,
        )
        text = CLIPTextModel(_text_config(vocab, h1, 12 if big else 2, 12 if big else 2, 77 if big else 16))
        text_2 = CLIPTextModelWithProjection(_text_config(vocab, h2, 32 if big else 2, 20 if big else 2,
                                                          77 if big else 16, projection=h2))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=sched, add_watermarker=False)
    if arch in ("tiny", "sd15"):
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = tmp / f"pipe_{arch}"
    pipe.save_pretrained(out)
    return out, sum(p.numel() for p in unet.parameters())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_mode(model_dir: Path, out_dir: Path, device: str, dtype: str, grad_mode: str, k: int,
             checkpoint: bool, steps: int, batch: int, n_steps: int, image_size: int) -> dict:
    """Prefill the reference, time plain sampling of a batch, then ``steps`` training steps."""
    from focusnfix.config import config_from_dict
    from focusnfix.sampling import sample
    from focusnfix.train import FocusNFixTrainer

    prompts = ["a photo of a red cat", "a blue dog on the beach"]
    cfg = {
        "model": {"path": str(model_dir), "dtype": dtype},
        "lora": {"rank": 64},
        "sampling": {"num_inference_steps": n_steps, "guidance_scale": 7.5, "grad_mode": grad_mode, "k": k,
                     "checkpoint_unet": checkpoint, "checkpoint_vae": checkpoint,
                     "height": image_size, "width": image_size},
        "objective": {"beta": 0.05},
        "mask": {"threshold_mode": "absolute", "threshold": 0.5, "dilate_px": 0},
        "aspects": [{"type": "python", "args": {"target": "gpu_check:Brightness"}}],
        # enough items that steps 1.. never meet an uncached one: (steps + 1) batches
        "data": {"prompts": prompts, "seeds_per_prompt": max(2, -(-(steps + 1) * batch // len(prompts))),
                 "cache_on_disk": False},
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
    del first
    _sync(device)
    t0 = time.perf_counter()
    filled = trainer.prefill_reference() or {"items": 0}
    _sync(device)
    prefill = time.perf_counter() - t0
    _, b_prompts, b_seeds = trainer.local_batch_items(1, 0)
    with torch.no_grad(), trainer.accelerator.autocast():
        sample(trainer.backbone, b_prompts, b_seeds, trainer.options)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        sample(trainer.backbone, b_prompts, b_seeds, trainer.options)
        _sync(device)
    sampling = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    records = []
    for step in range(1, steps + 1):  # step 0 ran above (the zero-LoRA check); every item is cached now
        t0 = time.perf_counter()
        rec = trainer.train_step(step)
        _sync(device)
        rec["wall"] = time.perf_counter() - t0
        records.append(rec)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del trainer
    if device == "cuda":
        torch.cuda.empty_cache()
    walls = [r["wall"] for r in records]
    timed = walls[1:] or walls  # the first step still warms kernels and the optimizer state
    steady = statistics.median(timed)
    return {
        "grad_mode": grad_mode, "k": k, "checkpoint": checkpoint, "batch": batch, "image_size": image_size,
        "base_dtype": base_dtype, "lora_dtypes": lora_dtypes, "zero_lora_constraint": zero_constraint,
        "losses_finite": all(math.isfinite(r["loss"]) for r in records),
        "grad_norms": [round(r["grad_norm"], 6) for r in records],
        "skipped": sum(r["skipped"] for r in records),
        "prefill_items": filled["items"],
        "prefill_seconds_per_item": round(prefill / max(1, filled["items"]), 4),
        "sampling_seconds": round(sampling, 4),
        "steady_seconds_per_step": round(steady, 4),
        "steps_seconds": [round(w, 4) for w in walls],
        "steady_over_sampling": round(steady / sampling, 3),
        "peak_gib": round(peak, 2) if peak is not None else None,
    }


def _try(fn, **kw) -> dict:
    try:
        return fn(**kw)
    except torch.OutOfMemoryError as err:  # report, keep going
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {**{k: kw[k] for k in ("grad_mode", "k", "checkpoint", "batch") if k in kw}, "error": f"OOM: {str(err)[:200]}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="sd15,sdxl", help="comma-separated: sd15, sdxl, tiny, tiny_sdxl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=None, help="default: 4 for sd15/tiny, 1 for sdxl/tiny_sdxl")
    parser.add_argument("--n-steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--train-steps", type=int, default=4, help="timed steps per mode (the first is not counted)")
    parser.add_argument("--batch-search", action="store_true", help="largest batch within 24/48/80 GiB (sd15)")
    parser.add_argument("--modes", default="1,1c,2,2c",
                        help="draft_k modes: K, with a trailing c for checkpointed UNet and VAE (default 1,1c,2,2c)")
    parser.add_argument("--out")
    args = parser.parse_args()
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = sorted(set(archs) - set(IMAGE_SIZE))
    if unknown:
        parser.error(f"--archs: unknown {unknown}; choose from {sorted(IMAGE_SIZE)}")
    if args.batch_search and args.device != "cuda":
        parser.error("--batch-search measures CUDA peak memory; it needs --device cuda")
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    tmp = Path(tempfile.mkdtemp())
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "dtype": args.dtype, "ddim_steps": args.n_steps, "lora_rank": 64, "archs": {}}
    try:
        modes = [("draft_k", int(m.rstrip("c")), m.endswith("c")) for m in args.modes.split(",") if m.strip()]
    except ValueError:
        parser.error(f"--modes: expected K or Kc items such as 1,2c; got {args.modes!r}")
    for arch in archs:
        t0 = time.perf_counter()
        model_dir, unet_params = build_pipeline(tmp, arch)
        batch = args.batch or (1 if "sdxl" in arch else 4)
        entry = {"unet_params": unet_params, "build_seconds": round(time.perf_counter() - t0, 1),
                 "image_size": IMAGE_SIZE[arch], "batch": batch, "modes": []}
        for i, (mode, k, ckpt) in enumerate(modes):
            r = _try(run_mode, model_dir=model_dir, out_dir=tmp / f"{arch}_run{i}", device=args.device,
                     dtype=args.dtype, grad_mode=mode, k=k, checkpoint=ckpt, steps=args.train_steps, batch=batch,
                     n_steps=args.n_steps, image_size=IMAGE_SIZE[arch])
            entry["modes"].append(r)
            print(json.dumps({"arch": arch, **r}), flush=True)
        if args.batch_search and arch in ("sd15", "tiny"):
            tries, b = [], 2
            while b <= 64:
                r = _try(run_mode, model_dir=model_dir, out_dir=tmp / f"{arch}_b{b}", device=args.device,
                         dtype=args.dtype, grad_mode="draft_k", k=2, checkpoint=True, steps=2, batch=b,
                         n_steps=args.n_steps, image_size=IMAGE_SIZE[arch])
                tries.append({"batch": b, "peak_gib": r.get("peak_gib"), "error": r.get("error"),
                              "steady_seconds_per_step": r.get("steady_seconds_per_step")})
                print(json.dumps({"arch": arch, "batch_search": tries[-1]}), flush=True)
                if "error" in r or (r.get("peak_gib") or 0) > 80:
                    break
                b *= 2
            fits = {}
            for budget in (24, 48, 80):
                ok = [t["batch"] for t in tries if t["error"] is None and t["peak_gib"] is not None
                      and t["peak_gib"] <= budget]
                fits[f"{budget}_gib"] = max(ok) if ok else None
            entry["batch_search"] = {"mode": "draft_k, k = 2, checkpointed UNet and VAE", "tries": tries,
                                     "largest_batch_within": fits}
        result["archs"][arch] = entry
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
