"""Worker for test_multiprocess.py: run under torchrun / accelerate with 2 processes.

Writes, per rank, the LoRA gradient of step 0 (after the cross-process average) and the
LoRA weights after training, so the test can compare ranks and the single-process run.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from safetensors.torch import save_file  # noqa: E402

from focusnfix.config import config_from_dict  # noqa: E402
from focusnfix.lora import lora_parameters  # noqa: E402
from focusnfix.train import FocusNFixTrainer, lora_vector  # noqa: E402

from conftest import base_config  # noqa: E402


def main(model: str, out: str) -> None:
    cfg = config_from_dict(base_config(model, f"{out}/run", steps=3, batch_size=4))
    trainer = FocusNFixTrainer(cfg, progress=False)
    rank = trainer.accelerator.process_index
    params = lora_parameters(trainer.backbone.unet)
    init = lora_vector(trainer.backbone.unet)
    terms = trainer.loss_on(step=0, micro=0)
    trainer.accelerator.backward(terms["loss"])
    trainer._sync_gradients()
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.train()
    save_file(
        {"init": init, "grad0": grad.contiguous(), "final": lora_vector(trainer.backbone.unet)},
        f"{out}/rank{rank}.safetensors",
    )
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"num_processes": trainer.accelerator.num_processes}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
