"""The learning-curve table of the model card, from held-out results files of training snapshots.

    python scripts/curve_table.py LABEL=FILE [LABEL=FILE ...] [--reference FILE] [--ratio 8]

Each FILE is what `python -m gist_memory.eval.heldout --model SNAPSHOT --out FILE` wrote for one snapshot; the
reference file holds the `full` and `none` FAQ cells the recovered fraction needs. Prints one row per snapshot:
multiple-choice accuracy at `--ratio` (4x unless told) of `gist` (anchors off) and `gist+anchors` on the one-passage kinds (and of
`gist+anchors` among four passages), and the FAQ
log-likelihood gain recovered (of `gist` and of `gist+anchors`). A missing cell prints as ""; a column with no
value in any row is left out.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from gist_memory.eval.heldout.run import read_results, recovered_fraction

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=FILE")
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--ratio", type=float, default=4.0, help="the target ratio whose cells make the table")
    a = ap.parse_args(argv)
    ref = {(r["method"], r["kind"]): r for r in read_results(a.reference) if r["method"] in ("full", "none")}
    cols = [("gist", "entity_single"), ("gist", "common_single"), ("gist", "faq"),
            ("gist+anchors", "entity_single"), ("gist+anchors", "common_single"), ("gist+anchors", "entity_distractors"),
            ("gist+anchors", "common_distractors"), ("gist+anchors", "faq")]
    rows = []
    for spec in a.runs:
        label, path = spec.split("=", 1)
        cells = {(r["method"], r["kind"]): r for r in read_results(path) if r.get("ratio") == a.ratio}
        vals = []
        for m, k in cols:
            c = cells.get((m, k))
            if c is None:
                vals.append("")
            elif k == "faq":
                f = recovered_fraction(c, ref.get(("full", "faq")), ref.get(("none", "faq")))
                vals.append("" if f is None else f"{f:.2f} recovered")
            else:
                vals.append(f"{c['metrics']['mc_accuracy']:.2f}")
        rows.append((label, vals))
    keep = [j for j in range(len(cols)) if any(v[j] for _, v in rows)]
    print("| snapshot | " + " | ".join(f"{cols[j][0]} @{a.ratio:g}x {cols[j][1]}" for j in keep) + " |")
    print("|---|" + "---|" * len(keep))
    for label, vals in rows:
        print(f"| {label} | " + " | ".join(vals[j] for j in keep) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
