"""The training corpus, under its 0.2 import path: everything here lives in `gist_memory.data` now.

- sources: `gist_memory.data.sources` (+ `manuals`, `books`; `Document`, `SourceMissing` in `document`)
- cleaning and chunking: `gist_memory.data.clean`
- building and reading a corpus: `gist_memory.data.corpus`
- the command: `gist_memory.data.command` (`python -m gist_memory.data build OUT`; this module's
  `python -m gist_memory.train.data build OUT` still works)

Pure Python (no torch).
"""

from __future__ import annotations

from gist_memory.data.books import iter_austen, iter_kjv, iter_shakespeare, read_r_lazyload_strings
from gist_memory.data.clean import (
    MAX_WORDS,
    MIN_WORDS,
    TARGET_WORDS,
    NearDuplicateIndex,
    chunk_paragraphs,
    clean_text,
    is_heldout,
    is_prose,
    normalized_key,
    word_count,
)
from gist_memory.data.command import main
from gist_memory.data.corpus import (
    CorpusSummary,
    SourceStats,
    build_corpus,
    iter_corpus,
    licenses_markdown,
    load_corpus,
)
from gist_memory.data.document import CorpusError, Document, SourceMissing
from gist_memory.data.manuals import html_to_paragraphs, iter_postgres_docs, iter_python_docs
from gist_memory.data.sources import (
    BOOK_SOURCES,
    DEFAULT_SOURCES,
    HF_DEFAULT_MAX_ROWS,
    SOURCE_HINTS,
    SOURCE_LICENSES,
    expand_sources,
    iter_dir,
    iter_hf,
    iter_source,
    iter_wiki,
    wiki_summaries_path,
)

__all__ = [
    "BOOK_SOURCES", "DEFAULT_SOURCES", "HF_DEFAULT_MAX_ROWS", "MAX_WORDS", "MIN_WORDS", "SOURCE_HINTS",
    "SOURCE_LICENSES", "TARGET_WORDS", "CorpusError", "CorpusSummary", "Document", "NearDuplicateIndex",
    "SourceMissing", "SourceStats", "build_corpus", "chunk_paragraphs", "clean_text", "expand_sources",
    "html_to_paragraphs", "is_heldout", "is_prose", "iter_austen", "iter_corpus", "iter_dir", "iter_hf",
    "iter_kjv", "iter_postgres_docs", "iter_python_docs", "iter_shakespeare", "iter_source", "iter_wiki",
    "licenses_markdown", "load_corpus", "main", "normalized_key", "read_r_lazyload_strings", "wiki_summaries_path",
    "word_count",
]  # fmt: skip

if __name__ == "__main__":
    raise SystemExit(main())
