"""One self-contained HTML report of an evaluation (no network, no JavaScript libraries).

:func:`write_report` reads an evaluation directory written by
:func:`focusnfix.evaluate.evaluate` (``metrics.json``, ``images.npz``, ``per_image.json``) and
writes one HTML file with

* the metric tables (mean and 95% bootstrap interval per method, human votes if folded in);
* per example: prompt and seed, the base image, its target heatmap and mask, each method's image
  and its ``|method - base|`` map (mean over channels, x4, black-red-yellow-white ramp);
* reward and constraint vs step plots of training logs (``log.jsonl``), as inline SVG;
* the beta trade-off curve (outside-mask PSNR vs target gain) of a ``sweep.json``.

Images are PNG ``data:`` URIs; every user-supplied string (prompts, paths, names) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from focusnfix.errors import InputError
from focusnfix.evaluate import load_eval
from focusnfix.files import atomic_write_text

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
#: preferred column order of methods (others follow in metrics.json order)
METHOD_ORDER = ("base", "focusnfix", "draft", "sld")

CSS = """
body{font-family:system-ui,Arial,sans-serif;margin:20px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:right;vertical-align:top}
th{background:#f3f3f3} td.l,th.l{text-align:left}
img.px{image-rendering:pixelated;width:128px;height:128px;display:block;border:1px solid #888}
.ex td{text-align:center} .prompt{max-width:220px;text-align:left;font-size:13px}
.ci{color:#777;font-size:11px} .note{color:#666;font-size:12px}
svg{background:#fff;border:1px solid #ddd;margin:6px}
"""


def esc(text: Any) -> str:
    """HTML-escape any value (quotes included)."""
    return html.escape(str(text), quote=True)


def png_data_uri(array: np.ndarray) -> str:
    """``(H, W, 3)`` or ``(H, W)`` uint8 -> ``data:image/png;base64,...``."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chw_to_hwc(x: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` uint8 (C = 1 or 3) -> ``(H, W, 3)`` uint8."""
    x = np.asarray(x)
    if x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    return np.ascontiguousarray(x.transpose(1, 2, 0))


def ramp(h: np.ndarray) -> np.ndarray:
    """``(H, W)`` in [0, 1] -> ``(H, W, 3)`` uint8 black-red-yellow-white ramp."""
    h = np.clip(np.asarray(h, dtype=np.float64), 0, 1)
    rgb = np.stack([np.clip(h * 3 - k, 0, 1) for k in range(3)], axis=-1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def diff_map(image: np.ndarray, base: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """``|image - base|`` of two ``(3, H, W)`` uint8 images, channel mean x gain, as a ramp ``(H, W, 3)``."""
    d = np.abs(image.astype(np.float64) - base.astype(np.float64)).mean(axis=0) / 255.0
    return ramp(d * gain)


def method_order(names: list[str]) -> list[str]:
    first = [m for m in METHOD_ORDER if m in names]
    return first + [m for m in names if m not in first]


def fmt_stat(s: Any, digits: int = 3) -> str:
    """``S`` -> ``"mean <span>[lo, hi]</span>"`` HTML; None -> an em dash."""
    if not isinstance(s, dict) or s.get("mean") is None:
        return "&mdash;"
    lo, hi = (s.get("ci95") or [None, None])[:2]

    def f(v: Any) -> str:
        return "&mdash;" if v is None else f"{float(v):.{digits}g}" if abs(float(v)) >= 1000 else f"{float(v):.{digits}f}"

    return f'{f(s["mean"])} <span class="ci">[{f(lo)}, {f(hi)}]</span>'


# ---------------------------------------------------------------------------------------------
# SVG plots
# ---------------------------------------------------------------------------------------------
def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def svg_plot(
    series: list[tuple[str, list[float], list[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    width: int = 440,
    height: int = 270,
    point_labels: list[list[str]] | None = None,
    lines: bool = True,
) -> str:
    """An inline SVG line (or scatter) plot of ``(label, xs, ys)`` series; non-finite points skipped."""
    clean = []
    for label, xs, ys in series:
        pts = [(float(x), float(y)) for x, y in zip(xs, ys, strict=False)
               if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
        clean.append((label, pts))
    allp = [p for _, pts in clean for p in pts]
    left, right, top, bottom = 62, 16, 28, 42
    pw, ph = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(title)}" class="plot">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{esc(title)}</text>']
    if not allp:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="12">no data</text></svg>')
        return "".join(parts)
    x0, x1 = min(p[0] for p in allp), max(p[0] for p in allp)
    y0, y1 = min(p[1] for p in allp), max(p[1] for p in allp)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        pad = abs(y0) * 0.05 or 0.5
        y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for t in _ticks(x0, x1):
        parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 14}" text-anchor="middle" font-size="10">{t:.3g}</text>')
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{sy(t) + 3:.1f}" text-anchor="end" font-size="10">{t:.3g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" font-size="11">{esc(xlabel)}</text>')
    parts.append(f'<text x="12" y="{top + ph / 2}" text-anchor="middle" font-size="11" '
                 f'transform="rotate(-90 12 {top + ph / 2})">{esc(ylabel)}</text>')
    for i, (label, pts) in enumerate(clean):
        color = PALETTE[i % len(PALETTE)]
        if lines and len(pts) > 1:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        if not lines or len(pts) <= 30:
            for j, (x, y) in enumerate(pts):
                parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>')
                if point_labels and i < len(point_labels) and j < len(point_labels[i]):
                    parts.append(f'<text x="{sx(x) + 5:.1f}" y="{sy(y) - 5:.1f}" font-size="10">'
                                 f'{esc(point_labels[i][j])}</text>')
        parts.append(f'<text x="{left + 8}" y="{top + 14 + 13 * i}" font-size="11" fill="{color}">{esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
def _metric_tables(metrics: dict[str, Any]) -> str:
    methods = metrics.get("methods", {})
    names = method_order(list(methods))
    target = metrics.get("aspect", "")
    others = sorted({a for m in methods.values() for a in (m.get("other_rewards") or {})})
    judges = sorted({a for m in methods.values() for a in (m.get("judge_defect_rate") or {})})
    out = ['<h2>Rewards and judges</h2><table class="metrics" id="table-rewards"><tr><th class="l">method</th>',
           f"<th>target reward ({esc(target)})</th>"]
    out += [f"<th>reward: {esc(a)}</th>" for a in others]
    out += [f"<th>judge defect rate: {esc(j)}</th>" for j in judges]
    out.append("</tr>")
    for n in names:
        m = methods[n]
        cells = [fmt_stat(m.get("target_reward"))]
        cells += [fmt_stat((m.get("other_rewards") or {}).get(a)) for a in others]
        cells += [fmt_stat((m.get("judge_defect_rate") or {}).get(j)) for j in judges]
        out.append(f'<tr><td class="l">{esc(n)}</td>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    cols = [("outside_psnr", "outside PSNR (dB)"), ("outside_ssim", "outside SSIM"), ("inside_change", "inside change"),
            ("target_gain", "target gain"), ("improved_share", "improved"), ("degraded_share", "degraded"),
            ("others_degraded_share", "others degraded")]
    out.append('<h2>Change vs base (per image, same prompt and seed)</h2><table class="metrics" id="table-change">'
               '<tr><th class="l">method</th>' + "".join(f"<th>{esc(c[1])}</th>" for c in cols) + "</tr>")
    for n in names:
        m = methods[n]
        out.append(f'<tr><td class="l">{esc(n)}</td>' + "".join(f"<td>{fmt_stat(m.get(k))}</td>" for k, _ in cols)
                   + "</tr>")
    out.append("</table>")
    human = {n: methods[n]["human"] for n in names if isinstance(methods[n].get("human"), dict)}
    if human:
        out.append('<h2>Human votes</h2><table class="metrics" id="table-human"><tr><th class="l">method</th>'
                   "<th>ratings</th><th>improved</th><th>degraded</th><th>others degraded</th></tr>")
        for n, h in human.items():
            out.append(f'<tr><td class="l">{esc(n)}</td><td>{esc(h.get("n_ratings", ""))}</td>'
                       + "".join(f"<td>{fmt_stat(h.get(k))}</td>" for k in
                                 ("improved_share", "degraded_share", "others_degraded_share")) + "</tr>")
        out.append("</table>")
    s = metrics.get("settings", {})
    out.append(f'<p class="note">eps = {esc(s.get("eps"))} (reward units), judge threshold = '
               f'{esc(s.get("judge_threshold"))}, {esc(s.get("n_bootstrap"))} bootstrap resamples over images; '
               f'PSNR of an unchanged outside is capped at {esc(s.get("psnr_cap_db"))} dB. '
               + " ".join(esc(n) for n in metrics.get("notes", [])) + "</p>")
    return "".join(out)


def _img(uri: str, alt: str, cls: str = "px") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{esc(alt)}" title="{esc(alt)}">'


def _examples(metrics: dict[str, Any], arrays: dict[str, np.ndarray], per_image: dict[str, Any], limit: int) -> str:
    if "base" not in arrays:
        return '<p class="note">no images.npz in the evaluation directory</p>'
    items = per_image.get("items") or []
    methods = [m for m in method_order(list(metrics.get("methods", {}))) if m != "base" and f"method__{m}" in arrays]
    n = min(limit, arrays["base"].shape[0])
    head = ['<th class="l">prompt / seed</th><th>base</th><th>heatmap</th><th>mask</th>']
    for m in methods:
        head.append(f"<th>{esc(m)}</th><th>|{esc(m)} &minus; base|</th>")
    rows = [f'<h2>Examples ({n} of {arrays["base"].shape[0]})</h2><table class="ex" id="examples"><tr>'
            + "".join(head) + "</tr>"]
    for i in range(n):
        prompt = items[i]["prompt"] if i < len(items) else ""
        seed = items[i]["seed"] if i < len(items) else ""
        base = arrays["base"][i]
        cells = [f'<td class="prompt">{esc(prompt)}<br><span class="ci">seed {esc(seed)}</span></td>',
                 f'<td>{_img(png_data_uri(chw_to_hwc(base)), f"base {i}")}</td>',
                 f'<td>{_img(png_data_uri(ramp(arrays["heatmap"][i, 0] / 255.0)), f"heatmap {i}")}</td>',
                 f'<td>{_img(png_data_uri(chw_to_hwc(arrays["mask"][i])), f"mask {i}")}</td>']
        for m in methods:
            img = arrays[f"method__{m}"][i]
            cells.append(f'<td>{_img(png_data_uri(chw_to_hwc(img)), f"{m} {i}")}</td>')
            cells.append(f'<td>{_img(png_data_uri(diff_map(img, base)), f"diff {m} {i}")}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    rows.append("</table>")
    return "".join(rows)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Records of a training ``log.jsonl`` (a run directory also works); bad lines are skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    if not path.is_file():
        raise InputError(f"training log {path} does not exist")
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def _training_plots(train_logs: dict[str, Path]) -> str:
    logs = {name: read_log(p) for name, p in train_logs.items()}
    out = ['<h2>Training</h2><div id="training-plots">']
    for key, label in (("reward", "reward"), ("constraint", "constraint ||(1-M)(I-I0)||"),
                       ("outside_change", "mean |change| outside the mask"), ("mask_area", "mask area")):
        series = [(name, [r["step"] for r in recs if key in r], [r[key] for r in recs if key in r])
                  for name, recs in logs.items()]
        if any(s[1] for s in series):
            out.append(svg_plot(series, f"{label} vs step", "step", label))
    out.append("</div>")
    return "".join(out)


def _sweep_section(sweep_path: Path) -> str:
    if not Path(sweep_path).is_file():
        raise InputError(f"sweep file {sweep_path} does not exist")
    doc = json.loads(Path(sweep_path).read_text())
    pts = doc.get("points", [])

    def mean(p: dict, k: str) -> float | None:
        s = p.get(k)
        return s.get("mean") if isinstance(s, dict) else None

    xs = [mean(p, "outside_psnr") for p in pts]
    ys = [mean(p, "target_gain") for p in pts]
    labels = [f"β={p.get('beta')}" + (" (DRaFT)" if p.get("beta") == 0 else "") for p in pts]
    out = ['<h2>β trade-off</h2><div id="sweep-plot">',
           svg_plot([("sweep", xs, ys)], "target gain vs outside-mask PSNR", "outside PSNR (dB)",
                    "target gain", point_labels=[labels]),
           '</div><table class="metrics" id="table-sweep"><tr><th>β</th><th>target gain</th><th>outside PSNR</th>'
           "<th>outside SSIM</th><th>improved</th><th>degraded</th><th>others degraded</th></tr>"]
    for p in pts:
        out.append(f"<tr><td>{esc(p.get('beta'))}</td>" + "".join(
            f"<td>{fmt_stat(p.get(k))}</td>" for k in ("target_gain", "outside_psnr", "outside_ssim",
                                                        "improved_share", "degraded_share", "others_degraded_share"))
            + "</tr>")
    out.append("</table>")
    return "".join(out)


def write_report(
    eval_dir: str | Path,
    out_html: str | Path,
    train_logs: dict[str, Path] | None = None,
    sweep: Path | None = None,
    max_examples: int = 32,
) -> Path:
    """Write the self-contained HTML report of ``eval_dir`` to ``out_html`` (atomically).

    Args:
        eval_dir: an evaluation directory (``metrics.json`` required; ``images.npz`` and
            ``per_image.json`` for the example rows).
        out_html: the HTML file to write.
        train_logs: run name -> ``log.jsonl`` (or its run directory), plotted vs step.
        sweep: a ``sweep.json`` from :func:`focusnfix.sweep.sweep`.
        max_examples: at most this many example rows.
    """
    metrics, arrays, per_image = load_eval(eval_dir)
    body = [f"<h1>Focus-N-Fix evaluation: target aspect {esc(metrics.get('aspect'))}</h1>",
            f'<p>{esc(metrics.get("n_images"))} images ({len(metrics.get("prompts", []))} prompts &times; '
            f'{len(metrics.get("seeds", []))} seeds); evaluation directory <code>{esc(eval_dir)}</code>. '
            "Mask: 1 = region the target aspect's localizer found on the base image (may change).</p>",
            _metric_tables(metrics),
            _examples(metrics, arrays, per_image, max_examples)]
    if train_logs:
        body.append(_training_plots(train_logs))
    if sweep is not None:
        body.append(_sweep_section(Path(sweep)))
    page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Focus-N-Fix report</title>"
            f"<style>{CSS}</style></head><body>" + "".join(body) + "</body></html>")
    return atomic_write_text(out_html, page)


__all__ = ["diff_map", "esc", "fmt_stat", "png_data_uri", "read_log", "svg_plot", "write_report"]
