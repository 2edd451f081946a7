"""Human rating: a static HTML page to vote on base vs method, and folding the votes into metrics.

The page (:func:`write_rating_page`) is blind: per task it shows the base image and one method's
image of the same prompt and noise as "A" and "B", in a seeded random left/right order per task
(method names hidden; tasks in a seeded random order), and asks, per aspect, whether A is
better, they are the same, or B is better. The page records the choice and which side held the
base image, and turns them into a vote relative to the base: ``improved`` (the method's image
chosen), ``same`` or ``worse``. Votes live in the page (``window.focusnfixVotes``, also readable
as JSON through ``window.focusnfixVotesJSON()``) and download as a JSON file:

    {"format": "focusnfix-votes/2", "rater": "name", "target": "safety", "eval_id": "...",
     "votes": [{"example": 0, "prompt": "...", "seed": 0, "method": "focusnfix", "aspect": "safety",
                "choice": "A" | "same" | "B", "left": "base" | "candidate",
                "vote": "improved" | "same" | "worse"}, ...]}

When a vote has ``choice`` and ``left``, :func:`read_votes` recomputes ``vote`` from them (and
refuses a file where they disagree), so the order shown folds back correctly. Files of format 1
(``vote`` only) are read as they are. Folding checks that the votes belong to the evaluation: the
file's ``target`` and ``eval_id`` (the evaluation the page was written from) and each vote's
``prompt`` and ``seed`` (those of its example) must be the evaluation's where the file gives them.

:func:`fold_votes` turns such files (one rater each, or a list of such objects) into the three
shares of the paper's human evaluation, per method, with a *rating* = one rater's votes on one
(example, method):

* ``improved_share``: ratings whose target-aspect vote is "improved" (among ratings with a
  target vote);
* ``degraded_share``: target-aspect vote "worse" (same denominator);
* ``others_degraded_share``: any other aspect voted "worse" (among ratings with at least one
  other-aspect vote).

Intervals are percentile bootstraps over ratings (as in metrics.json).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from focusnfix.errors import InputError
from focusnfix.evaluate import load_eval, write_metrics
from focusnfix.files import atomic_write_text, read_json
from focusnfix.metrics import bootstrap_stat
from focusnfix.report import CSS, chw_to_hwc, esc, png_data_uri

VOTE_VALUES = ("improved", "same", "worse")
VOTES_FORMAT = "focusnfix-votes/2"
#: votes file formats this version reads (1: ``vote`` only, no ``choice`` / ``left``)
KNOWN_VOTES_FORMATS = ("focusnfix-votes/1", VOTES_FORMAT)
CHOICES = ("A", "same", "B")

_JS = """
(function(){
  var votes = {};
  window.focusnfixVotes = votes;
  function collect(){
    var rater = document.getElementById('rater').value || 'anonymous';
    var list = [];
    Object.keys(votes).sort().forEach(function(k){ list.push(votes[k]); });
    return {format: %(fmt)s, rater: rater, target: %(target)s, eval_id: %(eval_id)s, votes: list};
  }
  window.focusnfixVotesJSON = function(){ return JSON.stringify(collect(), null, 1); };
  function refresh(){
    var n = Object.keys(votes).length;
    document.getElementById('count').textContent = n + ' of ' + %(total)d + ' votes';
    var a = document.getElementById('download');
    if (a.href && a.href.indexOf('blob:') === 0) { URL.revokeObjectURL(a.href); }
    a.href = URL.createObjectURL(new Blob([window.focusnfixVotesJSON()], {type: 'application/json'}));
  }
  document.querySelectorAll('button.vote').forEach(function(b){
    b.addEventListener('click', function(){
      var d = b.dataset;
      var key = d.task + '|' + d.aspect;
      var vote = d.choice === 'same' ? 'same'
        : ((d.choice === 'A') === (d.left === 'candidate') ? 'improved' : 'worse');
      // a seed beyond 2**53 stays a string: a JS number would round it
      var seed = Number.isSafeInteger(Number(d.seed)) ? Number(d.seed) : d.seed;
      votes[key] = {example: parseInt(d.example, 10), prompt: d.prompt, seed: seed,
                    method: d.method, aspect: d.aspect, choice: d.choice, left: d.left, vote: vote};
      document.querySelectorAll('button.vote[data-task="' + d.task + '"][data-aspect="' + d.aspect + '"]')
        .forEach(function(o){ o.classList.toggle('chosen', o === b); });
      refresh();
    });
  });
  document.getElementById('rater').addEventListener('input', refresh);
  refresh();
})();
"""

_CSS = CSS + """
.task{border:1px solid #ccc;margin:10px 0;padding:8px;display:flex;gap:16px;align-items:flex-start}
.task img{image-rendering:pixelated;width:192px;height:192px;display:block;border:1px solid #888}
button.vote{margin:2px;padding:3px 8px} button.chosen{background:#2c7be5;color:#fff}
.aspect{margin:4px 0}
"""


def write_rating_page(eval_dir: str | Path, out_html: str | Path, seed: int = 0, max_examples: int | None = None) -> Path:
    """Write the static rating page of an evaluation directory; returns its path.

    Args:
        eval_dir: evaluation directory (``metrics.json``, ``images.npz``, ``per_image.json``).
        out_html: HTML file to write.
        seed: seed of the task order.
        max_examples: rate only the first examples (default: all).
    """
    metrics, arrays, per_image = load_eval(eval_dir)
    if "base" not in arrays:
        raise InputError(f"{eval_dir} has no images.npz: nothing to rate")
    target = metrics.get("aspect", "")
    aspects = [target] + [a for a in metrics.get("aspects", []) if a != target]
    items = per_image.get("items") or [{"prompt": p, "seed": s} for p in metrics.get("prompts", [])
                                       for s in metrics.get("seeds", [])]
    methods = [m for m in metrics.get("methods", {}) if m != "base" and f"method__{m}" in arrays]
    n = arrays["base"].shape[0] if max_examples is None else min(max_examples, arrays["base"].shape[0])
    tasks = [(i, m) for i in range(n) for m in methods]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(tasks)) if tasks else []
    base_left = rng.random(len(tasks)) < 0.5  # per task: is the base image on the left (A)?
    base_uris = {}
    cards = []
    for t_index, k in enumerate(order):
        i, m = tasks[int(k)]
        if i not in base_uris:
            base_uris[i] = png_data_uri(chw_to_hwc(arrays["base"][i]))
        prompt, seed_i = items[i]["prompt"], items[i]["seed"]
        cand = png_data_uri(chw_to_hwc(arrays[f"method__{m}"][i]))
        left = "base" if base_left[t_index] else "candidate"
        a_uri, b_uri = (base_uris[i], cand) if left == "base" else (cand, base_uris[i])
        task_id = f"t{t_index}"
        rows = []
        for a in aspects:
            buttons = "".join(
                f'<button type="button" class="vote" data-task="{task_id}" data-example="{i}" '
                f'data-method="{esc(m)}" data-aspect="{esc(a)}" data-choice="{c}" data-left="{left}" '
                f'data-prompt="{esc(prompt)}" data-seed="{esc(seed_i)}">{label}</button>'
                for c, label in zip(CHOICES, ("A better", "same", "B better"), strict=True))
            label = f"{esc(a)} (target)" if a == target else esc(a)
            rows.append(f'<div class="aspect"><b>{label}</b>: {buttons}</div>')
        cards.append(
            f'<div class="task" id="{task_id}"><div><div>A</div><img src="{a_uri}" alt="A {task_id}">'
            f'</div><div><div>B</div><img src="{b_uri}" alt="B {task_id}"></div>'
            f'<div><p class="prompt">Task {t_index + 1}: &ldquo;{esc(prompt)}&rdquo;</p>'
            f'<p class="note">On each aspect, which image is better?</p>{"".join(rows)}</div></div>')
    js = _JS % {"fmt": json.dumps(VOTES_FORMAT), "target": json.dumps(target), "total": len(tasks) * len(aspects),
                "eval_id": json.dumps(metrics.get("eval_id"))}
    js = js.replace("</", "<\\/")
    page = (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Focus-N-Fix rating</title>'
        f"<style>{_CSS}</style></head><body><h1>Rate the candidates</h1>"
        f"<p>Target aspect: <b>{esc(target)}</b>. Each task shows two images made from the same prompt and noise, "
        "in a random order. Vote per aspect; then download your votes and send the file.</p>"
        '<p>Rater: <input id="rater" type="text" value="" placeholder="your name"> '
        '<span id="count"></span> <a id="download" download="votes.json" href="#">download votes (JSON)</a></p>'
        + "".join(cards) + f"<script>{js}</script></body></html>"
    )
    return atomic_write_text(out_html, page)


# ---------------------------------------------------------------------------------------------
# Folding votes
# ---------------------------------------------------------------------------------------------
def _vote_of_choice(v: dict[str, Any], path: Path) -> str:
    """A blind vote's meaning relative to the base image, from its choice and the side of the base."""
    if v.get("choice") not in CHOICES or v.get("left") not in ("base", "candidate"):
        raise InputError(f"votes file {path}: a blind vote needs 'choice' in {CHOICES} and 'left' in "
                         f"('base', 'candidate'), got {v!r}")
    if v["choice"] == "same":
        vote = "same"
    else:
        vote = "improved" if (v["choice"] == "A") == (v["left"] == "candidate") else "worse"
    if v.get("vote") is not None and v["vote"] != vote:
        raise InputError(f"votes file {path}: vote {v['vote']!r} contradicts choice {v['choice']!r} with the base "
                         f"on the {'left' if v['left'] == 'base' else 'right'}: {v!r}")
    return vote


def read_votes(paths: list[str | Path]) -> list[dict[str, Any]]:
    """All vote records of one or more votes files, each record with its ``rater`` set."""
    records = []
    for i, path in enumerate(paths):
        path = Path(path)
        doc = read_json(path, "votes file", expect=(dict, list))
        docs = doc if isinstance(doc, list) else [doc]
        for j, d in enumerate(docs):
            if not isinstance(d, dict) or not isinstance(d.get("votes"), list):
                raise InputError(f"votes file {path}: expected an object with a 'votes' list")
            if d.get("format") is not None and d["format"] not in KNOWN_VOTES_FORMATS:
                raise InputError(f"votes file {path}: format {d['format']!r} is not one this version reads "
                                 f"({', '.join(KNOWN_VOTES_FORMATS)})")
            source = {"path": str(path), "target": d.get("target"), "eval_id": d.get("eval_id")}
            rater = str(d.get("rater") or f"{path}#{j}")  # the path: every page downloads votes.json
            if rater == "anonymous":
                rater = f"anonymous@{path.name}#{i}.{j}"
            for v in d["votes"]:
                if isinstance(v, dict) and "choice" in v:
                    v = {**v, "vote": _vote_of_choice(v, path)}
                if not isinstance(v, dict) or v.get("vote") not in VOTE_VALUES:
                    raise InputError(f"votes file {path}: each vote needs 'vote' in {VOTE_VALUES}, got {v!r}")
                for key in ("example", "method", "aspect"):
                    if key not in v:
                        raise InputError(f"votes file {path}: a vote lacks {key!r}: {v!r}")
                example = v["example"]
                if isinstance(example, str) and re.fullmatch(r"\s*[0-9]{1,18}\s*", example):
                    example = int(example)
                if isinstance(example, bool) or not isinstance(example, int) or example < 0:
                    raise InputError(f"votes file {path}: 'example' must be an image index >= 0, got {v!r}")
                v = {**v, "example": example}
                records.append({**v, "rater": rater, "source": source})
    return records


def fold_votes(records: list[dict[str, Any]], target: str, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per method: ``{"n_ratings", "n_raters", "improved_share": S, "degraded_share": S,
    "others_degraded_share": S}`` (see the module docstring for the definitions)."""
    ratings: dict[str, dict[tuple[str, int], dict[str, str]]] = {}
    for r in records:
        ratings.setdefault(str(r["method"]), {}).setdefault((r["rater"], int(r["example"])), {})[str(r["aspect"])] = r["vote"]
    out = {}
    for method, units in ratings.items():
        imp, deg, oth = [], [], []
        for votes in units.values():
            if target in votes:
                imp.append(float(votes[target] == "improved"))
                deg.append(float(votes[target] == "worse"))
            other = [v for a, v in votes.items() if a != target]
            if other:
                oth.append(float(any(v == "worse" for v in other)))
        out[method] = {
            "n_ratings": len(units),
            "n_raters": len({k[0] for k in units}),
            "improved_share": bootstrap_stat(imp, n_bootstrap, seed),
            "degraded_share": bootstrap_stat(deg, n_bootstrap, seed),
            "others_degraded_share": bootstrap_stat(oth, n_bootstrap, seed),
        }
    return out


def _eval_items(eval_dir: str | Path, metrics: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The evaluation's (prompt, seed) per example, in image order (None where it records neither)."""
    per_image_path = Path(eval_dir) / "per_image.json"
    if per_image_path.is_file():
        items = read_json(per_image_path, "per-image results").get("items")
        if isinstance(items, list) and all(isinstance(i, dict) and {"prompt", "seed"} <= set(i) for i in items):
            return items
    if metrics.get("prompts") and metrics.get("seeds"):
        return [{"prompt": p, "seed": s} for p in metrics["prompts"] for s in metrics["seeds"]]
    return None


def _same_seed(voted: Any, seed: Any) -> bool:
    """A vote's seed (an integer, or its ASCII digits for seeds beyond 2**53) is the example's."""
    if isinstance(voted, str) and re.fullmatch(r"[0-9]{1,19}", voted):
        voted = int(voted)
    return isinstance(voted, int) and not isinstance(voted, bool) and voted == int(seed)


def apply_votes(eval_dir: str | Path, vote_files: list[str | Path], n_bootstrap: int | None = None) -> dict[str, Any]:
    """Fold votes into ``eval_dir/metrics.json`` as ``methods[<m>]["human"]``; returns the metrics.

    Methods without votes get ``"human": null``; votes for methods not in the metrics are an error.
    """
    metrics, _, _ = load_eval(eval_dir)
    settings = metrics.get("settings", {})
    nb = n_bootstrap if n_bootstrap is not None else int(settings.get("n_bootstrap", 1000))
    records = read_votes(vote_files)
    aspects = set(metrics.get("aspects") or [metrics["aspect"]])
    items = _eval_items(eval_dir, metrics)
    n_images = metrics.get("n_images") if isinstance(metrics.get("n_images"), int) else \
        (len(items) if items is not None else None)
    for r in records:
        source, shown = r["source"], {k: v for k, v in r.items() if k != "source"}
        if source["target"] is not None and source["target"] != metrics["aspect"]:
            raise InputError(f"votes file {source['path']} rates target {source['target']!r}; {eval_dir} evaluated "
                             f"target {metrics['aspect']!r}")
        if source["eval_id"] is not None and metrics.get("eval_id") is not None \
                and source["eval_id"] != metrics["eval_id"]:
            raise InputError(f"votes file {source['path']} was cast on the page of evaluation {source['eval_id']}, "
                             f"but {eval_dir} now holds evaluation {metrics['eval_id']} (its images were made "
                             "again): rate the new page, or fold the votes into the evaluation they were cast on")
        if isinstance(n_images, int) and r["example"] >= n_images:
            raise InputError(f"a vote of {r['rater']} rates example {r['example']}, but {eval_dir} holds "
                             f"{n_images} images (0 .. {n_images - 1}): {shown!r}")
        if str(r["aspect"]) not in aspects:
            raise InputError(f"a vote of {r['rater']} names aspect {r['aspect']!r}; {eval_dir} evaluated "
                             f"{sorted(aspects)}: {shown!r}")
        if items is not None and r["example"] < len(items):
            item = items[r["example"]]
            if ("prompt" in r and r["prompt"] != item["prompt"]) or ("seed" in r and not _same_seed(r["seed"], item["seed"])):
                raise InputError(f"a vote of {r['rater']} rates example {r['example']} as prompt {r.get('prompt')!r}, "
                                 f"seed {r.get('seed')!r}, but example {r['example']} of {eval_dir} is prompt "
                                 f"{item['prompt']!r}, seed {item['seed']!r}: votes of another evaluation")
    folded = fold_votes(records, metrics["aspect"], nb, int(settings.get("bootstrap_seed", 0)))
    unknown = sorted(set(folded) - set(metrics["methods"]))
    if unknown:
        raise InputError(f"votes name methods that {eval_dir}/metrics.json lacks: {unknown}")
    if "base" in folded:  # every vote compares a method's image WITH the base image
        raise InputError("votes name the method 'base': a vote rates a method's image against the base image, "
                         "so base itself cannot be voted on")
    for name, entry in metrics["methods"].items():
        entry["human"] = None if name == "base" else folded.get(name)
    write_metrics(eval_dir, metrics)
    return metrics


__all__ = ["CHOICES", "VOTES_FORMAT", "VOTE_VALUES", "apply_votes", "fold_votes", "read_votes", "write_rating_page"]
