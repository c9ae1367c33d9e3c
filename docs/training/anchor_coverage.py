"""How often the planted answer survives as raw anchors: per QA kind, the items whose answer tokens are all / partly
kept as anchors in the answer passage, and the anchor share of tokens (no model forward; plans only).

    python docs/training/anchor_coverage.py --set anchor_budget=sentence --set max_anchor_fraction=0.5
    python docs/training/anchor_coverage.py                      # the shipped adapter's config
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from gist_memory import GistModel
from gist_memory.data import load_qa


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", default="0:40")
    ap.add_argument("--ratios", default="4,8")
    ap.add_argument("--set", action="append", default=[], help="gist config override key=value (json value)")
    a = ap.parse_args()
    lo, hi = (int(x) for x in a.items.split(":"))
    items = load_qa()[lo:hi]
    extra = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        try:
            extra[k] = json.loads(v)
        except json.JSONDecodeError:
            extra[k] = v
    for r in (float(x) for x in a.ratios.split(",")):
        m = GistModel.from_pretrained(config_overrides={"target_ratio": r, **extra})
        rows: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
        for it in items:
            plan = m.plan(it.passages[it.answer_passage])
            a0 = plan.text.find(it.answer)
            if a0 < 0:
                continue
            offs = m.tokenizer(plan.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            idx = [i for i, (s, e) in enumerate(offs) if s < a0 + len(it.answer) and e > a0]
            kept = sum(bool(plan.anchors[i]) for i in idx)
            row = rows[it.kind]
            row[0] += 1
            row[1] += kept == len(idx)
            row[2] += kept > 0
            row[3] += float(plan.anchors.mean())
        for kind, (n, full, part, frac) in sorted(rows.items()):
            print(json.dumps({"ratio": r, "kind": kind, "items": n, "answer_fully_anchored": full,
                              "answer_partly_anchored": part, "anchor_share_of_tokens": round(frac / n, 3),
                              "overrides": extra}))


if __name__ == "__main__":
    main()
