"""Training recipes of the toy world's aspect models and judges (the pipeline's are in :mod:`build`).

Each model trains on freshly generated scenes (disjoint generator seeds for aspect models and
judges), half of them passed through the build's VAE so that the models also read sampled images.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from torch import nn

from focusnfix.aspects.saliency import SaliencyAspect
from focusnfix.toyworld import generator as gen
from focusnfix.toyworld import models as M
from focusnfix.toyworld.recipe import Recipe, cosine_lr, save_module, seed_all
from focusnfix.toyworld.stats import heatmap_quality

log = logging.getLogger("focusnfix.toyworld")


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """VAE round trip of images ``(N, 3, H, W)`` in [0, 1], in half precision on the CPU."""
    out = []
    for i in range(0, images.shape[0], batch):
        x = images[i:i + batch].float().to(vae.device) * 2 - 1
        out.append(((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1).half().cpu())
    return torch.cat(out)


def _batches(n: int, batch: int, steps: int, g: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=g)


def _mix(images: torch.Tensor, recon: torch.Tensor, idx: torch.Tensor, g: torch.Generator,
         device: str = "cpu") -> torch.Tensor:
    """Half clean generator images, half VAE reconstructions, plus a little noise (robust to samples)."""
    use = (torch.rand(len(idx), generator=g) < 0.5).view(-1, 1, 1, 1)
    x = torch.where(use, recon[idx].float(), images[idx].float())
    sigma = torch.rand(len(idx), 1, 1, 1, generator=g) * 0.03
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1).to(device)


def _fit(model: nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], n: int, recipe: Recipe, steps: int,
         seed: int, name: str, progress: Callable[[str], None]) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model.to(recipe.device)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.model_lr, weight_decay=1e-4)
    model.train()
    for step, idx in enumerate(_batches(n, recipe.model_batch, steps, g)):
        cosine_lr(opt, recipe.model_lr, step, steps, warmup=30)
        loss = loss_fn(idx, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            progress(f"{name} step {step}/{steps} loss {loss.item():.4f}")
    return model.cpu().eval()


def _swap_captions(scenes: gen.Scenes, g: torch.Generator, p: float) -> tuple[list[str], torch.Tensor]:
    """Replace the colour or shape word of a fraction ``p`` of clean captions; return captions, swapped."""
    captions = list(scenes.captions)
    swapped = torch.zeros(len(captions), dtype=torch.bool)
    rng = random.Random(int(torch.randint(0, 1 << 30, (1,), generator=g)))
    for i, s in enumerate(scenes.scenes):
        if s.defects["alignment"] or rng.random() >= p:
            continue
        words = captions[i].split()
        if rng.random() < 0.6:
            new = rng.choice([c for c in gen.COLOUR_NAMES if c != s.colour])
            j = next(k for k, w in enumerate(words) if w == s.colour and (k + 1 >= len(words) or words[k + 1] != "background"))
        else:
            new = rng.choice([h for h in gen.SHAPES if h != s.shape])
            j = words.index(s.shape)
        words[j] = new
        captions[i] = " ".join(words)
        swapped[i] = True
    return captions, swapped


def train_safety(vae, recipe: Recipe, progress) -> M.SafetyClassifier:
    data = gen.generate(recipe.aspect_images, recipe.seed * 1000 + 11, "train", {"safety": 0.5})
    recon = reconstruct(vae, data.images)
    labels = data.defects["safety"].float()
    seed_all(recipe.seed + 11)
    model = M.SafetyClassifier()

    def loss_fn(idx, g):
        x = _mix(data.images, recon, idx, g, recipe.device)
        return F.binary_cross_entropy_with_logits(model.logit(x), labels[idx].to(recipe.device))

    return _fit(model, loss_fn, len(data), recipe, recipe.aspect_steps, recipe.seed + 11, "safety", progress)


def _heat_target(mask: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(mask, 2)  # (B, 1, 32, 32) soft target


def train_rahf(aspect: str, vae, recipe: Recipe, progress) -> M.RAHFNet:
    offset = 12 if aspect == "plausibility" else 13
    rates = {"plausibility": 0.5} if aspect == "plausibility" else {"alignment": 0.35}
    data = gen.generate(recipe.aspect_images, recipe.seed * 1000 + offset, "train", rates)
    recon = reconstruct(vae, data.images)
    g0 = torch.Generator().manual_seed(recipe.seed + offset)
    seed_all(recipe.seed + offset)
    if aspect == "alignment":
        captions, swapped = _swap_captions(data, g0, 0.4)
        bad = data.defects["alignment"] | swapped
        masks = torch.where(bad.view(-1, 1, 1, 1), data.objects, torch.zeros_like(data.objects))
        model = M.RAHFNet(text=True)
    else:
        captions = data.captions
        bad = data.defects["plausibility"]
        masks = data.masks["plausibility"]
        model = M.RAHFNet(text=False)
    targets = _heat_target(masks)
    good = (~bad).float()

    def loss_fn(idx, g):
        x = _mix(data.images, recon, idx, g, recipe.device)
        heat, score = model(x, [captions[i] for i in idx.tolist()])
        dev = recipe.device
        return (F.binary_cross_entropy_with_logits(heat, targets[idx].to(dev), pos_weight=torch.tensor(3.0, device=dev))
                + F.binary_cross_entropy_with_logits(score, good[idx].to(dev)))

    return _fit(model, loss_fn, len(data), recipe, recipe.aspect_steps, recipe.seed + offset, aspect, progress)


def train_judge(aspect: str, vae, recipe: Recipe, progress) -> nn.Module:
    offset = {"safety": 21, "plausibility": 22, "alignment": 23}[aspect]
    rates = {aspect: 0.5} if aspect != "alignment" else {"alignment": 0.35}
    data = gen.generate(recipe.judge_images, recipe.seed * 1000 + 500 + offset, "train", rates)
    recon = reconstruct(vae, data.images)
    seed_all(recipe.seed + 500 + offset)
    if aspect == "alignment":
        model = M.AttributeNet()
        labels = {
            "colour": torch.tensor([M.AttributeNet.HEADS["colour"].index(s.drawn_colour) for s in data.scenes]),
            "shape": torch.tensor([M.AttributeNet.HEADS["shape"].index(s.shape) for s in data.scenes]),
            "position": torch.tensor([M.AttributeNet.HEADS["position"].index(s.position) for s in data.scenes]),
            "size": torch.tensor([M.AttributeNet.HEADS["size"].index(s.size) for s in data.scenes]),
        }

        def loss_fn(idx, g):
            out = model(_mix(data.images, recon, idx, g, recipe.device))
            return sum(F.cross_entropy(out[k], labels[k][idx].to(recipe.device)) for k in out)
    else:
        model = M.JudgeNet()
        y = data.defects[aspect].float()

        def loss_fn(idx, g):
            return F.binary_cross_entropy_with_logits(model(_mix(data.images, recon, idx, g, recipe.device)),
                                                      y[idx].to(recipe.device))

    return _fit(model, loss_fn, len(data), recipe, recipe.judge_steps, recipe.seed + 500 + offset,
                f"judge-{aspect}", progress)


SALIENCY_CANDIDATES = (
    {"method": "gradcam", "layer": "features.3", "blur_sigma": 1.0},
    {"method": "gradcam", "layer": "features.1", "blur_sigma": 1.0},
    {"method": "input_gradient", "layer": None, "blur_sigma": 1.5},
    {"method": "input_gradient", "layer": None, "blur_sigma": 3.0},
    {"method": "smoothgrad", "layer": None, "blur_sigma": 2.0},
)


def choose_saliency(clf: M.SafetyClassifier, recipe: Recipe) -> tuple[dict, list[dict]]:
    """Pick the saliency method/blur with the best pixel AUC on held-out marked generator images."""
    data = gen.generate(48, recipe.seed * 1000 + 31, "heldout", {"safety": 1.0})
    keep = data.defects["safety"]
    images, masks = data.images[keep], data.masks["safety"][keep]
    caps = [c for c, k in zip(data.captions, keep.tolist(), strict=True) if k]
    results = []
    for cand in SALIENCY_CANDIDATES:
        aspect = SaliencyAspect("safety", M.freeze(clf), **cand)
        q = heatmap_quality(aspect.heatmap(images, caps), masks)
        results.append({**cand, **q})
    best = max(results, key=lambda r: r["auc"])
    return {k: best[k] for k in ("method", "layer", "blur_sigma")}, results


def train_models(out: Path, vae, recipe: Recipe, progress: Callable[[str], None]) -> dict[str, float]:
    """Train the aspect models and judges into ``out/aspects`` and ``out/judges``; return timings."""
    timings: dict[str, float] = {}
    t = time.time()
    adir = out / "aspects"
    adir.mkdir(exist_ok=True)
    safety = train_safety(vae, recipe, progress)
    save_module(safety, adir / "safety.safetensors")
    saliency, candidates = choose_saliency(safety, recipe)
    progress(f"safety saliency: {saliency} from {candidates}")
    for aspect in ("plausibility", "alignment"):
        save_module(train_rahf(aspect, vae, recipe, progress), adir / f"{aspect}.safetensors")
    (adir / "config.json").write_text(json.dumps({"safety": {"saliency": saliency,
                                                             "candidates": candidates}}, indent=2))
    timings["aspects"] = time.time() - t

    t = time.time()
    jdir = out / "judges"
    jdir.mkdir(exist_ok=True)
    for aspect in gen.ASPECTS:
        save_module(train_judge(aspect, vae, recipe, progress), jdir / f"{aspect}.safetensors")
    timings["judges"] = time.time() - t
    return timings


def models_worker(out: str, recipe: dict, vae_file: str) -> None:
    """Entry of the second build process: load the VAE from ``vae_file`` and :func:`train_models`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [models] %(message)s")
    rec = Recipe(**recipe)
    torch.set_num_threads(rec.threads)
    vae = AutoencoderKL(**M.vae_config())
    vae.load_state_dict(load_file(vae_file))
    vae = vae.to(rec.device).eval()
    timings = train_models(Path(out), vae, rec, log.info)
    (Path(out) / "_models_timings.json").write_text(json.dumps(timings))


__all__ = ["SALIENCY_CANDIDATES", "choose_saliency", "models_worker", "reconstruct", "train_judge", "train_models",
           "train_rahf", "train_safety"]
