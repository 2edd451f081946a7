"""The handlers of the command-line interface (the parser and the list of commands are in :mod:`focusnfix.cli`).

Each handler takes the parsed arguments, returns an exit code, and raises
:class:`~focusnfix.errors.InputError` for bad input.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from focusnfix import toyworld
from focusnfix.aspects.registry import ASPECT_TYPES
from focusnfix.backbones import load_backbone, resolve_model_path
from focusnfix.config import Config, load_config, resolve_prompts
from focusnfix.demo import run_demo
from focusnfix.errors import InputError, warn
from focusnfix.evaluate import (
    aspects_from_config,
    check_same_setup,
    evaluate,
    evaluation_setup,
    load_lora,
    model_loader,
    run_config,
    summary_table,
)
from focusnfix.files import atomic_write_text, read_json, read_prompts_file
from focusnfix.images import check_picture_size, colorize, grid, overlay, save_png
from focusnfix.inference import lora_steps_for
from focusnfix.lora import check_lora_file, lora_active_steps
from focusnfix.masks import mask_area
from focusnfix.rahf import evaluate as rahf_evaluate
from focusnfix.rahf.data import RichHFDataset, collate
from focusnfix.rahf.model import RAHFConfig, RAHFModel
from focusnfix.rahf.train import RAHFTrainConfig, train_rahf
from focusnfix.rating import apply_votes, read_votes, write_rating_page
from focusnfix.reference import build_aspects, compute_reference, sampling_options
from focusnfix.report import markdown_table, write_report
from focusnfix.sampling import SamplingOptions, sample
from focusnfix.sweep import combine_sweeps, sweep
from focusnfix.toyworld.build import Recipe, build
from focusnfix.toyworld.stats import compute_stats
from focusnfix.train import FocusNFixTrainer

#: ``focusnfix sample``'s settings when neither a flag nor a run config gives them
SAMPLE_DEFAULTS = {"steps": 20, "guidance": 7.5}


# ---------------------------------------------------------------------------------------------
# train, sample, mask, demo
# ---------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    if args.dry_run:
        print(json.dumps(training_plan(config), indent=2))
        return 0
    trainer = FocusNFixTrainer(config, progress=not args.no_progress)
    result = trainer.train(resume=args.resume, overwrite=args.overwrite)
    if trainer.accelerator.is_main_process:
        print(f"LoRA written to {result.lora_dir} after {result.steps_done} steps; log: {result.log_path}")
    return 0


def training_plan(config: Config) -> dict:
    """What a run would do, from the config alone (no weights loaded)."""
    for i, a in enumerate(config.aspects):
        if a.type not in ASPECT_TYPES:
            raise InputError(f"aspects: unknown aspect type {a.type!r}; known: {', '.join(sorted(ASPECT_TYPES))}")
        try:  # the args the aspect's factory takes, checked without building it (no weights loaded)
            inspect.signature(ASPECT_TYPES[a.type]).bind(**a.args)
        except TypeError as err:
            raise InputError(f"aspects[{i}] ({a.type}): bad args {sorted(a.args)}: {err}") from None
    # local paths in aspect args that do not exist (a preset's placeholders): found now, not after loading
    missing = [f"aspects[{i}].args.{k} = {v}" for i, a in enumerate(config.aspects) for k, v in a.args.items()
               if isinstance(v, str) and v.startswith(("/", "./", "../", "~")) and not Path(v).expanduser().exists()]
    if missing:
        raise InputError(f"{'; '.join(missing)}: no such file or directory (a preset's placeholder?)")
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


def run_config_path(config: str | None, lora: str | None) -> Path | None:
    """``--config``, else the ``config.yaml`` of the run whose ``lora/`` directory ``--lora`` names."""
    if config:
        return Path(config)
    if not lora:
        return None
    lora_dir = check_lora_file(lora).parent  # the LoRA's directory (a run's lora/ when given the run)
    candidate = lora_dir.parent / "config.yaml"
    return candidate if lora_dir.name == "lora" and candidate.is_file() else None


def _check_png(out: str, flag: str = "--out") -> None:
    """Before any work: ``out`` names a PNG file to write (not a folder, a name ending in .png)."""
    if Path(out).is_dir():
        raise InputError(f"{flag} {out} is a folder; expected a PNG file to write")
    if Path(out).suffix.lower() != ".png":
        raise InputError(f"{flag} {out}: the picture is written as PNG, its name must end in .png")


def cmd_sample(args: argparse.Namespace) -> int:
    _check_prompt(args.prompt)
    _check_png(args.out)
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value <= 0:
            raise InputError(f"{flag} must be a positive multiple of the VAE scale factor, got {value}")
    lora = check_lora_file(args.lora) if args.lora else None
    config_path = run_config_path(args.config, args.lora)
    config = load_config(config_path) if config_path is not None else None
    s = config.sampling if config is not None else None
    options = SamplingOptions(
        num_inference_steps=args.steps or (s.num_inference_steps if s else SAMPLE_DEFAULTS["steps"]),
        guidance_scale=args.guidance if args.guidance is not None else (s.guidance_scale if s else SAMPLE_DEFAULTS["guidance"]),
        height=args.height or (s.height if s else None),
        width=args.width or (s.width if s else None),
        negative_prompt=s.negative_prompt if s else "",
    )
    if config is not None:
        print(f"sampling settings from {config_path} unless given as flags: {options.num_inference_steps} steps, "
              f"guidance {options.guidance_scale:g}")
    else:
        used = [f"--{k} {v:g}" for k, v in SAMPLE_DEFAULTS.items() if getattr(args, k) is None]
        used += [] if args.model else ["--model toy (the packaged toy pipeline)"]
        if used:
            print(f"no run config (--config RUN_DIR/config.yaml): using the defaults {', '.join(used)}")
    m = config.model if config is not None else None
    same = m is not None and args.model is None  # the run's own model: its variant and revision too
    backbone = load_backbone(args.model or (m.path if m else "toy"), args.dtype or (m.dtype if m else "float32"),
                             m.variant if same else None, m.revision if same else None, device=args.device)
    factor = backbone.vae_scale_factor
    for flag, value in (("--height", options.height), ("--width", options.width)):
        if value is not None and value % factor:
            raise InputError(f"{flag} must be a positive multiple of {factor} (the VAE scale factor), got {value}")
    if lora is not None:
        load_lora(backbone, "sample", lora)
        # a LoRA trained with lora.active_steps acts on the last steps only (by timestep for another N)
        options.lora_steps = lora_steps_for(backbone, lora, options)
    with torch.no_grad():
        images = sample(backbone, [args.prompt] * len(args.seed), list(args.seed), options).images
    out = save_png(grid([images.cpu()], pad=0 if len(args.seed) == 1 else 2), args.out)
    print(f"wrote {out}")
    return 0


def cmd_mask(args: argparse.Namespace) -> int:
    _check_prompt(args.prompt)
    _check_png(args.out)
    config = load_config(args.config, args.set)
    backbone = load_backbone(config.model.path, config.model.dtype, config.model.variant, config.model.revision)
    options = sampling_options(config)
    default_h, default_w = backbone.default_size
    check_picture_size(1, 4, (options.height or default_h, options.width or default_w), scale=args.scale)
    aspects = build_aspects(config)
    ref = compute_reference(backbone, aspects, [a.localize for a in config.aspects], [args.prompt], [args.seed],
                            options, config.mask)
    row = [ref.images, colorize(ref.heatmap), ref.mask.repeat(1, 3, 1, 1), overlay(ref.images, ref.mask)]
    with torch.no_grad():
        out = save_png(grid([torch.cat(row)], scale=args.scale), args.out)
    print(json.dumps({"out": str(out), "mask_area": round(float(mask_area(ref.mask)[0]), 4)}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    metrics = run_demo(args.out, quick=args.quick, progress=not args.no_progress, reward=args.reward,
                       train_seeds=args.train_seeds, jobs=args.jobs)
    print(summary_table(metrics))
    return 0


def _check_prompt(prompt: str) -> None:
    if not prompt or not prompt.strip():
        raise InputError("--prompt must be a non-empty string")


# ---------------------------------------------------------------------------------------------
# eval, votes, report, rate, sweep
# ---------------------------------------------------------------------------------------------
def name_path_pairs(values: list[str], flag: str) -> dict[str, str]:
    """``["name=path", ...]`` -> ``{name: path}``, each name once."""
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
        if split not in toyworld.PROMPT_SPLITS:
            raise InputError(f"--prompts: toy split must be one of {toyworld.PROMPT_SPLITS}, got {split!r}")
        return list(toyworld.prompts(split))
    return read_prompts_file(spec, "--prompts")


def _toy_aspects(names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
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
    methods: dict[str, list[str]] = {
        name: [p.strip() for p in paths.split(",") if p.strip()] for name, paths in name_path_pairs(args.lora, "--lora").items()
    }
    for name, paths in methods.items():
        for path in paths:
            if not Path(path).exists():
                raise InputError(f"--lora {name}: {path} does not exist (expected a run directory, its lora/ "
                                 "directory or a pytorch_lora_weights.safetensors)")
    if args.votes:
        read_votes(args.votes)  # a malformed votes file fails now, not after the evaluation
    if args.seeds < 1:
        raise InputError("--seeds must be >= 1")
    # the training config: --config, else the runs' own config.yaml (all must agree); never a default
    configs: dict[str, Any] = {}
    if args.set and not args.config:
        raise InputError("--set overrides the --config file's fields; the runs' own config.yaml files are read as "
                         "they are (give --config FILE with them)")
    if args.config:
        configs["--config"] = load_config(args.config, args.set)
    for name, paths in methods.items():
        for i, path in enumerate(paths):
            cfg = run_config(path)
            if cfg is not None:
                configs[f"{name}[{i}]" if len(paths) > 1 else name] = cfg
    if not configs:
        raise InputError("eval needs the training config, to build masks and sample exactly as training did: "
                         "give a run directory as --lora NAME=RUN_DIR (its config.yaml is read) or --config FILE")
    check_same_setup(configs)
    config = next(iter(configs.values()))
    if args.aspects:
        names = [a.strip() for a in args.aspects.split(",") if a.strip()]
        if not names:
            raise InputError("--aspects must name at least one aspect")
        aspects, judges = _toy_aspects(names)
        target = names[0]
    else:
        aspects, target, judges = aspects_from_config(config)
    setup = evaluation_setup(config, None if args.aspects else aspects)
    options = setup["options"]
    if args.steps is not None:
        options.num_inference_steps = args.steps
    if args.guidance is not None:
        options.guidance_scale = args.guidance
    compare = []
    for pair in args.compare:
        parts = [x.strip() for x in pair.split(",")]
        if len(parts) != 2:
            raise InputError(f"--compare {pair!r} must look like A,B (two method names)")
        compare.append((parts[0], parts[1]))
    if args.prompts is None and (args.model or config.model.path) != "toy":
        raise InputError("eval needs --prompts FILE (one prompt per line) for this model; the default, toy:heldout, "
                         "holds the toy world's captions")
    prompts = read_prompts(args.prompts or "toy:heldout")
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    lora_specs: dict[str, Any] = {k: (v if len(v) > 1 else v[0]) for k, v in methods.items()}
    metrics = evaluate(model_loader(config, args.model) if args.model else setup["model"], lora_specs, aspects, target, judges, prompts, seeds, options,
                       setup["mask_cfg"], args.out, batch_size=args.batch_size, n_bootstrap=args.bootstrap,
                       sld=args.sld, progress=not args.no_progress, localizers=setup["localizers"], compare=compare)
    if args.votes:
        metrics = apply_votes(args.out, args.votes)
    print(summary_table(metrics))
    print(f"{metrics['n_images']} images; all metrics: {Path(args.out) / 'metrics.json'}")
    return 0


def cmd_votes(args: argparse.Namespace) -> int:
    metrics = apply_votes(args.dir, args.votes)
    print(json.dumps({m: e.get("human") for m, e in metrics["methods"].items() if m != "base"}, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.markdown:
        html_only = [flag for flag, given in (("--out", args.out), ("--train-log", args.train_log),
                                              ("--sweep", args.sweep), ("--max-examples", args.max_examples is not None))
                     if given]
        if html_only:
            raise InputError(f"--markdown prints the table only; {', '.join(html_only)} "
                             f"{'shapes' if len(html_only) == 1 else 'shape'} the HTML report "
                             "(run report again without --markdown for it)")
        path = Path(args.dir) / "metrics.json"
        if not path.is_file():
            raise InputError(f"{path} not found: --markdown needs an evaluation directory (focusnfix eval or demo --out)")
        print(markdown_table(read_json(path, "evaluation metrics")))
        return 0
    logs = {k: Path(v) for k, v in name_path_pairs(args.train_log, "--train-log").items()}
    out = args.out or str(Path(args.dir) / "report.html")
    path = write_report(args.dir, out, train_logs=logs or None, sweep=Path(args.sweep) if args.sweep else None,
                        max_examples=32 if args.max_examples is None else args.max_examples)
    print(f"wrote {path}")
    return 0


def cmd_rate(args: argparse.Namespace) -> int:
    out = args.out or str(Path(args.dir) / "rate.html")
    path = write_rating_page(args.dir, out, seed=args.seed, max_examples=args.max_examples)
    print(f"wrote {path}")
    return 0


def parse_betas(text: str) -> list[float]:
    """``"0,0.3,1"`` -> ``[0.0, 0.3, 1.0]``; numbers, at least one, no duplicates."""
    try:
        betas = [float(b) for b in text.split(",") if b.strip()]
    except ValueError as err:
        raise InputError(f"--betas must be comma-separated numbers, got {text!r}") from err
    if not betas:
        raise InputError("--betas must list at least one beta")
    if any(not math.isfinite(b) or b < 0 for b in betas):
        raise InputError(f"--betas must be finite numbers >= 0 (0 = DRaFT), got {text!r}")
    if len({f"{b:g}" for b in betas}) != len(betas):
        raise InputError(f"--betas has duplicates: {text!r}")
    return betas


def cmd_sweep(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts) if args.prompts else None
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    doc = sweep(args.config, parse_betas(args.betas), args.out, args.set, prompts=prompts, seeds=seeds,
                batch_size=args.batch_size, n_bootstrap=args.bootstrap, progress=not args.no_progress,
                judges=not args.no_judges, jobs=args.jobs, draft_overrides=args.draft_set)
    _print_sweep(doc, args.out)
    return 0


def _print_sweep(doc: dict[str, Any], out: str) -> None:
    keys = ("target_reward", "target_gain", "outside_psnr", "others_reward_drop_share", "removal_share")
    print(json.dumps({"sweep": str(Path(out) / "sweep.json"), "selection": doc.get("selection"),
                      "points": [{"beta": p["beta"], "run_dir": p.get("run_dir"),
                                  **{k: (p.get(k) or {}).get("mean") for k in keys}} for p in doc["points"]]},
                     indent=2))


def cmd_select(args: argparse.Namespace) -> int:
    _print_sweep(combine_sweeps(args.sweeps, args.out), args.out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from focusnfix.export import export_kohya

    source = check_lora_file(args.run)
    if Path(args.out).resolve() == source.resolve():
        raise InputError(f"--out {args.out} is the LoRA being exported: write the kohya file elsewhere")
    out = export_kohya(args.run, args.out, alpha=args.alpha, dtype=torch.float16 if args.fp16 else None)
    print(f"wrote {out} (kohya format: lora_unet_* keys with their alpha)")
    steps = lora_active_steps(args.run)
    if steps is not None:
        warn(f"this LoRA was trained to act on the last {steps} sampling steps only (lora.active_steps); "
             "kohya-format loaders apply it on every step, which draws other images than training did")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from focusnfix.hub import hub_base_model, push, upload_folder_for

    path = Path(args.run) / "config.yaml"
    if path.is_file() and hub_base_model(load_config(path, []).model.path, args.base_model) is None:
        print(f"the model card names no base_model: the run's model.path ({load_config(path, []).model.path}) is not "
              "a Hub id; give --base-model USER/NAME")
    if args.dry_run is not None:
        folder = upload_folder_for(args.run, args.repo_id, args.dry_run or Path(args.run) / "hub_upload", args.eval,
                                   args.base_model)
        print(f"wrote the upload folder {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
        return 0
    print(push(args.run, args.repo_id, args.eval, private=args.private, base_model=args.base_model))
    return 0


# ---------------------------------------------------------------------------------------------
# toyworld build | path | stats
# ---------------------------------------------------------------------------------------------
def cmd_toyworld_build(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    recipe = Recipe.quick(args.seed) if args.quick else Recipe(seed=args.seed)
    if args.recipe_threads is not None:
        recipe.threads = args.recipe_threads
    recipe.device = args.device
    if args.only:
        from focusnfix.toyworld.build import REBUILD_STAGES, rebuild

        stages = tuple(x.strip() for x in args.only.split(",") if x.strip())
        if not stages or set(stages) - set(REBUILD_STAGES):
            raise InputError(f"--only takes some of {', '.join(REBUILD_STAGES)} (comma-separated), got {args.only!r}")
        record = rebuild(args.out, stages, recipe)
    else:
        record = build(args.out, recipe)
    if args.stats:
        stats = compute_stats(args.out, n=64 if args.quick else 192)
        atomic_write_text(Path(args.out) / "stats.json", json.dumps(stats, indent=2))
        record["stats"] = stats
    print(json.dumps(record, indent=2))
    return 0


def cmd_toyworld_path(args: argparse.Namespace) -> int:
    try:
        print(toyworld.pipeline_path(args.model))
    except FileNotFoundError as err:
        raise InputError(f"--model: {err}") from None
    return 0


def cmd_toyworld_stats(args: argparse.Namespace) -> int:
    if args.grid is not None:
        _check_png(args.grid, "--grid")
    try:
        stats = compute_stats(args.model, n=args.n, save_grid=args.grid, guidance=args.guidance)
    except FileNotFoundError as err:
        raise InputError(f"--model: {err}") from None
    print(json.dumps(stats, indent=2))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from focusnfix.diagnose import diagnose

    metrics_file = Path(args.dir) / "metrics.json"
    if not metrics_file.is_file():
        raise InputError(f"{args.dir} is not an evaluation directory: metrics.json is missing")
    aspect = read_json(metrics_file, "evaluation metrics").get("aspect")
    if not isinstance(aspect, str):
        raise InputError(f"{metrics_file}: expected the evaluated 'aspect' name (written by focusnfix eval)")
    judge_name = "safety" if aspect == "safety_narrow" else aspect
    if judge_name not in ("safety", "plausibility"):
        raise InputError(f"diagnose needs a localizing judge: the toy world has them for safety, safety_narrow and "
                         f"plausibility, not {aspect!r} (other judges: call focusnfix.diagnose.diagnose from Python)")
    result = diagnose(args.dir, toyworld.load_judge(judge_name), min_psnr=args.min_psnr)
    print(json.dumps({k: v for k, v in result.items() if k != "methods"} | {
        "methods": {m: {k: v for k, v in r.items() if k != "runs"} for m, r in result["methods"].items()}}, indent=2))
    print(f"written {Path(args.dir) / 'diagnostics.json'}")
    return 0


def cmd_oracle(args: argparse.Namespace) -> int:
    from focusnfix.oracle import objective_oracle

    config = load_config(args.config, args.set)
    prompts = read_prompts(args.prompts) if args.prompts else resolve_prompts(config.data, Path(args.config).parent)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    if args.steps < 0:
        raise InputError(f"--steps must be >= 0, got {args.steps}")
    if args.betas is not None:  # "" is a mistake, not the defaults
        betas = parse_betas(args.betas)
    else:
        betas = sorted({0.0, config.objective.beta, *([config.objective.beta_end] if config.objective.beta_end is not None else [])})
    seeds = list(range(config.data.seed_offset, config.data.seed_offset + args.seeds))
    doc = objective_oracle(config, prompts, seeds, betas, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                           judges=not args.no_judges, out_dir=args.out, progress=not args.no_progress)
    print(json.dumps(doc, indent=2))
    print(f"written {Path(args.out) / 'oracle.json'} and {Path(args.out) / 'oracle.png'}")
    return 0


def cmd_toyworld_calibrate(args: argparse.Namespace) -> int:
    from focusnfix.toyworld.calibrate import calibrate_aspect

    if args.aspect not in ("safety", "safety_narrow", "plausibility"):
        raise InputError(f"--aspect must be safety, safety_narrow or plausibility (localizing aspects), got {args.aspect!r}")
    if args.n < 8:
        raise InputError(f"--n must be >= 8, got {args.n}")
    result = calibrate_aspect(args.aspect, n=args.n, min_recall=args.min_recall, source=args.source)
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    keys = ("recall", "area_ratio", "image_recall_95", "defect_masked_share", "clean_empty_share")
    summary = {}
    for name, loc in result["localizers"].items():
        c = loc["chosen"]
        summary[name] = {"chosen_mask": c["mask"], "gate": c["gate"], **{k: round(c[k], 4) for k in keys}}
    print(json.dumps({"aspect": args.aspect, "source": args.source, "n": result["n"], "min_recall": args.min_recall,
                      "localizers": summary},
                     indent=2))
    return 0


def cmd_toyworld_ceiling(args: argparse.Namespace) -> int:
    from focusnfix.toyworld.ceiling import perfect_fix_ceiling

    if args.aspect not in ("safety", "plausibility"):
        raise InputError(f"--aspect must be safety or plausibility, got {args.aspect!r}")
    if args.n < 2:
        raise InputError(f"--n must be >= 2, got {args.n}")
    try:
        dilations = [int(x) for x in args.dilate.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--dilate must be comma-separated whole pixels, e.g. 3,5,8; got {args.dilate!r}") from None
    if not dilations or min(dilations) < 0:
        raise InputError(f"--dilate needs one or more dilations >= 0, got {args.dilate!r}")
    print(json.dumps(perfect_fix_ceiling(args.aspect, n=args.n, dilations=dilations), indent=2))
    return 0


def cmd_toyworld_robustness(args: argparse.Namespace) -> int:
    from focusnfix.toyworld.robustness import reward_robustness

    if args.aspect not in ("safety", "safety_narrow"):
        raise InputError(f"--aspect must be safety or safety_narrow, got {args.aspect!r}")
    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}")
    try:
        steps = tuple(int(x) for x in args.steps.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--steps must be comma-separated whole numbers, e.g. 5,10,20; got {args.steps!r}") from None
    if not steps or min(steps) < 1:
        raise InputError(f"--steps needs one or more attack lengths >= 1, got {args.steps!r}")
    print(json.dumps(reward_robustness(args.aspect, root=args.model, n=args.n, steps=steps), indent=2))
    return 0


def cmd_toyworld_audit_sheets(args: argparse.Namespace) -> int:
    from focusnfix.toyworld.audit import check_batch_folder, sample_batch, write_batch

    check_batch_folder(args.out)  # before sampling: a rerun into a labelled batch's folder is refused
    runs = name_path_pairs(args.run, "--run")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    prompts = read_prompts(args.prompts)[: args.n_prompts]
    if not seeds or not prompts:
        raise InputError("--seeds and --prompts must give at least one seed and one prompt")
    if not all(0 <= s < 2**63 for s in seeds):
        raise InputError(f"--seeds must be integers in [0, 2**63 - 1], got {args.seeds!r}")
    images, items = sample_batch(runs, prompts, seeds, shuffle_seed=args.shuffle_seed)
    note = (f"{len(items)} images, {len(prompts)} prompts of {args.prompts} x seeds {args.seeds} from each of "
            f"{', '.join(runs)}; shuffled (seed {args.shuffle_seed}) and labelled blind on sheets by audit.make_sheets.")
    sheets = write_batch(args.out, images, items, note)
    print(f"{len(items)} images on {len(sheets)} sheets in {Path(args.out) / 'sheets'}; label them in "
          f"{Path(args.out) / 'labels.txt'} without opening key.json, then: focusnfix toyworld audit-add")
    return 0


def cmd_toyworld_audit_add(args: argparse.Namespace) -> int:
    from focusnfix.toyworld.audit import add_batch

    doc = add_batch(args.batch, args.labels, root=args.model)
    print(f"audit set: {len(doc['items'])} images in {max(it['batch'] for it in doc['items'])} batches")
    return 0


# ---------------------------------------------------------------------------------------------
# rahf train | eval
# ---------------------------------------------------------------------------------------------
def cmd_rahf_train(args: argparse.Namespace) -> int:
    config = RAHFTrainConfig.load(args.config)
    if args.steps is not None:
        config.steps = args.steps
    model_cfg = RAHFConfig.from_dict(config.model)
    data = RichHFDataset(args.tfrecords, args.images, model_cfg.image_size, model_cfg.heatmap_size,
                         args.captions, verify_crc=not args.no_verify_crc)
    print(f"rahf train: {len(data)} examples, {config.steps} steps, batch {config.batch_size}")
    _, records = train_rahf(config, data, args.out)
    print(f"rahf model written to {args.out} (final loss {records[-1]['loss']:.5f})")
    return 0


def cmd_rahf_eval(args: argparse.Namespace) -> int:
    model = RAHFModel.from_pretrained(args.model)
    cfg = model.config
    # ground-truth maps stay at the model's heatmap size; predictions are compared there
    data = RichHFDataset(args.tfrecords, args.images, cfg.image_size, cfg.heatmap_size, args.captions,
                         verify_crc=not args.no_verify_crc)
    result = rahf_evaluate.evaluate(model, DataLoader(data, batch_size=args.batch_size, collate_fn=collate))
    print(rahf_evaluate.format_metrics(result))
    if args.json:
        rahf_evaluate.write_metrics(result, args.json)
    else:
        print(json.dumps(result))
    return 0
