"""Command-line interface: ``focusnfix train | sample | mask | toyworld | ...``.

Every command exits with 0 on success, 2 on bad input (one line naming the field, path or
value at fault), 1 on anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence

# keep third-party chatter (torchvision fallbacks, deprecations) off the user's terminal
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)

from focusnfix.errors import InputError  # noqa: E402


# ---------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from focusnfix.config import load_config

    config = load_config(args.config, args.set)
    if args.dry_run:
        print(json.dumps(training_plan(config), indent=2))
        return 0
    from focusnfix.train import FocusNFixTrainer

    trainer = FocusNFixTrainer(config, progress=not args.no_progress)
    result = trainer.train(resume=args.resume)
    if trainer.accelerator.is_main_process:
        print(f"LoRA written to {result.lora_dir} after {result.steps_done} steps; log: {result.log_path}")
    return 0


def training_plan(config) -> dict:
    """What a run would do, from the config alone (no weights loaded)."""
    from focusnfix.aspects.registry import ASPECT_TYPES
    from focusnfix.backbones import resolve_model_path
    from focusnfix.config import resolve_prompts

    for a in config.aspects:
        if a.type not in ASPECT_TYPES:
            raise InputError(f"aspects: unknown aspect type {a.type!r}; known: {', '.join(sorted(ASPECT_TYPES))}")
    prompts = resolve_prompts(config.data)
    s, t = config.sampling, config.train
    grad_steps = {"draft_k": s.k, "draft_lv": 1, "full": s.num_inference_steps}[s.grad_mode]
    model = config.model.path
    try:
        model = resolve_model_path(model)
    except InputError:
        if "/" not in model or model.startswith((".", "/", "~")):
            raise
    return {
        "model": model,
        "dtype": config.model.dtype,
        "method": "DRaFT (beta = 0)" if config.objective.beta == 0 else "Focus-N-Fix",
        "beta": config.objective.beta,
        "aspects": [{"type": a.type, "name": a.name, "weight": a.weight, "localize": a.localize} for a in config.aspects],
        "pool": {"prompts": len(prompts), "seeds_per_prompt": config.data.seeds_per_prompt},
        "steps": t.steps,
        "images_per_step": t.batch_size * t.grad_accum,
        "sampling": f"DDIM {s.num_inference_steps} steps, CFG {s.guidance_scale}, {s.grad_mode}, "
        f"gradient through the last {grad_steps} UNet call(s)",
        "lora": config.lora.model_dump(),
        "output_dir": t.output_dir,
    }


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from focusnfix.backbones import load_backbone
    from focusnfix.images import grid, save_png
    from focusnfix.lora import check_lora_file
    from focusnfix.sampling import SamplingOptions, sample

    _check_prompt(args.prompt)
    backbone = load_backbone(args.model, args.dtype, device=args.device)
    if args.lora:
        path = check_lora_file(args.lora)
        backbone.pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    options = SamplingOptions(
        num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height, width=args.width
    )
    with torch.no_grad():
        images = sample(backbone, [args.prompt] * len(args.seed), list(args.seed), options).images
    out = save_png(grid([images.cpu()], pad=0 if len(args.seed) == 1 else 2), args.out)
    print(f"wrote {out}")
    return 0


def cmd_mask(args: argparse.Namespace) -> int:
    import torch

    from focusnfix.config import load_config
    from focusnfix.images import colorize, grid, overlay, save_png
    from focusnfix.masks import mask_area
    from focusnfix.reference import build_aspects, compute_reference, sampling_options

    _check_prompt(args.prompt)
    config = load_config(args.config, args.set)
    from focusnfix.backbones import load_backbone

    backbone = load_backbone(config.model.path, config.model.dtype, config.model.variant, config.model.revision)
    aspects = build_aspects(config)
    ref = compute_reference(
        backbone,
        aspects,
        [a.localize for a in config.aspects],
        [args.prompt],
        [args.seed],
        sampling_options(config),
        config.mask,
    )
    row = [ref.images, colorize(ref.heatmap), ref.mask.repeat(1, 3, 1, 1), overlay(ref.images, ref.mask)]
    with torch.no_grad():
        out = save_png(grid([torch.cat(row)], scale=args.scale), args.out)
    print(json.dumps({"out": str(out), "mask_area": round(float(mask_area(ref.mask)[0]), 4)}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from focusnfix.demo import run_demo, summary_table

    metrics = run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    print(summary_table(metrics))
    return 0


def _check_prompt(prompt: str) -> None:
    if not prompt or not prompt.strip():
        raise InputError("--prompt must be a non-empty string")


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="focusnfix", description="Region-aware reward fine-tuning of text-to-image diffusion models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a LoRA with Focus-N-Fix (beta = 0: DRaFT)")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--dry-run", action="store_true", help="validate the config and print the plan; load nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample an image with the same sampler as training")
    p.add_argument("--model", default="toy", help="'toy', a diffusers pipeline directory or a hub id")
    p.add_argument("--lora", help="directory with pytorch_lora_weights.safetensors")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds (several: a row)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("mask", help="show what training would fix: Î0 | heatmap | mask | overlay")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4, help="pixel upscaling of the picture")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("demo", help="train Focus-N-Fix and DRaFT on the toy world, evaluate, report")
    p.add_argument("--out", required=True, help="output directory (metrics.json, report.html, lora/)")
    p.add_argument("--quick", action="store_true", help="a smaller run (about 2 minutes), for CI")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Sub-commands that live beside their modules (toy world, evaluation, report, ...)."""
    import importlib

    for module_name in ("focusnfix.toyworld.cli", "focusnfix.evaluate_cli", "focusnfix.rahf.cli"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # only "this optional part is absent" is fine; a broken import inside it is not
            if err.name is None or not module_name.startswith(err.name):
                raise
            continue
        yield module.add_subcommands


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as err:
        print(f"focusnfix: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("focusnfix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
