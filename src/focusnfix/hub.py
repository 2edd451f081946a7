"""Share a run on the Hugging Face Hub: the LoRA, a model card and a sample grid.

:func:`upload_folder_for` builds the folder that is uploaded (``README.md`` = the model card,
``pytorch_lora_weights.safetensors``, ``samples.png``, ``metrics_summary.json`` when an
evaluation exists); :func:`push` uploads it with ``huggingface_hub``. The card says what a user
needs to reproduce or judge the LoRA: base model and revision, aspects, beta, K, steps, the mask
settings, the evaluation's headline numbers, and how to load it.

The upload itself is untested here (no network); the folder's content is tested.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from focusnfix.config import load_config
from focusnfix.errors import InputError
from focusnfix.files import atomic_write, atomic_write_text, read_json
from focusnfix.lora import LORA_SCHEDULE_NAME, LORA_WEIGHT_NAME, check_lora_file, lora_identity

_SUMMARY_KEYS = ("removal_share", "new_defect_share", "hack_gap", "others_degraded_share", "outside_psnr",
                 "target_reward")


def _summary(eval_dir: Path | None, lora: Path) -> dict[str, Any] | None:
    """The card's evaluation table, of an evaluation that evaluated ``lora`` (the LoRA uploaded)."""
    if eval_dir is None or not (eval_dir / "metrics.json").is_file():
        return None
    metrics = read_json(eval_dir / "metrics.json", "evaluation metrics (--eval)")
    evaluated = (metrics.get("settings") or {}).get("lora_identity")
    this = lora_identity(lora)
    if not isinstance(evaluated, dict):
        raise InputError(f"--eval {eval_dir}: its metrics.json does not record which LoRAs it evaluated (an "
                         "evaluation of an earlier focusnfix version): evaluate this run again to put numbers on its card")
    uploaded = sorted(name for name, hashes in evaluated.items() if isinstance(hashes, list) and this in hashes)
    if not uploaded:
        raise InputError(f"--eval {eval_dir} did not evaluate this run's LoRA ({lora}, identity {this}): its methods "
                         f"{sorted(evaluated)} are other LoRAs; evaluate this one (focusnfix eval --lora NAME=RUN)")
    return {
        "aspect": metrics.get("aspect"),
        "n_images": metrics.get("n_images"),
        "this_lora": uploaded,
        "methods": {name: {k: m.get(k) for k in _SUMMARY_KEYS if m.get(k) is not None}
                    for name, m in metrics.get("methods", {}).items()},
    }


def _fmt(stat: Any) -> str:
    if not isinstance(stat, dict) or stat.get("mean") is None:
        return "–"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:.3g} [{lo:.3g}, {hi:.3g}]"


def hub_base_model(model_path: str, base_model: str | None = None) -> str | None:
    """The card's ``base_model``: ``base_model`` if given, else ``model_path`` when it is a Hub id
    (``USER/NAME``, not a local folder); None when neither (the Hub reads only Hub ids there)."""
    if base_model:
        if base_model.count("/") != 1:
            raise InputError(f"--base-model must be a Hub id USER/NAME, got {base_model!r}")
        return base_model
    is_hub_id = model_path.count("/") == 1 and not model_path.startswith((".", "/", "~")) and not Path(model_path).exists()
    return model_path if is_hub_id else None


def model_card(run_dir: Path, repo_id: str, summary: dict[str, Any] | None, base_model: str | None = None) -> str:
    """The README.md of the upload: YAML front matter the Hub reads, then the run's facts."""
    config = load_config(run_dir / "config.yaml", [])
    m, s, o, t = config.model, config.sampling, config.objective, config.train
    hub_id = hub_base_model(m.path, base_model)
    aspects = ", ".join(f"{a.name or a.args.get('aspect', a.type)} ({a.type}, weight {a.weight:g})" for a in config.aspects)
    method = "Focus-N-Fix" if o.beta > 0 else "DRaFT (beta = 0)"
    lines = [
        "---",
        *([f"base_model: {hub_id}"] if hub_id else []),
        "library_name: diffusers",
        "tags: [lora, text-to-image, diffusers, focusnfix, reward-fine-tuning]",
        "---",
        "",
        f"# {repo_id}",
        "",
        f"A LoRA trained with **{method}** (region-aware reward fine-tuning, focusnfix) on `{m.path}`"
        + (f" at revision `{m.revision}`" if m.revision else "") + ".",
        "",
        "| setting | value |",
        "|---|---|",
        f"| aspects | {aspects} |",
        f"| beta (regional constraint) | {o.beta:g} ({o.norm}, {o.space} space) |",
        f"| gradient | {s.grad_mode}, K = {s.k}, {s.num_inference_steps} DDIM steps, guidance {s.guidance_scale:g} |",
        f"| training | {t.steps} steps, batch {t.batch_size}, learning rate {t.learning_rate:g}, seed {t.seed} |",
        f"| LoRA | rank {config.lora.rank}, alpha {config.lora.alpha or config.lora.rank:g}, "
        f"modules {', '.join(config.lora.target_modules)} |",
        f"| mask | {config.mask.threshold_mode} threshold {config.mask.threshold:g}, dilation {config.mask.dilate_px} px, "
        f"feather {config.mask.feather_px:g} px |",
        "",
    ]
    if summary:
        lines += [f"## Evaluation ({summary['n_images']} images, target aspect {summary['aspect']})", "",
                  "| method | " + " | ".join(_SUMMARY_KEYS) + " |", "|---|" + "---|" * len(_SUMMARY_KEYS)]
        for name, vals in summary["methods"].items():
            shown = f"**{name}** (this LoRA)" if name in summary.get("this_lora", []) else name
            lines.append(f"| {shown} | " + " | ".join(_fmt(vals.get(k)) for k in _SUMMARY_KEYS) + " |")
        lines += ["", "Mean [95% interval]; definitions in focusnfix's docs/evaluation.md.", ""]
    # the toy world's pipeline ships inside focusnfix ("toy" is no hub id)
    load = (["from focusnfix import toyworld", "", "pipe = DiffusionPipeline.from_pretrained(str(toyworld.pipeline_path()))"]
            if m.path == "toy" else ["", f'pipe = DiffusionPipeline.from_pretrained("{m.path}")'])
    call = f"num_inference_steps={s.num_inference_steps}, guidance_scale={s.guidance_scale:g}"
    late = config.lora.active_steps
    lines += ["## Use", "", "```python", "from diffusers import DiffusionPipeline", *load,
              f'pipe.load_lora_weights("{repo_id}")']
    if late is None:
        lines += [f"image = pipe(prompt, {call}).images[0]  # the sampling it was trained with", "```", ""]
    else:
        lines += [
            "```",
            "",
            f"This LoRA acts only on the last {late} of {s.num_inference_steps} sampling steps (the steps before are "
            "the base model's), as it was trained; `focusnfix_lora.json` records them. Sample it so:",
            "",
            "```python",
            "from huggingface_hub import snapshot_download",
            "from focusnfix.inference import late_lora_callback",
            "",
            f'callback = late_lora_callback(pipe, snapshot_download("{repo_id}"), num_inference_steps={s.num_inference_steps})',
            f"image = pipe(prompt, {call}, callback_on_step_end=callback).images[0]",
            "```",
            "",
            "The callback leaves the LoRA switched off after each call; `pipe.enable_lora()` puts it back on every step.",
            "",
        ]
    lines += [
        "For ComfyUI / AUTOMATIC1111: `focusnfix export RUN --format kohya --out lora.safetensors`"
        + (" (those apply a LoRA on every step: not what this one was trained for)." if late is not None else "."),
        "",
    ]
    if (run_dir / "samples" / "final.png").is_file():
        lines += ["![samples: mask, base, fine-tuned, difference](samples.png)", ""]
    return "\n".join(lines)


def upload_folder_for(run_dir: str | Path, repo_id: str, out: str | Path, eval_dir: str | Path | None = None,
                      base_model: str | None = None) -> Path:
    """Write the folder to upload (model card, LoRA, samples, metrics summary) to ``out``; ``base_model``:
    the Hub id of the weights trained on (default: the run's ``model.path`` when it is one)."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise InputError(f"{run_dir} is not a run directory (no config.yaml)")
    lora = check_lora_file(run_dir / "lora")
    if not repo_id or repo_id.count("/") != 1:
        raise InputError(f"--repo-id must look like USER/NAME, got {repo_id!r}")
    if eval_dir and not (Path(eval_dir) / "metrics.json").is_file():
        raise InputError(f"--eval: {eval_dir} is not an evaluation directory (no metrics.json)")
    summary = _summary(Path(eval_dir) if eval_dir else None, lora)  # checked before anything is written
    if out.resolve() in (run_dir.resolve(), lora.parent.resolve()):
        raise InputError(f"the upload folder {out} is the run or its LoRA folder; give a folder of its own")
    out.mkdir(parents=True, exist_ok=True)
    # the LoRA, its schedule (a LoRA that acts on its last steps only) and the final sample grid
    copies = {lora: LORA_WEIGHT_NAME, lora.parent / LORA_SCHEDULE_NAME: LORA_SCHEDULE_NAME,
              run_dir / "samples" / "final.png": "samples.png"}
    # a folder written before (the dry run's default RUN/hub_upload) keeps none of its earlier files:
    # a schedule or an evaluation summary of another LoRA would be uploaded beside this one
    for name in (*copies.values(), "metrics_summary.json", "README.md"):
        (out / name).unlink(missing_ok=True)
    for src, name in copies.items():
        if src.is_file():  # each file whole or not at all (a kill mid-copy leaves no half LoRA to upload)
            atomic_write(out / name, lambda tmp, src=src: shutil.copyfile(src, tmp), suffix=src.suffix)
    if summary:
        atomic_write_text(out / "metrics_summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "README.md", model_card(run_dir, repo_id, summary, base_model))
    return out


def push(run_dir: str | Path, repo_id: str, eval_dir: str | Path | None = None, private: bool = False,
         token: str | None = None, base_model: str | None = None) -> str:
    """Create ``repo_id`` (if needed) and upload the run's folder; returns the commit URL.

    Untested here (no network): it calls ``huggingface_hub.create_repo`` and ``upload_folder``.
    """
    import tempfile

    from huggingface_hub import create_repo, upload_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = upload_folder_for(run_dir, repo_id, tmp, eval_dir, base_model)
        create_repo(repo_id, private=private, exist_ok=True, token=token)
        info = upload_folder(repo_id=repo_id, folder_path=str(folder), token=token,
                             commit_message="focusnfix: LoRA, model card and samples")
    return str(info)


__all__ = ["hub_base_model", "model_card", "push", "upload_folder_for"]
