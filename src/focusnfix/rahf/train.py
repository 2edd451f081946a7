"""Training of a RAHF-style model: MSE on both heatmaps and all four scores.

loss = mean over heatmaps of MSE(pred_map, gt_map) * ``heatmap_weight``
       + mean over scores of MSE(pred_score, gt_score)

(the RAHF paper's losses: MSE for maps and scores; ours: equal weights by default).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from focusnfix.errors import InputError
from focusnfix.files import read_text
from focusnfix.ops import resize
from focusnfix.rahf.data import RichHFDataset, collate
from focusnfix.rahf.model import HEATMAPS, SCORES, RAHFConfig, RAHFModel


@dataclass
class RAHFTrainConfig:
    """What ``focusnfix rahf train --config FILE`` reads (JSON or YAML; every field optional).

    Attributes:
        model: :class:`RAHFConfig` fields.
        steps: optimizer steps.
        batch_size: images per step.
        learning_rate, weight_decay: AdamW.
        heatmap_weight: weight of the heatmap MSE against the score MSE.
        seed: initialisation and data order.
        log_every: print the loss every N steps (0 = never).
        device: "cpu", "cuda" or "auto".
        num_workers: DataLoader workers.
    """

    model: dict = field(default_factory=dict)
    steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    heatmap_weight: float = 1.0
    seed: int = 0
    log_every: int = 50
    device: str = "auto"
    num_workers: int = 0

    @classmethod
    def load(cls, path: str | Path | None) -> RAHFTrainConfig:
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise InputError(f"--config {path} does not exist")
        try:
            data = yaml.safe_load(read_text(path, "--config")) or {}
        except yaml.YAMLError as err:
            raise InputError(f"--config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise InputError(f"--config {path} must hold a mapping")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"--config {path}: unknown fields {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        cfg = cls(**data)
        RAHFConfig.from_dict(cfg.model)  # validate early
        return cfg


def rahf_loss(out: dict[str, torch.Tensor], maps: torch.Tensor, scores: torch.Tensor,
              heatmap_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE loss of one batch.

    Args:
        out: the model's output dict.
        maps: ``(B, 2, M, M)`` ground-truth implausibility and misalignment maps in [0, 1].
        scores: ``(B, 4)`` ground-truth plausibility, alignment, aesthetics, overall.

    Returns:
        ``(loss, {"heatmap_mse": x, "score_mse": x})``.
    """
    map_losses = []
    for j, name in enumerate(HEATMAPS):
        pred = out[name]
        gt = maps[:, j : j + 1]
        gt = resize(gt, pred.shape[-2:])
        map_losses.append(F.mse_loss(pred, gt))
    score_losses = [F.mse_loss(out[name], scores[:, j]) for j, name in enumerate(SCORES)]
    hm, sc = torch.stack(map_losses).mean(), torch.stack(score_losses).mean()
    return heatmap_weight * hm + sc, {"heatmap_mse": hm.item(), "score_mse": sc.item()}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_rahf(
    config: RAHFTrainConfig, dataset: RichHFDataset | torch.utils.data.Dataset, out_dir: str | Path,
    log=print,
) -> tuple[RAHFModel, list[dict]]:
    """Train a model on ``dataset`` and save it to ``out_dir`` (``rahf_config.json``,
    ``model.safetensors``, ``train_log.jsonl``). Returns the model and the log records."""
    torch.manual_seed(config.seed)
    device = _device(config.device)
    model = RAHFModel.from_config(RAHFConfig.from_dict(config.model)).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, collate_fn=collate,
                        num_workers=config.num_workers, generator=torch.Generator().manual_seed(config.seed),
                        drop_last=len(dataset) > config.batch_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    step, start = 0, time.time()
    with open(out_dir / "train_log.jsonl", "w") as log_file:
        while step < config.steps:
            for batch in loader:
                out = model(batch["image"].to(device), batch["prompt"])
                loss, parts = rahf_loss(out, batch["maps"].to(device), batch["scores"].to(device), config.heatmap_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                step += 1
                rec = {"step": step, "loss": loss.item(), **parts, "seconds": round(time.time() - start, 3)}
                records.append(rec)
                log_file.write(json.dumps(rec) + "\n")
                if config.log_every and (step % config.log_every == 0 or step == 1):
                    log(f"step {step}: loss {rec['loss']:.5f} (heatmaps {parts['heatmap_mse']:.5f}, "
                        f"scores {parts['score_mse']:.5f})")
                if step >= config.steps:
                    break
    model.eval()
    model.save_pretrained(out_dir)
    (out_dir / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
    return model, records
