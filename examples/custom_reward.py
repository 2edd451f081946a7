"""Train Focus-N-Fix with your own reward and heatmap, from Python (docs/api.md).

The reward here is hand-written for the toy world: "no dark spots" (the toy pipeline draws an
unwanted dark mark beside some objects). Any differentiable reward works the same way: a
PickScore, a classifier, a VLM score; the heatmap says where the image is bad (1 = may change).

    python examples/custom_reward.py --out runs/custom --steps 20
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from focusnfix import Aspect, FocusNFixTrainer, config_from_dict


class NoDarkSpots(Aspect):
    """Reward: minus the amount of near-black pixels. Heatmap: where they are, blurred a little."""

    name = "no_dark_spots"
    reward_threshold = -1e-3  # at or above: no dark spot worth fixing (the mask gate empties its mask)

    def darkness(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [0, 1] -> (B, 1, H, W)
        luminance = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)
        return F.relu(0.3 - luminance) / 0.3

    def reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -self.darkness(images).mean(dim=(1, 2, 3))  # (B,), differentiable

    def heatmap(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        dark = F.avg_pool2d(self.darkness(images), 5, stride=1, padding=2)
        return (dark / dark.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)).clamp(0, 1)  # (B, 1, H, W)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/custom_reward")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=16, help="toy training prompts to use")
    args = parser.parse_args()

    from focusnfix import toyworld

    config = config_from_dict({
        "model": {"path": "toy"},
        "sampling": {"num_inference_steps": 10, "guidance_scale": 5.0, "k": 2},
        "objective": {"beta": 1.0},
        "mask": {"threshold_mode": "absolute", "threshold": 0.3, "dilate_px": 1},
        # the config names the aspect (its identity keys the reference cache); the object is passed below
        "aspects": [{"type": "python", "name": "no_dark_spots", "args": {"target": "custom_reward:NoDarkSpots"}}],
        "data": {"prompts": toyworld.prompts("fit")[: args.prompts], "seeds_per_prompt": 1},
        "train": {"output_dir": args.out, "steps": args.steps, "batch_size": 4, "learning_rate": 1e-3,
                  "checkpoint_every": 0, "sample_every": 0, "device": "cpu"},
    })
    result = FocusNFixTrainer(config, aspects=[NoDarkSpots()], progress=False).train(overwrite=True)
    print(f"LoRA: {result.lora_dir} ({result.steps_done} steps); log: {result.log_path}")


if __name__ == "__main__":
    main()
