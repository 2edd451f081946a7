"""Trainer: exact step 0, the regional constraint at work, LoRA files, resume, NaN guard."""

import json
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from focusnfix.config import config_from_dict
from focusnfix.errors import InputError
from focusnfix.lora import LORA_WEIGHT_NAME, lora_parameters
from focusnfix.sampling import sample
from focusnfix.train import FocusNFixTrainer, lora_vector

from conftest import base_config, train_until_crash


def make_trainer(tiny_sd_dir, tmp_path, name="run", **train):
    cfg = config_from_dict(base_config(str(tiny_sd_dir), str(tmp_path / name), **train))
    return FocusNFixTrainer(cfg, progress=False)


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_step_zero_policy_equals_reference_and_constraint_is_exactly_zero(tiny_sd_dir, tmp_path, space):
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"))
    cfg["objective"]["space"] = space  # latent: Î0's latents, stored compactly, still give exactly 0
    trainer = FocusNFixTrainer(config_from_dict(cfg), progress=False)
    terms = trainer.loss_on(step=0, micro=0)
    assert torch.equal(terms["constraint"], torch.zeros(2))
    assert torch.equal(terms["outside_change"], torch.zeros(2))
    assert terms["mask_area"].tolist() == [0.5, 0.5]  # the left half
    terms["loss"].backward()
    grads = [p.grad for p in lora_parameters(trainer.backbone.unet)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # the same batch with its reference read back from the compact cache (uint8 images, fp16 latents)
    _, prompts, seeds = trainer.local_batch_items(0, 0)
    trainer.cache.get(prompts, seeds)
    assert not trainer.cache.missing(prompts, seeds)
    cached = trainer.loss_on(step=0, micro=0)
    assert torch.equal(cached["constraint"], torch.zeros(2))  # the stored items' tolerance keeps it exactly 0


def test_reference_prefill_and_step_zero_reuse_give_the_computed_reference(tiny_sd_dir, tmp_path):
    """Before step 1 every reference item that a later step draws is computed in large batches
    (none that no step draws); step 0's come from the zero LoRA's own sample and equal
    compute_reference's items bit for bit."""
    from focusnfix.cache import encode_item
    from focusnfix.reference import compute_reference

    trainer = make_trainer(tiny_sd_dir, tmp_path, steps=2, batch_size=2)
    trainer.config.data.cache_on_disk = False
    assert trainer.lora_is_zero()
    step0, drawn = trainer.step_zero_items(), trainer.items_drawn(0, 2)
    assert drawn == step0 | trainer.items_drawn(1, 2) and len(drawn) < len(trainer.pool)  # one item is never drawn
    stats = trainer.prefill_reference()
    assert stats["items"] == len(drawn - step0)
    missing = set(trainer.cache.missing([p for p, _ in trainer.pool], [s for _, s in trainer.pool]))
    assert missing == set(range(len(trainer.pool))) - (drawn - step0)  # step 0's left to step 0, the rest never
    trainer.loss_on(step=0, micro=0)
    assert set(trainer.cache.missing([p for p, _ in trainer.pool], [s for _, s in trainer.pool])) == \
        set(range(len(trainer.pool))) - drawn
    assert trainer.cache.stats["computed"] == len(drawn)
    prompts = [trainer.pool[i][0] for i in sorted(step0)]
    seeds = [trainer.pool[i][1] for i in sorted(step0)]
    fresh = compute_reference(trainer.backbone, trainer.aspects, trainer.localize, prompts, seeds, trainer.options,
                              trainer.config.mask, [a.gate for a in trainer.config.aspects])
    for j, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
        want = encode_item(fresh.images[j], fresh.latents[j], fresh.heatmap[j], fresh.mask[j])
        got = trainer.cache.ram[trainer.cache.key(p, s)]
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # a LoRA that is not zero (a resumed or initialised run) never stands in for the reference
    with torch.no_grad():
        next(p for n, p in trainer.backbone.unet.named_parameters() if "lora_B" in n).add_(0.1)
    assert not trainer.lora_is_zero()


def _outside_change(trainer):
    """Mean |Î - Î0| over the right half (outside the left-half mask) and the mean reward,
    on the whole training pool."""
    prompts = [p for p, _ in trainer.pool]
    seeds = [s for _, s in trainer.pool]
    with torch.no_grad():
        now = sample(trainer.backbone, prompts, seeds, trainer.options).images
        with trainer.backbone.adapters_disabled():
            ref = sample(trainer.backbone, prompts, seeds, trainer.options).images
    w = now.shape[-1]
    outside = (now - ref)[..., w // 2 :].abs().mean().item()
    return outside, now.mean().item(), ref.mean().item()


@pytest.mark.slow
def test_constraint_keeps_outside_unchanged_while_reward_rises(tiny_sd_dir, tmp_path):
    """Reward = mean brightness (wants change everywhere), mask = left half."""
    results = {}
    for beta in (0.0, 0.03):
        cfg = base_config(str(tiny_sd_dir), str(tmp_path / f"beta{beta}"), steps=40, learning_rate=1e-2)
        cfg["objective"]["beta"] = beta
        # convolutions too: a random tiny UNet needs them to brighten one half only
        cfg["lora"]["target_modules"] = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_out"]
        trainer = FocusNFixTrainer(config_from_dict(cfg), progress=False)
        trainer.train()
        results[beta] = _outside_change(trainer)
    (draft_out, draft_r, base_r), (fnf_out, fnf_r, _) = results[0.0], results[0.03]
    print(f"\noutside |change|: DRaFT {draft_out:.5f}  Focus-N-Fix {fnf_out:.5f}  ratio {draft_out / fnf_out:.1f}")
    print(f"reward (mean brightness): base {base_r:.5f}  DRaFT {draft_r:.5f}  Focus-N-Fix {fnf_r:.5f}")
    assert draft_out >= 10 * fnf_out
    assert fnf_r > base_r + 1e-3 and draft_r > base_r + 1e-3


def test_run_directory_and_lora_loads_in_a_plain_pipeline(tiny_sd_dir, tmp_path):
    trainer = make_trainer(tiny_sd_dir, tmp_path, steps=3, checkpoint_every=2, sample_every=2)
    result = trainer.train()
    run = result.run_dir
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for key in ("loss", "reward", "constraint", "mask_area", "grad_norm", "seconds", "lr", "skipped"):
        assert key in lines[0]
    assert (run / "config.yaml").is_file() and (run / "samples" / "step_000002.png").is_file()
    assert (run / "checkpoints" / "step_000002" / "lora.safetensors").is_file()
    weights = run / "lora" / LORA_WEIGHT_NAME
    assert weights.is_file()
    assert all(k.startswith("unet.") for k in load_file(str(weights)))

    # a plain diffusers pipeline loads the LoRA and draws what our sampler draws
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)
    pipe.load_lora_weights(str(run / "lora"))
    with torch.no_grad():
        theirs = pipe(["a red circle"], num_inference_steps=4, guidance_scale=3.0,
                      generator=torch.Generator().manual_seed(5), output_type="pt").images
        ours = sample(trainer.backbone, ["a red circle"], [5], trainer.options).images
        with trainer.backbone.adapters_disabled():
            base = sample(trainer.backbone, ["a red circle"], [5], trainer.options).images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (ours - base).abs().max() > 1e-3  # the LoRA did change the image


def test_resume_after_a_crash_ends_with_the_same_lora(tiny_sd_dir, tmp_path, monkeypatch):
    straight = make_trainer(tiny_sd_dir, tmp_path, "straight", steps=5, checkpoint_every=2)
    straight.train()
    want = lora_vector(straight.backbone.unet)

    crashed = make_trainer(tiny_sd_dir, tmp_path, "crashed", steps=5, checkpoint_every=2)
    train_until_crash(crashed, monkeypatch, crash_step=3)
    assert not (tmp_path / "crashed" / "lora").exists()
    resumed = make_trainer(tiny_sd_dir, tmp_path, "crashed", steps=5, checkpoint_every=2)
    resumed.train(resume=True)
    assert torch.equal(lora_vector(resumed.backbone.unet), want)
    steps = [json.loads(x)["step"] for x in (tmp_path / "crashed" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_refuses_a_changed_config_and_fresh_run_refuses_old_checkpoints(tiny_sd_dir, tmp_path):
    from focusnfix.errors import InputError

    make_trainer(tiny_sd_dir, tmp_path, "r", steps=2, checkpoint_every=1).train()
    with pytest.raises(InputError, match="--resume"):
        make_trainer(tiny_sd_dir, tmp_path, "r", steps=2, checkpoint_every=1).train()
    with pytest.raises(InputError, match="train.learning_rate changed"):
        make_trainer(tiny_sd_dir, tmp_path, "r", steps=3, learning_rate=1e-3).train(resume=True)


class _NaNOnce:
    def __init__(self, aspect, bad_step_calls):
        self.aspect, self.calls, self.bad = aspect, 0, bad_step_calls

    def __call__(self, images, prompts):
        self.calls += 1
        r = self.aspect.reward(images, prompts)
        return r * float("nan") if self.calls in self.bad else r


def test_non_finite_step_is_skipped_and_logged(tiny_sd_dir, tmp_path):
    trainer = make_trainer(tiny_sd_dir, tmp_path, steps=3)
    aspect = trainer.aspects[0]
    hook = _NaNOnce(type(aspect)(), bad_step_calls={2})
    aspect.reward = hook  # the 2nd reward call (step 2) is NaN
    around: dict[int, list[torch.Tensor]] = {}
    real_step = trainer.train_step

    def recorded(step):  # the LoRA before and after each step
        before = lora_vector(trainer.backbone.unet).clone()
        out = real_step(step)
        around[step] = [before, lora_vector(trainer.backbone.unet).clone()]
        return out

    trainer.train_step = recorded
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in lines] == [False, True, False]
    assert math.isnan(lines[1]["loss"])
    assert torch.equal(*around[1])  # the skipped step left the LoRA (and Adam's state) alone
    assert not torch.equal(*around[0]) and not torch.equal(*around[2])
    assert torch.isfinite(lora_vector(trainer.backbone.unet)).all()


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_sd_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "killed"), steps=10, checkpoint_every=2)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(__file__))
    cmd = [sys.executable, "-m", "focusnfix.cli", "train", "--config", str(path), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = tmp_path / "killed" / "checkpoints" / "step_000004" / "state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), proc.stderr.read().decode()[-2000:]
    assert not (tmp_path / "killed" / "lora").exists(), "run finished before it could be killed"
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout

    torch.set_num_threads(1)  # the same kernels' reduction order as the OMP_NUM_THREADS=1 subprocess
    straight = make_trainer(tiny_sd_dir, tmp_path, "straight", steps=10, checkpoint_every=2)
    straight.train()
    a = load_file(str(tmp_path / "killed" / "lora" / LORA_WEIGHT_NAME))
    b = load_file(str(tmp_path / "straight" / "lora" / LORA_WEIGHT_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_an_existing_lora_and_resume_from_a_named_checkpoint(tiny_sd_dir, tmp_path):
    first = make_trainer(tiny_sd_dir, tmp_path, name="first", steps=4, checkpoint_every=2, keep_checkpoints=3)
    result = first.train()
    trained = lora_vector(first.backbone.unet)
    # a new run that starts from the first run's LoRA: its adapter is that LoRA before step 1
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "second"), steps=1)
    cfg["lora"]["init_from"] = str(result.lora_dir)
    second = FocusNFixTrainer(config_from_dict(cfg), progress=False)
    torch.testing.assert_close(lora_vector(second.backbone.unet), trained, rtol=0, atol=0)
    assert not second.lora_is_zero() and "init_from_sha256" in second.run_fields["lora"]
    cfg["lora"]["rank"] = 2  # another rank: refused with the shapes named
    with pytest.raises(InputError, match="does not fit"):
        FocusNFixTrainer(config_from_dict(cfg), progress=False)
    # --resume PATH: continue from the step-2 checkpoint, not the latest (step 4)
    again = make_trainer(tiny_sd_dir, tmp_path, name="first", steps=4, checkpoint_every=2, keep_checkpoints=3)
    again.train(resume=str(tmp_path / "first" / "checkpoints" / "step_000002"))
    torch.testing.assert_close(lora_vector(again.backbone.unet), trained)  # the same last two steps again
    with pytest.raises(InputError, match="not a checkpoint"):
        make_trainer(tiny_sd_dir, tmp_path, name="first", steps=4).train(resume=str(tmp_path / "nowhere"))


def test_lora_active_steps_train_from_the_cached_frozen_prefix(tiny_sd_dir, tmp_path):
    """lora.active_steps = k: reference items hold the frozen prefix's latents; a step runs only
    the last k UNet calls from them, gives the same loss and LoRA gradient as the whole chain, a
    zero constraint at step 0, and the saved LoRA records its active steps."""
    from focusnfix.lora import lora_active_steps

    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "late"), steps=2)
    cfg["lora"]["active_steps"] = 2
    trainer = FocusNFixTrainer(config_from_dict(cfg), progress=False)
    terms = trainer.loss_on(step=0, micro=0)  # step 0: from the zero LoRA's own sample
    assert torch.equal(terms["constraint"], torch.zeros(2))
    trainer.prefill_reference()
    with torch.no_grad():
        for p in lora_parameters(trainer.backbone.unet):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    _, prompts, seeds = trainer.local_batch_items(1, 0)
    ref = trainer.cache.get(prompts, seeds)
    assert ref.prefix_latents is not None and ref.prefix_latents.dtype == torch.float32
    calls = []
    handle = trainer.backbone.unet.register_forward_hook(lambda m, i, o: calls.append(1))
    terms = trainer.loss_on(step=1, micro=0)
    handle.remove()
    assert len(calls) == 2  # the last k calls only (the tiny UNet is called once per step: CFG is batched)
    terms["loss"].sum().backward()
    cached = [p.grad.clone() for p in lora_parameters(trainer.backbone.unet)]
    trainer.optimizer.zero_grad(set_to_none=True)
    whole = sample(trainer.backbone, prompts, seeds, trainer.options)  # the frozen prefix recomputed
    assert whole.prefix_latents is not None
    # equal up to float rounding: the prefill computed some of these items in a batch of another size
    torch.testing.assert_close(whole.prefix_latents, ref.prefix_latents, atol=2e-5, rtol=0)
    reward, _ = trainer.total_reward(whole.images.float(), prompts)
    from focusnfix.objective import focus_n_fix_loss

    again = focus_n_fix_loss(reward, whole.images.float(), ref.images, ref.mask, 1.0, "frobenius",
                             tolerance=ref.image_tolerance)
    torch.testing.assert_close(again.loss, terms["loss"].detach(), atol=1e-5, rtol=1e-5)
    again.loss.sum().backward()
    for a, p in zip(cached, lora_parameters(trainer.backbone.unet), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-4)
    result = FocusNFixTrainer(config_from_dict({**cfg, "train": {**cfg["train"], "output_dir": str(tmp_path / "r2")}}),
                              progress=False).train()
    assert lora_active_steps(result.lora_dir) == 2


def test_beta_schedule_is_applied_and_logged_per_step(tiny_sd_dir, tmp_path):
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "ramp"))
    cfg["objective"] |= {"beta": 1.0, "beta_end": 3.0, "beta_ramp_start": 0.25}
    trainer = FocusNFixTrainer(config_from_dict(cfg), progress=False)
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "ramp" / "log.jsonl").read_text().splitlines()]
    assert [r["beta"] for r in lines] == [1.0, 1.0, 2.0, 3.0]
    for r in lines:  # the loss used that step's beta
        assert r["loss"] == pytest.approx(-r["reward"] + r["beta"] * r["constraint"], rel=1e-5, abs=1e-6)
    with pytest.raises(Exception, match="beta_ramp_start"):
        config_from_dict(cfg | {"objective": {"beta": 1.0, "beta_end": 2.0, "beta_ramp_start": 1.0}})


def test_the_reward_is_the_weighted_sum_and_weight_zero_aspects_are_not_scored(tiny_sd_dir, tmp_path):
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"))

    def bright(name: str, region: str, weight: float, localize: bool) -> dict:
        return {"type": "python", "name": name, "weight": weight, "localize": localize,
                "args": {"target": "toy_aspects:brightness", "kwargs": {"region": region}}}

    cfg["aspects"] = [bright("left", "left", 2.0, True), bright("whole", "all", -0.5, False),
                      bright("unused", "all", 0.0, False)]
    trainer = FocusNFixTrainer(config_from_dict(cfg), progress=False)
    calls = []
    unused = trainer.aspects[2]
    real = unused.reward
    unused.reward = lambda images, prompts: calls.append(1) or real(images, prompts)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    total, parts = trainer.total_reward(images, ["a", "b"])
    left, whole = (a.reward(images, ["a", "b"]).float() for a in trainer.aspects[:2])
    assert torch.equal(total, 2.0 * left + -0.5 * whole)
    assert set(parts) == {"left", "whole"} and not calls  # a weight-0 aspect is not even scored
    torch.testing.assert_close(total, 1.5 * left)  # the two rewards are the same brightness here


@pytest.mark.parametrize("region", ["none", "left"])
def test_a_composite_reward_reaches_the_lora_only_through_the_mask(tiny_sd_dir, tmp_path, region):
    """objective.reward_input: composite scores M * policy + (1 - M) * Î0: with an empty mask the reward
    does not see the policy at all (zero LoRA gradient at beta 0); with the left half it does."""
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"))
    cfg["objective"] = {"beta": 0.0, "reward_input": "composite"}
    cfg["aspects"][0]["args"]["kwargs"]["region"] = region
    trainer = FocusNFixTrainer(config_from_dict(cfg), progress=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a LoRA that is not zero: the policy differs from Î0
        for p in lora_parameters(trainer.backbone.unet):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    terms = trainer.loss_on(step=1, micro=0)
    assert terms["mask_area"].tolist() == ([0.0, 0.0] if region == "none" else [0.5, 0.5])
    terms["loss"].backward()
    grad = sum(float(p.grad.abs().sum()) for p in lora_parameters(trainer.backbone.unet) if p.grad is not None)
    assert (grad == 0.0) if region == "none" else (grad > 0)


def test_gradient_accumulation_averages_the_micro_batches_gradients(tiny_sd_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_sd_dir, tmp_path, grad_accum=2, max_grad_norm=1e9)
    params = lora_parameters(trainer.backbone.unet)
    want = []
    for micro in (0, 1):  # each micro-batch's gradient alone
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.loss_on(step=1, micro=micro)["loss"].backward()
        want.append([p.grad.clone() for p in params])
    trainer.optimizer.zero_grad(set_to_none=True)
    seen = []
    clip = torch.nn.utils.clip_grad_norm_  # the step's gradients, as clipping (a no-op here) sees them
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda ps, n: seen.append([p.grad.clone() for p in params]) or clip(ps, n))
    trainer.train_step(1)
    assert len(seen) == 1
    for got, a, b in zip(seen[0], *want, strict=True):
        torch.testing.assert_close(got, (a + b) / 2, rtol=1e-5, atol=1e-8)
    assert not all(torch.allclose(a, b) for a, b in zip(*want, strict=True))  # two different micro-batches


def test_draft_lv_averages_the_reward_over_the_sample_and_its_renoisings(tiny_sd_dir, tmp_path):
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"))
    cfg["sampling"] |= {"grad_mode": "draft_lv", "lv_n": 2}
    trainer = FocusNFixTrainer(config_from_dict(cfg), progress=False)
    scored = []
    real = trainer.total_reward

    def recording(images, prompts):
        total, parts = real(images, prompts)
        scored.append((images.detach().clone(), total.detach()))
        return total, parts

    trainer.total_reward = recording
    terms = trainer.loss_on(step=1, micro=0)
    assert len(scored) == 3  # the sample and its 2 re-noisings, each scored
    assert not torch.equal(scored[0][0], scored[1][0]) and not torch.equal(scored[1][0], scored[2][0])
    torch.testing.assert_close(terms["reward"].detach(), sum(r for _, r in scored) / 3)


def test_lora_dropout_acts_in_training_only_never_on_sampled_images(tiny_sd_dir, tmp_path):
    """With lora.dropout > 0 the graded calls drop out; training samples, validation images and
    a loaded LoRA's images do not (PEFT makes its layers in train mode)."""
    from focusnfix.backbones import load_backbone
    from focusnfix.evaluate import load_lora

    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"), steps=2)
    cfg["lora"] = {"rank": 4, "dropout": 0.5}
    cfg["sampling"]["merge_lora"] = False  # every call through the LoRA branch, where dropout lives
    cfg["data"]["validation_prompts"] = ["a blue circle"]
    trainer = FocusNFixTrainer(config_from_dict(cfg), progress=False)
    trainer.train()
    assert any(m.training for m in trainer.backbone.unet.modules())  # the LoRA's dropout is on in training
    first, again = trainer.save_samples("a"), trainer.save_samples("b")
    assert first.read_bytes() == again.read_bytes()
    assert trainer.save_validation("a").read_bytes() == trainer.save_validation("b").read_bytes()
    assert any(m.training for m in trainer.backbone.unet.modules())  # and on again after them

    backbone = load_backbone(str(tiny_sd_dir))
    load_lora(backbone, "run", tmp_path / "run")
    opts = trainer.options
    with torch.no_grad():
        one, two = (sample(backbone, ["a red circle"], [3], opts).images for _ in range(2))
    assert torch.equal(one, two)


def test_user_masks_keyed_by_seed_reach_every_reference_item(tiny_sd_dir, tmp_path):
    """A mask_files index keyed by (prompt, seed): the step-0 reuse, the prefill and a later cache
    fill all give each item its own seed's mask."""
    import numpy as np
    from PIL import Image

    size = 32  # the tiny pipeline's image size
    masks = tmp_path / "masks"
    masks.mkdir()
    for side in ("left", "right"):
        arr = np.zeros((size, size), np.uint8)
        arr[:, slice(0, size // 2) if side == "left" else slice(size // 2, None)] = 255
        Image.fromarray(arr).save(masks / f"{side}.png")
    index = {"a red circle": {"0": "left.png", "1": "right.png"}, "a blue square": {"0": "right.png", "1": "left.png"}}
    (masks / "index.json").write_text(json.dumps(index))
    cfg = base_config(str(tiny_sd_dir), str(tmp_path / "run"), steps=2, batch_size=2)
    cfg["aspects"] = [
        {"type": "python", "localize": False, "args": {"target": "toy_aspects:brightness", "kwargs": {"region": "left"}}},
        {"type": "mask_files", "weight": 0, "args": {"path": str(masks)}},
    ]
    trainer = FocusNFixTrainer(config_from_dict(cfg), progress=False)
    trainer.train()
    prompts, seeds = [p for p, _ in trainer.pool], [s for _, s in trainer.pool]
    ref = trainer.cache.get(prompts, seeds)
    for j, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
        left = index[p][str(s)] == "left.png"
        half = ref.mask[j, 0, :, : size // 2] if left else ref.mask[j, 0, :, size // 2:]
        other = ref.mask[j, 0, :, size // 2:] if left else ref.mask[j, 0, :, : size // 2]
        assert half.eq(1).all() and other.eq(0).all(), (p, s)
