"""Building a training corpus and reading it back.

`build_corpus(out_dir)` writes `train.jsonl` and `heldout.jsonl` (one `{"text", "source", "doc_id"}` per passage of
~40-250 words; the passages of one document are contiguous and in reading order), `LICENSES.md` and
`summary.json`. Exact duplicates (normalised-text hash) and near duplicates (sampled 8-word shingle fingerprints)
are dropped across the whole corpus before the split, so no held-out text recurs in train; the split is by
document, from a keyed hash of the document id, so it is deterministic given the seed and stable when sources are
added or capped. `iter_corpus` / `load_corpus` read a split back. Pure Python.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

from gist_memory.data.clean import (
    MAX_WORDS,
    MIN_WORDS,
    TARGET_WORDS,
    NearDuplicateIndex,
    _keyed_unit,
    chunk_paragraphs,
    is_heldout,
    normalized_key,
    word_count,
)
from gist_memory.data.document import CorpusError, Document, SourceMissing, write_jsonl
from gist_memory.data.sources import DEFAULT_SOURCES, SOURCE_HINTS, SOURCE_LICENSES, expand_sources, iter_source

logger = logging.getLogger(__name__)


@dataclass
class SourceStats:
    """Per-source counts in a `CorpusSummary`."""

    docs: int = 0
    passages: int = 0
    words: int = 0
    approx_tokens: int = 0
    train_docs: int = 0
    train_passages: int = 0
    heldout_docs: int = 0
    heldout_passages: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0


@dataclass
class CorpusSummary:
    """What `build_corpus` wrote.

    Attributes:
        out_dir: The output folder.
        sources: Counts per source that contributed text.
        missing: Requested built-in sources that are not installed, with the command that provides each.
        skipped: Input files or records skipped, with the reason (capped at 200 entries).
        seed: Split/shuffle seed.
        heldout_fraction: Requested fraction of held-out documents.
        totals: Counts over all sources.
    """

    out_dir: str
    sources: dict[str, SourceStats] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seed: int = 0
    heldout_fraction: float = 0.05
    totals: SourceStats = field(default_factory=SourceStats)

    def to_dict(self) -> dict:
        """JSON-serialisable form (as written to `summary.json`)."""
        return asdict(self)


_write_jsonl = write_jsonl


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def licenses_markdown(sources: Iterable[str]) -> str:
    """The LICENSES.md text for the given source names."""
    lines = [
        "# Licences and attribution of this corpus",
        "",
        "Built by `gist_memory.data.corpus.build_corpus`. Each passage's `source` field names its source below.",
        "",
    ]
    for s in sources:
        if s in SOURCE_LICENSES:
            lic, text = SOURCE_LICENSES[s]
        elif s.startswith("dir:"):
            lic, text = "as the folder's own", f"Local folder `{s[4:]}`: the licence of its files applies."
        elif s.startswith("hf:"):
            lic, text = "see the dataset card", f"Hugging Face dataset `{s[3:]}`: see its dataset card for the licence."
        else:
            lic, text = "unknown", ""
        lines += [f"## `{s}`: {lic}", "", text, ""]
    return "\n".join(lines)


def build_corpus(
    out_dir: Union[str, Path],
    sources: Sequence[str] = DEFAULT_SOURCES,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    max_docs: Optional[int] = None,
    min_words: int = MIN_WORDS,
    target_words: int = TARGET_WORDS,
    max_words: int = MAX_WORDS,
    near_dedup: bool = True,
) -> CorpusSummary:
    """Builds the training corpus: passages of every available source, deduplicated and split by document.

    Args:
        out_dir: Output folder (created; `train.jsonl`, `heldout.jsonl`, `LICENSES.md`, `summary.json`).
        sources: Source names: `wiki`, `python-docs`, `postgres-docs`, `books` (or `kjv`, `shakespeare`,
            `austen`), `dir:PATH`, `hf:NAME[:CONFIG]`.
        heldout_fraction: Fraction of documents held out (by a keyed hash of the document id).
        seed: Seed of the split and of the document order.
        max_docs: At most this many documents per source (a seeded sample), for quick builds.
        min_words: Shortest passage.
        target_words: Passages close once they reach this many words.
        max_words: Longest passage.
        near_dedup: Also drop near duplicates (shingle fingerprints), not only exact ones.

    Returns:
        The `CorpusSummary` (also written to `summary.json`).

    Raises:
        CorpusError: No requested source is available, a `dir:`/`hf:` source cannot be read, or the sources hold
            no passage of at least `min_words` words. Nothing in `out_dir` is overwritten then.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise CorpusError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if not 0 < min_words <= target_words <= max_words:
        raise CorpusError("need 0 < min_words <= target_words <= max_words")
    names = expand_sources(list(sources))
    if not names:
        raise CorpusError("no sources given")
    out = Path(out_dir)
    summary = CorpusSummary(out_dir=str(out), seed=seed, heldout_fraction=heldout_fraction)
    skipped: list[str] = []

    # 1. documents -> passages, per source (each source's documents in a seeded order)
    docs: list[tuple[float, Document, list[str]]] = []
    for name in names:
        try:
            src_docs = list(iter_source(name, skipped, max_docs))
        except SourceMissing:
            hint = SOURCE_HINTS.get(name, "")
            summary.missing[name] = hint
            logger.warning("source %r is not installed; skipping it (install with: %s)", name, hint)
            continue
        if max_docs is not None:
            src_docs.sort(key=lambda d: _keyed_unit(seed, "sample:" + d.doc_id))
            src_docs = src_docs[:max_docs]
        n_before = len(docs)
        for d in src_docs:
            passages = chunk_paragraphs(d.paragraphs, min_words, target_words, max_words)
            if passages:
                docs.append((_keyed_unit(seed, "order:" + d.doc_id), d, passages))
        if len(docs) == n_before:
            msg = f"source {name!r} yielded no passage of at least {min_words} words"
            if name.startswith(("dir:", "hf:")):
                detail = "; ".join(skipped[-5:])
                raise CorpusError(msg + (f" (skipped: {detail})" if detail else ""))
            logger.warning(msg)
    if not docs:
        if summary.missing and len(summary.missing) == len(names):
            cmds = "\n".join(f"  {k}: {v}" for k, v in summary.missing.items())
            raise CorpusError(f"none of the requested sources is installed; install at least one:\n{cmds}")
        raise CorpusError(f"the sources {names} hold no passage of at least {min_words} words")

    # 2. one seeded order over all documents; dedup in that order; split by document
    docs.sort(key=lambda t: (t[0], t[1].doc_id))
    seen_exact: set[bytes] = set()
    near = NearDuplicateIndex() if near_dedup else None
    seen_ids: set[str] = set()
    train: list[dict] = []
    heldout: list[dict] = []
    stats: dict[str, SourceStats] = {}
    heldout_ids = [d.doc_id for _, d, _ in docs if is_heldout(d.doc_id, heldout_fraction, seed)]
    if heldout_fraction > 0 and not heldout_ids and len(docs) >= 2:
        heldout_ids = [min((d.doc_id for _, d, _ in docs), key=lambda i: _keyed_unit(seed, "split:" + i))]
    heldout_set = set(heldout_ids)
    if len(heldout_set) == len(docs) and len(docs) >= 2:  # keep at least one training document
        heldout_set.discard(max(heldout_set, key=lambda i: _keyed_unit(seed, "split:" + i)))
    for _, d, passages in docs:
        doc_id = d.doc_id
        if doc_id in seen_ids:  # the same id twice (e.g. a jsonl id repeated): make it unique
            k = 2
            while f"{doc_id}#{k}" in seen_ids:
                k += 1
            doc_id = f"{doc_id}#{k}"
        seen_ids.add(doc_id)
        st = stats.setdefault(d.source, SourceStats())
        split_held = d.doc_id in heldout_set
        kept = 0
        for text in passages:
            key = hashlib.sha1(normalized_key(text).encode("utf-8")).digest()
            if key in seen_exact:
                st.exact_duplicates += 1
                continue
            seen_exact.add(key)
            if near is not None and near.check_and_add(text):
                st.near_duplicates += 1
                continue
            rec = {"text": text, "source": d.source, "doc_id": doc_id}
            (heldout if split_held else train).append(rec)
            kept += 1
            w = word_count(text)
            st.passages += 1
            st.words += w
            if split_held:
                st.heldout_passages += 1
            else:
                st.train_passages += 1
        if kept:
            st.docs += 1
            if split_held:
                st.heldout_docs += 1
            else:
                st.train_docs += 1
    if not train:
        raise CorpusError("no training passages left after deduplication")
    for st in stats.values():
        st.approx_tokens = round(st.words * 1.4)  # SmolLM2 tokens per word: 1.26 (Austen) to 1.54 (docs)
    summary.sources = stats
    tot = SourceStats()
    for st in stats.values():
        for k in asdict(tot):
            setattr(tot, k, getattr(tot, k) + getattr(st, k))
    summary.totals = tot
    summary.skipped = skipped[:200]

    # 3. write (temporary files renamed into place)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "heldout.jsonl", heldout)
    _write_text(out / "LICENSES.md", licenses_markdown(sorted(stats)))
    _write_text(out / "summary.json", json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return summary


def _split_path(path: Union[str, Path], split: str) -> Path:
    p = Path(path)
    if p.is_dir():
        if split not in ("train", "heldout"):
            raise CorpusError(f"split must be 'train' or 'heldout', got {split!r}")
        p = p / f"{split}.jsonl"
    if not p.is_file():
        raise CorpusError(f"no corpus file at {str(p)!r}; build one with `gist-memory data build OUT`")
    return p


def iter_corpus(path: Union[str, Path], split: str = "train") -> Iterator[dict]:
    """Streams the passages of a built corpus.

    Args:
        path: The corpus folder (or a `.jsonl` file directly).
        split: `train` or `heldout`.

    Yields:
        `{"text", "source", "doc_id"}` dicts.

    Raises:
        CorpusError: The file is missing or a line is not a passage record.
    """
    p = _split_path(path, split)
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{p}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise CorpusError(f"{p}:{lineno}: not a passage record")
            yield rec


def load_corpus(path: Union[str, Path], split: str = "train") -> list[dict]:
    """All passages of a built corpus split (see `iter_corpus`)."""
    return list(iter_corpus(path, split))
