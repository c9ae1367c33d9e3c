"""Write the held-out tables into README.md (and optionally a model card) from the committed results file.

    python scripts/update_tables.py                 # README.md from docs/results/heldout.jsonl
    python scripts/update_tables.py --check         # exit 1 if README.md differs from what the results render

The README block between `<!-- heldout-table:start -->` and `<!-- heldout-table:end -->` is exactly
`gist_memory.eval.heldout.render_markdown(read_results(docs/results/heldout.jsonl))`: nobody copies numbers by
hand, and tests/test_readme_tables.py fails when the two drift apart. The results file is what
`python -m gist_memory.eval.heldout ... --out docs/results/heldout.jsonl` writes (commands in docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "heldout.jsonl"
START, END = "<!-- heldout-table:start -->", "<!-- heldout-table:end -->"
NOTE = ("Machine: 2 vCPU AMD EPYC (AVX2), fp32, torch 1 thread, SmolLM2-135M-Instruct; 20 items per kind (one item "
        "is 0.05; differences under ~0.2 are noise). Rows `gist`/`gist+anchors`: the shipped adapter.")


def rendered(results: Path = RESULTS) -> str:
    """The markdown block the README must hold."""
    from gist_memory.eval.heldout.run import read_results, render_markdown

    return render_markdown(read_results(results), note=NOTE)


def replace_block(text: str, block: str, where: str) -> str:
    """`text` with the marked block replaced by `block` (ValueError naming `where` if the markers are missing)."""
    if START not in text or END not in text:
        raise ValueError(f"{where} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--card", type=Path, help="also write the block into this model card")
    a = ap.parse_args(argv)
    block = rendered()
    targets = [ROOT / "README.md"] + ([a.card] if a.card else [])
    stale = []
    for path in targets:
        text = path.read_text(encoding="utf-8")
        new = replace_block(text, block, str(path))
        if new != text:
            stale.append(path)
            if not a.check:
                path.write_text(new, encoding="utf-8")
    if a.check and stale:
        print(f"stale tables in: {', '.join(map(str, stale))}; run python scripts/update_tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
