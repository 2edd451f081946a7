"""Sub-commands ``eval``, ``votes``, ``report``, ``rate`` and ``sweep`` (registered by ``focusnfix.cli``).

Handlers return an exit code and raise :class:`~focusnfix.errors.InputError` for bad input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from focusnfix.errors import InputError
from focusnfix.files import read_prompts_file


def _name_path_pairs(values: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        if "=" not in v:
            raise InputError(f"{flag} {v!r} must look like NAME=PATH")
        name, path = v.split("=", 1)
        name = name.strip()
        if not name or not path:
            raise InputError(f"{flag} {v!r} must look like NAME=PATH with a non-empty name and path")
        if name in out:
            raise InputError(f"{flag}: name {name!r} given twice")
        out[name] = path
    return out


def read_prompts(spec: str) -> list[str]:
    """``toy:heldout`` / ``toy:train`` or a text file with one prompt per line (``#`` comments)."""
    if spec.startswith("toy:"):
        split = spec.split(":", 1)[1]
        if split not in ("train", "heldout"):
            raise InputError(f"--prompts: toy split must be train or heldout, got {split!r}")
        from focusnfix import toyworld

        return list(toyworld.prompts(split))
    return read_prompts_file(spec, "--prompts")


def _toy_aspects(names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    from focusnfix import toyworld

    aspects, judges = {}, {}
    for n in names:
        if n not in toyworld.ASPECTS:
            raise InputError(f"--aspects: {n!r} is not a toy world aspect ({', '.join(toyworld.ASPECTS)}); "
                             "use --config for other aspects")
        try:
            aspects[n] = toyworld.load_aspect(n)
            judges[n] = toyworld.load_judge(n)
        except FileNotFoundError as err:
            raise InputError(str(err)) from err
    return aspects, judges


def cmd_eval(args: argparse.Namespace) -> int:
    from focusnfix.config import MaskConfig, load_config
    from focusnfix.evaluate import aspects_from_config, evaluate
    from focusnfix.sampling import SamplingOptions

    methods: dict[str, str | None] = dict(_name_path_pairs(args.lora, "--lora"))
    if args.seeds < 1:
        raise InputError("--seeds must be >= 1")
    config = load_config(args.config, args.set) if args.config else None
    if config is not None and not args.aspects:
        aspects, target, judges = aspects_from_config(config)
    elif args.aspects:
        names = [a.strip() for a in args.aspects.split(",") if a.strip()]
        if not names:
            raise InputError("--aspects must name at least one aspect")
        aspects, judges = _toy_aspects(names)
        target = names[0]
    else:
        raise InputError("give --aspects (toy world names, first = target) or --config")
    if config is not None:
        s = config.sampling
        options = SamplingOptions(num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                                  height=s.height, width=s.width, negative_prompt=s.negative_prompt)
        mask_cfg = config.mask
        model = args.model or config.model.path
    else:
        options = SamplingOptions(num_inference_steps=20, guidance_scale=7.5)
        mask_cfg = MaskConfig()
        model = args.model or "toy"
    if args.steps is not None:
        options.num_inference_steps = args.steps
    if args.guidance is not None:
        options.guidance_scale = args.guidance
    prompts = read_prompts(args.prompts)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    metrics = evaluate(model, methods, aspects, target, judges, prompts, seeds, options, mask_cfg, args.out,
                       batch_size=args.batch_size, n_bootstrap=args.bootstrap, sld=args.sld)
    if args.votes:
        from focusnfix.rating import apply_votes

        metrics = apply_votes(args.out, args.votes)
    summary = {m: {k: (e.get(k) or {}).get("mean") for k in ("target_reward", "outside_psnr", "improved_share")}
               for m, e in metrics["methods"].items()}
    print(json.dumps({"metrics": str(Path(args.out) / "metrics.json"), "n_images": metrics["n_images"],
                      "summary": summary}, indent=2))
    return 0


def cmd_votes(args: argparse.Namespace) -> int:
    from focusnfix.rating import apply_votes

    metrics = apply_votes(args.dir, args.votes)
    print(json.dumps({m: e.get("human") for m, e in metrics["methods"].items() if m != "base"}, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from focusnfix.report import write_report

    logs = {k: Path(v) for k, v in _name_path_pairs(args.train_log, "--train-log").items()}
    out = args.out or str(Path(args.dir) / "report.html")
    path = write_report(args.dir, out, train_logs=logs or None, sweep=Path(args.sweep) if args.sweep else None,
                        max_examples=args.max_examples)
    print(f"wrote {path}")
    return 0


def cmd_rate(args: argparse.Namespace) -> int:
    from focusnfix.rating import write_rating_page

    out = args.out or str(Path(args.dir) / "rate.html")
    path = write_rating_page(args.dir, out, seed=args.seed, max_examples=args.max_examples)
    print(f"wrote {path}")
    return 0


def parse_betas(text: str) -> list[float]:
    try:
        betas = [float(b) for b in text.split(",") if b.strip()]
    except ValueError as err:
        raise InputError(f"--betas must be comma-separated numbers, got {text!r}") from err
    if not betas:
        raise InputError("--betas must list at least one beta")
    if len({f"{b:g}" for b in betas}) != len(betas):
        raise InputError(f"--betas has duplicates: {text!r}")
    return betas


def cmd_sweep(args: argparse.Namespace) -> int:
    from focusnfix.sweep import sweep

    prompts = read_prompts(args.prompts) if args.prompts else None
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    doc = sweep(args.config, parse_betas(args.betas), args.out, args.set, prompts=prompts, seeds=seeds,
                batch_size=args.batch_size, n_bootstrap=args.bootstrap, progress=not args.no_progress)
    print(json.dumps({"sweep": str(Path(args.out) / "sweep.json"),
                      "points": [{"beta": p["beta"],
                                  "target_gain": (p.get("target_gain") or {}).get("mean"),
                                  "outside_psnr": (p.get("outside_psnr") or {}).get("mean")} for p in doc["points"]]},
                     indent=2))
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register ``eval``, ``votes``, ``report``, ``rate`` and ``sweep``."""
    p = sub.add_parser("eval", help="evaluate base vs LoRAs (and SLD) on held-out prompts and seeds")
    p.add_argument("--model", help="'toy', a diffusers pipeline directory or a hub id (default: config's or toy)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="a method: name and LoRA directory (repeatable), e.g. focusnfix=runs/fnf/lora")
    p.add_argument("--aspects", help="toy world aspects, comma-separated; the first is the target")
    p.add_argument("--config", help="a training config: its aspects (first weighted = target), mask and sampling")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--prompts", default="toy:heldout", help="prompt file (one per line) or toy:heldout")
    p.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0 = all)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    p.add_argument("--seed-offset", type=int, default=10000, help="first seed (default keeps clear of training seeds)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: config's, else 20)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: config's, else 7.5)")
    p.add_argument("--sld", action="store_true", help="also run the Safe Latent Diffusion baseline (method 'sld')")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per interval")
    p.add_argument("--votes", action="append", default=[], metavar="FILE", help="fold human votes into metrics.json")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("votes", help="fold rating-page votes into an evaluation's metrics.json")
    p.add_argument("dir", help="evaluation directory")
    p.add_argument("--votes", action="append", required=True, metavar="FILE", help="votes JSON (repeatable)")
    p.set_defaults(func=cmd_votes)

    p = sub.add_parser("report", help="write a self-contained HTML report of an evaluation")
    p.add_argument("dir", help="evaluation directory")
    p.add_argument("--out", help="HTML file (default: DIR/report.html)")
    p.add_argument("--train-log", action="append", default=[], metavar="NAME=PATH",
                   help="a training log.jsonl (or run directory) to plot (repeatable)")
    p.add_argument("--sweep", help="sweep.json for the beta trade-off curve")
    p.add_argument("--max-examples", type=int, default=32)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("rate", help="write the static human-rating page of an evaluation")
    p.add_argument("dir", help="evaluation directory")
    p.add_argument("--out", help="HTML file (default: DIR/rate.html)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task order")
    p.add_argument("--max-examples", type=int)
    p.set_defaults(func=cmd_rate)

    p = sub.add_parser("sweep", help="train one LoRA per beta and evaluate the trade-off (beta 0 = DRaFT)")
    p.add_argument("--config", required=True)
    p.add_argument("--betas", required=True, help="comma-separated, e.g. 0,0.3,1,3")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--prompts", help="evaluation prompts (default: the config's training prompts)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--seed-offset", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)


__all__ = ["add_subcommands", "parse_betas", "read_prompts"]
