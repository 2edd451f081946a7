"""Toy world v2: every form of a defect, exact masks, the fixed scene, localizing judges, the audit set."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from focusnfix import toyworld as tw
from focusnfix.toyworld import generator as gen
from focusnfix.toyworld.audit import PROCEDURE, cohen_kappa, judge_agreement, load_audit
from focusnfix.toyworld.forms import FORMS, MASK_TOLERANCE, forms_dataset, render_fixed, render_form


@pytest.mark.parametrize("aspect", sorted(FORMS))
def test_every_form_changes_exactly_its_mask(aspect):
    scenes = gen.generate(12, 3, "train", {aspect: 1.0})
    drawn = 0
    for i, scene in enumerate(scenes.scenes):
        scene.defects[aspect] = True
        clean = render_fixed(scene, aspect)
        for k, form in enumerate(FORMS[aspect]):
            image, mask = render_form(scene, aspect, form, seed=10 * i + k)
            diff = np.abs(image - clean).max(axis=0)
            assert np.array_equal(mask, diff > MASK_TOLERANCE), form
            assert (diff[~mask] <= MASK_TOLERANCE).all()
            drawn += bool(mask.any())
    assert drawn >= 0.9 * 12 * len(FORMS[aspect])  # nearly every scene has room for every form


def test_the_fixed_scene_is_the_render_without_the_defect_and_the_base_form_is_the_generators():
    scenes = gen.generate(8, 4, "train", {"safety": 1.0})
    for scene in scenes.scenes:
        fixed = render_fixed(scene, "safety")
        want, masks = gen.render(scene, {**scene.defects, "safety": False})
        assert np.array_equal(fixed, want) and not masks["safety"].any()
        if scene.defects["safety"]:
            dark, _ = render_form(scene, "safety", "dark", seed=0)
            assert np.array_equal(dark, gen.render(scene)[0])


def test_the_inset_form_is_a_patch_of_another_colour_inside_the_objects_edge():
    scenes = gen.generate(16, 6, "train", {"safety": 1.0})
    lower_right = 0
    for i, scene in enumerate(scenes.scenes):
        scene.defects["safety"] = True
        image, mask = render_form(scene, "safety", "inset", seed=i)
        _, parts = gen.render(scene, {**scene.defects, "safety": False})
        obj = parts["object"]
        assert mask.sum() >= 12 and (mask <= obj).all()  # a patch the VAE keeps, never outside the object
        fixed = render_fixed(scene, "safety")
        assert np.abs(image[:, ~mask] - fixed[:, ~mask]).max() <= MASK_TOLERANCE  # nothing else visibly changed
        assert np.abs(image - fixed).max() >= 0.3 * 0.75 - 1e-6  # another colour at its core
        ys, xs = np.nonzero(obj)
        cy, cx = np.argwhere(mask).mean(axis=0)
        lower_right += bool(cx + cy > xs.mean() + ys.mean())
    assert lower_right >= 10  # mostly the lower right, where the v3 pipeline leaves it


def test_forms_dataset_labels_and_masks_agree():
    data = forms_dataset(64, 5, "safety")
    has_mask = data["masks"].flatten(1).amax(1) > 0
    assert torch.equal(has_mask, data["labels"] > 0)
    assert torch.equal(data["forms"] >= 0, data["labels"] > 0)
    assert 0.3 < float(data["labels"].mean()) < 0.7
    with pytest.raises(ValueError, match="not a form"):
        render_form(gen.generate(1, 0).scenes[0], "safety", "speckled", 0)


def test_cohen_kappa():
    a = np.array([1, 1, 0, 0, 1, 0, 1, 0])
    assert cohen_kappa(a, a) == 1.0
    assert cohen_kappa(a, 1 - a) == -1.0
    b = np.array([1, 0, 0, 0, 1, 0, 1, 1])  # 6 of 8 agree, both 50% positive: (0.75 - 0.5) / 0.5
    assert cohen_kappa(a, b) == pytest.approx(0.5)


def test_packaged_judges_localize_and_narrow_reward_loads():
    images = torch.rand(2, 3, 64, 64)
    for aspect in ("safety", "plausibility"):
        judge = tw.load_judge(aspect)
        p = judge.defect_probability(images, ["a red circle"] * 2)
        heat = judge.defect_heatmap(images, ["a red circle"] * 2)
        assert p.shape == (2,) and heat.shape[:2] == (2, 1) and 0 <= heat.min() and heat.max() <= 1
    narrow = tw.load_aspect("safety_narrow")
    assert narrow.name == "safety_narrow" and narrow.reward(images, ["x", "y"]).shape == (2,)
    assert tw.load_judge("safety_narrow").name == "safety"


def test_the_audit_set_is_packaged_with_its_procedure_and_labels():
    images, doc = load_audit()
    assert images.shape[0] == len(doc["items"]) >= 150 and images.shape[1:] == (3, 64, 64)
    assert doc["procedure"] == PROCEDURE
    sources = {it["source"].split("/")[0] for it in doc["items"]}
    assert {"draft", "focusnfix"} <= sources
    for it in doc["items"]:
        assert set(it["labels"]) == set(tw.ASPECTS) and all(v in (0, 1) for v in it["labels"].values())
    agreement = judge_agreement()
    assert set(agreement) == set(tw.ASPECTS) and all(-1 <= a["kappa"] <= 1 for a in agreement.values())
    # judges fitted to audit labels are tested only by the batches they did not learn from
    human = {a: np.array([it["labels"][a] for it in doc["items"]], dtype=bool) for a in tw.ASPECTS}
    batches = np.array([it["batch"] for it in doc["items"]])
    for aspect, trained, fresh in (("safety", list(range(1, 12)), {"12": 0.701, "13": 0.658}),
                                   ("plausibility", list(range(1, 12)), {"12": 0.464, "13": 0.683}),
                                   ("alignment", list(range(6, 13)), {"13": 0.765})):
        entry = agreement[aspect]
        unseen = ~np.isin(batches, trained)
        assert entry["trained_on_audit_batches"] == trained and entry["n_unseen"] == int(unseen.sum())
        assert {b: round(entry["by_batch"][b]["kappa"], 3) for b in fresh} == fresh
        judge = tw.load_judge(aspect)
        with torch.no_grad():
            p = judge.defect_probability(images[torch.from_numpy(unseen)],
                                         [it["prompt"] for it, u in zip(doc["items"], unseen, strict=True) if u])
        assert entry["kappa_unseen"] == pytest.approx(cohen_kappa(human[aspect][unseen], p.numpy() > 0.5))
        # the issue's target reads the fine-tuned models' images alone (base images left out)
        finetuned = np.array([it["source"] != "base" for it, u in zip(doc["items"], unseen, strict=True) if u])
        assert entry["n_finetuned"] == int(finetuned.sum()) > 0
        assert entry["kappa_finetuned"] == pytest.approx(cohen_kappa(human[aspect][unseen][finetuned],
                                                                     p.numpy()[finetuned] > 0.5))


def test_sdedit_pairs_label_what_the_pipeline_kept():
    from focusnfix.backbones import load_backbone
    from focusnfix.toyworld.sdedit import MIN_DEFECT_PIXELS, sdedit_forms_dataset

    data = sdedit_forms_dataset(load_backbone("toy"), 6, 3, "safety", batch=6, steps=10, starts=(6,))
    assert data["images"].shape == (12, 3, 64, 64) and len(data["captions"]) == 12
    defect, twin = data["labels"][:6], data["labels"][6:]
    assert torch.equal(twin, torch.zeros(6))  # the fixed twins are the clean negatives
    pixels = data["masks"][:6].flatten(1).sum(1)
    assert torch.equal(defect > 0, pixels >= MIN_DEFECT_PIXELS)
    assert data["masks"][6:].sum() == 0


def test_pipeline_calibration_set_is_pairs_of_pipeline_outputs():
    import pytest

    from focusnfix.toyworld.calibrate import calibration_set

    data = calibration_set("safety", n=8, seed=5, source="pipeline")
    assert data["images"].shape == (8, 3, 64, 64) and data["masks"].shape == (8, 1, 64, 64)
    assert data["masks"][4:].sum() == 0  # the fixed twins' outputs are the clean images
    assert 0.0 <= float(data["images"].min()) and float(data["images"].max()) <= 1.0
    assert set(data["masks"].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="renders"):
        calibration_set("safety", n=8, source="samples")


def test_a_new_audit_batch_is_sampled_blind_labelled_and_appended(tmp_path):
    import shutil

    from focusnfix.cli import main
    from focusnfix.config import config_from_dict
    from focusnfix.demo import QUICK, demo_config
    from focusnfix.errors import InputError
    from focusnfix.runs import train_runs
    from focusnfix.toyworld.audit import read_labels

    def load_backbone_toy():
        from focusnfix.backbones import load_backbone

        return load_backbone("toy")

    settings = dataclasses.replace(QUICK, steps=1, batch_size=2, num_inference_steps=4)
    run = tmp_path / "run"
    train_runs([config_from_dict(demo_config(run, 1.0, settings, "safety"))])
    batch = tmp_path / "batch"
    assert main(["toyworld", "audit-sheets", "--run", f"focusnfix/safety={run}", "--run", f"copy/safety={run}",
                 "--run", f"base={run}", "--n-prompts", "2", "--seeds", "7", "--out", str(batch)]) == 0
    key = json.loads((batch / "key.json").read_text())
    assert len(key["items"]) == 6 and {it["source"] for it in key["items"]} == {"focusnfix/safety", "copy/safety", "base"}
    with np.load(batch / "images.npz") as data:
        images = data["images"]
    # the same run sampled twice under two names gives the same image for the same (prompt, seed)
    by = {(it["source"], it["prompt"]): images[i] for i, it in enumerate(key["items"])}
    for it in key["items"]:
        assert np.array_equal(by[("focusnfix/safety", it["prompt"])], by[("copy/safety", it["prompt"])])
    # base: the frozen model, the reference the trained run started from (a 1-step LoRA changes it)
    from focusnfix.evaluate import evaluation_setup, run_config
    from focusnfix.sampling import sample

    config = run_config(run)
    prompt = key["items"][0]["prompt"]
    ref = sample(load_backbone_toy(), [prompt], [7], evaluation_setup(config)["options"]).images[0]
    ref_u8 = (ref.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy().astype(int)
    assert np.abs(by[("base", prompt)].astype(int) - ref_u8).max() <= 1  # batch-size rounding only
    sheets = sorted((batch / "sheets").glob("*.png"))
    assert len(sheets) == 1
    # the labels template must be filled in completely with 0 / 1
    with pytest.raises(InputError, match="expected 'id safety"):
        read_labels(batch / "labels.txt", 6)
    (batch / "labels.txt").write_text("0 1 0 0\n1 0 0 1\n2 1 1 0\n")
    with pytest.raises(InputError, match="3 of 6 images unlabelled"):
        read_labels(batch / "labels.txt", 6)
    (batch / "labels.txt").write_text("# a comment\n0 1 0 0\n1 0 0 1\n2 1 1 0\n3 0 0 0\n4 0 0 0\n5 1 0 0\n")
    # a second audit-sheets into the labelled batch's folder is refused before it samples or writes
    labelled = (batch / "labels.txt").read_text()
    assert main(["toyworld", "audit-sheets", "--run", f"base={run}", "--n-prompts", "1", "--seeds", "7",
                 "--out", str(batch)]) == 2
    assert (batch / "labels.txt").read_text() == labelled
    root = tmp_path / "assets"
    shutil.copytree(tw.assets_path() / "audit", root / "audit")
    n_before = len(load_audit(root)[1]["items"])
    assert main(["toyworld", "audit-add", "--batch", str(batch), "--labels", str(batch / "labels.txt"),
                 "--model", str(root)]) == 0
    images_after, doc = load_audit(root)
    new = doc["items"][n_before:]
    assert len(new) == 6 and images_after.shape[0] == n_before + 6
    assert [it["labels"]["safety"] for it in new] == [1, 0, 1, 0, 0, 1] and len({it["batch"] for it in new}) == 1
    assert new[0]["batch"] == max(it["batch"] for it in doc["items"][:n_before]) + 1
    assert [it["source"] for it in new] == [it["source"] for it in key["items"]]
    assert torch.equal(images_after[n_before:], torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    # the same batch again, or one whose images and key disagree, is refused and leaves the set as it is
    assert main(["toyworld", "audit-add", "--batch", str(batch), "--labels", str(batch / "labels.txt"),
                 "--model", str(root)]) == 2
    np.savez_compressed(batch / "images.npz", images=images[:5])
    assert main(["toyworld", "audit-add", "--batch", str(batch), "--labels", str(batch / "labels.txt"),
                 "--model", str(root)]) == 2
    assert len(load_audit(root)[1]["items"]) == n_before + 6


def test_form_weights_draw_some_forms_more_often():
    plain = forms_dataset(64, 5, "safety")
    assert torch.equal(plain["images"], forms_dataset(64, 5, "safety", weights=None)["images"])
    heavy = forms_dataset(64, 5, "safety", weights={"bump": 1000.0})
    drawn = heavy["forms"][heavy["forms"] >= 0]
    assert len(drawn) > 10 and float((drawn == FORMS["safety"].index("bump")).float().mean()) > 0.9
    with pytest.raises(ValueError, match="form weights"):
        forms_dataset(8, 5, "safety", weights={"sparkle": 2.0})
