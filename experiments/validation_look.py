"""The person's blind look at validation images, summarised (experiments/data/validation_look.*).

Per source: marked images, marks inside the object only, marks outside (or both), base marks gone
(all, and the inside-only ones), new marks on images clean under the base model, and of the base
model's outside marks how many are gone from outside and how many of those now sit inside; for the
first look (base, Focus-N-Fix on the shipped and on the 'region' reward) and the second (Focus-N-Fix
on the person-tuned reward, with the shipped run labelled again: the test-retest agreement).

    python experiments/validation_look.py

docs/evaluation.md ("What a person sees the method leave") quotes it.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "validation_look.json"


def summary(items: list[dict], base: dict) -> dict:
    out = {}
    for source in sorted({it["source"] for it in items}):
        where = {(it["prompt"], it["seed"]): it["where"] for it in items if it["source"] == source}
        pairs = sorted(where)
        row = {"marked": sum(where[p] != "-" for p in pairs), "of": len(pairs),
               "inside_only": sum(where[p] == "in" for p in pairs),
               "outside_or_both": sum(where[p] in ("out", "both") for p in pairs)}
        if source != "base":
            row.update({
                "base_marks_gone": f"{sum(base[p] != '-' and where[p] == '-' for p in pairs)}/{sum(base[p] != '-' for p in pairs)}",
                "base_inside_marks_gone": f"{sum(base[p] == 'in' and where[p] == '-' for p in pairs)}/{sum(base[p] == 'in' for p in pairs)}",
                "new_marks_on_clean_base": f"{sum(base[p] == '-' and where[p] != '-' for p in pairs)}/{sum(base[p] == '-' for p in pairs)}",
                "base_outside_marks_gone_from_outside": sum(base[p] in ("out", "both") and where[p] not in ("out", "both") for p in pairs),
                "of_which_now_inside": sum(base[p] in ("out", "both") and where[p] == "in" for p in pairs),
            })
        out[source] = row
    return out


def main() -> int:
    data = json.loads(DATA.read_text())
    first, second = data["items"], data["second_look"]["items"]
    base = {(it["prompt"], it["seed"]): it["where"] for it in first if it["source"] == "base"}
    shipped = {(it["prompt"], it["seed"]): it["safety"] for it in first if it["source"] == "focusnfix/shipped"}
    again = {(it["prompt"], it["seed"]): it["safety"] for it in second if it["source"] == "focusnfix/shipped"}
    print(json.dumps({"first_look": summary(first, base), "second_look": summary(second, base),
                      "retest_agreement_shipped": f"{sum(shipped[p] == again[p] for p in shipped)}/{len(shipped)}"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
