"""Building the toy world: the recipe of its pipeline (VAE, UNet + text encoder) and the whole build.

``build(out_dir)`` trains everything from generated data on CPU and writes::

    out_dir/pipeline/        diffusers StableDiffusionPipeline layout (safetensors)
    out_dir/aspects/         safety.safetensors, plausibility.safetensors, alignment.safetensors, config.json
    out_dir/judges/          safety.safetensors, plausibility.safetensors, alignment.safetensors
    out_dir/build.json       recipe, seeds and timings

Every stage is seeded, so the same recipe and seed rebuild models of the same quality (bit-for-bit
on the same machine and torch build). Aspect models and judges: :mod:`focusnfix.toyworld.build_models`.
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing as mp
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from focusnfix.toyworld import generator as gen
from focusnfix.toyworld import models as M
from focusnfix.toyworld.build_models import (
    harden_shipped_safety_reward,
    models_worker,
    train_models,
    train_sample_like_safety_judge,
)
from focusnfix.toyworld.recipe import Recipe, cosine_lr, save_module, seed_all
from focusnfix.toyworld.tokenizer import load_tokenizer, write_tokenizer

log = logging.getLogger("focusnfix.toyworld")


# ----------------------------------------------------------------------------------------------
# pipeline
# ----------------------------------------------------------------------------------------------
def train_vae(images: torch.Tensor, recipe: Recipe, progress: Callable[[str], None]):
    seed_all(recipe.seed + 1)
    dev = recipe.device
    vae = AutoencoderKL(**M.vae_config()).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(recipe.seed + 1)
    c = recipe.vae_crop
    for step in range(recipe.vae_steps):
        cosine_lr(opt, recipe.vae_lr, step, recipe.vae_steps)
        idx = torch.randint(0, images.shape[0], (recipe.vae_batch,), generator=g)
        oy, ox = (torch.randint(0, 64 - c + 1, (2,), generator=g) // 8 * 8).tolist()
        x = images[idx, :, oy:oy + c, ox:ox + c].float().to(dev) * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
        kl = post.kl().mean() / (c * c * 3)
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == recipe.vae_steps - 1:
            progress(f"vae step {step}/{recipe.vae_steps} loss {loss.item():.4f}")
    return vae.eval()


def finetune_decoder(vae, images: torch.Tensor, recipe: Recipe, progress: Callable[[str], None]):
    """Fine-tune ``vae``'s decoder (and ``post_quant_conv``) alone on whole images, in place.

    ``images``: ``(N, 3, 64, 64)`` in [0, 1]. The encoder stays frozen, so the latent space the UNet
    is trained in does not move: only how latents are drawn as pixels improves (what SD's
    ``sd-vae-ft-mse`` did for SD-1.x). Why: the first-stage VAE, trained on 32-pixel crops, greys the
    backgrounds, shifts object colours and draws a dark red or blue patch on the lower-right edge of
    green and purple objects that no render has (docs/toyworld.md, "The decoder"); every pipeline
    sample and every image the judges are trained on through the VAE carried it.
    """
    seed_all(recipe.seed + 7)
    dev = recipe.device
    with torch.no_grad():  # the decoder learns to draw the encoder's means: what the UNet is trained on
        means = encode_images(vae, images)
    for p in vae.parameters():
        p.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.vae_decoder_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(recipe.seed + 7)
    vae.train()
    for step in range(recipe.vae_decoder_steps):
        cosine_lr(opt, recipe.vae_decoder_lr, step, recipe.vae_decoder_steps, warmup=20)
        idx = torch.randint(0, images.shape[0], (recipe.vae_batch,), generator=g)
        x = images[idx].float().to(dev) * 2 - 1
        rec = vae.decode(means[idx].to(dev)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == recipe.vae_decoder_steps - 1:
            progress(f"vae decoder step {step}/{recipe.vae_decoder_steps} loss {loss.item():.4f}")
    for p in vae.parameters():
        p.requires_grad_(True)
    return vae.eval()


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    out = []
    dev = vae.device
    for i in range(0, images.shape[0], batch):
        out.append(vae.encode(images[i:i + batch].float().to(dev) * 2 - 1).latent_dist.mean.cpu())
    return torch.cat(out)


def _unet_stage(unet, text_encoder, latents: torch.Tensor, ids_all: torch.Tensor, empty: torch.Tensor,
                recipe: Recipe, steps: int, lr: float, warmup: int, v_prediction: bool, seed: int, name: str,
                progress: Callable[[str], None]):
    """One denoising-training stage of ``unet`` and ``text_encoder`` (trained jointly, in place);
    returns EMA copies of both (on CPU, eval mode). ``latents (N, 4, 8, 8)`` are scaled VAE means,
    ``ids_all (N, L)`` their caption token ids, ``empty (1, L)`` the empty caption's (dropout)."""
    dev = recipe.device
    noise_sched = DDPMScheduler(**{k: v for k, v in M.scheduler_config(v_prediction).items()
                                   if k not in ("set_alpha_to_one", "timestep_spacing")})
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    for p in ema_params:
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    alphas = noise_sched.alphas_cumprod.to(dev)
    t0 = time.time()
    for step in range(steps):
        cosine_lr(opt, lr, step, steps, warmup=warmup)
        idx = torch.randint(0, latents.shape[0], (recipe.unet_batch,), generator=g)
        x0 = latents[idx].float().to(dev)
        ids = ids_all[idx].clone()
        drop = torch.rand(recipe.unet_batch, generator=g) < recipe.caption_dropout
        ids[drop] = empty
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.randint(0, 1000, (recipe.unet_batch,), generator=g).to(dev)
        ids = ids.to(dev)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        # v = sqrt(a) * noise - sqrt(1 - a) * x0: at zero terminal SNR (a = 0) the target is -x0, which
        # epsilon prediction could not learn there
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v_prediction else noise
        pred = unet(xt, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema_params, params, strict=True):
                pe.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            progress(f"{name} step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return ema_unet.cpu(), ema_text.cpu()


def train_unet(latents: torch.Tensor, captions: list[str], tokenizer, recipe: Recipe,
               progress: Callable[[str], None]):
    """UNet + text encoder from scratch: stage 1 epsilon prediction on SD-1.5's schedule
    (``unet_steps``), then, if ``unet_v_steps > 0``, stage 2 from stage 1's EMA weights: v-prediction
    on the zero-terminal-SNR schedule (as SD 2's v-models were fine-tuned from their epsilon base).
    Returns the EMA weights of the last stage."""
    seed_all(recipe.seed + 2)
    vocab = tokenizer.get_vocab()
    text_encoder = CLIPTextModel(CLIPTextConfig(**M.text_config(len(vocab), tokenizer.bos_token_id,
                                                                tokenizer.eos_token_id)))
    unet = UNet2DConditionModel(**M.unet_config(text_encoder.config.hidden_size))
    unet, text_encoder = unet.to(recipe.device), text_encoder.to(recipe.device)
    ids_all = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    unet, text_encoder = _unet_stage(unet, text_encoder, latents, ids_all, empty, recipe, recipe.unet_steps,
                                     recipe.unet_lr, 100, False, recipe.seed + 2, "unet", progress)
    if recipe.unet_v_steps > 0:
        unet, text_encoder = unet.to(recipe.device), text_encoder.to(recipe.device)
        unet, text_encoder = _unet_stage(unet, text_encoder, latents, ids_all, empty, recipe,
                                         recipe.unet_v_steps, recipe.unet_v_lr, 50, True, recipe.seed + 5,
                                         "unet (v-prediction)", progress)
    return unet, text_encoder


def save_pipeline(out: Path, vae, unet, text_encoder, tokenizer_dir: Path, v_prediction: bool = False) -> None:
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(tokenizer_dir),
                                   unet=unet, scheduler=DDIMScheduler(**M.scheduler_config(v_prediction)), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)


# ----------------------------------------------------------------------------------------------
# the whole build
# ----------------------------------------------------------------------------------------------
def build(out_dir: str | Path, recipe: Recipe | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Train the whole toy world into ``out_dir``; return the build record (also in build.json)."""
    recipe = recipe or Recipe()
    progress = progress or log.info
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    timings: dict[str, float] = {}
    t_all = time.time()
    try:
        t = time.time()
        data = gen.generate(recipe.n_train, recipe.seed, "train")
        images = data.images.half()
        timings["data"] = time.time() - t
        progress(f"generated {recipe.n_train} scenes in {timings['data']:.0f}s")

        t = time.time()
        vae = train_vae(images[: recipe.vae_images], recipe, progress)
        latents = encode_images(vae, images)
        scale = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scale)
        latents = latents * scale
        if recipe.vae_decoder_steps > 0:  # after the latents: the encoder, hence the UNet's data, is unchanged
            finetune_decoder(vae, images[: recipe.vae_images], recipe, progress)
        timings["vae"] = time.time() - t

        models_proc = None
        if recipe.parallel:
            vae_file = out / "_vae.safetensors"
            save_module(vae, vae_file)
            models_proc = mp.get_context("spawn").Process(target=models_worker,
                                                          args=(str(out), asdict(recipe), str(vae_file)))
            models_proc.start()
        else:
            timings.update(train_models(out, vae, recipe, progress))

        t = time.time()
        tok_dir = out / "_tokenizer"
        write_tokenizer(tok_dir, gen.vocabulary())
        tokenizer = load_tokenizer(tok_dir)
        unet, text_encoder = train_unet(latents, data.captions, tokenizer, recipe, progress)
        save_pipeline(out / "pipeline", vae.cpu(), unet, text_encoder, tok_dir, recipe.unet_v_steps > 0)
        vae.to(recipe.device)
        timings["unet"] = time.time() - t
        del data, images, latents
        if models_proc is not None:
            models_proc.join()
            if models_proc.exitcode != 0:
                raise RuntimeError(f"toy world build: the aspect/judge process failed (exit {models_proc.exitcode})")
            timings.update(json.loads((out / "_models_timings.json").read_text()))
            (out / "_models_timings.json").unlink()
            (out / "_vae.safetensors").unlink()
        t = time.time()  # needs the finished pipeline: its image-to-image makes sample-like judge data
        train_sample_like_safety_judge(out, recipe, progress)
        timings["judge_sdedit"] = time.time() - t
        if recipe.reward_harden_rounds > 0:  # also needs the finished pipeline (SDEdit pairs to attack)
            t = time.time()
            harden_shipped_safety_reward(out, recipe, progress)
            timings["safety_harden"] = time.time() - t

        timings["total"] = time.time() - t_all
        shutil.rmtree(tok_dir, ignore_errors=True)
        record = {"recipe": asdict(recipe), "timings_s": {k: round(v, 1) for k, v in timings.items()},
                  "torch": torch.__version__, "threads": recipe.threads, "device": recipe.device}
        (out / "build.json").write_text(json.dumps(record, indent=2))
        progress(f"build done in {timings['total']:.0f}s -> {out}")
        return record
    finally:
        torch.set_num_threads(old_threads)


#: the stages :func:`rebuild` can run alone on a finished build
REBUILD_STAGES = ("decoder", "rewards", "safety_reward", "judges", "safety_harden")


def rebuild(out_dir: str | Path, stages: tuple[str, ...], recipe: Recipe | None = None,
            progress: Callable[[str], None] | None = None) -> dict:
    """Retrain only some stages of a finished build in ``out_dir`` (after a change to their recipe).

    * ``decoder``: fine-tune the VAE's decoder (:func:`finetune_decoder`, ``recipe.vae_decoder_steps``)
      of a build made without it, in ``pipeline/vae``; refused on a build whose decoder is already
      fine-tuned. The UNet's latents do not change, but every model trained on images through the
      VAE sees other pixels, so rebuild ``rewards``, ``safety_reward`` and ``judges`` with it
      (``build.json`` says under ``rebuilt_decoder`` which were not);
    * ``rewards``: the narrow safety reward (and its saliency choice) and the plausibility and
      alignment heatmap rewards (``aspects/{safety_narrow,plausibility,alignment}.safetensors``);
    * ``safety_reward``: the robust safety reward (``aspects/safety.safetensors``) and its saliency
      choice (``aspects/config.json``), hardened too when ``recipe.reward_harden_rounds > 0``;
    * ``safety_harden``: only the hardening (:func:`~focusnfix.toyworld.build_models.harden_safety_reward`)
      of the robust safety reward the build holds: what ``safety_reward`` does after its first part,
      when that part's recipe has not changed;
    * ``judges``: the localizing safety and plausibility judges and the alignment judge's attribute
      reader (``judges/``).

    These stages read nothing but the generator, the VAE and (the safety judge's SDEdit stage) the
    finished pipeline, all of which the build directory holds, so this writes what a full build with
    ``recipe`` would write (``tests/test_toyworld.py`` checks it bit for bit on a tiny build; for
    ``decoder``, given the first-stage VAE the build started from).
    ``build.json`` gets the new recipe and each stage's timing as ``rebuilt_<stage>``.
    """
    from focusnfix.backbones import load_backbone
    from focusnfix.toyworld.build_models import (
        choose_saliency,
        train_first_rewards,
        train_judge,
        train_localizing_judge,
        train_safety_robust,
    )

    unknown = set(stages) - set(REBUILD_STAGES)
    if unknown or not stages:
        raise ValueError(f"stages to rebuild must be some of {REBUILD_STAGES}, got {stages}")
    recipe = recipe or Recipe()
    progress = progress or log.info
    out = Path(out_dir)
    record_file = out / "build.json"
    if not record_file.is_file() or not (out / "pipeline").is_dir():
        raise FileNotFoundError(f"{out} is not a finished toy world build (build.json and pipeline/ expected)")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    record = json.loads(record_file.read_text())
    record_recipe_decoder = record["recipe"].get("vae_decoder_steps", 0)
    if "decoder" in stages and record_recipe_decoder > 0:
        raise ValueError(f"{out}: its VAE decoder is already fine-tuned (build.json recipe.vae_decoder_steps = "
                         f"{record['recipe']['vae_decoder_steps']}); a second fine-tune is not what a build writes")
    try:
        vae = load_backbone(str(out / "pipeline")).vae.to(recipe.device)
        for stage in REBUILD_STAGES:  # in build order
            if stage not in stages:
                continue
            t = time.time()
            if stage == "decoder":
                data = gen.generate(recipe.n_train, recipe.seed, "train")
                finetune_decoder(vae, data.images.half()[: recipe.vae_images], recipe, progress)
                vae.cpu().save_pretrained(out / "pipeline" / "vae")
                vae.to(recipe.device)
                record["rebuilt_decoder"] = ("pipeline/vae's decoder fine-tuned alone; the aspect models not "
                                             "rebuilt with it were trained through the first-stage decoder")
            elif stage == "rewards":
                train_first_rewards(out, vae, recipe, progress)
            elif stage == "safety_reward":
                robust = train_safety_robust(vae, recipe, progress)
                save_module(robust, out / "aspects" / "safety.safetensors")
                saliency, candidates = choose_saliency(robust, recipe, forms=True)
                path = out / "aspects" / "config.json"
                config = json.loads(path.read_text())
                config["safety"] = {"saliency": saliency, "candidates": candidates}
                path.write_text(json.dumps(config, indent=2))
                if recipe.reward_harden_rounds > 0:
                    harden_shipped_safety_reward(out, recipe, progress)
            elif stage == "safety_harden":
                if recipe.reward_harden_rounds < 1:
                    raise ValueError("the safety_harden stage needs recipe.reward_harden_rounds >= 1")
                harden_shipped_safety_reward(out, recipe, progress)
            else:  # judges
                save_module(train_localizing_judge("plausibility", vae, recipe, progress),
                            out / "judges" / "plausibility.safetensors")
                save_module(train_judge("alignment", vae, recipe, progress), out / "judges" / "alignment.safetensors")
                train_sample_like_safety_judge(out, recipe, progress)
            record["timings_s"][f"rebuilt_{stage}"] = round(time.time() - t, 1)
            progress(f"{stage} rebuilt in {time.time() - t:.0f}s")
        record["recipe"] = asdict(recipe)
        if "decoder" not in stages:  # the decoder stays what the build made
            record["recipe"]["vae_decoder_steps"] = record_recipe_decoder
        record_file.write_text(json.dumps(record, indent=2))
        return record
    finally:
        torch.set_num_threads(old_threads)


__all__ = ["Recipe", "build", "encode_images", "finetune_decoder", "REBUILD_STAGES", "rebuild", "save_pipeline", "train_unet", "train_vae"]
