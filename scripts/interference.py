"""Where states lose among several passages: the same held-out items read in seven arrangements.

    OMP_NUM_THREADS=1 python scripts/interference.py [--model FOLDER] [--method gist+anchors|pool+anchors]
        [--kinds entity_distractors common_distractors] [--items 20] [--seed 1] [--out FILE.jsonl]

Each item of a `*_distractors` kind (`gist_memory.eval.heldout`: four passages, one planted fact each, the
question names one subject) is scored by multiple choice (chance 0.25) with its context laid out as:

- `states`: the four passages' states in their order (what the held-out table scores);
- `target state only`: only the answer passage's state (what one state keeps);
- `states, target last`: the four states, the answer passage's last;
- `others' states + target text`: the three other passages' states, then the answer passage as raw text. If
  states of passages the question is not about out-weigh raw text that answers it, this falls below
  `full, target last`: states that push their own passage's facts whatever is asked ("loud" states);
- `full` / `full, target last` / `target text only`: raw text, no states.

`--method pool+anchors` compresses with training-free pooling and the same anchors as the shipped config (the
held-out table's `pool+anchors` row for that policy), to tell what the learned gist rows add or cost. Dev seed 1 by
default (the reported held-out table uses seed 0): this is a diagnostic, not a reported result. Prints a markdown
table (one row per kind) and appends one JSON line per kind to `--out` when given; `--render FILE.jsonl` prints
the table of a results file without running anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional

CONDITIONS = ("states", "target state only", "states, target last", "others' states + target text", "full",
              "full, target last", "target text only")


def score_item(gm, it) -> dict[str, int]:  # noqa: ANN001 - GistModel, HeldoutItem
    """1/0 per arrangement: whether the right choice scores best."""
    from gist_memory.eval.heldout.items import prompt

    st = gm.compress(it.passages)
    t = it.answer_passage
    others = [i for i in range(len(st)) if i != t]
    q = prompt(it)
    conts = list(it.continuations or it.choices)

    def right(ctx: str, states) -> int:  # noqa: ANN001
        s = gm.score_choices(ctx + q, conts, states=states)
        return int(max(range(len(s)), key=lambda i: (s[i], -i)) == it.answer_index)

    text = "\n\n".join
    return {
        "states": right("", st),
        "target state only": right("", [st[t]]),
        "states, target last": right("", [st[i] for i in others] + [st[t]]),
        "others' states + target text": right(it.passages[t] + "\n\n", [st[i] for i in others]),
        "full": right(text(it.passages) + "\n\n", None),
        "full, target last": right(text([it.passages[i] for i in others] + [it.passages[t]]) + "\n\n", None),
        "target text only": right(it.passages[t] + "\n\n", None),
    }


def render(path: str) -> str:
    """The markdown table of a results file (one row per model/method and kind)."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    out = ["| method (dev items) | kind | n | " + " | ".join(CONDITIONS) + " |", "|---|---|---|" + "---|" * len(CONDITIONS)]
    for r in rows:
        acc = r["accuracy"]
        out.append(f"| {r['method']} ({r['tag']}) @{r['ratio']:g}x, seed {r['seed']} | {r['kind']} | {r['n']} | "
                   + " | ".join(f"{acc[c]:.2f}" for c in CONDITIONS) + " |")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="saved gist model folder (default: the shipped one)")
    ap.add_argument("--method", choices=("gist+anchors", "pool+anchors"), default="gist+anchors")
    ap.add_argument("--kinds", nargs="+", default=["entity_distractors", "common_distractors"],
                    choices=["entity_distractors", "common_distractors"])
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--tag", default=None, help="a name for this row (default: the model folder)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--render", default=None, metavar="FILE", help="print the table of a results file and stop")
    a = ap.parse_args(argv)
    if a.render:
        print(render(a.render))
        return 0

    from gist_memory import GistModel
    from gist_memory.eval.heldout.items import build_items

    if a.method == "pool+anchors":
        from gist_memory.eval.heldout.run import pool_config

        shipped = GistModel.from_pretrained(a.model).config
        cfg = pool_config("pool+anchors", a.ratio, shipped.anchors, shipped.head_anchors,
                          shipped.head_anchor_fraction, head_budget=shipped.head_budget,
                          head_budget_cap=shipped.head_budget_cap)
        gm = GistModel.from_base(None, cfg)
    else:
        gm = GistModel.from_pretrained(a.model, config_overrides={"target_ratio": a.ratio})
    tag = a.tag or (a.model or "shipped")
    print(f"| {a.method} ({tag}) @{a.ratio:g}x, seed {a.seed} | n | " + " | ".join(CONDITIONS) + " |")
    print("|---|---|" + "---|" * len(CONDITIONS))
    for kind in a.kinds:
        items = build_items(a.items, seed=a.seed, kinds=[kind])[kind]
        t0 = time.perf_counter()
        hits = {c: 0 for c in CONDITIONS}
        for it in items:
            for c, v in score_item(gm, it).items():
                hits[c] += v
        acc = {c: hits[c] / len(items) for c in CONDITIONS}
        print(f"| {kind} | {len(items)} | " + " | ".join(f"{acc[c]:.2f}" for c in CONDITIONS) + " |", flush=True)
        if a.out:
            with open(a.out, "a", encoding="utf-8") as f:
                f.write(json.dumps({"kind": kind, "n": len(items), "seed": a.seed, "ratio": a.ratio,
                                    "method": a.method, "model": a.model or "shipped", "tag": tag, "accuracy": acc,
                                    "seconds": round(time.perf_counter() - t0, 1)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
