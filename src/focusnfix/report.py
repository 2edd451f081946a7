"""One self-contained HTML report of an evaluation (no network, no JavaScript libraries).

:func:`write_report` reads an evaluation directory written by
:func:`focusnfix.evaluate.evaluate` (``metrics.json``, ``images.npz``, ``per_image.json``) and
writes one HTML file with

* a headline (per method: defect removed, new defects, hack gap, other aspects, outside PSNR;
  the paired differences) and a summary bar chart with 95% intervals;
* the metric tables (mean and 95% bootstrap interval per method, paired differences, human votes
  if folded in);
* examples chosen to show the range (fixed, not fixed, reward hacked, new defect, clean): prompt
  and seed, the base image, its heatmap and mask, each method's image and its ``|method - base|``
  map (mean over channels, x4, black-red-yellow-white ramp, with its colour bar);
* reward and constraint vs step plots of training logs (``log.jsonl``, smoothed), as inline SVG;
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
from focusnfix.files import atomic_write_text, read_json, read_text

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


#: how the markdown table titles the demo's methods (other names are shown as they are)
METHOD_TITLES = {"focusnfix": "Focus-N-Fix", "draft": "DRaFT"}


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
# SVG plots: hand-written on purpose. The report is one self-contained HTML file that must open
# offline; inline SVG needs no plotting dependency (matplotlib would add ~40 MB and a font cache
# to the core install for five small line and bar plots).
# ---------------------------------------------------------------------------------------------
def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (steps of 1, 2 or 5 x 10^k) inside ``[lo, hi]``.

    Ticks are ``k * step`` for integer k (no accumulated additions), at most 4n of them; a range
    too narrow for its magnitude (float rounding) gets ``[lo, hi]``.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi)):
        return [lo, hi]
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    k0, k1 = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    if k1 < k0 or k1 - k0 > 4 * n:
        return [lo, hi]
    return [0.0 if k == 0 else k * step for k in range(k0, k1 + 1)]


def ema(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average (``alpha`` = weight of the newest value; 1 = no smoothing)."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * v + (1 - alpha) * out[-1])
    return out


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
    if x1 - x0 <= 1e-9 * max(abs(x0), abs(x1)):
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 - y0 <= 1e-9 * max(abs(y0), abs(y1)):  # flat (up to float rounding: an EMA of a constant)
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
    claim = [("removal_share", "defect removed (judge)"), ("new_defect_share", "new defect on clean (judge)"),
             ("hack_gap", "hack gap: reward says fixed, judge says defect"),
             ("others_degraded_share", "others degraded (judge flip)"),
             ("others_reward_drop_share", "others' reward drop > noise floor"), ("outside_psnr", "outside PSNR (dB)")]
    out.append('<h2>The claim: fixed where it was wrong, unchanged elsewhere</h2>'
               '<table class="metrics" id="table-claim"><tr><th class="l">method</th>'
               + "".join(f"<th>{esc(c[1])}</th>" for c in claim) + "<th>runs</th></tr>")
    for n in names:
        m = methods[n]
        out.append(f'<tr><td class="l">{esc(n)}</td>' + "".join(f"<td>{fmt_stat(m.get(k))}</td>" for k, _ in claim)
                   + f"<td>{esc(m.get('n_runs', 1 if n != 'base' else ''))}</td></tr>")
    out.append("</table>")
    comparisons = metrics.get("comparisons") or {}
    if comparisons:
        keys = [k for k, _ in claim] + ["target_reward"]
        labels = dict(claim, target_reward="target reward")
        out.append('<h2>Paired differences</h2><table class="metrics" id="table-paired"><tr><th class="l">'
                   "comparison</th>" + "".join(f"<th>{esc(labels[k])}</th>" for k in keys) + "</tr>")
        for name, diffs in comparisons.items():
            out.append(f'<tr><td class="l">{esc(name)}</td>'
                       + "".join(f"<td>{fmt_stat(diffs.get(k))}</td>" for k in keys) + "</tr>")
        out.append('</table><p class="note">Each cell: the statistic of the first method minus that of the second, '
                   "both computed on the same resamples of training runs and prompts (run r of each method shares "
                   "training seed r).</p>")
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
    out.append(f'<p class="note">Judge threshold = {esc(s.get("judge_threshold"))}; improved / degraded / reward '
               "drops count changes beyond each aspect's noise floor (the base rewards' within-prompt standard "
               f'deviation across seeds, at least {esc(s.get("eps"))}); {esc(s.get("n_bootstrap"))} bootstrap '
               f'resamples ({esc(s.get("bootstrap", "over images"))}); outside PSNR is that of the mean squared '
               f'error, capped at {esc(s.get("psnr_cap_db"))} dB when nothing changed. '
               + " ".join(esc(n) for n in metrics.get("notes", [])) + "</p>")
    return "".join(out)


def _md_stat(s: Any, digits: int) -> str:
    if not isinstance(s, dict) or s.get("mean") is None:
        return "–"
    lo, hi = (s.get("ci95") or [None, None])[:2]
    if lo is None or hi is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown_table(metrics: dict[str, Any]) -> str:
    """The claim table of ``metrics.json`` as GitHub markdown (the README's tables): one column per method
    (base first), one for each paired comparison, one row per metric; cells "mean [95% interval]"."""
    methods = metrics.get("methods", {})
    names = method_order(list(methods))
    comparisons = metrics.get("comparisons") or {}
    target = metrics.get("aspect", "")
    judges = sorted({a for m in methods.values() for a in (m.get("judge_defect_rate") or {})},
                    key=lambda a: (a != target, a))
    others = sorted({a for m in methods.values() for a in (m.get("other_rewards") or {})})
    rows: list[tuple[str, Any, int, bool]] = [  # label, getter, digits, has a paired difference
        ("defect removed (judge) ↑", "removal_share", 2, True),
        ("new defect on clean images ↓", "new_defect_share", 2, True),
        ("hack gap: reward says fixed, judge says defect ↓", "hack_gap", 2, True),
        ("another aspect's judge flips to defect ↓", "others_degraded_share", 2, True),
        ("another aspect's reward drops beyond its noise floor ↓", "others_reward_drop_share", 2, True),
        ("outside-mask PSNR vs base (dB) ↑", "outside_psnr", 1, True),
        ("outside-mask SSIM vs base ↑", "outside_ssim", 3, True),
        (f"{target} reward (target) ↑", "target_reward", 2, True),
    ]
    rows += [(f"judge: {j} defect rate", ("judge_defect_rate", j), 2, False) for j in judges]
    rows += [(f"{a} reward", ("other_rewards", a), 2, False) for a in others]

    def get(entry: dict[str, Any], key: Any) -> Any:
        return (entry.get(key[0]) or {}).get(key[1]) if isinstance(key, tuple) else entry.get(key)

    def shown(name: str) -> str:  # the README's names for the demo's two methods
        return " - ".join(METHOD_TITLES.get(part, part) for part in name.split(" - "))

    head = ["", *map(shown, names), *(f"{shown(c)} (paired)" for c in comparisons)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, digits, paired in rows:
        cells = [_md_stat(get(methods[n], key), digits) for n in names]
        cells += [_md_stat(get(d, key), digits) if paired else "–" for d in comparisons.values()]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def _mean(s: Any) -> float | None:
    return s.get("mean") if isinstance(s, dict) and s.get("mean") is not None else None


def _runs_text(n: object) -> str:
    return "1 training run" if n == 1 else f"{esc(n)} training runs"


def _pct(s: Any) -> str:
    m = _mean(s)
    if m is None:
        return "n/a"
    lo, hi = s["ci95"]
    return f"{100 * m:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def _headline(metrics: dict[str, Any]) -> str:
    """One sentence per method (what changed, where, how much) and one per paired comparison."""
    methods = metrics.get("methods", {})
    target = metrics.get("aspect", "")
    lines = []
    base_rate = _mean((methods.get("base", {}).get("judge_defect_rate") or {}).get(target))
    if base_rate is not None:
        lines.append(f"The base model draws a <b>{esc(target)}</b> defect (by its judge) in {100 * base_rate:.0f}% of "
                     f"{esc(metrics.get('n_images'))} held-out images.")
    for name in method_order(list(methods)):
        m = methods[name]
        if name == "base" or m.get("removal_share") is None:
            continue
        psnr = _mean(m.get("outside_psnr"))
        lines.append(
            f"<b>{esc(name)}</b> ({_runs_text(m.get('n_runs', 1))}): removes it in {_pct(m.get('removal_share'))} "
            f"of those images, adds one to {_pct(m.get('new_defect_share'))} of the clean ones; the reward calls "
            f"{_pct(m.get('hack_gap'))} fixed while the judge still sees the defect; another aspect's judge flips to "
            f"defect in {_pct(m.get('others_degraded_share'))}; outside the mask: "
            + (f"{psnr:.1f} dB PSNR." if psnr is not None else "n/a."))
    for name, d in (metrics.get("comparisons") or {}).items():
        r, o = d.get("removal_share"), d.get("outside_psnr")
        if _mean(r) is not None:
            lines.append(f"Paired, <b>{esc(name)}</b>: removal {100 * r['mean']:+.0f} points "
                         f"[{100 * r['ci95'][0]:+.0f}, {100 * r['ci95'][1]:+.0f}]"
                         + (f", outside PSNR {o['mean']:+.1f} dB [{o['ci95'][0]:+.1f}, {o['ci95'][1]:+.1f}]."
                            if _mean(o) is not None else "."))
    if not lines:
        return ""
    return '<div id="headline"><h2>Headline</h2><ul>' + "".join(f"<li>{x}</li>" for x in lines) + "</ul></div>"


def svg_bars(groups: list[tuple[str, list[tuple[str, dict | None]]]], title: str, width: int = 640) -> str:
    """Horizontal bars with 95% whiskers: ``[(group label, [(series label, S or None), ...]), ...]``, in [0, 1]."""
    series = sorted({lab for _, bars in groups for lab, _ in bars}, key=[lab for _, b in groups for lab, _ in b].index)
    bar_h, gap, left, top = 12, 10, 230, 24
    height = top + sum(len(b) * bar_h + gap for _, b in groups) + 30
    pw = width - left - 40  # room for a "100%" label right of a full bar
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(title)}" class="bars">',
             f'<text x="{width / 2}" y="15" text-anchor="middle" font-size="13">{esc(title)}</text>']
    y = top
    for label, bars in groups:
        parts.append(f'<text x="{left - 6}" y="{y + len(bars) * bar_h / 2 + 4}" text-anchor="end" '
                     f'font-size="11">{esc(label)}</text>')
        for lab, st in bars:
            color = PALETTE[series.index(lab) % len(PALETTE)]
            m = _mean(st)
            if m is not None:
                lo, hi = st["ci95"]
                parts.append(f'<rect x="{left}" y="{y + 1}" width="{max(0.5, m * pw):.1f}" height="{bar_h - 2}" '
                             f'fill="{color}"><title>{esc(lab)}: {m:.3f} [{lo:.3f}, {hi:.3f}]</title></rect>'
                             f'<line x1="{left + lo * pw:.1f}" x2="{left + hi * pw:.1f}" y1="{y + bar_h / 2}" '
                             f'y2="{y + bar_h / 2}" stroke="#000"/>'
                             f'<text x="{left + max(m, hi) * pw + 4:.1f}" y="{y + bar_h - 2}" font-size="10">'
                             f"{100 * m:.0f}%</text>")
            y += bar_h
        y += gap
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left + t * pw:.1f}" x2="{left + t * pw:.1f}" y1="{top - 4}" y2="{y - gap}" '
                     f'stroke="#ddd"/><text x="{left + t * pw:.1f}" y="{y + 6}" text-anchor="middle" '
                     f'font-size="10">{100 * t:.0f}%</text>')
    for i, lab in enumerate(series):
        parts.append(f'<rect x="{left + i * 110}" y="{height - 12}" width="10" height="10" '
                     f'fill="{PALETTE[i % len(PALETTE)]}"/><text x="{left + i * 110 + 14}" y="{height - 3}" '
                     f'font-size="11">{esc(lab)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _summary_chart(metrics: dict[str, Any]) -> str:
    methods = metrics.get("methods", {})
    names = [n for n in method_order(list(methods)) if n != "base" or methods[n].get("hack_gap") is not None]
    rows = [("defect removed (judge)", "removal_share"), ("new defect on clean images", "new_defect_share"),
            ("hack gap (reward fixed, judge defect)", "hack_gap"), ("another aspect's judge flips", "others_degraded_share")]
    groups = [(label, [(n, methods[n].get(key)) for n in names if n != "base" or key == "hack_gap"])
              for label, key in rows]
    groups = [(label, bars) for label, bars in groups if any(_mean(st) is not None for _, st in bars)]
    if not groups:
        return ""
    return '<div id="summary-chart">' + svg_bars(groups, "Per method: share of images (95% interval)") + "</div>"


def _colour_bar(gain: float = 4.0) -> str:
    bar = ramp(np.tile(np.linspace(0, 1, 128)[None, :], (10, 1)))
    return (f'<p class="note" id="diff-scale">Difference maps: |method &minus; base| averaged over colour channels, '
            f'&times;{gain:g}: <img src="{png_data_uri(bar)}" alt="colour bar" style="width:256px;height:12px;'
            f'vertical-align:middle;image-rendering:pixelated"> black = 0, white = {1 / gain:.2f} or more '
            "(in [0, 1] image units).</p>")


def _example_order(metrics: dict[str, Any], per_image: dict[str, Any], n_total: int, limit: int) -> list[tuple[int, str]]:
    """Examples that show the range: per category of the first method (fixed, not fixed, reward hacked,
    new defect, clean), the most changed first; falls back to the first images."""
    methods = [m for m in method_order(list(metrics.get("methods", {}))) if m != "base"]
    target = metrics.get("aspect", "")
    thr = (metrics.get("settings") or {}).get("judge_threshold", 0.5)
    pm = per_image.get("methods") or {}
    if not methods or methods[0] not in pm or "base" not in pm:
        return [(i, "") for i in range(min(limit, n_total))]
    first = pm[methods[0]]

    def run0(v: Any) -> np.ndarray:
        a = np.asarray(v, dtype=np.float64)
        return a[0] if a.ndim == 2 else a

    try:
        before = np.asarray(pm["base"]["judge_probability"][target], dtype=np.float64) > thr
        after = run0(first["judge_probability"][target]) > thr
    except (KeyError, TypeError, ValueError):
        return [(i, "") for i in range(min(limit, n_total))]
    hack = run0(first["hack_gap"]) > 0 if "hack_gap" in first else np.zeros(n_total, bool)
    change = run0(first["inside_change"]) if "inside_change" in first else np.zeros(n_total)
    change = np.nan_to_num(change, nan=0.0)
    cats = [("fixed", before & ~after), ("not fixed", before & after & ~hack), ("reward hacked", before & hack),
            ("new defect", ~before & after), ("clean, kept", ~before & ~after)]
    per_cat = max(1, limit // len(cats))
    out: list[tuple[int, str]] = []
    for label, sel in cats:
        idx = np.flatnonzero(sel)
        idx = idx[np.argsort(-change[idx], kind="stable")][:per_cat]
        out += [(int(i), label) for i in idx]
    return out[:limit]


def _img(uri: str, alt: str, cls: str = "px") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{esc(alt)}" title="{esc(alt)}">'


def _examples(metrics: dict[str, Any], arrays: dict[str, np.ndarray], per_image: dict[str, Any], limit: int) -> str:
    if "base" not in arrays:
        return '<p class="note">no images.npz in the evaluation directory</p>'
    items = per_image.get("items") or []
    methods = [m for m in method_order(list(metrics.get("methods", {}))) if m != "base" and f"method__{m}" in arrays]
    chosen = _example_order(metrics, per_image, arrays["base"].shape[0], limit)
    head = ['<th class="l">prompt / seed</th><th>base</th><th>heatmap</th><th>mask</th>']
    for m in methods:
        head.append(f"<th>{esc(m)}</th><th>|{esc(m)} &minus; base|</th>")
    rows = [f'<h2>Examples ({len(chosen)} of {arrays["base"].shape[0]})</h2>'
            '<p class="note">Chosen to show the range, by what the first method\'s first training run did to the '
            "target defect (by the judge): fixed, not fixed, reward hacked, a new defect, clean and kept; the most "
            "changed first.</p>" + _colour_bar() + '<table class="ex" id="examples"><tr>' + "".join(head) + "</tr>"]
    for i, category in chosen:
        prompt = items[i]["prompt"] if i < len(items) else ""
        seed = items[i]["seed"] if i < len(items) else ""
        base = arrays["base"][i]
        tag = f'<br><b class="cat">{esc(category)}</b>' if category else ""
        cells = [f'<td class="prompt">{esc(prompt)}<br><span class="ci">seed {esc(seed)}</span>{tag}</td>',
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
    for line in read_text(path, "training log").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    if not records:  # a kill may cut the last line, never all of them
        raise InputError(f"training log {path} holds no step records (JSON lines with a 'step'); expected a "
                         "run's log.jsonl or its run directory")
    return records


def _training_plots(train_logs: dict[str, Path], smooth: float = 0.3) -> str:
    logs = {name: read_log(p) for name, p in train_logs.items()}
    out = ['<h2>Training</h2><p class="note">Per training run (method and seed); curves are exponential moving '
           f'averages (weight {smooth:g} on each new step) of the logged values.</p><div id="training-plots">']
    for key, label in (("reward", "reward"), ("constraint", "constraint ||(1-M)(I-I0)||"),
                       ("outside_change", "mean |change| outside the mask"), ("mask_area", "mask area")):
        series = [(name, [r["step"] for r in recs if key in r], ema([r[key] for r in recs if key in r], smooth))
                  for name, recs in logs.items()]
        if any(s[1] for s in series):
            out.append(svg_plot(series, f"{label} vs step", "step", label))
    out.append("</div>")
    return "".join(out)


def _sweep_section(sweep_path: Path) -> str:
    doc = read_json(sweep_path, "sweep file (--sweep)")
    pts = doc.get("points", [])
    if not isinstance(pts, list) or not all(isinstance(p, dict) for p in pts):
        raise InputError(f"sweep file {sweep_path}: expected a 'points' list of objects (focusnfix sweep's sweep.json)")

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


def _diagnostics_table(path: Path, eval_id: str | None) -> str:
    """The table of :mod:`focusnfix.diagnose`'s ``diagnostics.json`` ('' when there is none, or a
    note when it was made from another evaluation than ``eval_id``'s, e.g. one rerun into the folder)."""
    if not path.is_file():
        return ""
    d = read_json(path, "diagnostics")
    if d.get("eval_id") != eval_id:
        return (f"<p>{esc(path)} was made from another evaluation than this folder's metrics.json (an earlier "
                "run into the same folder): its table is left out; run <code>focusnfix diagnose</code> again.</p>")
    held = d.get("mask_holds_judge_defect") or {}

    def num(v: Any, digits: int = 2) -> str:
        return "–" if v is None else f"{v:.{digits}f}"

    cols = [("removal_share", "defect removed", 2),
            ("regional_removal_share", f"removed, outside PSNR &ge; {num(d.get('min_psnr'), 0)} dB", 2),
            ("median_outside_psnr_of_removals", "median outside PSNR of removals (dB)", 1),
            ("inside_change_share", "share of the removals' squared change inside the mask", 2),
            ("composite_removal_share", "removed when only its pixels inside the mask are pasted on base", 2)]
    out = ['<h2>Where the fixes happened (after the fact)</h2><table class="metrics" id="table-diagnostics">'
           '<tr><th class="l">method</th>' + "".join(f"<th>{label}</th>" for _, label, _ in cols) + "</tr>"]
    for name, row in (d.get("methods") or {}).items():
        out.append(f'<tr><td class="l">{esc(name)}</td>' + "".join(f"<td>{num(row.get(k), n)}</td>" for k, _, n in cols)
                   + "</tr>")
    out.append(f'</table><p class="note">Shares of the base images the judge calls defective (mean over training runs). '
               f"The training mask holds {num(held.get('pooled'))} of the pixels the judge localizes on those base "
               f"images ({num(held.get('images_ge_95'))} of images hold &ge; 95%). Held-out images and judges: these "
               "explain a result, they never choose a setting.</p>")
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
            "Mask: 1 = region the training run's localizers found on the base image (may change).</p>",
            _headline(metrics),
            _summary_chart(metrics),
            _metric_tables(metrics),
            _diagnostics_table(Path(eval_dir) / "diagnostics.json", metrics.get("eval_id")),
            _examples(metrics, arrays, per_image, max_examples)]
    if train_logs:
        body.append(_training_plots(train_logs))
    if sweep is not None:
        body.append(_sweep_section(Path(sweep)))
    page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Focus-N-Fix report</title>"
            f"<style>{CSS}</style></head><body>" + "".join(body) + "</body></html>")
    return atomic_write_text(out_html, page)


__all__ = ["diff_map", "ema", "esc", "fmt_stat", "markdown_table", "png_data_uri", "read_log", "svg_bars", "svg_plot", "write_report"]
