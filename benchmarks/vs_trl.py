"""focusnfix's training step next to trl's AlignProp step, side by side in one process.

The same packaged toy pipeline, the same reward (the toy safety model, differentiable), batch 4,
DDIM 20, CFG 7.5, LoRA rank 4 on the attention projections, gradient through the last K steps
(trl: ``truncated_backprop_timestep = N - K``, fixed), one thread. Each round runs every variant
once, interleaved, so load from other processes hits all of them alike:

* ``trl_alignprop``: ``AlignPropTrainer.step`` (trl 0.23.1, the last release with AlignProp);
* ``focusnfix_draft``: our trainer's step with beta = 0;
* ``focusnfix_warm``: our Focus-N-Fix step with its reference cached;
* ``focusnfix_warm_compiled``: the same with ``sampling.compile_unet: true`` (the no-gradient UNet
  calls through ``torch.compile``; its one-off compile is in the warm-up, reported apart as
  ``compile_seconds``);
* ``sampling``: the diffusers pipeline's ``pipe(...)`` on the batch, no gradient (the floor's first part);
* ``sampling_focusnfix``: our own sampler on the batch, no gradient (LoRA merged): the same images
  without the pipeline's per-call overhead.

    pip install -e ".[bench]"          # trl==0.23.1 (only this script needs it)
    python benchmarks/vs_trl.py [--repeats 5] [--ks 1,2,20]

Prints JSON: per K, median seconds per variant, min-max over rounds, and ratios to trl and to sampling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def measure_k(k: int, args: argparse.Namespace, reward_model, prompts_pool: list[str]) -> dict:
    """One K: build both trainers, time every variant over interleaved rounds."""
    from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline

    from focusnfix import toyworld
    from focusnfix.config import load_config
    from focusnfix.sampling import sample
    from focusnfix.train import FocusNFixTrainer

    tmp = Path(tempfile.mkdtemp())
    config = load_config(ROOT / "configs" / "toy_safety.yaml", [
        f"train.output_dir={tmp / 'run'}", f"train.batch_size={args.batch}", f"sampling.k={k}",
        f"sampling.num_inference_steps={args.steps}", "sampling.guidance_scale=7.5", "lora.rank=4",
        "lora.alpha=4", "data.cache_on_disk=false", "lora.active_steps=null",  # the LoRA on every step, as trl's
    ])
    ours = FocusNFixTrainer(config, progress=False)
    _, prompts, seeds = ours.local_batch_items(1, 0)
    with torch.no_grad():  # a LoRA that is not zero, as after a few steps
        for name, p in ours.backbone.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    ours.cache.get(prompts, seeds)
    beta = config.objective.beta

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline = DefaultDDPOStableDiffusionPipeline(str(toyworld.pipeline_path()), use_lora=True)
        theirs = AlignPropTrainer(
            AlignPropConfig(
                num_epochs=1, train_batch_size=args.batch, sample_num_steps=args.steps, sample_guidance_scale=7.5,
                truncated_backprop_rand=False, truncated_backprop_timestep=args.steps - k, mixed_precision="no",
                log_with=None, train_learning_rate=1e-3, project_kwargs={"project_dir": str(tmp / "trl")},
            ),
            lambda images, p, meta: (reward_model.reward(images, list(p)), {}),
            lambda: (prompts_pool[0], {}),
            pipeline,
        )
    counter = {"step": 0}

    def trl_alignprop() -> None:
        counter["step"] = theirs.step(0, counter["step"])

    def focusnfix_draft() -> None:  # the whole optimizer step, as trl's step: forward, backward, clip, update
        ours.config.objective.beta = 0.0
        ours.train_step(1)
        ours.config.objective.beta = beta

    def focusnfix_warm() -> None:
        ours.train_step(1)

    def focusnfix_warm_compiled() -> None:
        ours.options.compile_unet = True
        ours.train_step(1)
        ours.options.compile_unet = False

    def sampling() -> None:
        with torch.no_grad():
            ours.backbone.pipe(prompts, num_inference_steps=args.steps, guidance_scale=7.5,
                               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt")

    def sampling_ours() -> None:
        with torch.no_grad():
            sample(ours.backbone, prompts, seeds, ours.options)

    ours.backbone.pipe.set_progress_bar_config(disable=True)
    variants = {"trl_alignprop": trl_alignprop, "focusnfix_draft": focusnfix_draft,
                "focusnfix_warm": focusnfix_warm, "focusnfix_warm_compiled": focusnfix_warm_compiled,
                "sampling": sampling, "sampling_focusnfix": sampling_ours}
    times: dict[str, list[float]] = {n: [] for n in variants}
    warmup: dict[str, float] = {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        fn()  # warm-up (the compiled variant compiles here)
        warmup[name] = time.perf_counter() - t0
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    return {
        "compile_seconds": round(warmup["focusnfix_warm_compiled"] - med["focusnfix_warm_compiled"], 1),
        "seconds_median": {n: round(v, 4) for n, v in med.items()},
        "seconds_min_max": {n: [round(min(v), 4), round(max(v), 4)] for n, v in times.items()},
        "ratio_to_trl": {n: round(v / med["trl_alignprop"], 3) for n, v in med.items()},
        "ratio_to_sampling": {n: round(v / med["sampling"], 3) for n, v in med.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps N")
    parser.add_argument("--ks", default="1,2,20", help="gradient steps K to measure (N = all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import trl
    except ImportError:
        print("benchmarks/vs_trl.py needs trl 0.23.1: pip install -e '.[bench]'", file=sys.stderr)
        return 2

    from focusnfix import toyworld

    reward_model = toyworld.load_aspect("safety")
    prompts_pool = toyworld.prompts("fit")
    results = {"trl_version": trl.__version__, "threads": args.threads, "batch": args.batch, "ddim_steps": args.steps,
               "guidance": 7.5, "lora_rank": 4, "reward": "toy safety (robust)", "repeats": args.repeats, "by_k": {}}
    for k in [int(x) for x in args.ks.split(",")]:
        results["by_k"][str(k)] = measure_k(k, args, reward_model, prompts_pool)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
