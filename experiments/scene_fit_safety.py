"""An untrained safety judge, its settings chosen on a person's labels outside the audit set.

The shipped safety judge is a network trained on generator renders; a person sees marks on the
pipeline's images that it does not (kappa 0.53 on audit batches 6-9), most of them *inside* the
object: a dark spot on a green square's lower right, a bluish oval in a purple circle. The scene fit
(:mod:`focusnfix.toyworld.scene_fit`) already reads blobs *outside* the fitted silhouette; this adds
patches *inside* it (each pixel's colour distance to its local median, which smooth shading follows
and a small patch does not) and chooses the five settings of
:class:`~focusnfix.toyworld.scene_fit.SceneFitMarkJudge`:

* on the 320 person-labelled pipeline samples of the ``fit`` and ``validation`` prompts (never a
  held-out prompt; ``experiments/person_labelled_judge.person_set``), the setting with the highest
  Cohen's kappa, smoothed over neighbouring patch thresholds (+-0.01) so that a lucky threshold
  does not win;
* among the settings that read every generator form the shipped judge reads at AUC >= 0.97 (the
  issue's target) at >= 0.97 too, on a design set of generator scenes (64 per form, the ``train``
  split, seeds no stats use). The two forms the shipped judge misses (``bump``, ``inset``) set no
  floor: the generator's ``inset`` is a large soft patch, some of them invisible, unlike the small
  spots a person marks on pipeline images, and a floor on it excluded every setting that agrees
  with a person better than the shipped judge (kappa <= 0.56 with it, 0.75 without). Both are
  reported.

It prints the choice, the kappa of the choice made within 5 folds of the 320 (3 repeats: what to
expect on new images of the same kind) and the forms table. ``--audit`` adds the kappa with every
audit batch of the packaged audit set, for the chosen judge and the shipped one at its operating
point. The rule for shipping it was written before the audit set was read with it
(docs/toyworld.md, "An untrained safety judge").

    python experiments/scene_fit_safety.py [--audit] [--json FILE]

About 2 minutes at two threads.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from focusnfix.toyworld import load_judge
from focusnfix.toyworld.audit import cohen_kappa, load_audit
from focusnfix.toyworld.forms import FORMS, forms_dataset
from focusnfix.toyworld.scene_fit import SceneFitMarkJudge, fit_scene, patch_map, stray_map
from focusnfix.toyworld.stats import _auc, vae_round_trip

sys.path.insert(0, str(Path(__file__).resolve().parent))
from person_labelled_judge import person_set  # noqa: E402

STRAY_WINDOWS, STRAY_THRESHOLDS = (3, 5), (0.5, 0.6, 0.7)
PATCH_WINDOWS, PATCH_EROSIONS = (5, 7, 9), (2, 3)
PATCH_THRESHOLDS = tuple(np.round(np.arange(0.02, 0.31, 0.01), 2))
FORM_FLOOR = 0.97
DESIGN_SEED, DESIGN_N = 5779, 64


def features(images: torch.Tensor) -> tuple[dict, dict]:
    """Scores of every window setting: ``stray[w] (N,)`` and ``patch[(window, erosion)] (N,)``."""
    fit = fit_scene(images)
    stray = {w: F.avg_pool2d(stray_map(fit), w, 1, w // 2).flatten(1).amax(1).numpy() for w in STRAY_WINDOWS}
    patch = {(k, e): F.avg_pool2d(patch_map(images, fit, k, e), 3, 1, 1).flatten(1).amax(1).numpy()
             for k in PATCH_WINDOWS for e in PATCH_EROSIONS}
    return stray, patch


def probability(stray: np.ndarray, patch: np.ndarray, sa: float, t: float) -> np.ndarray:
    """The judge's probability (SceneFitMarkJudge's formula) from precomputed scores."""
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    return np.maximum(sig((stray - sa) / 0.05), sig((patch - t) / 0.02))


def design_forms() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    out = []
    for k, form in enumerate(FORMS["safety"]):
        data = forms_dataset(DESIGN_N, DESIGN_SEED + 100 * k, "safety", "train", forms=(form,))
        out.append((form, vae_round_trip(data["images"]), data["labels"]))
    return out


def choose(y: np.ndarray, stray: dict, patch: dict, allowed: set, idx: np.ndarray) -> dict:
    """The allowed setting with the highest kappa on ``idx`` of the person set, smoothed over +-0.01."""
    best = None
    for w, sa, key in itertools.product(STRAY_WINDOWS, STRAY_THRESHOLDS, patch):
        kappas = np.array([cohen_kappa(y[idx], (stray[w][idx] > sa) | (patch[key][idx] > t)) for t in PATCH_THRESHOLDS])
        smooth = np.convolve(kappas, np.ones(3) / 3, mode="same")
        for j in range(1, len(PATCH_THRESHOLDS) - 1):
            setting = (w, sa, key[0], key[1], float(PATCH_THRESHOLDS[j]))
            if setting in allowed and (best is None or smooth[j] > best["smoothed_kappa"]):
                best = {"smoothed_kappa": float(smooth[j]), "kappa": float(kappas[j]), "setting": setting}
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audit", action="store_true", help="also read the packaged audit set (after the rule is written)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    px, py = person_set()
    y = py.numpy().astype(bool)
    stray, patch = features(px)

    shipped = load_judge("safety", person_tuned=False)  # generator-trained, at its operating point (shipped then)
    forms = design_forms()
    shipped_auc = {}
    form_feats = []
    for form, images, labels in forms:
        with torch.no_grad():
            shipped_auc[form] = _auc(shipped.defect_probability(images, [""] * len(images)).double(), labels.double())
        form_feats.append((form, *features(images), labels))
    allowed, form_auc = set(), {}
    for w, sa, (k, e), t in itertools.product(STRAY_WINDOWS, STRAY_THRESHOLDS, patch, PATCH_THRESHOLDS):
        aucs = {form: _auc(torch.from_numpy(probability(fs[w], fp[(k, e)], sa, t)).double(), labels.double())
                for form, fs, fp, labels in form_feats}
        setting = (w, sa, k, e, float(t))
        form_auc[setting] = aucs
        if all(aucs[f] >= FORM_FLOOR for f in aucs if shipped_auc[f] >= FORM_FLOOR):
            allowed.add(setting)
    chosen = choose(y, stray, patch, allowed, np.arange(len(y)))
    unconstrained = choose(y, stray, patch, set(form_auc), np.arange(len(y)))

    rng = np.random.default_rng(0)
    cv = []
    for _ in range(3):
        perm = rng.permutation(len(y))
        fold_kappas = []
        for fold in np.array_split(perm, 5):
            w, sa, k, e, t = choose(y, stray, patch, allowed, np.setdiff1d(perm, fold))["setting"]
            fold_kappas.append(cohen_kappa(y[fold], (stray[w][fold] > sa) | (patch[(k, e)][fold] > t)))
        cv.append(round(float(np.mean(fold_kappas)), 3))
    with torch.no_grad():
        p_shipped = shipped.defect_probability(px, [""] * len(px)).numpy()
    out = {
        "settings_tried": len(form_auc), "settings_allowed_by_forms": len(allowed),
        "chosen": dict(zip(("stray_window", "stray_threshold", "patch_window", "patch_erosion", "patch_threshold"),
                           chosen["setting"], strict=True)),
        "person_kappa": {"chosen": round(chosen["kappa"], 3), "chosen_5fold_cv": cv,
                         "unconstrained_best": round(unconstrained["kappa"], 3),
                         "unconstrained_setting": unconstrained["setting"],
                         "shipped_judge_at_its_threshold": round(cohen_kappa(y, p_shipped > 0.5), 3)},
        "design_forms_auc": {"chosen": {f: round(v, 3) for f, v in form_auc[chosen["setting"]].items()},
                             "shipped": {f: round(v, 3) for f, v in shipped_auc.items()}},
    }
    print(json.dumps(out), flush=True)

    if args.audit:
        images, doc = load_audit()
        human = np.array([it["labels"]["safety"] for it in doc["items"]], dtype=bool)
        batches = np.array([it["batch"] for it in doc["items"]])
        w, sa, k, e, t = chosen["setting"]
        judges = {"chosen": SceneFitMarkJudge(w, sa, k, e, t), "shipped": shipped}
        out["audit_kappa"] = {}
        for name, judge in judges.items():
            with torch.no_grad():
                pred = torch.cat([judge.defect_probability(images[i : i + 128], [""] * len(images[i : i + 128]))
                                  for i in range(0, len(images), 128)]).numpy() > 0.5
            later = batches >= 6
            out["audit_kappa"][name] = {
                "by_batch": {int(b): round(cohen_kappa(human[batches == b], pred[batches == b]), 3)
                             for b in sorted(set(batches))},
                "batches_6_9": round(cohen_kappa(human[later & (batches <= 9)], pred[later & (batches <= 9)]), 3),
                "all": round(cohen_kappa(human, pred), 3)}
            print(name, json.dumps(out["audit_kappa"][name]), flush=True)
    out["seconds"] = round(time.time() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
