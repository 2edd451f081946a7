"""Sampler: same noise as diffusers, zero-LoRA exactness, gradient only through the last K steps."""

import pytest
import torch
from diffusers import DDIMScheduler

from focusnfix.backbones import load_backbone, make_ddim_scheduler
from focusnfix.lora import add_lora, lora_parameters
from focusnfix.sampling import SamplingOptions, sample

PROMPTS = ["a red circle", "a blue square"]
SEEDS = [3, 7]


@pytest.fixture()
def backbone(tiny_sd_dir):
    return load_backbone(str(tiny_sd_dir))


def _perturb_lora(unet, scale=0.05):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_matches_the_diffusers_pipeline(backbone):
    opts = SamplingOptions(num_inference_steps=5, guidance_scale=4.0)
    with torch.no_grad():
        ours = sample(backbone, PROMPTS[:1], SEEDS[:1], opts).images
        theirs = backbone.pipe(
            PROMPTS[:1], num_inference_steps=5, guidance_scale=4.0,
            generator=torch.Generator().manual_seed(SEEDS[0]), output_type="pt",
        ).images
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_v_prediction_zero_terminal_snr_models_match_the_diffusers_pipeline(tiny_sd_dir, tmp_path):
    """SD 2.x-style schedulers (v-prediction, zero terminal SNR, trailing timesteps) sample as diffusers does."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction",
                                               rescale_betas_zero_snr=True, timestep_spacing="trailing")
    pipe.save_pretrained(tmp_path / "v")
    bb = load_backbone(str(tmp_path / "v"))
    assert bb.scheduler.config.prediction_type == "v_prediction" and bb.scheduler.config.rescale_betas_zero_snr
    with torch.no_grad():
        ours = sample(bb, PROMPTS[:1], SEEDS[:1], SamplingOptions(num_inference_steps=5, guidance_scale=4.0)).images
        theirs = bb.pipe(PROMPTS[:1], num_inference_steps=5, guidance_scale=4.0,
                         generator=torch.Generator().manual_seed(SEEDS[0]), output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_zero_lora_reproduces_the_frozen_image_bit_for_bit(backbone):
    opts = SamplingOptions(num_inference_steps=4, guidance_scale=3.0, k=2)
    with torch.no_grad():
        before = sample(backbone, PROMPTS, SEEDS, opts).images
    add_lora(backbone.unet, rank=4)
    with torch.no_grad(), backbone.adapters_disabled():
        reference = sample(backbone, PROMPTS, SEEDS, opts).images
    policy = sample(backbone, PROMPTS, SEEDS, opts).images  # with autograd, LoRA on
    assert policy.requires_grad
    assert torch.equal(policy.detach(), reference)
    assert torch.equal(reference, before)
    _perturb_lora(backbone.unet)
    with torch.no_grad():
        changed = sample(backbone, PROMPTS, SEEDS, opts).images
        with backbone.adapters_disabled():
            still_reference = sample(backbone, PROMPTS, SEEDS, opts).images
    assert not torch.equal(changed, reference)
    assert torch.equal(still_reference, reference)  # the frozen model is the same UNet, LoRA off


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gradient_flows_only_through_the_last_k_unet_calls(backbone, k):
    params = add_lora(backbone.unet, rank=4)
    _perturb_lora(backbone.unet)  # B != 0 so A gets gradient too
    calls = []
    handle = backbone.unet.register_forward_hook(lambda m, i, o: calls.append(o[0].requires_grad))
    opts = SamplingOptions(num_inference_steps=5, guidance_scale=3.0, k=k)
    out = sample(backbone, PROMPTS, SEEDS, opts)
    handle.remove()
    assert calls == [False] * (5 - k) + [True] * k
    out.images.mean().backward()
    grads = [p.grad for p in params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0  # non-zero even for K = 1


def test_draft_k_gradient_equals_detached_full_graph(backbone):
    """Running the early steps under no_grad gives the same LoRA gradient as keeping them
    in the graph with their outputs detached (what peers do)."""
    params = add_lora(backbone.unet, rank=4)
    _perturb_lora(backbone.unet)
    opts = SamplingOptions(num_inference_steps=4, guidance_scale=3.0, k=2)
    sample(backbone, PROMPTS, SEEDS, opts).images.mean().backward()
    ours = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    # manual chain: all steps with autograd, detach before the last two
    sched = backbone.scheduler
    cond = backbone.encode_prompts(PROMPTS)
    from focusnfix.sampling import initial_noise

    x = initial_noise(backbone, SEEDS, 32, 32)
    sched.set_timesteps(4)
    for i, t in enumerate(sched.timesteps):
        if i == 2:
            x = x.detach()
        eps = backbone.predict_noise(x, t, cond, 3.0)
        x = sched.step(eps, t, x).prev_sample
    backbone.decode(x).mean().backward()
    for a, p in zip(ours, params, strict=True):
        torch.testing.assert_close(a, p.grad)


def test_full_mode_with_checkpointing_gives_the_same_gradient(backbone):
    params = add_lora(backbone.unet, rank=4)
    _perturb_lora(backbone.unet)
    grads = []
    for ckpt in (False, True):
        opts = SamplingOptions(num_inference_steps=3, guidance_scale=3.0, grad_mode="full",
                               checkpoint_unet=ckpt, checkpoint_vae=ckpt)
        sample(backbone, PROMPTS, SEEDS, opts).images.mean().backward()
        grads.append([p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_draft_lv_renoises_the_last_step(backbone):
    add_lora(backbone.unet, rank=4)
    calls = []
    handle = backbone.unet.register_forward_hook(lambda m, i, o: calls.append(o[0].requires_grad))
    opts = SamplingOptions(num_inference_steps=4, guidance_scale=3.0, grad_mode="draft_lv", lv_n=2)
    out = sample(backbone, PROMPTS, SEEDS, opts, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert calls == [False, False, False, True, True, True]
    assert out.extra_images.shape == (2, 2, 3, 32, 32)
    assert not torch.equal(out.extra_images[0], out.extra_images[1])


def test_identity_last_step_scheduler_is_fixed():
    bad = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        set_alpha_to_one=False, steps_offset=0)
    with pytest.warns(UserWarning, match="zero gradient"):
        fixed = make_ddim_scheduler(bad.config)
    assert fixed.config.steps_offset == 1
    # the last step of the fixed scheduler depends on the model output
    fixed.set_timesteps(4)
    x = torch.randn(1, 4, 2, 2)
    eps = torch.randn(1, 4, 2, 2, requires_grad=True)
    out = fixed.step(eps, fixed.timesteps[-1], x, eta=0.0).prev_sample
    (g,) = torch.autograd.grad(out.sum(), eps)
    assert g.abs().sum() > 0


def test_denoise_from_a_later_step_runs_only_the_remaining_unet_calls(backbone):
    from focusnfix.sampling import denoise, initial_noise

    opts = SamplingOptions(num_inference_steps=5, guidance_scale=3.0)
    cond = backbone.encode_prompts(["a red circle"], "", True)
    x = initial_noise(backbone, [0], 32, 32)
    calls = []
    with torch.no_grad():
        full, _ = denoise(backbone, cond, x, opts, grad_steps=0, on_unet_call=lambda i, g: calls.append(i))
        assert calls == [0, 1, 2, 3, 4]
        calls.clear()
        late, _ = denoise(backbone, cond, x, opts, grad_steps=0, on_unet_call=lambda i, g: calls.append(i), start=3)
    assert calls == [3, 4] and late.shape == full.shape and not torch.equal(late, full)


def test_merged_lora_gives_the_unmerged_images_and_restores_the_base_weights(backbone):
    """The no-gradient calls run with the LoRA folded into the base weights: the same images
    within 1e-5, base weights restored bit for bit, no LoRA branch called, gradient unchanged."""
    params = add_lora(backbone.unet, rank=4)
    _perturb_lora(backbone.unet, scale=0.2)
    before = {k: v.clone() for k, v in backbone.unet.state_dict().items()}
    merged_opts = SamplingOptions(num_inference_steps=5, guidance_scale=3.0, k=2)
    plain_opts = SamplingOptions(num_inference_steps=5, guidance_scale=3.0, k=2, merge_lora=False)
    with torch.no_grad():
        merged = sample(backbone, PROMPTS, SEEDS, merged_opts).images
        plain = sample(backbone, PROMPTS, SEEDS, plain_opts).images
        with backbone.adapters_disabled():
            frozen = sample(backbone, PROMPTS, SEEDS, merged_opts).images
    assert (merged - plain).abs().max() <= 1e-5 and not torch.equal(merged, frozen)
    after = backbone.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing drifted
    # inside the context the LoRA branch is not called
    lora_calls = []
    hooks = [m.register_forward_hook(lambda *_: lora_calls.append(1))
             for n, m in backbone.unet.named_modules() if n.endswith("lora_A.default")]
    with torch.no_grad(), backbone.lora_merged():
        sample(backbone, PROMPTS[:1], SEEDS[:1], plain_opts)
    assert lora_calls == []
    # the LoRA gradient of DRaFT-K is the same with and without merging the early calls
    grads = {}
    for opts in (merged_opts, plain_opts):
        for p in params:
            p.grad = None
        sample(backbone, PROMPTS, SEEDS, opts).images.mean().backward()
        grads[opts.merge_lora] = [p.grad.clone() for p in params]
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    for h in hooks:
        h.remove()


def test_sampling_after_the_adapters_were_deleted(backbone):
    """Deleting an adapter leaves empty PEFT wrappers: the merged path must then run the plain
    model (what evaluation does after each method's LoRA is unloaded)."""
    add_lora(backbone.unet, rank=4)
    _perturb_lora(backbone.unet, scale=0.2)
    opts = SamplingOptions(num_inference_steps=3, guidance_scale=3.0)
    with torch.no_grad(), backbone.adapters_disabled():
        frozen = sample(backbone, PROMPTS, SEEDS, opts).images
    backbone.unet.delete_adapters(["default"])
    with torch.no_grad():
        after = sample(backbone, PROMPTS, SEEDS, opts).images
    assert torch.equal(after, frozen)


@pytest.mark.slow
def test_compiled_unet_gives_the_eager_images_and_the_same_lora_gradient(backbone):
    """sampling.compile_unet: the no-gradient calls (LoRA merged, and the frozen model's) run
    through torch.compile; images equal the eager ones up to float rounding, the LoRA changes
    between steps are seen (parameters are graph inputs), and the gradient is unchanged."""
    params = add_lora(backbone.unet, rank=4)
    _perturb_lora(backbone.unet, scale=0.2)
    eager = SamplingOptions(num_inference_steps=5, guidance_scale=3.0, k=2)
    compiled = SamplingOptions(num_inference_steps=5, guidance_scale=3.0, k=2, compile_unet=True)
    with torch.no_grad():
        a, b = sample(backbone, PROMPTS, SEEDS, eager).images, sample(backbone, PROMPTS, SEEDS, compiled).images
        with backbone.adapters_disabled():
            fa, fb = sample(backbone, PROMPTS, SEEDS, eager).images, sample(backbone, PROMPTS, SEEDS, compiled).images
    assert (a - b).abs().max() <= 1e-5 and (fa - fb).abs().max() <= 1e-5 and (a - fa).abs().max() > 1e-3
    assert backbone.unet is backbone.pipe.unet  # the compiled wrapper is only used inside the context
    _perturb_lora(backbone.unet, scale=0.2)  # an optimizer step: the compiled calls must see new weights
    grads = {}
    for name, opts in (("eager", eager), ("compiled", compiled)):
        for p in params:
            p.grad = None
        out = sample(backbone, PROMPTS, SEEDS, opts).images
        out.mean().backward()
        grads[name] = (out.detach(), [p.grad.clone() for p in params])
    assert (grads["eager"][0] - grads["compiled"][0]).abs().max() <= 1e-5
    for x, y in zip(grads["eager"][1], grads["compiled"][1], strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_lora_active_steps_gate_the_adapter_and_keep_the_frozen_prefix(backbone, steps):
    """lora_steps = L: the first N - L UNet calls are the frozen model's (no LoRA, no gradient)."""
    add_lora(backbone.unet, rank=4)
    _perturb_lora(backbone.unet)
    opts = SamplingOptions(num_inference_steps=5, guidance_scale=3.0, k=steps, lora_steps=steps)
    calls, lora_used = [], []
    handle = backbone.unet.register_forward_hook(lambda m, i, o: calls.append(o[0].requires_grad))
    from peft.tuners.lora import LoraLayer

    layer = next(m for m in backbone.unet.modules() if isinstance(m, LoraLayer))
    hook = layer.lora_A["default"].register_forward_hook(lambda m, i, o: lora_used.append(True))
    sample(backbone, PROMPTS, SEEDS, opts)
    handle.remove()
    hook.remove()
    assert calls == [False] * (5 - steps) + [True] * steps
    # the LoRA branch ran in the graded calls only (LoRA layers are called once per UNet call and layer)
    assert len(lora_used) == steps
    # the frozen prefix: the same latents after N - L steps as the frozen model's chain
    from focusnfix.sampling import denoise, initial_noise

    cond = backbone.encode_prompts(PROMPTS, "", True)
    x_t = initial_noise(backbone, SEEDS, 32, 32)
    with torch.no_grad():
        prefix = SamplingOptions(num_inference_steps=5, guidance_scale=3.0, lora_steps=steps)
        gated, _ = denoise(backbone, cond, x_t, prefix, 0)
        with backbone.adapters_disabled():
            frozen, _ = denoise(backbone, cond, x_t, SamplingOptions(num_inference_steps=5, guidance_scale=3.0), 0)
        # by hand: the frozen model for N - L steps, then the LoRA for the rest (via `start`)
        timesteps_n = 5 - steps
        with backbone.adapters_disabled():
            x = x_t
            ts = backbone.set_timesteps(5, x)
            for i in range(timesteps_n):
                x = backbone.scheduler_step(backbone.predict_noise(x, ts[i], cond, 3.0), ts[i], x)
        by_hand, _ = denoise(backbone, cond, x, SamplingOptions(num_inference_steps=5, guidance_scale=3.0), 0,
                             start=timesteps_n)
    torch.testing.assert_close(gated, by_hand, atol=1e-6, rtol=0)
    assert not torch.allclose(gated, frozen)  # the LoRA did act on the last steps


def test_lora_active_steps_equal_to_k_give_the_whole_gradient(backbone):
    """With the LoRA on the last K steps only, DRaFT-K's truncated gradient IS the full gradient."""
    params = add_lora(backbone.unet, rank=4)
    _perturb_lora(backbone.unet)
    grads = []
    for mode in ("draft_k", "full"):
        opts = SamplingOptions(num_inference_steps=4, guidance_scale=3.0, grad_mode=mode, k=2, lora_steps=2)
        sample(backbone, PROMPTS, SEEDS, opts).images.mean().backward()
        grads.append([p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    assert sum(g.abs().sum() for g in grads[0]) > 0


def test_late_lora_callback_makes_diffusers_draw_what_focusnfix_samples(backbone, tiny_sd_dir, tmp_path):
    """A LoRA saved with its active steps, loaded by pipe.load_lora_weights and gated by the callback,
    gives the images of our sampler with lora_steps (and of the ungated LoRA only where L = N)."""
    import json

    from focusnfix.inference import late_lora_callback
    from focusnfix.lora import LORA_SCHEDULE_NAME, lora_active_steps, save_lora_weights

    add_lora(backbone.unet, rank=4)
    _perturb_lora(backbone.unet, 0.2)
    save_lora_weights(backbone.unet, type(backbone.pipe), tmp_path / "lora",
                      {"active_steps": 2, "num_inference_steps": 5, "timesteps": [201, 1]})
    assert lora_active_steps(tmp_path / "lora") == 2
    assert json.loads((tmp_path / "lora" / LORA_SCHEDULE_NAME).read_text())["active_steps"] == 2
    with torch.no_grad():
        ours = sample(backbone, PROMPTS[:1], SEEDS[:1],
                      SamplingOptions(num_inference_steps=5, guidance_scale=4.0, lora_steps=2)).images
        ungated = sample(backbone, PROMPTS[:1], SEEDS[:1], SamplingOptions(num_inference_steps=5, guidance_scale=4.0)).images
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    callback = late_lora_callback(pipe, tmp_path / "lora", num_inference_steps=5)
    with torch.no_grad():
        theirs = [pipe(PROMPTS[:1], num_inference_steps=5, guidance_scale=4.0, callback_on_step_end=callback,
                       generator=torch.Generator().manual_seed(SEEDS[0]), output_type="pt").images for _ in range(2)]
    torch.testing.assert_close(theirs[0], ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs[1], ours, atol=1e-5, rtol=0)  # the callback left the pipe ready again
    assert (ours - ungated).abs().max() > 1e-3
