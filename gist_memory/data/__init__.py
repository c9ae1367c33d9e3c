"""Data shared by training and evaluation (pure Python, no torch; imports nothing above `text`).

- `document`: what a corpus source yields (`Document`) and the errors of reading sources.
- `clean`: text cleaning, passage chunking, the keyed train/held-out split, near-duplicate fingerprints.
- `sources`: the sources by name (Wikipedia leads, local folders, Hugging Face datasets, and the registry);
  `manuals` (Python and PostgreSQL documentation) and `books` (KJV, Shakespeare, Austen).
- `corpus`: `build_corpus` (dedup + split + write) and `load_corpus` / `iter_corpus`; `command` is its CLI
  (`python -m gist_memory.data build OUT`, also `gist-memory data build`).
- `qa`: retention QA items (`QAItem`), their prompts, answer matching and jsonl I/O; `qa_build` makes them from
  held-out text (`build_qa`).
"""

from gist_memory.data.clean import chunk_paragraphs, clean_text, is_heldout, normalized_key, word_count
from gist_memory.data.corpus import CorpusSummary, build_corpus, iter_corpus, load_corpus
from gist_memory.data.document import CorpusError, Document, SourceMissing
from gist_memory.data.qa import (
    KINDS,
    QABuildError,
    QAItem,
    choice_continuations,
    exact_match,
    load_qa,
    question_prompt,
    save_qa,
)
from gist_memory.data.qa_build import build_qa, sentence_spans
from gist_memory.data.sources import expand_sources, iter_source, iter_wiki

__all__ = [
    "KINDS", "CorpusError", "CorpusSummary", "Document", "QABuildError", "QAItem", "SourceMissing", "build_corpus",
    "build_qa", "choice_continuations", "chunk_paragraphs", "clean_text", "exact_match", "expand_sources",
    "is_heldout", "iter_corpus", "iter_source", "iter_wiki", "load_corpus", "load_qa", "normalized_key",
    "question_prompt", "save_qa", "sentence_spans", "word_count",
]  # fmt: skip
