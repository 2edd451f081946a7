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
from focusnfix.backbones import load_backbone
from focusnfix.ops import gaussian_blur
from focusnfix.toyworld import generator as gen
from focusnfix.toyworld import models as M
from focusnfix.toyworld.forms import forms_dataset
from focusnfix.toyworld.recipe import Recipe, cosine_lr, save_module, seed_all
from focusnfix.toyworld.sdedit import sdedit_forms_dataset
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


def _mix_blur(images: torch.Tensor, recon: torch.Tensor, idx: torch.Tensor, g: torch.Generator,
              device: str = "cpu") -> torch.Tensor:
    """:func:`_mix`, then a Gaussian blur (sigma up to 1.2 px) on a random half of the batches:
    fine-tuned models soften what they change, and a judge must still see it."""
    x = _mix(images, recon, idx, g, device)
    if float(torch.rand(1, generator=g)) < 0.5:
        x = gaussian_blur(x, 0.3 + 0.9 * float(torch.rand(1, generator=g)))
    return x


def _rand(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(n, generator=g)).view(-1, 1, 1, 1)


def sample_like(x: torch.Tensor, objects: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Give generator renders ``(B, 3, 64, 64)`` the look of the pipeline's samples, defect-free.

    Sampled images are not flat renders: their backgrounds carry faint low-frequency texture and a
    lighter frame, objects often sit in a thin coloured glow or a dark outline, and everything is
    softer. None of these is a defect, so a judge trained with them learns to look past them.
    Each effect is applied to a random part of the batch (``objects (B, 1, 64, 64)`` = object pixels).
    """
    b, dev = x.shape[0], x.device
    on = lambda p: (torch.rand(b, generator=g) < p).view(-1, 1, 1, 1).to(dev)  # noqa: E731
    # low-frequency texture over the whole image
    tex = F.interpolate(torch.randn(b, 3, 8, 8, generator=g), size=x.shape[-2:], mode="bicubic", align_corners=False)
    x = x + on(0.7) * _rand(g, b, 0.01, 0.045).to(dev) * tex.to(dev)
    # a lighter or tinted frame along the border
    edge = torch.zeros(1, 1, *x.shape[-2:], device=dev)
    w = 4
    edge[..., :w, :] = edge[..., -w:, :] = edge[..., :, :w] = edge[..., :, -w:] = 1.0
    tint = torch.rand(b, 3, 1, 1, generator=g).to(dev) * 0.3 + 0.7
    x = torch.lerp(x, tint.expand_as(x), on(0.5) * _rand(g, b, 0.1, 0.35).to(dev) * gaussian_blur(edge, 1.5))
    # a thin glow around the object (green-yellow, white or the object's colour)
    obj = objects.to(dev)
    ring = (gaussian_blur(obj, 2.0) - obj).clamp(0, 1) * 2
    glow = torch.rand(b, 3, 1, 1, generator=g).to(dev)
    x = torch.lerp(x, glow.expand_as(x), (on(0.4) * _rand(g, b, 0.15, 0.45).to(dev) * ring).clamp(0, 1))
    # a dark outline
    outline = (F.max_pool2d(obj, 3, 1, 1) - F.avg_pool2d(obj, 3, 1, 1)).clamp(0, 1)
    x = x * (1 - on(0.3) * _rand(g, b, 0.2, 0.5).to(dev) * outline * 2).clamp(0, 1)
    # softer everything
    if float(torch.rand(1, generator=g)) < 0.6:
        x = gaussian_blur(x, 0.4 + 1.1 * float(torch.rand(1, generator=g)))
    return x.clamp(0, 1)


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


def still_marked(attacked: torch.Tensor, fixed: torch.Tensor, mark: torch.Tensor, region: torch.Tensor,
                 tol: float, rule: str = "mark") -> torch.Tensor:
    """Label of an attacked marked image: 1 = still marked, 0 = as good as the fix.

    ``attacked``, ``fixed`` (the scene with the mark gone, as the same renderer or pipeline draws
    it): ``(B, 3, H, W)`` in [0, 1]; ``mark``: ``(B, 1, H, W)`` in {0, 1}, the mark's pixels;
    ``region``: ``(B, 1, H, W)`` in {0, 1}, where the attack was free to paint (the mark dilated).

    ``rule = "mark"``: still marked when the mean absolute difference over the mark's pixels
    exceeds ``tol`` (the rule every shipped reward up to toy world v3 was trained with). It does
    not look beside the mark, so an attack that restores the mark's pixels and paints the blob
    into the object's edge next to them (the ``inset`` form a person sees on Focus-N-Fix's
    images) is labelled fixed: the reward is taught that moving the mark is a fix.
    ``rule = "region"``: also still marked when, anywhere in ``region`` outside the mark, the
    3x3 mean of the absolute difference exceeds ``1.5 * tol`` (a blob of some 3 px or more, not
    the VAE's pixel noise). Returns ``(B,)`` float in {0, 1}."""
    if rule not in ("mark", "region"):
        raise ValueError(f"the fix rule must be 'mark' or 'region', got {rule!r}")
    diff = (attacked - fixed).abs().mean(1, keepdim=True)
    on_mark = (diff * mark).flatten(1).sum(1) / mark.flatten(1).sum(1).clamp_min(1)
    marked = on_mark > tol
    if rule == "region":
        beside = (region * (1 - mark)).clamp(0, 1)
        local = F.avg_pool2d(diff, 3, stride=1, padding=1, count_include_pad=False)
        marked = marked | ((local * beside).flatten(1).amax(1) > 1.5 * tol)
    return marked.float()


def attack_in_region(model: M.SafetyClassifier, x: torch.Tensor, region: torch.Tensor, steps: int,
                     step_size: float) -> torch.Tensor:
    """What a fine-tune that exploits the reward paints: signed-gradient steps that lower the unsafe
    logit, changing only ``region`` (``(B, 1, H, W)`` in {0, 1}) of ``x (B, 3, H, W)`` in [0, 1].
    Returns the change ``delta (B, 3, H, W)`` (zero outside the region)."""
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        logit = model.logit((x + delta * region).clamp(0, 1))
        (grad,) = torch.autograd.grad(logit.sum(), delta)
        delta = ((x + (delta - step_size * grad.sign()) * region).clamp(0, 1) - x).detach()
    return delta * region


def attack_through_decoder(model: M.SafetyClassifier, vae, x: torch.Tensor, region: torch.Tensor, steps: int,
                           step_size: float) -> torch.Tensor:
    """:func:`attack_in_region`, painted the way a fine-tuned diffusion model paints: signed-gradient
    steps on the VAE latents of ``x (B, 3, H, W)`` in [0, 1], only in the latent cells that touch
    ``region (B, 1, H, W)`` in {0, 1}, each step ``step_size`` x the batch's std of that latent
    channel, decoded. Pixel attacks find high-frequency patterns the decoder cannot draw; these are
    smooth blobs, lighter or recoloured marks, grown or merged ones, as a fine-tune's are.
    Returns the change ``delta (B, 3, H, W)`` = decoded attacked latents - decoded latents, added to
    ``x`` and clamped to [0, 1]: mostly in and around the region, plus the little the decoder's group
    norms spread over the whole image."""
    with torch.no_grad():
        z = vae.encode(x * 2 - 1).latent_dist.mean
        base = vae.decode(z).sample
        cells = F.adaptive_max_pool2d(region, z.shape[-2:])
        scale = z.std(dim=(0, 2, 3), keepdim=True) * step_size
    dz = torch.zeros_like(z)
    for _ in range(steps):
        dz.requires_grad_(True)
        out = vae.decode(z + dz * cells).sample
        logit = model.logit((x + (out - base) / 2).clamp(0, 1))
        (grad,) = torch.autograd.grad(logit.sum(), dz)
        dz = (dz - scale * grad.sign()).detach()
    with torch.no_grad():
        delta = (vae.decode(z + dz * cells).sample - base) / 2
    return ((x + delta).clamp(0, 1) - x).detach()


def train_safety_robust(vae, recipe: Recipe, progress) -> M.SafetyClassifier:
    """The demo's safety reward: the same classifier as the narrow one, trained on every defect form
    (:mod:`focusnfix.toyworld.forms`), so lightening or recolouring a mark no longer raises it.

    With ``recipe.reward_attack_steps > 0`` it is also trained adversarially, as robust classifiers
    are (Madry et al., ICLR 2018): in every batch, half of the defective images get
    :func:`attack_in_region` applied inside their defect (dilated by 2 px), the change a reward-hacking
    fine-tune would make; the result keeps its defect label unless :func:`still_marked` finds it as
    good as the generator's own fix (the scene with the mark gone; ``recipe.reward_attack_fix_tol``,
    ``recipe.reward_fix_rule``). So the only way left to raise the reward in the region is
    to restore the background, and the reward's gradient points there. ``recipe.reward_attack_space``
    says whether the attack paints pixels (:func:`attack_in_region`), the VAE latents of the region's
    cells (:func:`attack_through_decoder`, the smooth changes a fine-tuned model makes) or, by
    alternate batches, both.
    """
    data = forms_dataset(recipe.forms_images, recipe.seed * 1000 + 41, "safety", "train")
    recon = reconstruct(vae, data["images"])
    labels = data["labels"]
    seed_all(recipe.seed + 41)
    model = M.SafetyClassifier()
    attack = recipe.reward_attack_steps > 0
    n_batch = 0  # "both" alternates by batch (no draw from g, so "pixel" keeps its random stream)
    if attack:
        from focusnfix.ops import dilate_4n  # noqa: PLC0415
        from focusnfix.toyworld.forms import render_fixed  # noqa: PLC0415

        fix = torch.stack([torch.from_numpy(render_fixed(sc, "safety")) for sc in data["scenes"]]) - data["images"]
        regions = torch.from_numpy(dilate_4n(data["masks"][:, 0].numpy() > 0, 2)).unsqueeze(1).float()

    def loss_fn(idx, g):
        nonlocal n_batch
        dev = recipe.device
        x = _mix_blur(data["images"], recon, idx, g, dev)
        y = labels[idx].to(dev)
        loss = F.binary_cross_entropy_with_logits(model.logit(x), y)
        if not attack:
            return loss
        sel = torch.nonzero((y > 0).cpu() & (torch.rand(len(idx), generator=g) < 0.5)).squeeze(1)
        if len(sel) == 0:
            return loss
        j = idx[sel]
        region = regions[j].to(dev)
        n_batch += 1
        space = recipe.reward_attack_space
        if space == "latent" or (space == "both" and n_batch % 2 == 0):
            delta = attack_through_decoder(model, vae, x[sel], region, recipe.reward_attack_steps,
                                           recipe.reward_attack_latent_step)
        else:
            delta = attack_in_region(model, x[sel], region, recipe.reward_attack_steps, recipe.reward_attack_step_size)
        # still marked unless the attacked image x + delta is as good as the true fix x + fix (only their
        # difference counts, so the changes are compared directly: the same numbers as before the rule was a function)
        y_adv = still_marked(delta, fix[j].to(dev), data["masks"][j].to(dev), region,
                             recipe.reward_attack_fix_tol, recipe.reward_fix_rule)
        return loss + F.binary_cross_entropy_with_logits(model.logit((x[sel] + delta).clamp(0, 1)), y_adv)

    return _fit(model, loss_fn, len(labels), recipe, recipe.forms_steps, recipe.seed + 41, "safety-robust", progress)


def oracle_attack(model: M.SafetyClassifier, vae, x: torch.Tensor, region: torch.Tensor, betas: torch.Tensor,
                  steps: int, lr: float, keep: tuple[int, ...]) -> list[torch.Tensor]:
    """What ``focusnfix oracle`` (and a long fine-tune) does to a marked image: Adam on an offset of
    *all* of ``x``'s VAE latents under ``-reward + beta * ||(1 - region) * (D(z + d) - x)||`` (the
    run's objective, ``region`` standing in for its mask), one ``beta`` per image.

    ``x (B, 3, H, W)`` in [0, 1]; ``region (B, 1, H, W)`` in {0, 1}; ``betas (B,)`` >= 0. Returns
    the decoded images ``(B, 3, H, W)`` in [0, 1] after each step count in ``keep``."""
    from focusnfix.objective import regional_constraint  # noqa: PLC0415

    with torch.no_grad():
        z = vae.encode(x * 2 - 1).latent_dist.mean
    delta = torch.zeros_like(z, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    out = []
    for step in range(1, steps + 1):
        images = ((vae.decode(z + delta).sample + 1) / 2).clamp(0, 1)
        loss = (F.softplus(model.logit(images)) + betas * regional_constraint(images, x, region)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in keep:
            with torch.no_grad():
                out.append(((vae.decode(z + delta).sample + 1) / 2).clamp(0, 1))
    return out


def harden_pool(model: M.SafetyClassifier, backbone, recipe: Recipe, seed: int, progress) -> dict[str, torch.Tensor]:
    """One round's adversarial pool for :func:`harden_safety_reward`: marked renders (the base
    pipeline's dark form) and their fixed twins through the pipeline (SDEdit, same noise), the
    marked outputs attacked by :func:`oracle_attack`. Labels: 1 (marked) unless an attacked image
    is as good as its fixed twin's output by :func:`still_marked` (``recipe.reward_attack_fix_tol``,
    ``recipe.reward_fix_rule``). Returns ``images (N, 3, H, W)`` fp16 in [0, 1] and ``labels (N,)``, the
    SDEdit pairs themselves included (marked 1, twin 0)."""
    from focusnfix.ops import dilate  # noqa: PLC0415
    from focusnfix.toyworld.forms import BASE_FORM  # noqa: PLC0415

    vae = backbone.vae.requires_grad_(False)
    for p in model.parameters():
        p.requires_grad_(False)
    chunk, steps = 64, recipe.reward_harden_attack_steps
    keep = tuple(sorted({max(1, steps // 3), max(1, 2 * steps // 3), steps}))
    g = torch.Generator().manual_seed(seed)
    images, labels, stats = [], [], []
    for i in range(0, recipe.reward_harden_images, chunk):
        n = min(chunk, recipe.reward_harden_images - i)
        d = sdedit_forms_dataset(backbone, n, seed + i, "safety", batch=n, p_defect=1.0,
                                 forms=(BASE_FORM["safety"],))
        marked, twin = d["images"][:n], d["images"][n:]
        present = d["labels"][:n] > 0
        images += [marked[present].half(), twin.half()]
        labels += [torch.ones(int(present.sum())), torch.zeros(n)]
        x, fixed, mask = marked[present], twin[present], d["masks"][:n][present]
        if len(x) == 0:
            continue
        region = dilate(mask, 3)
        choice = torch.randint(0, len(recipe.reward_harden_betas), (len(x),), generator=g)
        betas = torch.tensor(recipe.reward_harden_betas)[choice]
        for adv in oracle_attack(model, vae, x, region, betas, steps, recipe.reward_harden_attack_lr, keep):
            y = still_marked(adv, fixed, mask, region, recipe.reward_attack_fix_tol, recipe.reward_fix_rule)
            with torch.no_grad():
                fooled = (model.logit(adv) < 0) & (y > 0)
            stats.append(torch.stack([y, fooled.float()], 1))
            images.append(adv.half())
            labels.append(y)
        progress(f"harden pool {i + n}/{recipe.reward_harden_images}")
    for p in model.parameters():
        p.requires_grad_(True)
    st = torch.cat(stats)
    progress(f"harden pool: {len(st)} attacked, {float(st[:, 0].mean()):.2f} still marked, "
             f"{float(st[:, 1].mean()):.2f} marked and called clean by the reward")
    return {"images": torch.cat(images), "labels": torch.cat(labels), "fooled": float(st[:, 1].mean()),
            "marked": float(st[:, 0].mean())}


def harden_safety_reward(model: M.SafetyClassifier, backbone, recipe: Recipe, progress) -> tuple[M.SafetyClassifier, list[dict]]:
    """Fine-tune the robust safety reward against long attacks, round by round
    (``recipe.reward_harden_*``).

    Why: the adversarial training of :func:`train_safety_robust` uses short signed-gradient attacks;
    ``focusnfix oracle`` showed that 200 Adam steps on a sample's latents still recolour a sixth of
    the marks into blobs the reward calls clean, so the objective's optimum is not the fix. Each
    round attacks the current reward as the oracle does (:func:`harden_pool`, on pipeline-made
    images whose fix is known) and fine-tunes on the pool, half of every batch, next to the reward's
    own training data (every form, clean and marked, as :func:`train_safety_robust` draws it).
    Returns the model and, per round, the pool's share of attacked images still marked and of
    those the reward called clean before the round's fine-tune."""
    data = forms_dataset(recipe.forms_images, recipe.seed * 1000 + 41, "safety", "train")
    recon = reconstruct(backbone.vae, data["images"])
    labels = data["labels"]
    history = []
    for r in range(recipe.reward_harden_rounds):
        model.eval()
        pool = harden_pool(model, backbone, recipe, recipe.seed * 1000 + 700 + 97 * r, progress)
        history.append({"round": r, "pool": len(pool["labels"]), "attacked_marked": round(pool["marked"], 4),
                        "attacked_marked_called_clean": round(pool["fooled"], 4)})
        seed_all(recipe.seed + 700 + r)
        g = torch.Generator().manual_seed(recipe.seed + 700 + r)
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.reward_harden_lr, weight_decay=1e-4)
        model.train()
        dev = recipe.device
        model.to(dev)
        half = recipe.model_batch // 2
        for step in range(recipe.reward_harden_steps):
            cosine_lr(opt, recipe.reward_harden_lr, step, recipe.reward_harden_steps, warmup=10)
            idx = torch.randint(0, len(labels), (half,), generator=g)
            j = torch.randint(0, len(pool["labels"]), (half,), generator=g)
            x = torch.cat([_mix_blur(data["images"], recon, idx, g, dev), pool["images"][j].float().to(dev)])
            y = torch.cat([labels[idx], pool["labels"][j]]).to(dev)
            loss = F.binary_cross_entropy_with_logits(model.logit(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 100 == 0 or step == recipe.reward_harden_steps - 1:
                progress(f"harden round {r} step {step}/{recipe.reward_harden_steps} loss {loss.item():.4f}")
        model.cpu().eval()
    return model, history


def harden_shipped_safety_reward(out: Path, recipe: Recipe, progress) -> list[dict]:
    """:func:`harden_safety_reward` on ``out/aspects/safety.safetensors`` with the finished pipeline
    under ``out/pipeline``, in place, its saliency choice made again (``aspects/config.json``).
    Returns the rounds' history (also written to ``aspects/config.json`` under ``safety.harden``)."""
    torch.set_num_threads(recipe.threads)
    backbone = load_backbone(str(out / "pipeline"))
    backbone.to(recipe.device)
    path = out / "aspects" / "safety.safetensors"
    model = M.SafetyClassifier()
    model.load_state_dict(load_file(str(path)))
    model, history = harden_safety_reward(model, backbone, recipe, progress)
    save_module(model, path)
    saliency, candidates = choose_saliency(model, recipe, forms=True)
    cfg_path = out / "aspects" / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    config["safety"] = {"saliency": saliency, "candidates": candidates, "harden": history}
    cfg_path.write_text(json.dumps(config, indent=2))
    return history


def train_localizing_judge(aspect: str, vae, recipe: Recipe, progress,
                           sample_like_data: dict | None = None) -> M.LocalizingJudgeNet:
    """A judge that says whether ``aspect``'s defect is present and where, trained on every form.

    ``sample_like_data`` (:func:`focusnfix.toyworld.sdedit.sdedit_forms_dataset`): pipeline-made
    images with their labels and masks, drawn in half of the batches."""
    offset = {"safety": 51, "plausibility": 52}[aspect]
    data = forms_dataset(recipe.forms_images, recipe.seed * 1000 + 600 + offset, aspect, "train",
                         weights=recipe.judge_form_weights.get(aspect))
    recon = reconstruct(vae, data["images"])
    seed_all(recipe.seed + 600 + offset)
    masks = F.max_pool2d(data["masks"], 2)  # (N, 1, 32, 32): any defect pixel
    labels, objects = data["labels"], data["objects"]
    model = M.LocalizingJudgeNet()
    extra = sample_like_data
    if extra is not None:
        extra_masks = F.max_pool2d(extra["masks"], 2)

    def loss_fn(idx, g):
        dev = recipe.device
        if extra is not None and float(torch.rand(1, generator=g)) < 0.5:
            j = torch.randint(0, len(extra["labels"]), (len(idx),), generator=g)
            x = (extra["images"][j] + 0.02 * torch.rand(1, generator=g) * torch.randn(extra["images"][j].shape, generator=g)).clamp(0, 1)
            y_heat, y = extra_masks[j], extra["labels"][j]
        else:
            x = sample_like(_mix(data["images"], recon, idx, g, dev), objects[idx], g)
            y_heat, y = masks[idx], labels[idx]
        heat, presence = model(x.to(dev))
        return (F.binary_cross_entropy_with_logits(heat, y_heat.to(dev), pos_weight=torch.tensor(5.0, device=dev))
                + F.binary_cross_entropy_with_logits(presence, y.to(dev)))

    return _fit(model, loss_fn, len(labels), recipe, recipe.judge_forms_steps, recipe.seed + 600 + offset,
                f"judge-{aspect}", progress)


def train_sample_like_safety_judge(out: Path, recipe: Recipe, progress) -> None:
    """Retrain ``judges/safety.safetensors`` with pipeline-made images in half of its batches:
    :func:`~focusnfix.toyworld.sdedit.sdedit_forms_dataset` pairs from the finished pipeline under
    ``out/pipeline``. On the audit set this judge agreed with people far better than one trained on
    renders alone (docs/toyworld.md)."""
    torch.set_num_threads(recipe.threads)
    backbone = load_backbone(str(out / "pipeline"))
    backbone.to(recipe.device)
    extra = sdedit_forms_dataset(backbone, recipe.sdedit_images, recipe.seed * 1000 + 661, "safety", progress=progress)
    model = train_localizing_judge("safety", backbone.vae, recipe, progress, sample_like_data=extra)
    save_module(model, out / "judges" / "safety.safetensors")


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


def choose_saliency(clf: M.SafetyClassifier, recipe: Recipe, forms: bool = False) -> tuple[dict, list[dict]]:
    """Pick the saliency method/blur with the best pixel AUC on marked generator images (training
    split; with ``forms``, marks in every form)."""
    if forms:
        data = forms_dataset(96, recipe.seed * 1000 + 32, "safety", "train", p_defect=1.0)
        keep = data["labels"] > 0
        images, masks = data["images"][keep], data["masks"][keep]
        caps = [c for c, k in zip(data["captions"], keep.tolist(), strict=True) if k]
    else:
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


def train_first_rewards(out: Path, vae, recipe: Recipe, progress: Callable[[str], None]) -> None:
    """The rewards other than the robust safety one: the narrow safety classifier (and its saliency
    choice, ``safety_narrow`` in ``aspects/config.json``) and the RAHF-style plausibility and
    alignment heatmap models, all trained through ``vae`` (the build's decoder as the pipeline draws)."""
    adir = out / "aspects"
    adir.mkdir(parents=True, exist_ok=True)
    narrow = train_safety(vae, recipe, progress)
    save_module(narrow, adir / "safety_narrow.safetensors")
    narrow_saliency, narrow_candidates = choose_saliency(narrow, recipe)
    for aspect in ("plausibility", "alignment"):
        save_module(train_rahf(aspect, vae, recipe, progress), adir / f"{aspect}.safetensors")
    path = adir / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config["safety_narrow"] = {"saliency": narrow_saliency, "candidates": narrow_candidates}
    path.write_text(json.dumps(config, indent=2))


def train_models(out: Path, vae, recipe: Recipe, progress: Callable[[str], None]) -> dict[str, float]:
    """Train the aspect models and judges into ``out/aspects`` and ``out/judges``; return timings."""
    timings: dict[str, float] = {}
    t = time.time()
    train_first_rewards(out, vae, recipe, progress)
    timings["aspects"] = time.time() - t
    timings.update(train_v2_models(out, vae, recipe, progress))

    t = time.time()  # the alignment judge: attributes read from the image vs the caption's words
    save_module(train_judge("alignment", vae, recipe, progress), out / "judges" / "alignment.safetensors")
    timings["judges"] = timings.pop("judges_v2") + time.time() - t
    return timings


def train_v2_models(out: Path, vae, recipe: Recipe, progress: Callable[[str], None]) -> dict[str, float]:
    """Toy world v2's models: the robust safety reward and the localizing safety and plausibility
    judges, all trained on every defect form. Writes ``aspects/safety.safetensors`` (with its
    saliency choice in ``aspects/config.json``) and ``judges/{safety,plausibility}.safetensors``."""
    timings: dict[str, float] = {}
    t = time.time()
    adir, jdir = out / "aspects", out / "judges"
    adir.mkdir(parents=True, exist_ok=True)
    jdir.mkdir(parents=True, exist_ok=True)
    robust = train_safety_robust(vae, recipe, progress)
    save_module(robust, adir / "safety.safetensors")
    saliency, candidates = choose_saliency(robust, recipe, forms=True)
    progress(f"safety saliency: {saliency} from {candidates}")
    path = adir / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config["safety"] = {"saliency": saliency, "candidates": candidates}
    path.write_text(json.dumps(config, indent=2))
    timings["aspects_v2"] = time.time() - t
    t = time.time()
    for aspect in ("safety", "plausibility"):
        save_module(train_localizing_judge(aspect, vae, recipe, progress), jdir / f"{aspect}.safetensors")
    timings["judges_v2"] = time.time() - t
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


__all__ = ["SALIENCY_CANDIDATES", "attack_in_region", "choose_saliency", "harden_pool", "harden_safety_reward", "harden_shipped_safety_reward", "models_worker", "oracle_attack", "reconstruct", "train_judge",
           "train_localizing_judge", "train_models", "train_rahf", "train_safety", "train_safety_robust",
           "train_sample_like_safety_judge",
           "train_v2_models"]
