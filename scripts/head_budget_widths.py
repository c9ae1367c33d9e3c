"""What spreading anchor rows unevenly over heads costs in cache width and bytes (`GistConfig.head_budget`).

    OMP_NUM_THREADS=1 python scripts/head_budget_widths.py [--model FOLDER] [--items 20] [--seed 1]

Compresses the dev FAQ passages (a seeded sample outside the reported seed-0 sample, as
`python -m gist_memory.eval.heldout --seed 1 --faq-exclude-seed 0` draws them) at 4x with each budget and prints a
markdown table: rows kept per head (what the ratio counts), positions the states take in a reader's cache (each
spliced layer is as wide as its widest head; averaged over layers), the widest layer, the bytes of a float32
store entry (only the kept rows are stored), and the bytes a read's cache holds for the states between forwards, laid
out padded (every head as wide as its layer's widest) and packed (each head's real rows only: what
`kv.cache_from_layers` builds for a read, before its first forward adds the one-layer scratch layout its layers
share), as raw text's cache bytes over them. Nothing is scored: the quality of each budget is in
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

BUDGETS = [("even", None), ("layer", 2.0), ("layer", 4.0), ("global", 2.0), ("global", 3.0), ("global", 4.0),
           ("global", 8.0), ("global", 16.0),
           ("depth", 4.0)]


def _budget(spec: str) -> tuple[str, Optional[float]]:
    """`even`, `layer:4`, `global:16` -> (budget, cap)."""
    name, _, cap = spec.partition(":")
    if name not in ("even", "layer", "global", "depth"):
        raise SystemExit(f"unknown head budget {name!r} (even, layer, global or depth)")
    return name, (float(cap) if cap else None)


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="saved gist model folder (default: the shipped one)")
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--budgets", nargs="+", default=None, metavar="BUDGET[:CAP]",
                    help="only these budgets, e.g. even global:4 global:16 (default: all of the table's)")
    a = ap.parse_args(argv)
    budgets = BUDGETS if a.budgets is None else [_budget(b) for b in a.budgets]

    import torch

    from gist_memory import GistModel
    from gist_memory.eval.heldout.faq import load_faq
    from gist_memory.eval.heldout.items import build_items
    from gist_memory.model import kv
    from gist_memory.store.store import encode_entry

    held = {it.id for it in build_items(a.items, seed=0, kinds=["faq"])["faq"]}
    faq = [it for it in load_faq() if it.id not in held]
    items = build_items(a.items, seed=a.seed, kinds=["faq"], faq_items=faq)["faq"]
    texts = [p for it in items for p in it.passages]
    base = GistModel.from_pretrained(a.model, config_overrides={"target_ratio": a.ratio, "anchors": "recall",
                                                                  "head_anchors": True, "head_budget": "even"})
    raw = 0
    rows = []
    for budget, cap in budgets:
        m = base.with_config(head_budget=budget, **({} if cap is None else {"head_budget_cap": cap}))
        states = m.compress(texts)
        raw = sum(s.num_tokens for s in states)
        kept = sum(s.num_rows for s in states)
        read = sum(s.num_positions for s in states)
        widest = sum(s.num_kept for s in states)
        size = sum(len(encode_entry(s, "float32", "k")) for s in states)
        held = [0, 0]  # a read's cache bytes for the states: padded, packed
        for s in states:
            layers, _ = kv.splice(None, 0, [s], m.rope, device=m.device, dtype=m.dtype)
            held[0] += kv.cache_bytes(kv.cache_from_layers(layers, packed=False))
            held[1] += kv.cache_bytes(kv.cache_from_layers(layers))
        L, H, _, D = states[0].keys.shape
        per_token = L * H * (D + states[0].values.shape[-1]) * torch.finfo(m.dtype).bits // 8
        rows.append((budget if cap is None else f"{budget}, cap {cap:g}", kept, read, widest, size,
                     held[0] / per_token, held[1] / per_token))
        print(f"{rows[-1][0]}: done", file=sys.stderr, flush=True)
    ref = rows[0][4]
    print(f"{len(texts)} dev FAQ passages, {raw} raw tokens, target ratio {a.ratio:g}x\n")
    print("| head budget | raw / kept rows per head | raw / cache positions (mean over layers) | "
          f"raw / widest layer | store bytes (float32) vs {rows[0][0]} | raw / read cache bytes, padded | "
          "raw / read cache bytes, packed |")
    print("|---|---|---|---|---|---|---|")
    for name, kept, read, widest, size, padded, packed in rows:
        print(f"| {name} | {raw / kept:.2f}x | {raw / read:.2f}x | {raw / widest:.2f}x | {size / ref:.2f} | "
              f"{raw / padded:.2f}x | {raw / packed:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
