"""`python -m gist_memory.eval.heldout`: run (or resume) the held-out table and print it as markdown.

Examples:
    python -m gist_memory.eval.heldout --ratios 4 8 --out results.jsonl
    python -m gist_memory.eval.heldout --model runs/x/checkpoint --out results.jsonl --markdown table.md
    python -m gist_memory.eval.heldout --methods full none pool+anchors --ratios 4 --items 20 --out short.jsonl
    python -m gist_memory.eval.heldout --render-only --out results.jsonl
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from gist_memory.config import ANCHOR_POLICIES, HEAD_BUDGETS
from gist_memory.eval.heldout.items import KINDS, HeldoutError, build_items
from gist_memory.eval.heldout.run import (
    METHODS,
    READ_ORDERS,
    default_loader,
    read_label,
    read_results,
    render_details,
    render_markdown,
    run_table,
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m gist_memory.eval.heldout", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--model", default=None, help="saved gist model folder for gist/gist+anchors (default: shipped)")
    ap.add_argument("--base", default=None, help="base LM for full/none/trunc/pool (default: embedded SmolLM2)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[4.0, 8.0])
    ap.add_argument("--items", type=int, default=16, help="items per kind (FAQ: a seeded sample of this many)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faq-exclude-seed", type=int, default=None,
                    help="leave out the FAQ items that this seed's sample of --items holds (dev runs: --seed 1 "
                         "--faq-exclude-seed 0 keeps them apart from the reported seed-0 items)")
    ap.add_argument(
        "--generate",
        default="single",
        choices=["single", "all", "none"],
        help="free generation on one-passage items (default), on all items, or none",
    )
    ap.add_argument("--out", default="heldout_results.jsonl", help="results, one JSON line per cell (resumable)")
    ap.add_argument("--markdown", default=None, help="also write the markdown table to this file")
    ap.add_argument("--details", action="store_true", help="print the per-cell table too")
    ap.add_argument("--render-only", action="store_true", help="render --out without running anything")
    ap.add_argument("--anchors", default=None, choices=list(ANCHOR_POLICIES),
                    help="anchor policy for pool+anchors and gist+anchors instead of theirs (rows are labelled)")
    ap.add_argument("--head-anchors", action=argparse.BooleanOptionalAction, default=None,
                    help="with --anchors recall: anchors chosen per layer and head (--no-head-anchors: shared)")
    ap.add_argument("--head-anchor-fraction", type=float, default=None,
                    help="with --head-anchors: the share of anchors each head chooses itself (the rest shared)")
    ap.add_argument("--head-budget", default=None, choices=HEAD_BUDGETS,
                    help="with --head-anchors: how anchor rows are spread over heads (GistConfig.head_budget)")
    ap.add_argument("--head-budget-cap", type=float, default=None,
                    help="with an uneven --head-budget: most rows per head, times the even count")
    ap.add_argument("--head-budget-cap-ratio", type=float, default=None,
                    help="the target ratio --head-budget-cap is stated at; it scales with the ratio (e.g. 4: cap 4 "
                         "at 4x is cap 8 at 8x)")
    ap.add_argument("--write-head", default=None, choices=["none", "template"],
                    help="what the writer reads before each passage, for every state method (default: each method's "
                         "own); rows are labelled '<write-head> head'")
    ap.add_argument("--read-order", default="given", choices=list(READ_ORDERS),
                    help="how each item's passages are arranged before the question, for every method that reads "
                         "passages: as given, or by relevance (GistModel.focus: the reader's likelihood of the "
                         "question after each passage alone; the most relevant last)")
    ap.add_argument("--read-keep", type=int, default=None,
                    help="with --read-order relevance: read only the N most relevant passages")
    ap.add_argument("--tag", default=None, help="name the learned rows of this run (e.g. 'adapted reader')")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    a = ap.parse_args(argv)
    if a.head_anchors and a.anchors not in ("recall", "capitalized+recall"):
        print("error: --head-anchors needs --anchors recall or capitalized+recall", file=sys.stderr)
        return 2
    try:
        read_label(a.read_order, a.read_keep)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.render_only:
        recs = read_results(a.out)
        if not recs:
            print(f"error: no results in {a.out}", file=sys.stderr)
            return 2
    else:
        try:
            faq = None
            if a.faq_exclude_seed is not None and "faq" in a.kinds:
                from gist_memory.eval.heldout.faq import load_faq

                held = {it.id for it in build_items(a.items, seed=a.faq_exclude_seed, kinds=["faq"])["faq"]}
                faq = [it for it in load_faq() if it.id not in held]
            items = build_items(a.items, seed=a.seed, kinds=a.kinds, faq_items=faq)
        except HeldoutError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        recs = run_table(
            items, methods=a.methods, ratios=a.ratios, out=a.out, base=a.base, model=a.model, seed=a.seed,
            n_requested=a.items, generate=False if a.generate == "none" else a.generate,
            loader=default_loader(a.base, a.model, device=a.device, dtype=a.dtype, anchors=a.anchors,
                                  head_anchors=a.head_anchors, head_anchor_fraction=a.head_anchor_fraction,
                                  head_budget=a.head_budget, head_budget_cap=a.head_budget_cap,
                                  head_budget_cap_ratio=a.head_budget_cap_ratio, write_head=a.write_head),
            anchors=a.anchors, tag=a.tag, head_anchors=a.head_anchors, head_anchor_fraction=a.head_anchor_fraction,
            head_budget=a.head_budget, head_budget_cap=a.head_budget_cap, head_budget_cap_ratio=a.head_budget_cap_ratio,
            write_head=a.write_head, read_order=a.read_order, read_keep=a.read_keep, log=lambda s: print(s, file=sys.stderr, flush=True),
        )  # fmt: skip
    md = render_markdown(recs)
    if a.details:
        md += "\n" + render_details(recs)
    print(md)
    if a.markdown:
        Path(a.markdown).write_text(md, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
