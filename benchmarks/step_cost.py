"""What does one Focus-N-Fix training step cost, relative to a plain DRaFT-K step?

Measured in one run, on one machine, interleaved (so load from other processes hits all variants):

* ``draft``: policy sampling (gradient through the last K steps) + reward + backward: a plain
  DRaFT-K step with no reference at all;
* ``focusnfix_cached``: the trainer's step with every reference already in the cache;
* ``focusnfix_uncached``: the same, but the reference Î0 and its mask recomputed every step;
* ``detach_all_steps``: DRaFT-K as peers run it: every step with autograd on, early outputs
  detached (same gradient as ``draft``).

    python benchmarks/step_cost.py [--model toy|DIR] [--repeats 5]

Prints JSON with seconds per step (median) and the ratios to ``draft``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (random test pipeline), 'toy', or a directory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from focusnfix.config import config_from_dict
    from focusnfix.reference import compute_reference
    from focusnfix.sampling import initial_noise, sample
    from focusnfix.train import FocusNFixTrainer

    from conftest import base_config
    from tiny import save_tiny_sd

    tmp = Path(tempfile.mkdtemp())
    model = str(save_tiny_sd(tmp / "sd")) if args.model == "tiny" else args.model
    cfg = base_config(model, str(tmp / "run"), steps=1000, batch_size=4)
    cfg["sampling"]["num_inference_steps"] = 20
    cfg["data"]["cache_on_disk"] = False
    trainer = FocusNFixTrainer(config_from_dict(cfg), progress=False)
    bb, opts = trainer.backbone, trainer.options
    idx, prompts, seeds = trainer.local_batch_items(0, 0)
    trainer.cache.get(idx, prompts, seeds, trainer.accelerator.device)  # warm the cache

    def draft() -> None:
        images = sample(bb, prompts, seeds, opts).images
        (-trainer.total_reward(images, prompts)[0].mean()).backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    def focusnfix_cached() -> None:
        trainer.loss_on(0, 0)["loss"].backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    def focusnfix_uncached() -> None:
        compute_reference(bb, trainer.aspects, trainer.localize, prompts, seeds, opts, trainer.config.mask)
        focusnfix_cached()

    def detach_all_steps() -> None:
        cond = bb.encode_prompts(prompts)
        x = initial_noise(bb, seeds, *bb.default_size)
        bb.scheduler.set_timesteps(opts.num_inference_steps)
        n = len(bb.scheduler.timesteps)
        for i, t in enumerate(bb.scheduler.timesteps):
            if i == n - opts.k:
                x = x.detach()
            x = bb.scheduler.step(bb.predict_noise(x, t, cond, opts.guidance_scale), t, x).prev_sample
        (-trainer.total_reward(bb.decode(x), prompts)[0].mean()).backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    variants = {"draft": draft, "focusnfix_cached": focusnfix_cached,
                "focusnfix_uncached": focusnfix_uncached, "detach_all_steps": detach_all_steps}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model, "threads": args.threads, "batch": len(prompts), "ddim_steps": opts.num_inference_steps,
        "k": opts.k, "repeats": args.repeats,
        "seconds_median": {k: round(v, 4) for k, v in med.items()},
        "ratio_to_draft": {k: round(v / med["draft"], 3) for k, v in med.items()},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
