"""The Focus-N-Fix training loop.

One optimizer step:

1. pick a global batch of (prompt, seed) pairs from the training pool (deterministic in
   ``(train.seed, step)``) and take this process's shard;
2. reference: the frozen model's image Î0 (LoRA disabled, no grad) and its mask, from the
   reference cache (computed once per pair, then reused every epoch);
3. policy: sample the same prompts from the same x_T with the LoRA on, gradient through the
   last K steps (DRaFT-K / -LV / full), decode inside the graph;
4. loss = −Σ_a w_a r_a(Î) + β ‖(1 − M) ⊙ (Î − Î0)‖_F, backward;
5. average LoRA gradients over processes, clip, skip the update if anything is non-finite,
   AdamW step, log, checkpoint.

Run directory layout (``train.output_dir``)::

    config.yaml                 resolved config
    log.jsonl                   one JSON line per step
    checkpoints/step_000050/    lora.safetensors, optimizer.pt, scheduler.pt, state.json
    reference_cache/            Î0, latents and mask per pool item (safetensors)
    samples/step_000050.png     reference row / fine-tuned row
    lora/pytorch_lora_weights.safetensors   final LoRA (diffusers format)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from focusnfix import masks as mask_ops
from focusnfix.aspects import Aspect
from focusnfix.backbones import Backbone, load_backbone
from focusnfix.config import Config, dump_config, resolve_prompts
from focusnfix.errors import InputError
from focusnfix.images import grid, save_png
from focusnfix.lora import add_lora, load_lora_state_dict, lora_parameters, lora_state_dict, save_lora_weights
from focusnfix.objective import focus_n_fix_loss
from focusnfix.reference import Reference, ReferenceCache, build_aspects, compute_reference, sampling_options  # noqa: F401
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


def _lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return fn


def config_fingerprint(config: Config) -> str:
    """Hash of everything that must not change between a run and its resume."""
    data = config.model_dump(mode="json")
    data["train"].pop("steps")  # extending a finished run is allowed
    data["train"].pop("checkpoint_every")
    data["train"].pop("sample_every")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


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
        self.accelerator = accelerator or Accelerator(
            mixed_precision=tc.mixed_precision, cpu=tc.device == "cpu"
        )
        self.progress = progress
        self.run_dir = Path(tc.output_dir)
        self.prompts = resolve_prompts(config.data)
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
        self.aspects = aspects if aspects is not None else build_aspects(config)
        if len(self.aspects) != len(config.aspects):
            raise InputError(f"{len(self.aspects)} aspects given but the config lists {len(config.aspects)}")
        for a in self.aspects:
            a.to(self.accelerator.device).eval().requires_grad_(False)
        self.weights = [a.weight for a in config.aspects]
        self.localize = [a.localize for a in config.aspects]
        self.options = sampling_options(config)

        lc = config.lora
        # same LoRA init on every process and every run (PEFT draws lora_A from the global RNG)
        torch.manual_seed(tc.seed)
        self.params = add_lora(self.backbone.unet, lc.rank, lc.alpha, lc.target_modules, lc.dropout)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=tc.learning_rate, betas=tc.adam_betas, weight_decay=tc.weight_decay
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(tc.lr_scheduler, tc.warmup_steps, tc.steps)
        )
        # Only the optimizer goes through accelerate (fp16 loss scaling). The UNet is not wrapped
        # in DDP: LoRA gradients are averaged explicitly in _sync_gradients, which works for any
        # number of UNet calls per backward (DDP's reducer does not).
        self.optimizer = self.accelerator.prepare(self.optimizer)
        cache_dir = self.run_dir / "reference_cache" if config.data.cache_on_disk else None
        self.cache = ReferenceCache(self._compute_reference, cache_dir)
        self.step = 0

    # -- pieces --------------------------------------------------------------------------------
    def _compute_reference(self, prompts: list[str], seeds: list[int]) -> Reference:
        with self.accelerator.autocast():
            return compute_reference(
                self.backbone, self.aspects, self.localize, prompts, seeds, self.options, self.config.mask
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

    def loss_on(self, step: int, micro: int) -> dict[str, Any]:
        """Forward one micro-batch and return the loss terms (loss keeps its graph)."""
        idx, prompts, seeds = self.local_batch_items(step, micro)
        device = self.accelerator.device
        ref = self.cache.get(idx, prompts, seeds, device)
        rank = self.accelerator.process_index
        generator = torch.Generator().manual_seed(hash((self.config.train.seed, step, micro, rank)) % 2**63)
        with self.accelerator.autocast():
            out = sample(self.backbone, prompts, seeds, self.options, generator=generator)
            images = out.images.float()
            reward, parts = self.total_reward(images, prompts)
            if out.extra_images is not None:  # DRaFT-LV: average the reward over re-noisings
                for extra in out.extra_images:
                    reward = reward + self.total_reward(extra.float(), prompts)[0]
                reward = reward / (1 + out.extra_images.shape[0])
            if self.config.objective.space == "latent":
                policy, reference = out.latents.float(), ref.latents
            else:
                policy, reference = images, ref.images
            terms = focus_n_fix_loss(
                reward, policy, reference, ref.mask, self.config.objective.beta, self.config.objective.norm
            )
        change = (images.detach() - ref.images).abs().mean(dim=1, keepdim=True)
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
            self.accelerator.backward(terms["loss"] / tc.grad_accum)
            for key in ("loss", "reward", "constraint", "mask_area", "outside_change"):
                acc.setdefault(key, []).append(terms[key].detach().reshape(-1))
            for name, r in terms["parts"].items():
                acc.setdefault(f"reward/{name}", []).append(r.reshape(-1))
        self._sync_gradients()
        grad_norm = self.accelerator.clip_grad_norm_(self.params, tc.max_grad_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        record: dict[str, Any] = {"step": step + 1}
        for key, values in acc.items():
            record[key] = self._mean_over_processes(torch.cat(values))
        finite = math.isfinite(record["loss"]) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.lr_scheduler.step()
        else:  # never write non-finite weights: drop this update and say so
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        record.update(
            grad_norm=grad_norm,
            lr=self.lr_scheduler.get_last_lr()[0],
            skipped=not finite,
            seconds=round(time.perf_counter() - t0, 4),
        )
        return record

    # -- run directory ---------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.jsonl"

    def _checkpoint_dirs(self) -> list[Path]:
        root = self.run_dir / "checkpoints"
        if not root.is_dir():
            return []
        done = [d for d in root.glob("step_*") if (d / "state.json").is_file()]
        return sorted(done, key=lambda d: int(d.name.split("_")[1]))

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step_N`` atomically (main process); prune old ones."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        root = self.run_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{self.step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp_", dir=root))
        try:
            save_file(lora_state_dict(self.backbone.unet), str(tmp / "lora.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
            state = {"step": self.step, "fingerprint": config_fingerprint(self.config)}
            (tmp / "state.json").write_text(json.dumps(state))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in self._checkpoint_dirs()[: -self.config.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        if state.get("fingerprint") != config_fingerprint(self.config):
            raise InputError(
                f"checkpoint {path} was written with a different config; resume needs the same config "
                "(only train.steps, checkpoint_every and sample_every may change)"
            )
        load_lora_state_dict(self.backbone.unet, load_file(str(path / "lora.safetensors"), device="cpu"))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        self.step = int(state["step"])

    def _truncate_log(self, step: int) -> None:
        if not self.log_path.is_file():
            return
        keep = [
            line for line in self.log_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
        ]
        tmp = self.log_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.log_path)

    def _prepare_run_dir(self, resume: bool) -> None:
        main = self.accelerator.is_main_process
        if resume:
            ckpts = self._checkpoint_dirs()
            if ckpts:
                self.load_checkpoint(ckpts[-1])
                if main:
                    self._truncate_log(self.step)
                    print(f"resuming from {ckpts[-1]} (step {self.step})")
            elif main:
                print(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}; starting from step 0")
        elif main and self._checkpoint_dirs():
            raise InputError(
                f"{self.run_dir} already holds checkpoints; pass --resume to continue or choose another train.output_dir"
            )
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(self.config))
            if not resume and self.log_path.exists():
                self.log_path.unlink()
        self.accelerator.wait_for_everyone()

    def save_samples(self, name: str) -> Path | None:
        """Reference row above fine-tuned row for the first pool items."""
        if not self.accelerator.is_main_process:
            return None
        n = min(self.config.train.num_sample_images, len(self.pool))
        items = self.pool[:n]
        prompts, seeds = [p for p, _ in items], [s for _, s in items]
        ref = self.cache.get(list(range(n)), prompts, seeds, self.accelerator.device)
        with torch.no_grad(), self.accelerator.autocast():
            now = sample(self.backbone, prompts, seeds, self.options).images.float()
        from focusnfix.images import overlay

        rows = [overlay(ref.images, ref.mask, 0.35), ref.images, now, (now - ref.images).abs().mul(4).clamp(0, 1)]
        return save_png(grid([r.cpu() for r in rows], scale=2), self.run_dir / "samples" / f"{name}.png")

    # -- the loop --------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> TrainResult:
        tc = self.config.train
        self._prepare_run_dir(resume)
        main = self.accelerator.is_main_process
        bar = tqdm(total=tc.steps, initial=self.step, disable=not (self.progress and main), desc="focusnfix")
        log = open(self.log_path, "a") if main else None  # noqa: SIM115 - closed below
        try:
            while self.step < tc.steps:
                record = self.train_step(self.step)
                self.step += 1
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", reward=f"{record['reward']:.4f}", c=f"{record['constraint']:.4f}"
                )
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self.save_checkpoint()
                if tc.sample_every and self.step % tc.sample_every == 0:
                    self.save_samples(f"step_{self.step:06d}")
        finally:
            bar.close()
            if log is not None:
                log.close()
        lora_dir = self.run_dir / "lora"
        self.accelerator.wait_for_everyone()
        if main:
            save_lora_weights(self.backbone.unet, type(self.backbone.pipe), lora_dir)
        self.save_samples("final")
        self.accelerator.wait_for_everyone()
        return TrainResult(self.run_dir, lora_dir, self.step, self.log_path)


def lora_vector(unet: torch.nn.Module) -> torch.Tensor:
    """All LoRA parameters as one flat fp32 vector (tests, multi-process checks)."""
    return torch.cat([p.detach().float().reshape(-1).cpu() for p in lora_parameters(unet)])
