"""`python -m gist_memory.data build OUT [--sources wiki,books] [--max-docs N]` (also `gist-memory data build`)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Optional

from gist_memory.data.corpus import build_corpus
from gist_memory.data.document import CorpusError
from gist_memory.data.sources import DEFAULT_SOURCES


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m gist_memory.data build OUT [--sources ...]`; returns the exit status."""
    ap = argparse.ArgumentParser(
        prog="python -m gist_memory.data", description="Build a training corpus from the offline sources."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a corpus folder")
    b.add_argument("out_dir")
    b.add_argument("--sources", default=",".join(DEFAULT_SOURCES), help="comma-separated source names")
    b.add_argument("--heldout-fraction", type=float, default=0.05)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-docs", type=int, default=None, help="at most N documents per source")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        s = build_corpus(
            args.out_dir,
            sources=[x for x in args.sources.split(",") if x],
            heldout_fraction=args.heldout_fraction,
            seed=args.seed,
            max_docs=args.max_docs,
        )
    except CorpusError as e:
        print(f"error: {e}")
        return 2
    for name, st in s.sources.items():
        print(
            f"{name:15s} docs {st.docs:6d}  passages {st.passages:7d} (held out {st.heldout_passages:5d})  "
            f"words {st.words:9d}  ~tokens {st.approx_tokens:9d}  dups {st.exact_duplicates}+{st.near_duplicates}"
        )
    t = s.totals
    print(
        f"{'total':15s} docs {t.docs:6d}  passages {t.passages:7d} (held out {t.heldout_passages:5d})  words {t.words}"
    )
    for name, hint in s.missing.items():
        print(f"missing {name}: {hint}")
    print(f"wrote {s.out_dir}")
    return 0
