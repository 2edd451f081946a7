"""``focusnfix toyworld {build,path,stats}``: register with :func:`add_subcommands`."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def add_subcommands(subparsers) -> None:
    """Register the ``toyworld`` command (with ``build``, ``path``, ``stats``) on an argparse subparsers object."""
    tw = subparsers.add_parser("toyworld", help="the embedded toy world: build, locate, measure")
    sub = tw.add_subparsers(dest="toyworld_command", required=True)

    b = sub.add_parser("build", help="train the toy pipeline, aspect models and judges (CPU)")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--quick", action="store_true", help="a few-minute, lower-quality build (for tests)")
    b.add_argument("--seed", type=int, default=0, help="build seed (default 0 = the shipped models)")
    b.add_argument("--threads", type=int, default=None, help="torch threads per process (default: the recipe's, 1)")
    b.add_argument("--device", default="cpu", help="torch device for training (default cpu)")
    b.add_argument("--stats", action="store_true", help="measure and write stats.json after building")
    b.set_defaults(func=_build)

    p = sub.add_parser("path", help="print the packaged toy pipeline directory")
    p.add_argument("--model", default=None, help="a build directory instead of the packaged assets")
    p.set_defaults(func=_path)

    s = sub.add_parser("stats", help="measure the toy world and print JSON")
    s.add_argument("--model", default=None, help="a build directory (default: the packaged assets)")
    s.add_argument("--n", type=int, default=192, help="pipeline samples (held-out prompts x seeds)")
    s.add_argument("--grid", default=None, help="also save a PNG grid of the first 64 samples")
    s.set_defaults(func=_stats)


def _build(args: argparse.Namespace) -> int:
    from focusnfix.toyworld.build import Recipe, build

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    recipe = Recipe.quick(args.seed) if args.quick else Recipe(seed=args.seed)
    if args.threads is not None:
        recipe.threads = args.threads
    recipe.device = args.device
    record = build(args.out, recipe)
    if args.stats:
        from pathlib import Path

        from focusnfix.toyworld.stats import compute_stats

        stats = compute_stats(args.out, n=64 if args.quick else 192)
        (Path(args.out) / "stats.json").write_text(json.dumps(stats, indent=2))
        record["stats"] = stats
    print(json.dumps(record, indent=2))
    return 0


def _path(args: argparse.Namespace) -> int:
    from focusnfix.toyworld import pipeline_path

    try:
        print(pipeline_path(args.model))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _stats(args: argparse.Namespace) -> int:
    from focusnfix.toyworld.stats import compute_stats

    try:
        stats = compute_stats(args.model, n=args.n, save_grid=args.grid)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m focusnfix.toyworld.cli toyworld build --out DIR``."""
    parser = argparse.ArgumentParser(prog="focusnfix")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
