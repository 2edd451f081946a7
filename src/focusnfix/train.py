"""The Focus-N-Fix training loop.

One optimizer step:

1. pick a global batch of (prompt, seed) pairs from the training pool (deterministic in
   ``(train.seed, step)``) and take this process's shard;
2. reference: the frozen model's image Î0 (LoRA disabled, no grad) and its mask, from the
   content-keyed reference cache (filled before the first step in large batches, then reused
   every epoch; at step 0 a zero LoRA's own sample is Î0, so those items cost no extra pass);
3. policy: sample the same prompts from the same x_T with the LoRA on, gradient through the
   last K steps (DRaFT-K / -LV / full), decode inside the graph;
4. loss = −Σ_a w_a r_a(Î) + β ‖(1 − M) ⊙ (Î − Î0)‖_F, backward (through the fp16 loss scaler
   when ``mixed_precision: fp16``);
5. average LoRA gradients over processes, unscale, clip, step through the scaler (which skips
   the update on non-finite gradients and lowers its scale), log, checkpoint.

The run folder's layout and rules (lock, ``--overwrite``, what a resume must match) are in
:mod:`focusnfix.rundir`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from focusnfix import masks as mask_ops
from focusnfix import rundir
from focusnfix.aspects import Aspect
from focusnfix.backbones import Backbone, load_backbone
from focusnfix.cache import ReferenceCache
from focusnfix.config import Config, dump_config, resolve_prompts
from focusnfix.errors import InputError, warn
from focusnfix.files import atomic_write_text, file_sha256, partial_name, sync_tree
from focusnfix.images import grid, overlay, save_png
from focusnfix.lora import (
    add_lora,
    check_lora_file,
    load_lora_state_dict,
    lora_dropout_off,
    lora_parameters,
    lora_state_dict,
    peft_state_dict_of_file,
    replace_dir,
    save_lora_weights,
)
from focusnfix.objective import beta_at, focus_n_fix_loss, reward_composite
from focusnfix.reference import (
    Reference,
    build_aspects,
    compute_reference,
    model_identity,
    reference_fields,
    reference_from_images,
    sampling_options,
)
from focusnfix.sampling import sample


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    lora_dir: Path
    steps_done: int
    log_path: Path


def batch_indices(pool_size: int, batch_size: int, seed: int, step: int, micro: int) -> list[int]:
    """Global batch of pool indices for (step, micro-batch): deterministic, without replacement
    when the pool is large enough, so resume and multi-process runs see the same batches."""
    rng = np.random.default_rng([seed, step, micro])
    return rng.choice(pool_size, size=batch_size, replace=pool_size < batch_size).tolist()


def _warn_long_prompts(backbone: Backbone, prompts: list[str]) -> None:
    tokenizer = getattr(backbone.pipe, "tokenizer", None)
    limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer is None or not limit or limit > 100_000:
        return
    long = [p for p in prompts if len(tokenizer(p, verbose=False).input_ids) > limit]
    if long:
        warn(
            f"{len(long)} prompt(s) exceed the text encoder's {limit} tokens and are truncated, "
            f"e.g. {long[0][:60]!r}{'...' if len(long[0]) > 60 else ''}"
        )


class FocusNFixTrainer:
    """Trains a LoRA with the Focus-N-Fix objective (``objective.beta = 0`` is DRaFT).

    Args:
        config: validated :class:`Config`.
        aspects: pre-built aspects (else built from ``config.aspects``); same order as the config.
        backbone: pre-loaded backbone (else loaded from ``config.model``).
        accelerator: an ``accelerate.Accelerator`` (else made from ``config.train``).
        progress: show a tqdm bar on the main process.
    """

    def __init__(
        self,
        config: Config,
        aspects: list[Aspect] | None = None,
        backbone: Backbone | None = None,
        accelerator: Accelerator | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        tc = config.train
        if tc.device == "cuda" and accelerator is None and not torch.cuda.is_available():
            raise InputError("train.device is cuda, but torch sees no CUDA GPU here (a CPU build of torch, or no "
                             "visible device); use train.device: auto or cpu")
        if tc.report_to != "none":
            _require_tracker(tc.report_to)
        # mixed_precision None: accelerate's own (launch flags, `accelerate config`), "no" without one
        self.accelerator = accelerator or Accelerator(
            mixed_precision=tc.mixed_precision, cpu=tc.device == "cpu",
            log_with=None if tc.report_to == "none" else tc.report_to, project_dir=str(Path(tc.output_dir) / "trackers"),
        )
        self.progress = progress
        self.run_dir = Path(tc.output_dir)
        self.prompts = resolve_prompts(config.data)
        trained_on = set(self.prompts) & set(config.data.validation_prompts or [])
        if trained_on:
            raise InputError(f"data.validation_prompts must never be trained on; {len(trained_on)} of them are "
                             f"training prompts too, e.g. {sorted(trained_on)[0]!r}")
        seeds = range(config.data.seed_offset, config.data.seed_offset + config.data.seeds_per_prompt)
        self.pool: list[tuple[str, int]] = [(p, s) for p in self.prompts for s in seeds]
        n_proc = self.accelerator.num_processes
        if tc.batch_size % n_proc:
            raise InputError(f"train.batch_size={tc.batch_size} must be divisible by the {n_proc} processes")
        self.local_batch = tc.batch_size // n_proc

        self.backbone = backbone or load_backbone(
            config.model.path, config.model.dtype, config.model.variant, config.model.revision
        )
        self.backbone.to(self.accelerator.device)
        if self.accelerator.is_main_process:
            _warn_long_prompts(self.backbone, self.prompts)
        self.aspects = aspects if aspects is not None else build_aspects(config)
        if len(self.aspects) != len(config.aspects):
            raise InputError(f"{len(self.aspects)} aspects given but the config lists {len(config.aspects)}")
        for a in self.aspects:
            a.to(self.accelerator.device).eval().requires_grad_(False)
        self.weights = [a.weight for a in config.aspects]
        self.localize = [a.localize for a in config.aspects]
        self.options = sampling_options(config)
        # identity of the frozen weights, before the adapter exists (resume and cache keys)
        self.model_id = model_identity(self.backbone)
        self.run_fields = rundir.run_fields(config, self.prompts, self.model_id)

        lc = config.lora
        # same LoRA init on every process and every run (PEFT draws lora_A from the global RNG)
        torch.manual_seed(tc.seed)
        self.params = add_lora(self.backbone.unet, lc.rank, lc.alpha, lc.target_modules, lc.dropout)
        if lc.init_from:  # continue from an existing LoRA (its file's hash is part of the run's identity)
            load_lora_state_dict(self.backbone.unet, peft_state_dict_of_file(lc.init_from))
            self.run_fields["lora"]["init_from_sha256"] = file_sha256(check_lora_file(lc.init_from))
        # The optimizer is not passed through accelerator.prepare: the UNet is not wrapped in DDP
        # (LoRA gradients are averaged explicitly in _sync_gradients, which works for any number
        # of UNet calls per backward) and the fp16 loss scaler is ours, so a skipped update always
        # goes through it (scaler.step skips, scaler.update lowers the scale).
        self.optimizer = _optimizer(tc, self.params, self.accelerator.device)
        # diffusers' schedules (what its training examples use); "constant" with warmup is its constant_with_warmup
        kind = "constant_with_warmup" if tc.lr_scheduler == "constant" and tc.warmup_steps else tc.lr_scheduler
        self.lr_scheduler = get_scheduler(kind, self.optimizer, num_warmup_steps=tc.warmup_steps,
                                          num_training_steps=tc.steps)
        fp16 = "fp16" in (tc.mixed_precision, self.accelerator.mixed_precision)
        self.scaler = torch.amp.GradScaler(self.accelerator.device.type, enabled=fp16)

        fields = reference_fields(config, self.backbone, self.aspects, self.accelerator.device.type,
                                  str(self.accelerator.mixed_precision))
        self.cache = ReferenceCache(
            self._compute_reference,
            fields,
            self.run_dir / "reference_cache" if config.data.cache_on_disk else None,
            ram_items=config.data.cache_ram_items,
            manage=self.accelerator.is_main_process,
            announce=warn,
        )
        self.step = 0

    # -- pieces --------------------------------------------------------------------------------
    def _compute_reference(self, prompts: list[str], seeds: list[int]) -> Reference:
        with self.accelerator.autocast():
            return compute_reference(
                self.backbone, self.aspects, self.localize, prompts, seeds, self.options, self.config.mask,
                [a.gate for a in self.config.aspects],
            )

    def total_reward(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of the aspects' rewards ``(B,)`` and each aspect's reward (detached)."""
        total = images.new_zeros(images.shape[0])
        parts = {}
        for aspect, w in zip(self.aspects, self.weights, strict=True):
            if w == 0:
                continue
            r = aspect.reward(images, prompts).float()
            if r.shape != total.shape:
                raise InputError(f"aspect {aspect.name!r}: reward must be (B,), got {tuple(r.shape)}")
            total = total + w * r
            parts[aspect.name] = r.detach()
        return total, parts

    def local_batch_items(self, step: int, micro: int) -> tuple[list[int], list[str], list[int]]:
        tc = self.config.train
        idx = batch_indices(len(self.pool), tc.batch_size, tc.seed, step, micro)
        rank = self.accelerator.process_index
        idx = idx[rank * self.local_batch : (rank + 1) * self.local_batch]
        return idx, [self.pool[i][0] for i in idx], [self.pool[i][1] for i in idx]

    def lora_schedule(self) -> dict[str, Any] | None:
        """What ``focusnfix_lora.json`` records of a LoRA trained with ``lora.active_steps`` (else None):
        the steps it acts on, and their timesteps, for sampling with another step count."""
        steps = self.config.lora.active_steps
        if steps is None:
            return None
        n = self.options.num_inference_steps
        h, w = self.options.height or self.backbone.default_size[0], self.options.width or self.backbone.default_size[1]
        latents = torch.zeros(self.backbone.latent_shape(1, h, w), device=self.backbone.device)
        timesteps = [int(t) for t in self.backbone.set_timesteps(n, latents)]
        return {"active_steps": steps, "num_inference_steps": n, "timesteps": timesteps[n - steps:]}

    def lora_is_zero(self) -> bool:
        """Whether the LoRA adds exactly nothing (every ``lora_B`` is 0: PEFT's initialisation)."""
        return all(not p.detach().any() for n, p in self.backbone.unet.named_parameters() if "lora_B" in n)

    def step_zero_items(self) -> set[int]:
        """Pool indices of step 0's global batch (every micro-batch, every process)."""
        tc = self.config.train
        return {i for micro in range(tc.grad_accum) for i in batch_indices(len(self.pool), tc.batch_size, tc.seed, 0, micro)}

    def items_drawn(self, start: int, stop: int) -> set[int]:
        """Pool indices that the global batches of steps ``start .. stop - 1`` draw (every micro-batch)."""
        tc = self.config.train
        return {i for step in range(start, stop) for micro in range(tc.grad_accum)
                for i in batch_indices(len(self.pool), tc.batch_size, tc.seed, step, micro)}

    def prefill_reference(self) -> dict[str, Any] | None:
        """Compute the missing reference items that the remaining steps will draw, before training,
        in batches of ``data.prefill_batch_size`` (a short trial run does not pay for the whole pool).

        Step 0's items are left to step 0 when the LoRA is still zero (its sample is Î0). With
        several processes each computes a share of the items on disk (``data.cache_on_disk``), then
        all wait. Returns ``{"items", "seconds"}`` of what was computed, or None when not prefilling.
        """
        dc = self.config.data
        n_proc = self.accelerator.num_processes
        if not dc.prefill_reference:
            return None
        if n_proc > 1 and not dc.cache_on_disk:  # the processes share the prefill through the disk cache only
            if self.accelerator.is_main_process:
                print(f"data.prefill_reference skipped: with {n_proc} processes it needs data.cache_on_disk: true; "
                      "each reference item is computed in the step that first draws it")
            return None
        t0 = time.perf_counter()
        skip = self.step_zero_items() if self.step == 0 and self.lora_is_zero() else set()
        drawn = self.items_drawn(self.step, self.config.train.steps)
        items = [pair for i, pair in enumerate(self.pool) if i in drawn and i not in skip]
        items = items[self.accelerator.process_index :: n_proc]
        todo = [items[i] for i in self.cache.missing([p for p, _ in items], [s for _, s in items])]
        bs = dc.prefill_batch_size
        bar = tqdm(total=len(todo), disable=not (self.progress and self.accelerator.is_main_process) or not todo,
                   desc="reference", unit="img")
        for i in range(0, len(todo), bs):
            chunk = todo[i : i + bs]
            self.cache.fill([p for p, _ in chunk], [s for _, s in chunk])
            bar.update(len(chunk))
        bar.close()
        self.accelerator.wait_for_everyone()
        return {"items": len(todo), "seconds": round(time.perf_counter() - t0, 4)}

    def reward_input(self, images: torch.Tensor, ref: Any) -> torch.Tensor:
        """What the reward scores (``objective.reward_input``): the images ``(B, 3, H, W)`` in [0, 1]
        themselves, or ``M * images + (1 - M) * Î0`` with the reference detached."""
        if self.config.objective.reward_input == "image":
            return images
        return reward_composite(images, ref.images, ref.mask)

    def beta_at(self, step: int) -> float:
        """The constraint weight at this optimizer step (``objective.beta_end`` ramps it)."""
        oc = self.config.objective
        return beta_at(min(step, self.config.train.steps - 1), self.config.train.steps, oc.beta, oc.beta_end,
                       oc.beta_ramp_start)

    def loss_on(self, step: int, micro: int) -> dict[str, Any]:
        """Forward one micro-batch and return the loss terms (loss keeps its graph)."""
        _, prompts, seeds = self.local_batch_items(step, micro)
        # at step 0 a zero LoRA's sample is the frozen model's, bit for bit: reuse it as the reference
        reuse = self.cache.missing(prompts, seeds) if step == 0 and self.lora_is_zero() else []
        ref = None if reuse else self.cache.get(prompts, seeds, self.accelerator.device)
        rank = self.accelerator.process_index
        generator = torch.Generator().manual_seed(hash((self.config.train.seed, step, micro, rank)) % 2**63)
        # with lora.active_steps the policy starts from the reference's frozen prefix (its first N - L steps)
        prefix = None if ref is None else ref.prefix_latents
        with self.accelerator.autocast():
            out = sample(self.backbone, prompts, seeds, self.options, generator=generator, prefix_latents=prefix)
        if reuse:
            with torch.no_grad(), self.accelerator.autocast():
                new = reference_from_images(
                    out.images[reuse], out.latents[reuse], self.aspects, self.localize, [prompts[i] for i in reuse],
                    self.config.mask, [a.gate for a in self.config.aspects],
                    None if out.prefix_latents is None else out.prefix_latents[reuse],
                    seeds=[seeds[i] for i in reuse],
                )
            self.cache.add([prompts[i] for i in reuse], [seeds[i] for i in reuse], new)
            ref = self.cache.get(prompts, seeds, self.accelerator.device)
        assert ref is not None
        with self.accelerator.autocast():
            images = out.images.float()
            scored = self.reward_input(images, ref)
            reward, parts = self.total_reward(scored, prompts)
            if out.extra_images is not None:  # DRaFT-LV: average the reward over re-noisings
                for extra in out.extra_images:
                    reward = reward + self.total_reward(self.reward_input(extra.float(), ref), prompts)[0]
                reward = reward / (1 + out.extra_images.shape[0])
            if self.config.objective.space == "latent":
                policy, reference, tol = out.latents.float(), ref.latents, ref.latent_tolerance
            else:
                policy, reference, tol = images, ref.images, ref.image_tolerance
            terms = focus_n_fix_loss(
                reward, policy, reference, ref.mask, self.beta_at(step), self.config.objective.norm,
                tolerance=0.0 if tol is None else tol,
            )
        diff = images.detach() - ref.images
        change = (diff - diff.clamp(-ref.image_tolerance, ref.image_tolerance)).abs().mean(dim=1, keepdim=True)
        keep = 1.0 - ref.mask
        outside_change = (change * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1.0)
        return {
            "loss": terms.loss,
            "reward": terms.reward,
            "parts": parts,
            "constraint": terms.constraint,
            "mask_area": mask_ops.mask_area(ref.mask),
            "outside_change": outside_change,
        }

    def _sync_gradients(self) -> None:
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def _mean_over_processes(self, value: torch.Tensor) -> float:
        v = value.detach().float().mean().reshape(1).to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            v = self.accelerator.reduce(v, reduction="mean")
        return float(v.item())

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (grad_accum micro-batches); returns its log record."""
        tc = self.config.train
        t0 = time.perf_counter()
        torch.manual_seed(hash((tc.seed, step)) % 2**63)  # LoRA dropout, if any
        acc: dict[str, list[torch.Tensor]] = {}
        for micro in range(tc.grad_accum):
            terms = self.loss_on(step, micro)
            self.scaler.scale(terms["loss"] / tc.grad_accum).backward()
            for key in ("loss", "reward", "constraint", "mask_area", "outside_change"):
                acc.setdefault(key, []).append(terms[key].detach().reshape(-1))
            for name, r in terms["parts"].items():
                acc.setdefault(f"reward/{name}", []).append(r.reshape(-1))
        # averaged before unscaling: every process then finds the same inf/NaN and keeps the same scale
        self._sync_gradients()
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm))
        record: dict[str, Any] = {"step": step + 1}
        for key, values in acc.items():
            record[key] = self._mean_over_processes(torch.cat(values))
        finite = math.isfinite(record["loss"]) and math.isfinite(grad_norm)
        if finite:  # never write non-finite weights: drop this update and say so
            self.scaler.step(self.optimizer)
        self.scaler.update()  # lowers the fp16 loss scale after an overflow (no-op without fp16)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        record.update(
            beta=self.beta_at(step),
            grad_norm=grad_norm,
            lr=self.lr_scheduler.get_last_lr()[0],
            skipped=not finite,
            seconds=round(time.perf_counter() - t0, 4),
        )
        if self.scaler.is_enabled():
            record["loss_scale"] = float(self.scaler.get_scale())
        return record

    # -- run directory ---------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.jsonl"

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step_N`` atomically (main process); prune old ones."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        root = self.run_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{self.step:06d}"
        tmp = root / f"{partial_name(final.name)}{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        save_file(lora_state_dict(self.backbone.unet), str(tmp / "lora.safetensors"))
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
        if self.scaler.is_enabled():
            torch.save(self.scaler.state_dict(), tmp / "scaler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        atomic_write_text(tmp / "state.json", json.dumps({"step": self.step, "fields": self.run_fields}))
        sync_tree(tmp)  # a power cut after the rename finds whole files, not a checkpoint of empty ones
        replace_dir(tmp, final)
        for old in rundir.checkpoint_dirs(self.run_dir)[: -self.config.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore LoRA, optimizer, LR schedule, loss scaler and RNG from ``path``."""
        state = json.loads((path / "state.json").read_text())
        rundir.check_resume(state, self.run_fields, path)
        load_lora_state_dict(self.backbone.unet, load_file(str(path / "lora.safetensors"), device="cpu"))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        if self.scaler.is_enabled() and (path / "scaler.pt").is_file():
            self.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
        if (path / "rng.pt").is_file():
            rng = torch.load(path / "rng.pt", weights_only=True)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(state["step"])

    def _prepare_run_dir(self, resume: bool | str, overwrite: bool) -> None:
        main = self.accelerator.is_main_process
        if main:
            rundir.remove_leftovers(self.run_dir)
            ckpt = rundir.prepare(self.run_dir, resume, overwrite)
            if ckpt is not None:  # refuse a mismatched resume before anything in the folder changes
                rundir.check_resume(json.loads((ckpt / "state.json").read_text()), self.run_fields, ckpt)
            if resume:
                aside = rundir.set_aside_superseded_lora(self.config)
                if aside is not None:
                    print(f"the final LoRA of the config this resume replaces is kept in {aside}")
            atomic_write_text(self.run_dir / "config.yaml", dump_config(self.config))
            self.cache.open()
        self.accelerator.wait_for_everyone()
        if isinstance(resume, str) and resume != "latest":
            chosen: Path | None = Path(resume)
        else:
            ckpts = rundir.checkpoint_dirs(self.run_dir) if resume else []
            chosen = ckpts[-1] if ckpts else None
        if chosen is not None:
            self.load_checkpoint(chosen)
        if main:
            rundir.truncate_log(self.log_path, self.step)  # a resume rewrites the steps after its checkpoint
            if chosen is not None:
                print(f"resuming from {chosen} (step {self.step})")
            elif resume:
                print(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}; starting from step 0")
        self.accelerator.wait_for_everyone()

    def save_samples(self, name: str) -> Path | None:
        """Mask overlay, reference, fine-tuned and |difference| x4 rows for the first pool items."""
        if not self.accelerator.is_main_process:
            return None
        n = min(self.config.train.num_sample_images, len(self.pool))
        prompts, seeds = [p for p, _ in self.pool[:n]], [s for _, s in self.pool[:n]]
        ref = self.cache.get(prompts, seeds, self.accelerator.device)
        with torch.no_grad(), self.accelerator.autocast(), lora_dropout_off(self.backbone.unet):
            now = sample(self.backbone, prompts, seeds, self.options).images.float()
        rows = [overlay(ref.images, ref.mask, 0.35), ref.images, now, (now - ref.images).abs().mul(4).clamp(0, 1)]
        picture = grid([r.cpu() for r in rows], scale=2)
        self._log_image("samples", picture)
        return save_png(picture, self.run_dir / "samples" / f"{name}.png")

    def save_validation(self, name: str) -> Path | None:
        """Base (top row) and current (bottom row) images of ``data.validation_prompts`` x seeds."""
        dc = self.config.data
        if not dc.validation_prompts or not self.accelerator.is_main_process:
            return None
        prompts = [p for p in dc.validation_prompts for _ in dc.validation_seeds]
        seeds = [s for _ in dc.validation_prompts for s in dc.validation_seeds]
        with torch.no_grad(), self.accelerator.autocast(), lora_dropout_off(self.backbone.unet):
            now = sample(self.backbone, prompts, seeds, self.options).images.float()
            with self.backbone.adapters_disabled():
                base = sample(self.backbone, prompts, seeds, self.options).images.float()
        picture = grid([base.cpu(), now.cpu()], scale=2)
        self._log_image("validation", picture)
        return save_png(picture, self.run_dir / "samples" / f"validation_{name}.png")

    def _log_image(self, tag: str, array: np.ndarray) -> None:
        """Send an ``(H, W, 3)`` uint8 image (a :func:`focusnfix.images.grid`) to the trackers, if any."""
        if self.config.train.report_to == "none" or not self.accelerator.is_main_process:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({tag: array}, step=self.step, dataformats="HWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({tag: [array]}, step=self.step)

    # -- the loop --------------------------------------------------------------------------------
    def train(self, resume: bool | str = False, overwrite: bool = False) -> TrainResult:
        """Train to ``train.steps``.

        Args:
            resume: continue from the run folder's last checkpoint (True or ``"latest"``) or from
                the checkpoint directory at this path (its config, prompts and model must match;
                a run without a checkpoint starts again at step 0).
            overwrite: replace a run already in the folder (its reference cache is kept and
                reused where its items still match).

        Raises:
            InputError: the folder holds a run and neither flag was given, another training
                holds the folder, or a resume does not match its checkpoint.
        """
        main = self.accelerator.is_main_process
        lock = rundir.RunLock(self.run_dir) if main else None
        if lock is not None:
            lock.acquire()
        try:
            self._prepare_run_dir(resume, overwrite)
            self._loop()
            lora_dir = self.run_dir / "lora"
            self.accelerator.wait_for_everyone()
            if main:
                save_lora_weights(self.backbone.unet, type(self.backbone.pipe), lora_dir, self.lora_schedule())
            self.save_samples("final")
            self.save_validation("final")
            self.accelerator.wait_for_everyone()
        finally:
            if lock is not None:
                lock.release()
        return TrainResult(self.run_dir, lora_dir, self.step, self.log_path)

    def _loop(self) -> None:
        tc = self.config.train
        main = self.accelerator.is_main_process
        bar = tqdm(total=tc.steps, initial=self.step, disable=not (self.progress and main), desc="focusnfix")
        log = open(self.log_path, "a", encoding="utf-8") if main else None  # noqa: SIM115 - closed below
        tracking = tc.report_to != "none"
        if tracking:
            self.accelerator.init_trackers(tc.tracker_project, config=_flat_scalars(self.config.model_dump(mode="json")))
        try:
            prefill = self.prefill_reference() if self.step < tc.steps else None
            if prefill is not None and main and prefill["items"]:  # its cost, apart from the steps'
                atomic_write_text(self.run_dir / "reference_prefill.json", json.dumps(prefill))
            while self.step < tc.steps:
                record = self.train_step(self.step)
                self.step += 1
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if tracking:  # every numeric field of the record, at its step
                    self.accelerator.log({k: float(v) for k, v in record.items()
                                          if k != "step" and isinstance(v, (int, float))}, step=self.step)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", reward=f"{record['reward']:.4f}", c=f"{record['constraint']:.4f}")
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self.save_checkpoint()
                if tc.sample_every and self.step % tc.sample_every == 0:
                    self.save_samples(f"step_{self.step:06d}")
                if tc.validation_every and self.step % tc.validation_every == 0:
                    self.save_validation(f"step_{self.step:06d}")
        finally:
            bar.close()
            if log is not None:
                log.close()
            if tracking:
                self.accelerator.end_training()


def _require_tracker(name: str) -> None:
    """Fail before training when ``train.report_to`` names a tracker whose package is missing
    (accelerate would only warn and train without tracking)."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise InputError(f"train.report_to is {name}, but the {name} package is not installed: "
                         f"pip install 'focusnfix[{name}]' (or set train.report_to: none)")


def _optimizer(tc: Any, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (its states in 8 bits: a quarter of the optimizer memory)."""
    if tc.optimizer == "adamw_8bit":
        if device.type != "cuda":
            raise InputError(f"train.optimizer adamw_8bit needs a CUDA GPU (bitsandbytes); this run is on {device.type}")
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise InputError("train.optimizer adamw_8bit needs bitsandbytes: pip install 'focusnfix[bnb]'") from err
        return bnb.optim.AdamW8bit(params, lr=tc.learning_rate, betas=tc.adam_betas, weight_decay=tc.weight_decay)
    return torch.optim.AdamW(params, lr=tc.learning_rate, betas=tc.adam_betas, weight_decay=tc.weight_decay)


def _flat_scalars(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b": scalar}`` (lists and None as strings): what trackers' hparams take."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat_scalars(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree if isinstance(tree, (int, float, str, bool)) else json.dumps(tree)}


def lora_vector(unet: torch.nn.Module) -> torch.Tensor:
    """All LoRA parameters as one flat fp32 vector (tests, multi-process checks)."""
    return torch.cat([p.detach().float().reshape(-1).cpu() for p in lora_parameters(unet)])
