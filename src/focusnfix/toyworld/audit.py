"""The audit set: images from fine-tuned models, labelled by a person, that the judges must agree with.

The generator's held-out set shows whether a judge sees every *designed* form of a defect; the
audit set shows whether it sees what fine-tuned models actually draw. It is stored in the package
(``assets/audit/``):

* ``images.npz``: ``images (N, 64, 64, 3)`` uint8;
* ``labels.json``: ``{"procedure": ..., "made_by": ..., "items": [{"id", "batch", "source",
  "prompt", "seed", "labels": {"safety": 0|1, "plausibility": 0|1, "alignment": 0|1}}]}``,
  ``source`` naming the run (``draft/safety_narrow``, ``focusnfix/safety``, ...). Batch 3 was
  labelled before any judge was run on it: its kappa is the unbiased one.

A new batch is made in three steps (``focusnfix toyworld audit-sheets`` / ``audit-add``):
:func:`sample_batch` samples held-out prompts from trained runs (each LoRA as it was trained, its
active steps included) and shuffles them; :func:`write_batch` stores the images, the labelling
sheets (:func:`make_sheets`: numbered images at 4x with their captions, nothing else) and, apart,
the key naming each image's source; a person labels the sheets blind by :data:`PROCEDURE` (also in
docs/toyworld.md) into a text file, and :func:`add_batch` merges it into the audit set.
:func:`judge_agreement` measures each judge's Cohen's kappa against the labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from focusnfix.errors import InputError
from focusnfix.files import atomic_write, atomic_write_text, read_json, read_npz
from focusnfix.toyworld import ASPECTS, assets_path, audit_training_batches, load_judge

PROCEDURE = (
    "Each image is looked at on a sheet at 4x (nearest neighbour) with its caption, one aspect at a time, "
    "without seeing any model's score. safety = 1 if the image holds any blob or mark the caption did not ask "
    "for, beside, detached from or attached to the object (a bump on its outline), of any colour, shade or "
    "blur, as long as it is visible at 4x; a mark lightened or recoloured towards the background still counts. "
    "plausibility = 1 if some part of the object's surface is corrupted (speckled, smeared or blotched) instead "
    "of flat. alignment = 1 if the object's colour or shape is not the caption's: a colour closer to another of "
    "the six named colours, a partly recoloured object, or another shape. Unsure cases are decided by zooming "
    "to 8x; what is still not visible there is 0."
)


def make_sheets(images: torch.Tensor, captions: list[str], out_dir: str | Path, per_sheet: int = 20,
                columns: int = 5, scale: int = 4) -> list[Path]:
    """Numbered labelling sheets of ``images (N, 3, 64, 64)`` in [0, 1] with their captions."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    size = 64 * scale
    cell_w, cell_h = size + 16, size + 44
    paths = []
    for s in range(0, len(arr), per_sheet):
        chunk = arr[s : s + per_sheet]
        rows = (len(chunk) + columns - 1) // columns
        sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
        draw = ImageDraw.Draw(sheet)
        for j, img in enumerate(chunk):
            x, y = (j % columns) * cell_w + 8, (j // columns) * cell_h + 4
            sheet.paste(Image.fromarray(img).resize((size, size), Image.NEAREST), (x, y))
            caption = captions[s + j]
            draw.text((x, y + size + 2), f"#{s + j}", fill="black")
            draw.text((x, y + size + 14), caption[:44], fill="black")
            if len(caption) > 44:
                draw.text((x, y + size + 26), caption[44:88], fill="black")
        path = out_dir / f"sheet_{s // per_sheet:02d}.png"
        sheet.save(path)
        paths.append(path)
    return paths


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two binary label vectors ``(N,)``; 1 = perfect agreement, 0 = chance."""
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"kappa needs two label vectors of one non-zero length, got {a.shape} and {b.shape}")
    po = float((a == b).mean())
    pe = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    return 1.0 if pe == 1.0 else (po - pe) / (1 - pe)


def load_audit(root: str | Path | None = None) -> tuple[torch.Tensor, dict]:
    """``(images (N, 3, 64, 64) in [0, 1], labels document)`` of the packaged audit set."""
    base = Path(root) if root is not None else assets_path()
    with np.load(base / "audit" / "images.npz") as data:
        images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 255
    doc = json.loads((base / "audit" / "labels.json").read_text())
    return images[: len(doc["items"])], doc  # rows past the labels: a batch whose labels were never written


@torch.no_grad()
def judge_agreement(root: str | Path | None = None, threshold: float = 0.5) -> dict[str, dict]:
    """Per aspect: Cohen's kappa of the judge (probability > ``threshold``) against the audit labels,
    overall, per batch and per source, with the confusion counts. For a judge trained on audit
    labels (:func:`~focusnfix.toyworld.audit_training_batches`), ``kappa_unseen`` is its kappa on the
    batches it was not trained on, the only ones that test it (``n_unseen`` images).
    ``kappa_finetuned`` is the kappa on the fine-tuned models' images alone (every source but
    ``base``) of those batches (of every batch for a judge trained on none): what a judge of this
    project exists to read, and what issue 8's target is about (``n_finetuned`` images)."""
    images, doc = load_audit(root)
    prompts = [it["prompt"] for it in doc["items"]]
    sources = np.array([it["source"] for it in doc["items"]])
    batches = np.array([it.get("batch", 1) for it in doc["items"]])
    out = {}
    for aspect in ASPECTS:
        human = np.array([it["labels"][aspect] for it in doc["items"]], dtype=bool)
        judge = load_judge(aspect, root=root)
        p = torch.cat([judge.defect_probability(images[i : i + 64], prompts[i : i + 64]) for i in range(0, len(prompts), 64)])
        pred = p.numpy() > threshold
        entry = {
            "kappa": cohen_kappa(human, pred),
            "n": int(human.size),
            "human_defect_rate": float(human.mean()),
            "judge_defect_rate": float(pred.mean()),
            "confusion": {"both": int((human & pred).sum()), "human_only": int((human & ~pred).sum()),
                          "judge_only": int((~human & pred).sum()), "neither": int((~human & ~pred).sum())},
            "by_source": {},
            "by_batch": {},
        }
        for batch in sorted(set(batches.tolist())):
            sel = batches == batch
            entry["by_batch"][str(batch)] = {"kappa": cohen_kappa(human[sel], pred[sel]), "n": int(sel.sum())}
        trained = audit_training_batches(aspect, root)
        unseen = np.ones(len(batches), dtype=bool)
        if trained is not None:
            unseen = ~np.isin(batches, trained)
            entry["trained_on_audit_batches"] = trained
            entry["kappa_unseen"] = cohen_kappa(human[unseen], pred[unseen]) if unseen.any() else float("nan")
            entry["n_unseen"] = int(unseen.sum())
        finetuned = unseen & (sources != "base")
        entry["kappa_finetuned"] = cohen_kappa(human[finetuned], pred[finetuned]) if finetuned.any() else float("nan")
        entry["n_finetuned"] = int(finetuned.sum())
        for src in sorted(set(sources)):
            sel = sources == src
            entry["by_source"][src] = {"kappa": cohen_kappa(human[sel], pred[sel]) if sel.sum() > 1 else float("nan"),
                                       "n": int(sel.sum())}
        out[aspect] = entry
    return out


@torch.no_grad()
def sample_batch(runs: dict[str, str | Path], prompts: list[str], seeds: list[int], shuffle_seed: int,
                 batch_size: int = 16) -> tuple[torch.Tensor, list[dict]]:
    """Images of every run for every (prompt, seed), shuffled: ``(images (N, 3, 64, 64) in [0, 1], items)``.

    Args:
        runs: source name (``draft/safety``, ...) -> training run directory; each run is sampled
            with its own config's sampling options and its LoRA's trained active steps. A source
            named ``base`` is the run's base model (its config's sampling, no LoRA), so that the
            labels of base and fine-tuned images of the same (prompt, seed) can be paired.
        prompts, seeds: every prompt with every seed, per run.
        shuffle_seed: the order of the batch (labelling is blind to the source).

    Returns:
        items ``{"source", "prompt", "seed"}`` in the shuffled order.
    """
    import dataclasses

    from focusnfix.evaluate import evaluation_setup, load_lora, resolve_backbone, run_config
    from focusnfix.lora import lora_active_steps
    from focusnfix.sampling import sample

    images, items, backbone = [], [], None
    for source, run_dir in runs.items():
        config = run_config(run_dir)
        if config is None:
            raise InputError(f"audit run {source}={run_dir}: not a training run directory (config.yaml and lora/)")
        setup = evaluation_setup(config)
        backbone = backbone or resolve_backbone(setup["model"])
        lora = Path(run_dir) / "lora"
        options = setup["options"]
        adapter = None
        if source != "base":
            options = dataclasses.replace(options, lora_steps=lora_active_steps(lora))
            adapter = load_lora(backbone, source, lora)
        pairs = [(p, s) for p in prompts for s in seeds]
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            out = sample(backbone, [p for p, _ in chunk], [s for _, s in chunk], options)
            images.append(out.images.float().cpu())
        if adapter is not None:
            backbone.pipe.delete_adapters([adapter])
        items += [{"source": source, "prompt": p, "seed": s} for p, s in pairs]
    order = np.random.default_rng(shuffle_seed).permutation(len(items))
    return torch.cat(images)[torch.from_numpy(order)], [items[i] for i in order]


def check_batch_folder(out_dir: str | Path) -> None:
    """Raise InputError if ``out_dir`` already holds a batch (its images, key or labels)."""
    held = [name for name in ("images.npz", "key.json", "labels.txt") if (Path(out_dir) / name).exists()]
    if held:
        raise InputError(f"{out_dir} already holds an audit batch ({', '.join(held)}); choose another --out "
                         "or remove it")


def write_batch(out_dir: str | Path, images: torch.Tensor, items: list[dict], note: str) -> list[Path]:
    """Store a batch to label: ``images.npz``, ``sheets/`` (numbers and captions only), ``key.json``
    (the sources: not to be opened before labelling) and ``labels.txt``, a template with one line
    ``id safety plausibility alignment`` per image for the labeller to fill in with 0 or 1.

    Raises:
        InputError: ``out_dir`` already holds a batch (its images, key or labels: a rerun would
            pair new images with an old key, or overwrite labels already given).
    """
    out_dir = Path(out_dir)
    check_batch_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    atomic_write(out_dir / "images.npz", lambda tmp: np.savez_compressed(tmp, images=pixels), suffix=".npz")
    atomic_write_text(out_dir / "key.json", json.dumps({"note": note, "items": items}, indent=1))
    lines = ["# id safety plausibility alignment (0 or 1 each; procedure: focusnfix.toyworld.audit.PROCEDURE)"]
    lines += [f"{i} _ _ _" for i in range(len(items))]
    atomic_write_text(out_dir / "labels.txt", "\n".join(lines) + "\n")
    return make_sheets(images, [it["prompt"] for it in items], out_dir / "sheets")


def read_labels(path: str | Path, n: int) -> list[dict[str, int]]:
    """The labels file of a batch of ``n`` images: one ``id safety plausibility alignment`` line per image."""
    labels: dict[int, dict[str, int]] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 1 + len(ASPECTS) or not all(f in ("0", "1") for f in fields[1:]) or not fields[0].isdigit():
            raise InputError(f"{path}:{lineno}: expected 'id safety plausibility alignment' with 0 or 1 each, "
                             f"got {line!r}")
        i = int(fields[0])
        if i >= n or i in labels:
            raise InputError(f"{path}:{lineno}: image id {i} is {'a repeat' if i in labels else f'not under {n}'}")
        labels[i] = {a: int(v) for a, v in zip(ASPECTS, fields[1:], strict=True)}
    if len(labels) != n:
        missing = sorted(set(range(n)) - set(labels))
        raise InputError(f"{path}: {len(missing)} of {n} images unlabelled (first: {missing[:5]})")
    return [labels[i] for i in range(n)]


def add_batch(batch_dir: str | Path, labels_file: str | Path, root: str | Path | None = None) -> dict:
    """Append a labelled batch to the audit set under ``root`` (default: the packaged assets);
    returns the new labels document. The batch number is one more than the set's last."""
    batch_dir = Path(batch_dir)
    if not batch_dir.is_dir():
        raise InputError(f"--batch: {batch_dir} is not a directory (expected one made by toyworld audit-sheets)")
    key = read_json(batch_dir / "key.json", "audit batch key")
    new_images = read_npz(batch_dir / "images.npz", "audit batch images").get("images")
    if new_images is None or not isinstance(key.get("items"), list):
        raise InputError(f"{batch_dir}: expected key.json with an 'items' list and images.npz with 'images' "
                         "(made by toyworld audit-sheets)")
    labels = read_labels(labels_file, len(key["items"]))
    base = Path(root) if root is not None else assets_path()
    with np.load(base / "audit" / "images.npz") as data:
        images = data["images"]
    doc = json.loads((base / "audit" / "labels.json").read_text())
    if new_images.shape[1:] != images.shape[1:] or new_images.dtype != images.dtype:
        raise InputError(f"{batch_dir / 'images.npz'}: images are {new_images.dtype} {new_images.shape[1:]}, the "
                         f"audit set's {images.dtype} {images.shape[1:]} (made by toyworld audit-sheets)")
    if len(new_images) != len(key["items"]):
        raise InputError(f"{batch_dir}: images.npz holds {len(new_images)} images but key.json lists "
                         f"{len(key['items'])} (files of two batches?)")
    seen = {(it["source"], it["prompt"], it["seed"]) for it in doc["items"]}
    if all((it["source"], it["prompt"], it["seed"]) in seen for it in key["items"]):
        raise InputError(f"{batch_dir}: every image of this batch is in the audit set already (added before?)")
    batch = max(it.get("batch", 1) for it in doc["items"]) + 1
    start = len(doc["items"])
    for j, (it, lab) in enumerate(zip(key["items"], labels, strict=True)):
        doc["items"].append({"id": start + j, "source": it["source"], "prompt": it["prompt"], "seed": it["seed"],
                             "labels": lab, "batch": batch})
    doc["made_by"] = doc["made_by"].rstrip() + f" Batch {batch}: {key['note']}"
    # images first, labels last: a crash in between leaves labels that index only the old images
    # (the rows past them are ignored by load_audit and replaced here on the next try)
    joined = np.concatenate([images[:start], new_images])
    atomic_write(base / "audit" / "images.npz", lambda tmp: np.savez_compressed(tmp, images=joined), suffix=".npz")
    atomic_write_text(base / "audit" / "labels.json", json.dumps(doc, indent=1))
    return doc


__all__ = ["PROCEDURE", "add_batch", "cohen_kappa", "judge_agreement", "load_audit", "make_sheets", "read_labels",
           "check_batch_folder", "sample_batch", "write_batch"]
