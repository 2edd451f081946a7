"""Train Focus-N-Fix on regions you paint yourself, one mask per (prompt, seed) (docs/trainer.md).

The frozen model draws a different picture for every seed of a prompt, so the defect sits in a
different place in each: the masks are keyed by prompt AND seed. The workflow:

1. sample the frozen model's images of the training pool (what the reference Î0 will be) into
   ``OUT/images/``;
2. paint a mask per image, white where the model may change the picture, black where it must keep
   it, saved under ``OUT/masks/`` with an ``index.json`` that maps each prompt to ``{seed: file}``.
   This script paints a stand-in (a disc over the darkest blob, the toy world's unwanted mark)
   unless ``--masks DIR`` gives your own painted folder;
3. train with the reward as one aspect (``localize: false``) and the masks as another
   (``type: mask_files``, ``weight: 0``).

    python examples/user_masks.py --out runs/user_masks --steps 20
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from focusnfix import FocusNFixTrainer, config_from_dict, toyworld
from focusnfix.backbones import load_backbone
from focusnfix.images import save_png
from focusnfix.reference import sampling_options
from focusnfix.sampling import sample


def paint_stand_in(image: np.ndarray, radius: int = 5) -> np.ndarray:
    """What a person's brush would give on a toy image ``(H, W, 3)`` uint8: white strokes of
    ``radius`` px over every dark blob (the unwanted marks the base toy pipeline draws), all black
    when there is none."""
    dark = image.max(axis=-1) < 0.3 * 255  # dark in every channel (a saturated blue object is not)
    blobs, n = ndimage.label(dark)
    sizes = ndimage.sum(dark, blobs, index=range(1, n + 1))
    marks = np.isin(blobs, [i + 1 for i, size in enumerate(sizes) if size >= 3])  # not a stray pixel
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    brush = yy**2 + xx**2 <= radius**2
    return (ndimage.binary_dilation(marks, structure=brush) * 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/user_masks")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8, help="toy training prompts to use")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    parser.add_argument("--masks", help="a folder of masks you painted (with its index.json); default: paint stand-ins")
    args = parser.parse_args()
    out = Path(args.out)

    config = {
        "model": {"path": "toy"},
        "sampling": {"num_inference_steps": 10, "guidance_scale": 5.0, "k": 2},
        "objective": {"beta": 1.0},
        "mask": {"threshold_mode": "absolute", "threshold": 0.5, "dilate_px": 0},
        "aspects": [
            # the reward: raised everywhere the masks allow; its own heatmap is not used
            {"type": "toyworld", "args": {"aspect": "safety"}, "localize": False},
            # the painted masks: the only localizer (weight 0: it gives no reward)
            {"type": "mask_files", "name": "painted", "weight": 0, "args": {"path": str(out / "masks")}},
        ],
        "data": {"prompts": toyworld.prompts("fit")[: args.prompts], "seeds_per_prompt": args.seeds},
        "train": {"output_dir": str(out / "run"), "steps": args.steps, "batch_size": 4, "learning_rate": 1e-3,
                  "checkpoint_every": 0, "sample_every": 0, "device": "cpu"},
    }
    prompts, seeds = config["data"]["prompts"], list(range(args.seeds))  # data.seed_offset 0: seeds 0 .. S-1

    if args.masks:
        config["aspects"][1]["args"]["path"] = args.masks
    else:
        # 1. the frozen model's images, sampled exactly as training samples its reference
        backbone = load_backbone("toy")
        options = sampling_options(config_from_dict(config))
        index: dict[str, dict[str, str]] = {}
        (out / "masks").mkdir(parents=True, exist_ok=True)
        for p, prompt in enumerate(prompts):
            with torch.no_grad():
                images = sample(backbone, [prompt] * len(seeds), seeds, options).images  # (S, 3, H, W) in [0, 1]
            for seed, image in zip(seeds, images, strict=True):
                save_png(image, out / "images" / f"p{p:03d}_s{seed}.png")
                # 2. the mask of this (prompt, seed): here a stand-in for a person's painting
                pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
                Image.fromarray(paint_stand_in(pixels)).save(out / "masks" / f"p{p:03d}_s{seed}.png")
                index.setdefault(prompt, {})[str(seed)] = f"p{p:03d}_s{seed}.png"
        (out / "masks" / "index.json").write_text(json.dumps(index, indent=1))
        painted = sum(1 for p in index.values() for f in p.values() if Image.open(out / "masks" / f).getextrema()[1])
        print(f"sampled {len(prompts) * len(seeds)} images into {out / 'images'}; {painted} masks with a region to fix")

    # 3. train: the constraint keeps every pixel outside each image's own painted region
    result = FocusNFixTrainer(config_from_dict(config), progress=False).train(overwrite=True)
    print(f"LoRA: {result.lora_dir} ({result.steps_done} steps); log: {result.log_path}")


if __name__ == "__main__":
    main()
