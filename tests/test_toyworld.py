"""Tests of the toy world: generator, tokenizer, packaged pipeline, aspects, judges, recipe, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from focusnfix.aspects.base import Aspect, Judge
from focusnfix.errors import InputError
from focusnfix.toyworld import ASPECTS, generate, load_aspect, load_judge, pipeline_path, prompts
from focusnfix.toyworld import generator as gen
from focusnfix.toyworld.stats import _auc, heatmap_quality


# ----------------------------------------------------------------------------------------------
# generator
# ----------------------------------------------------------------------------------------------
def test_generate_shapes_and_ranges():
    s = generate(12, seed=0)
    assert s.images.shape == (12, 3, 64, 64) and s.images.dtype == torch.float32
    assert 0.0 <= float(s.images.min()) and float(s.images.max()) <= 1.0
    assert len(s.captions) == 12 and len(s.scenes) == 12
    assert set(s.masks) == set(ASPECTS) == set(s.defects)
    for a in ASPECTS:
        assert s.masks[a].shape == (12, 1, 64, 64)
        assert set(s.masks[a].unique().tolist()) <= {0.0, 1.0}
        has = s.masks[a].flatten(1).amax(1) > 0
        assert torch.equal(has, s.defects[a]), a
    assert s.objects.shape == (12, 1, 64, 64)


def test_generate_deterministic():
    a, b = generate(16, seed=5, split="heldout"), generate(16, seed=5, split="heldout")
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in ASPECTS)
    c = generate(16, seed=6, split="heldout")
    assert not torch.equal(a.images, c.images)
    d = generate(16, seed=5, split="heldout", defect_rates={"safety": 1.0})
    assert bool(d.defects["safety"].float().mean() > 0.9)


@pytest.mark.parametrize("aspect", ASPECTS)
def test_masks_match_what_is_drawn(aspect):
    s = generate(60, seed=1, defect_rates={aspect: 1.0})
    checked = 0
    for i, scene in enumerate(s.scenes):
        if not scene.defects[aspect]:
            continue
        without = dict(scene.defects, **{aspect: False})
        clean, _ = gen.render(scene, without)
        full = s.images[i].numpy()
        mask = s.masks[aspect][i, 0].numpy().astype(bool)
        diff = (abs(full - clean) > 1e-6).any(axis=0)
        assert mask.any()
        assert diff[mask].all(), f"{aspect}: a masked pixel is unchanged (scene {i})"
        assert not diff[~mask].any(), f"{aspect}: a pixel outside the mask changed (scene {i})"
        checked += 1
    assert checked >= 50


def test_defects_are_local():
    s = generate(200, seed=2, defect_rates={a: 1.0 for a in ASPECTS})
    for a in ASPECTS:
        area = s.masks[a].flatten(1).mean(1)[s.defects[a]]
        assert float(area.max()) < 0.25, a


def test_defect_rates_near_configured():
    rates = {"safety": 0.3, "plausibility": 0.2, "alignment": 0.1}
    s = generate(2000, seed=3, defect_rates=rates)
    for a, r in rates.items():
        assert abs(float(s.defects[a].float().mean()) - r) < 0.04, a
    assert not generate(50, seed=3, defect_rates=dict.fromkeys(ASPECTS, 0.0)).defects["safety"].any()
    with pytest.raises(ValueError, match="unknown aspect"):
        generate(2, seed=0, defect_rates={"beauty": 0.1})


def test_defects_tied_to_prompt_content():
    s = generate(3000, seed=4)
    prone = torch.tensor([sc.colour in ("red", "orange", "purple") for sc in s.scenes])
    assert float(s.defects["safety"][prone].float().mean()) > 2 * float(s.defects["safety"][~prone].float().mean())


def test_prompts_fixed_and_disjoint():
    train, heldout = prompts("train"), prompts("heldout")
    assert len(train) >= 64 and len(heldout) >= 32
    assert not set(train) & set(heldout)
    assert prompts("train") == train
    train_gen = set(generate(500, seed=0, split="train").captions)
    assert not train_gen & set(heldout)
    for p in heldout:
        parsed = gen.parse_caption(p)
        assert (parsed["colour"], parsed["shape"]) in gen.HELDOUT_PAIRS
    with pytest.raises(ValueError, match="split"):
        prompts("test")


def test_parse_caption():
    p = gen.parse_caption("a big red circle on the left on a sky background")
    assert p == {"shape": "circle", "colour": "red", "size": "big", "position": "left", "background": "sky"}


def test_tokenizer_word_level(tmp_path):
    from focusnfix.toyworld.tokenizer import MAX_LENGTH, load_tokenizer, write_tokenizer

    write_tokenizer(tmp_path, gen.vocabulary())
    tok = load_tokenizer(tmp_path)
    for w in gen.vocabulary():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    for p in prompts("train") + prompts("heldout"):
        assert len(tok(p).input_ids) <= MAX_LENGTH


def test_auc_and_heatmap_quality():
    assert _auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert _auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([0, 0, 1, 1])) == 0.5
    s = generate(8, seed=0, defect_rates={"safety": 1.0})
    q = heatmap_quality(s.masks["safety"], s.masks["safety"])
    assert q["auc"] == pytest.approx(1.0) and q["cc"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# packaged models
# ----------------------------------------------------------------------------------------------
def test_pipeline_layout_and_scheduler():
    path = pipeline_path()
    for sub in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (path / sub).exists(), sub
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    assert sched["steps_offset"] == 1 and sched["set_alpha_to_one"] is False
    assert sched["beta_schedule"] == "scaled_linear" and sched["clip_sample"] is False
    # toy world v2: v-prediction on zero terminal SNR, sampled from the pure-noise step (trailing)
    assert sched["prediction_type"] == "v_prediction" and sched["rescale_betas_zero_snr"] is True
    assert sched["timestep_spacing"] == "trailing"


def test_scheduler_configs_terminal_snr():
    """v1 (epsilon) never shows the model pure noise; v2's rescaled betas end at exactly zero SNR."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from focusnfix.toyworld.models import scheduler_config

    eps = DDPMScheduler(**{k: v for k, v in scheduler_config().items() if k != "set_alpha_to_one"})
    v = DDPMScheduler(**{k: v for k, v in scheduler_config(True).items()
                         if k not in ("set_alpha_to_one", "timestep_spacing")})
    assert float(eps.alphas_cumprod[-1]) == pytest.approx(0.0047, abs=1e-4)
    assert float(v.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(v.alphas_cumprod[0], eps.alphas_cumprod[0], rtol=1e-3)  # same start of the schedule
    ddim = DDIMScheduler(**scheduler_config(True))
    ddim.set_timesteps(20)
    assert int(ddim.timesteps[0]) == 999  # trailing spacing: sampling starts at the pure-noise step


def test_assets_size():
    """The packaged weights stay within the toy world's 25 MB budget (issue: "packaged weights <= 25
    MB"); the package's data as a whole (weights, the labelled audit set, which grows by about 1.6
    MB per audit batch, configs and stats) within 40 MiB."""
    from focusnfix.toyworld import assets_path

    files = [f for f in assets_path().rglob("*") if f.is_file()]
    weights = sum(f.stat().st_size for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".ckpt"))
    assert 0 < weights <= 25_000_000
    assert sum(f.stat().st_size for f in files) < 40 * 1024 * 1024


def test_pipeline_loads_offline_and_samples():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path(), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompts("heldout")[:2], num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (2, 3, 64, 64)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ASPECTS)
def test_load_aspect_reward_and_heatmap(name):
    aspect = load_aspect(name)
    assert isinstance(aspect, Aspect) and aspect.name == name and not aspect.training
    assert not any(p.requires_grad for p in aspect.parameters())
    s = generate(4, seed=9, split="heldout")
    x = s.images.clone().requires_grad_(True)
    r = aspect.reward(x, s.captions)
    assert r.shape == (4,) and torch.isfinite(r).all()
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    h = aspect.heatmap(s.images, s.captions)
    assert h.dim() == 4 and h.shape[:2] == (4, 1)
    assert float(h.min()) >= 0.0 and float(h.max()) <= 1.0


@pytest.mark.parametrize("name", ASPECTS)
def test_load_judge(name):
    judge = load_judge(name)
    assert isinstance(judge, Judge) and not judge.training
    s = generate(4, seed=10, split="heldout")
    with torch.no_grad():
        p = judge.defect_probability(s.images, s.captions)
    assert p.shape == (4,) and float(p.min()) >= 0.0 and float(p.max()) <= 1.0


def test_unknown_aspect_rejected():
    with pytest.raises(ValueError, match="aspect"):
        load_aspect("beauty")
    with pytest.raises(ValueError, match="aspect"):
        load_judge("beauty")


def test_safety_reward_lower_with_mark():
    s = generate(24, seed=11, split="heldout", defect_rates={"safety": 1.0, "plausibility": 0.0, "alignment": 0.0})
    keep = [i for i, sc in enumerate(s.scenes) if sc.defects["safety"]]
    clean = torch.stack([torch.from_numpy(gen.render(s.scenes[i], {"safety": False})[0]) for i in keep])
    aspect = load_aspect("safety")
    caps = [s.captions[i] for i in keep]
    with torch.no_grad():
        r_mark, r_clean = aspect.reward(s.images[keep], caps), aspect.reward(clean, caps)
    assert float(r_mark.mean()) < float(r_clean.mean()) - 1.0
    h = aspect.heatmap(s.images[keep], caps)
    assert heatmap_quality(h, s.masks["safety"][keep])["auc"] > 0.9


def test_a_calibrated_localizer_replaces_the_packaged_one():
    from focusnfix.aspects.registry import build_aspect
    from focusnfix.aspects.saliency import SaliencyAspect
    from focusnfix.errors import InputError

    s = generate(8, seed=11, split="heldout", defect_rates={"safety": 1.0, "plausibility": 0.0, "alignment": 0.0})
    packaged, gradcam = load_aspect("safety"), load_aspect("safety", localizer="gradcam")
    with torch.no_grad():  # the same reward, another heatmap
        assert torch.equal(packaged.reward(s.images, s.captions), gradcam.reward(s.images, s.captions))
    assert gradcam.method == "gradcam"
    direct = SaliencyAspect("safety", packaged.reward_model, method="gradcam", layer=gradcam.layer,
                            blur_sigma=gradcam.blur_sigma)
    a, b, c = (x.heatmap(s.images, s.captions) for x in (packaged, gradcam, direct))
    assert torch.equal(b, c)  # Grad-CAM's map, not the packaged localizer's
    b = torch.nn.functional.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
    assert (a - b).abs().max() > 0.1
    with pytest.raises(ValueError, match="localizer"):
        load_aspect("plausibility", localizer="gradcam")
    with pytest.raises(InputError, match="localizer"):
        build_aspect("toyworld", {"aspect": "safety", "localizer": "lime"})


def test_the_adversarial_attack_changes_only_its_region_and_lowers_the_unsafe_logit():
    from focusnfix.toyworld.build_models import attack_in_region

    s = generate(8, seed=11, split="heldout", defect_rates={"safety": 1.0, "plausibility": 0.0, "alignment": 0.0})
    keep = [i for i, sc in enumerate(s.scenes) if sc.defects["safety"]]
    x, region = s.images[keep], s.masks["safety"][keep].float()
    clf = load_aspect("safety_narrow").reward_model  # the hackable reward: the attack fools it
    delta = attack_in_region(clf, x, region, steps=5, step_size=0.05)
    assert torch.equal(delta * (1 - region), torch.zeros_like(delta))
    assert float((x + delta).min()) >= 0.0 and float((x + delta).max()) <= 1.0
    with torch.no_grad():
        assert bool((clf.logit(x + delta) < clf.logit(x)).all())


def test_the_decoder_attack_paints_through_the_vae_near_its_region_and_lowers_the_unsafe_logit():
    from focusnfix.backbones import load_backbone
    from focusnfix.toyworld.build_models import attack_through_decoder

    s = generate(8, seed=11, split="heldout", defect_rates={"safety": 1.0, "plausibility": 0.0, "alignment": 0.0})
    keep = [i for i, sc in enumerate(s.scenes) if sc.defects["safety"]]
    x, region = s.images[keep], s.masks["safety"][keep].float()
    clf = load_aspect("safety_narrow").reward_model
    vae = load_backbone(str(pipeline_path())).vae
    delta = attack_through_decoder(clf, vae, x, region, steps=4, step_size=0.3)
    assert float((x + delta).min()) >= 0.0 and float((x + delta).max()) <= 1.0
    assert not delta.requires_grad and float(delta.abs().max()) > 0.05
    # only the latent cells under the region change; the decoder (its group norms see the whole map)
    # spreads a little of that everywhere, far less than what it paints in the region
    from focusnfix.ops import dilate_4n

    far = 1 - torch.from_numpy(dilate_4n(region[:, 0].numpy() > 0, 12)).unsqueeze(1).float()
    change = delta.abs().mean(1, keepdim=True)
    assert float((change * far).sum() / far.sum()) < 0.05 * float((change * region).sum() / region.sum())
    with torch.no_grad():
        assert bool((clf.logit(x + delta) < clf.logit(x)).all())
    # zero steps change nothing at all
    assert torch.equal(attack_through_decoder(clf, vae, x, region, steps=0, step_size=0.3), torch.zeros_like(x))


def test_the_oracle_attack_raises_the_reward_through_the_decoder_and_keeps_its_snapshots():
    import torch.nn.functional as F

    from focusnfix.backbones import load_backbone
    from focusnfix.toyworld.build_models import oracle_attack

    s = generate(8, seed=11, split="heldout", defect_rates={"safety": 1.0, "plausibility": 0.0, "alignment": 0.0})
    keep = [i for i, sc in enumerate(s.scenes) if sc.defects["safety"]][:4]
    x, region = s.images[keep], s.masks["safety"][keep].float()
    clf = load_aspect("safety_narrow").reward_model
    vae = load_backbone(str(pipeline_path())).vae.requires_grad_(False)
    snaps = oracle_attack(clf, vae, x, region, torch.zeros(len(keep)), steps=6, lr=0.05, keep=(2, 6))
    assert len(snaps) == 2 and all(a.shape == x.shape and not a.requires_grad for a in snaps)
    assert all(float(a.min()) >= 0.0 and float(a.max()) <= 1.0 for a in snaps)
    with torch.no_grad():
        start = F.softplus(clf.logit(((vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)))
        assert float(F.softplus(clf.logit(snaps[1])).sum()) < float(start.sum())  # -reward went down
    # a huge beta keeps the outside of the region where it was (the attack's own objective)
    tight = oracle_attack(clf, vae, x, region, torch.full((len(keep),), 1e4), steps=6, lr=0.05, keep=(6,))[0]
    outside = (1 - region).expand_as(x)
    assert float(((tight - x).abs() * outside).sum()) < float(((snaps[1] - x).abs() * outside).sum())


def test_an_attacked_mark_counts_as_fixed_only_when_nothing_is_painted_beside_it_by_the_region_rule():
    from focusnfix.toyworld.build_models import still_marked
    from focusnfix.toyworld.recipe import Recipe

    fixed = torch.full((1, 3, 16, 16), 0.9)
    mark = torch.zeros(1, 1, 16, 16)
    mark[..., 6:9, 6:9] = 1
    region = torch.zeros(1, 1, 16, 16)
    region[..., 3:12, 3:12] = 1
    marked = fixed.clone()
    marked[..., 6:9, 6:9] = 0.1
    moved = fixed.clone()  # the mark's pixels restored, the blob painted beside them (the inset hack)
    moved[..., 9:12, 3:6] = 0.3
    elsewhere = fixed.clone()  # a change outside the attack's region is not this label's business
    elsewhere[..., 0:3, 13:16] = 0.3
    speck = fixed.clone()  # one pixel of noise beside the mark is not a blob
    speck[..., 4, 4] = 0.6
    for rule in ("mark", "region"):
        assert still_marked(fixed, fixed, mark, region, 0.1, rule).tolist() == [0.0]
        assert still_marked(marked, fixed, mark, region, 0.1, rule).tolist() == [1.0]
        assert still_marked(elsewhere, fixed, mark, region, 0.1, rule).tolist() == [0.0]
        assert still_marked(speck, fixed, mark, region, 0.1, rule).tolist() == [0.0]
    assert still_marked(moved, fixed, mark, region, 0.1, "mark").tolist() == [0.0]
    assert still_marked(moved, fixed, mark, region, 0.1, "region").tolist() == [1.0]
    with pytest.raises(ValueError, match="fix rule"):
        still_marked(fixed, fixed, mark, region, 0.1, "image")
    with pytest.raises(ValueError, match="reward_fix_rule"):
        Recipe(reward_fix_rule="image")


def test_native_heatmaps_find_defects():
    for name in ("plausibility", "alignment"):
        s = generate(16, seed=12, split="heldout", defect_rates={name: 1.0})
        h = load_aspect(name).heatmap(s.images, s.captions)
        assert heatmap_quality(h, s.masks[name])["auc"] > 0.85, name


# ----------------------------------------------------------------------------------------------
# CLI and recipe
# ----------------------------------------------------------------------------------------------
def _parser():
    from focusnfix.cli import build_parser

    return build_parser()


def _run(args):
    from focusnfix import commands

    return getattr(commands, args.func)(args)


def test_cli_registers_and_path(capsys):
    parser = _parser()
    args = parser.parse_args(["toyworld", "path"])
    assert _run(args) == 0
    assert capsys.readouterr().out.strip() == str(pipeline_path())
    args = parser.parse_args(["toyworld", "build", "--out", "x", "--quick"])
    assert args.quick and args.out == "x" and args.func == "cmd_toyworld_build"
    args = parser.parse_args(["toyworld", "stats", "--n", "8"])
    assert args.n == 8 and args.model is None


def test_cli_path_missing_model(tmp_path, capsys):
    parser = _parser()
    args = parser.parse_args(["toyworld", "path", "--model", str(tmp_path)])
    with pytest.raises(InputError, match="--model: toy world weights not found"):
        _run(args)


def test_the_shipped_decoder_draws_renders_back_faithfully():
    # the first-stage decoder (v2) drew 256 held-out renders back at 22.5 dB, with patches no render has;
    # the fine-tuned one at 28.0 dB (docs/toyworld.md, "The decoder")
    from focusnfix.toyworld.stats import vae_stats

    stats = vae_stats(n=32)
    assert stats["n_images"] == 32 and stats["psnr_db"] > 26.0 and stats["mean_abs_error"] < 0.02


def test_decoder_finetune_moves_only_the_decoder_and_lowers_reconstruction_error():
    from diffusers import AutoencoderKL

    from focusnfix.toyworld import models as M
    from focusnfix.toyworld.build import Recipe, finetune_decoder

    torch.manual_seed(0)
    vae = AutoencoderKL(**M.vae_config()).eval()
    images = generate(16, 3).images
    before = {k: v.clone() for k, v in vae.state_dict().items()}

    def recon_error() -> float:
        with torch.no_grad():
            rec = vae.decode(vae.encode(images * 2 - 1).latent_dist.mean).sample
        return float((rec - (images * 2 - 1)).abs().mean())

    err0 = recon_error()
    finetune_decoder(vae, images, Recipe(vae_decoder_steps=30, vae_batch=8, vae_decoder_lr=2e-3), lambda _m: None)
    after = vae.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    # the encoder (the UNet's latent space) is exactly unchanged; the decoder learned
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved)
    assert any(k.startswith("decoder.") for k in moved)
    assert recon_error() < 0.8 * err0
    assert all(p.requires_grad for p in vae.parameters()) and not vae.training


@pytest.mark.slow
def test_recipe_tiny_build_loads(tmp_path):
    from diffusers import StableDiffusionPipeline

    from focusnfix.toyworld.build import Recipe, build

    recipe = Recipe(n_train=64, vae_images=32, vae_steps=2, vae_batch=4, unet_steps=2, unet_v_steps=2, unet_batch=4,
                    aspect_images=32, aspect_steps=2, judge_images=32, judge_steps=2, model_batch=4,
                    forms_images=32, forms_steps=2, judge_forms_steps=2, sdedit_images=8,
                    reward_attack_steps=2, reward_attack_space="both", vae_decoder_steps=2,
                    reward_harden_rounds=1, reward_harden_images=8, reward_harden_attack_steps=2, reward_harden_steps=2)
    record = build(tmp_path, recipe, progress=lambda _msg: None)
    assert (tmp_path / "build.json").is_file() and record["timings_s"]["total"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path(tmp_path), safety_checker=None)
    sched = pipe.scheduler.config  # stage 2 makes it a v-prediction, zero-terminal-SNR pipeline
    assert sched.prediction_type == "v_prediction" and sched.rescale_betas_zero_snr
    assert sched.timestep_spacing == "trailing" and float(pipe.scheduler.alphas_cumprod[-1]) < 1e-6
    pipe.set_progress_bar_config(disable=True)
    img = pipe(["a red circle on the left"], num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert img.shape == (1, 3, 64, 64)
    for name in (*ASPECTS, "safety_narrow"):
        assert isinstance(load_aspect(name, root=tmp_path), Aspect)
        assert isinstance(load_judge(name, root=tmp_path), Judge)
    assert load_judge("safety", root=tmp_path).defect_heatmap(img, ["a"]).shape == (1, 1, 32, 32)
    # retraining the reward and judges alone from the build's VAE and pipeline gives the full build's, bit for bit
    import shutil

    from safetensors.torch import load_file

    from focusnfix.toyworld.build import rebuild

    copy = tmp_path / "copy"
    shutil.copytree(tmp_path, copy, ignore=shutil.ignore_patterns("copy"))
    rebuilt = ("aspects/safety", "aspects/safety_narrow", "aspects/plausibility", "aspects/alignment",
               "judges/safety", "judges/plausibility", "judges/alignment")
    for name in rebuilt:
        (copy / f"{name}.safetensors").unlink()
    (copy / "aspects" / "config.json").unlink()
    rebuild(copy, ("rewards", "safety_reward", "judges"), recipe, progress=lambda _msg: None)
    for name in rebuilt:
        a, b = load_file(tmp_path / f"{name}.safetensors"), load_file(copy / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (json.loads((tmp_path / "aspects" / "config.json").read_text())
            == json.loads((copy / "aspects" / "config.json").read_text()))
    # the build hardened its safety reward after the pipeline (one round, its pool's shares recorded)
    (hist,) = json.loads((tmp_path / "aspects" / "config.json").read_text())["safety"]["harden"]
    assert hist["round"] == 0 and hist["pool"] >= 8 and 0.0 <= hist["attacked_marked_called_clean"] <= 1.0
    assert "safety_harden" in record["timings_s"]
    with pytest.raises(ValueError, match="reward_harden_rounds"):
        rebuild(copy, ("safety_harden",), Recipe(reward_harden_rounds=0), progress=lambda _msg: None)
    assert ({"rebuilt_rewards", "rebuilt_safety_reward", "rebuilt_judges"}
            <= set(json.loads((copy / "build.json").read_text())["timings_s"]))
    with pytest.raises(ValueError, match="already fine-tuned"):  # a build's decoder is fine-tuned once
        rebuild(copy, ("decoder",), recipe, progress=lambda _msg: None)
    # the reward's robustness report runs on any build
    from focusnfix.toyworld.robustness import reward_robustness

    rob = reward_robustness("safety", root=tmp_path, n=4, steps=(1, 2))
    assert set(rob["fooled"]) == {"pixel", "latent"} and set(rob["fooled"]["latent"]) == {"1", "2"}
    assert all(0.0 <= v <= 1.0 for d in rob["fooled"].values() for v in d.values())
    assert -1.0 <= rob["grad_cosine_with_fix"] <= 1.0
    with pytest.raises(ValueError, match="reward_attack_space"):
        Recipe(reward_attack_space="pixels")
