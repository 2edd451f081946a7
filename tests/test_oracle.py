"""The objective oracle: per-image latent optimization under the Focus-N-Fix objective."""

import pytest
import torch

from focusnfix.oracle import optimize_latents


def _identity_decode(z: torch.Tensor) -> torch.Tensor:
    return z.clamp(0, 1)


def _brightness_reward(x: torch.Tensor) -> torch.Tensor:
    # wants every pixel at 1: a reward that, unconstrained, changes the whole image
    return -((x - 1.0) ** 2).flatten(1).sum(1)


def test_zero_steps_return_the_reference_and_a_zero_constraint():
    z = torch.rand(2, 3, 8, 8) * 0.5
    mask = torch.zeros(2, 1, 8, 8)
    res = optimize_latents(_identity_decode, _brightness_reward, z, z.clone(), mask, beta=1.0, steps=0)
    assert torch.equal(res.images, z)
    assert torch.equal(res.constraint, torch.zeros(2))
    assert torch.allclose(res.reward, _brightness_reward(z))


def test_a_strong_constraint_confines_the_change_to_the_mask():
    torch.manual_seed(0)
    z = torch.rand(2, 3, 8, 8) * 0.5
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 2:5] = 1
    free = optimize_latents(_identity_decode, _brightness_reward, z, z.clone(), mask, beta=0.0, steps=150, lr=0.05)
    held = optimize_latents(_identity_decode, _brightness_reward, z, z.clone(), mask, beta=50.0, steps=150, lr=0.05)
    inside = mask.expand_as(z).bool()
    # both raise the reward inside the mask
    assert (held.images[inside] - z[inside]).mean() > 0.3 and (free.images[inside] - z[inside]).mean() > 0.3
    # without the constraint the outside moves too; with it, it stays within Adam's final step size
    assert (free.images[~inside] - z[~inside]).abs().mean() > 0.3
    assert (held.images[~inside] - z[~inside]).abs().max() < 0.06
    assert held.constraint.max() < free.constraint.min()


def test_images_are_optimized_independently():
    torch.manual_seed(1)
    z = torch.rand(3, 3, 8, 8) * 0.5
    mask = torch.zeros(3, 1, 8, 8)
    mask[:, :, :4] = 1
    both = optimize_latents(_identity_decode, _brightness_reward, z, z.clone(), mask, beta=2.0, steps=20)
    one = optimize_latents(_identity_decode, _brightness_reward, z[1:2], z[1:2].clone(), mask[1:2], beta=2.0, steps=20)
    assert torch.allclose(both.images[1:2], one.images, atol=1e-6)


def test_bad_beta_and_steps_are_rejected():
    z = torch.rand(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="beta"):
        optimize_latents(_identity_decode, _brightness_reward, z, z, mask, beta=-1.0)
    with pytest.raises(ValueError, match="steps"):
        optimize_latents(_identity_decode, _brightness_reward, z, z, mask, beta=1.0, steps=-2)


def test_cli_oracle_on_the_toy_world_starts_from_the_reference_exactly(tmp_path, capsys):
    """Zero steps: every image is the frozen model's, so nothing is removed and the outside is untouched."""
    import json
    from pathlib import Path

    from focusnfix.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "toy_safety.yaml"
    out = tmp_path / "oracle"
    assert main(["oracle", "--config", str(config), "--max-prompts", "3", "--steps", "0", "--betas", "0,2",
                 "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "oracle.json").read_text())
    assert doc["n"] == 3 and set(doc["betas"]) == {"0", "2"} and (out / "oracle.png").is_file()
    for entry in doc["betas"].values():
        assert entry["reward"] == pytest.approx(doc["base"]["reward"], abs=1e-5)
        assert entry["outside_psnr"] == pytest.approx(100.0) and entry["inside_change"] == 0.0
        assert entry["judge_new_defect"] in (None, 0.0) and entry["judge_removal"] in (None, 0.0)
    assert main(["oracle", "--config", str(config), "--steps", "-1", "--out", str(out)]) == 2
