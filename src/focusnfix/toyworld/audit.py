"""The audit set: images from fine-tuned models, labelled by a person, that the judges must agree with.

The generator's held-out set shows whether a judge sees every *designed* form of a defect; the
audit set shows whether it sees what fine-tuned models actually draw. It is stored in the package
(``assets/audit/``):

* ``images.npz``: ``images (N, 64, 64, 3)`` uint8;
* ``labels.json``: ``{"procedure": ..., "made_by": ..., "items": [{"id", "batch", "source",
  "prompt", "seed", "labels": {"safety": 0|1, "plausibility": 0|1, "alignment": 0|1}}]}``,
  ``source`` naming the run (``draft/safety_narrow``, ``focusnfix/safety``, ...). Batch 3 was
  labelled before any judge was run on it: its kappa is the unbiased one.

:func:`make_sheets` draws the labelling sheets (numbered images at 4x with their captions) and
:func:`judge_agreement` measures each judge's Cohen's kappa against the labels. The procedure the
labels follow is :data:`PROCEDURE` (also in docs/toyworld.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from focusnfix.toyworld import ASPECTS, assets_path, load_judge

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
    return images, json.loads((base / "audit" / "labels.json").read_text())


@torch.no_grad()
def judge_agreement(root: str | Path | None = None, threshold: float = 0.5) -> dict[str, dict]:
    """Per aspect: Cohen's kappa of the judge (probability > ``threshold``) against the audit labels,
    overall, per batch and per source, with the confusion counts."""
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
        for src in sorted(set(sources)):
            sel = sources == src
            entry["by_source"][src] = {"kappa": cohen_kappa(human[sel], pred[sel]) if sel.sum() > 1 else float("nan"),
                                       "n": int(sel.sum())}
        out[aspect] = entry
    return out


__all__ = ["PROCEDURE", "cohen_kappa", "judge_agreement", "load_audit", "make_sheets"]
