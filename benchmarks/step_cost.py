"""What does one Focus-N-Fix training step cost, next to plain sampling of its batch?

A reward fine-tuning step must at least sample its batch, so the floor of a DRaFT-K step is one
inference pass plus K UNet backward passes. Measured in one process, variants interleaved in each
round (load from other processes hits all of them alike), on the packaged toy pipeline with the toy
safety reward (batch 4, K = 2, DDIM 20, CFG 7.5, LoRA rank 4 by default):

* ``sampling``: the diffusers pipeline's own ``pipe(...)`` on the batch, no gradient (the floor's
  first part);
* ``sampling_focusnfix``: our own sampler on the batch, no gradient (LoRA merged), without the
  pipeline's per-call overhead;
* ``draft``: the trainer's step with beta = 0 (sample with gradient through the last K steps,
  reward, backward);
* ``focusnfix_warm``: the trainer's step with beta > 0, every reference item in the cache;
* ``focusnfix_warm_compiled``: the same with ``sampling.compile_unet: true`` (no-gradient UNet
  calls through ``torch.compile``; the one-off compile is in the warm-up, reported as
  ``compile_seconds``); ``sampling_focusnfix_compiled``: our sampler so;
* ``focusnfix_warm_unmerged``: the same with ``sampling.merge_lora: false`` (every no-gradient
  UNet call through PEFT's LoRA branch, as before the merge);
* ``focusnfix_reference_in_step``: the step when its reference is computed inside it (what the
  first epoch cost before the cache was filled ahead of training);
* ``focusnfix_late_lora_warm``: the step of a run with ``lora.active_steps = K`` (the LoRA acts
  only on the last K steps, the cache holds the frozen prefix's latents): K graded UNet calls.

Also measured: ``prefill_seconds_per_batch``, the reference cost per batch when the cache is filled
before training in batches of ``--prefill-batch`` (paid once, outside the steps).

    python benchmarks/step_cost.py [--model toy|DIR] [--repeats 5] [--batch 4] [--k 2]

Prints JSON with median seconds per variant, min-max over rounds, and ratios to ``sampling``, to
``focusnfix_warm`` and to ``draft``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="'toy' or a diffusers pipeline directory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--prefill-batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from focusnfix.config import load_config
    from focusnfix.reference import compute_reference
    from focusnfix.sampling import sample
    from focusnfix.train import FocusNFixTrainer

    tmp = Path(tempfile.mkdtemp())
    config = load_config(ROOT / "configs" / "toy_safety.yaml", [
        f"model.path={args.model}", f"train.output_dir={tmp / 'run'}", f"train.batch_size={args.batch}",
        f"sampling.k={args.k}", f"sampling.num_inference_steps={args.steps}",
        f"sampling.guidance_scale={args.guidance}", f"lora.rank={args.rank}", f"lora.alpha={args.rank}",
        "data.cache_on_disk=false", "lora.active_steps=null",  # the LoRA on every step (DRaFT's way)
    ])
    trainer = FocusNFixTrainer(config, progress=False)
    bb, opts = trainer.backbone, trainer.options
    beta = config.objective.beta
    _, prompts, seeds = trainer.local_batch_items(1, 0)
    with torch.no_grad():  # a LoRA that is not zero, as after a few steps
        for name, p in bb.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    trainer.cache.get(prompts, seeds)  # warm
    # the same run with lora.active_steps = K: reference items hold the frozen prefix, a step runs K calls
    late_config = config.model_copy(deep=True)
    late_config.lora.active_steps = args.k
    late_config.train.output_dir = str(tmp / "late")
    late = FocusNFixTrainer(late_config, progress=False)
    with torch.no_grad():
        for name, p in late.backbone.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    late.cache.get(prompts, seeds)

    def step() -> None:  # the whole optimizer step: forward, backward, clip, update
        trainer.train_step(1)

    def sampling() -> None:
        with torch.no_grad():
            bb.pipe(prompts, num_inference_steps=opts.num_inference_steps, guidance_scale=opts.guidance_scale,
                    generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt")

    def draft() -> None:
        trainer.config.objective.beta = 0.0
        step()
        trainer.config.objective.beta = beta

    def focusnfix_warm() -> None:
        step()

    def focusnfix_late_lora_warm() -> None:  # lora.active_steps = K (docs/trainer.md)
        late.train_step(1)

    def focusnfix_warm_unmerged() -> None:
        trainer.options.merge_lora = False
        step()
        trainer.options.merge_lora = True

    def focusnfix_reference_in_step() -> None:
        compute_reference(bb, trainer.aspects, trainer.localize, prompts, seeds, opts, trainer.config.mask,
                          [a.gate for a in trainer.config.aspects])
        step()

    def sampling_focusnfix() -> None:
        with torch.no_grad():
            sample(bb, prompts, seeds, opts)

    def focusnfix_warm_compiled() -> None:
        trainer.options.compile_unet = True
        step()
        trainer.options.compile_unet = False

    def sampling_focusnfix_compiled() -> None:
        with torch.no_grad():
            sample(bb, prompts, seeds, replace(opts, compile_unet=True))

    variants = {"sampling": sampling, "sampling_focusnfix": sampling_focusnfix, "draft": draft,
                "focusnfix_warm": focusnfix_warm, "focusnfix_warm_compiled": focusnfix_warm_compiled,
                "sampling_focusnfix_compiled": sampling_focusnfix_compiled,
                "focusnfix_warm_unmerged": focusnfix_warm_unmerged,
                "focusnfix_late_lora_warm": focusnfix_late_lora_warm,
                "focusnfix_reference_in_step": focusnfix_reference_in_step}
    bb.pipe.set_progress_bar_config(disable=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    warmup: dict[str, float] = {}
    for name, fn in variants.items():  # warm-up (the compiled variants compile here)
        t0 = time.perf_counter()
        fn()
        warmup[name] = time.perf_counter() - t0
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    # the reference filled ahead of training, in large batches, per training batch
    n = max(args.prefill_batch, args.batch)
    pool = trainer.pool[:n]
    t0 = time.perf_counter()
    compute_reference(bb, trainer.aspects, trainer.localize, [p for p, _ in pool], [s for _, s in pool], opts,
                      trainer.config.mask, [a.gate for a in trainer.config.aspects])
    prefill_per_batch = (time.perf_counter() - t0) * args.batch / len(pool)

    med = {k: statistics.median(v) for k, v in times.items()}

    def ratios(to: str) -> dict[str, float]:
        return {k: round(v / med[to], 3) for k, v in med.items()}

    result = {
        "model": args.model, "threads": args.threads, "batch": args.batch, "ddim_steps": opts.num_inference_steps,
        "guidance": opts.guidance_scale, "k": opts.k, "lora_rank": args.rank, "repeats": args.repeats,
        "reward": "toy safety (robust)", "beta": beta, "device": str(trainer.accelerator.device),
        "seconds_median": {k: round(v, 4) for k, v in med.items()},
        "seconds_min_max": {k: [round(min(v), 4), round(max(v), 4)] for k, v in times.items()},
        "prefill_seconds_per_batch": round(prefill_per_batch, 4),
        "compile_seconds": round(warmup["focusnfix_warm_compiled"] - med["focusnfix_warm_compiled"], 1),
        "ratio_to_sampling": ratios("sampling"),
        "ratio_to_focusnfix_warm": ratios("focusnfix_warm"),
        "ratio_to_draft": ratios("draft"),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
