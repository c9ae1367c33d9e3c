"""`ingest`: fill a `GistMemory` from files (txt, md, jsonl) and folders, resumably.

Texts are split into sentences (spaCy `sentencizer`, newline runs also end a sentence) and sentences are packed
into passages of at most `max_passage_tokens` tokens of the model's tokenizer (a sentence longer than that is cut
at token boundaries). Passage ids are deterministic: `<file>#<chunk>:<text hash>` (jsonl records without an id:
`<file>:<line>#<chunk>:<hash>`; with an id: `<id>`, or `<id>#<chunk>` if the record makes several passages).
Ids already in the memory are skipped, and passages are committed a few at a time, so a run that is killed
(even with SIGKILL) and started again finishes with every passage present exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from gist_memory.state.gist_state import text_hash

logger = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = (".txt", ".md", ".markdown", ".jsonl")
_SNIFF_BYTES = 8192
_BLOCK_CHARS = 100_000  # texts are chunked in blocks of about this size, cut at blank lines
_NONSPACE = re.compile(r"\S+")


@dataclass
class IngestSummary:
    """What an `ingest` run did.

    Attributes:
        files_read: Files read and chunked.
        files_skipped: (path, reason) of files not ingested (binary, not UTF-8, unreadable, unsupported).
        records_skipped: (path:line, reason) of jsonl lines that were not valid records.
        passages_added: Passages new to the memory (compressed, unless their state was already stored).
        passages_present: Passages skipped because their id was already in the memory (a resumed run).
        tokens_added: Tokens (of the model's tokenizer) of the added passages.
        seconds: Wall time of the run.
    """

    files_read: int = 0
    files_skipped: list[tuple[str, str]] = field(default_factory=list)
    records_skipped: list[tuple[str, str]] = field(default_factory=list)
    passages_added: int = 0
    passages_present: int = 0
    tokens_added: int = 0
    seconds: float = 0.0

    @property
    def passages_total(self) -> int:
        """Passages found in the input (added + already present)."""
        return self.passages_added + self.passages_present

    @property
    def passages_per_second(self) -> float:
        """Added passages per second of wall time."""
        return self.passages_added / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Added tokens per second of wall time."""
        return self.tokens_added / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        lines = [
            f"files read: {self.files_read}, skipped: {len(self.files_skipped)}",
            f"passages added: {self.passages_added}, already present: {self.passages_present}",
            f"tokens added: {self.tokens_added} in {self.seconds:.1f} s "
            f"({self.passages_per_second:.1f} passages/s, {self.tokens_per_second:.0f} tokens/s)",
        ]
        lines += [f"  skipped {p}: {why}" for p, why in self.files_skipped]
        lines += [f"  skipped record {p}: {why}" for p, why in self.records_skipped[:20]]
        if len(self.records_skipped) > 20:
            lines.append(f"  ... and {len(self.records_skipped) - 20} more bad records")
        return "\n".join(lines)


@dataclass
class Passage:
    """One passage to add: its deterministic id, text, metadata and token count."""

    id: str
    text: str
    metadata: dict[str, Any]
    num_tokens: int


# ---- chunking ------------------------------------------------------------------------------------------------
class Chunker:
    """Sentences (spaCy sentencizer) packed into passages of at most `max_tokens` tokens.

    Args:
        max_tokens: Token budget of a passage.
        tokenizer: A Hugging Face fast tokenizer (token offsets); None counts whitespace-separated words.
        language: spaCy language of the blank pipeline.
    """

    def __init__(self, max_tokens: int = 256, tokenizer: Any = None, language: str = "en") -> None:
        if max_tokens < 8:
            raise ValueError(f"max_passage_tokens must be >= 8, got {max_tokens}")
        from gist_memory.text import SentenceSplitter

        self.max_tokens = int(max_tokens)
        self.tokenizer = tokenizer
        self.splitter = SentenceSplitter("sentencizer", None, language)

    def _offsets(self, text: str) -> list[tuple[int, int]]:
        tok = self.tokenizer
        if tok is None:
            return [(m.start(), m.end()) for m in _NONSPACE.finditer(text)]
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:  # no "sequence longer than the model" warning for long blocks
            offs = backend.encode(text, add_special_tokens=False).offsets
        else:
            offs = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return [(int(a), int(b)) for a, b in offs if b > a]

    def count(self, text: str) -> int:
        """Tokens of `text`."""
        return len(self._offsets(text))

    def chunk(self, text: str) -> list[tuple[str, int]]:
        """(passage text, tokens) pairs covering `text`, in order."""
        from gist_memory.text import token_pieces

        out: list[tuple[str, int]] = []
        for block in _blocks(text):
            offsets = self._offsets(block)
            if not offsets:
                continue
            spans = self.splitter.split(block)
            pieces: list[tuple[int, int]] = []
            for a, b in token_pieces(offsets, spans, max_tokens=len(offsets) + 1):  # whole sentences
                pieces += self._cut(block, offsets, a, b)
            cur: Optional[tuple[int, int]] = None  # token range of the passage being packed
            for a, b in pieces:
                if cur is not None and b - cur[0] <= self.max_tokens:
                    cur = (cur[0], b)
                    continue
                if cur is not None:
                    out.append(self._piece(block, offsets, cur))
                cur = (a, b)
            if cur is not None:
                out.append(self._piece(block, offsets, cur))
        return [(t, n) for t, n in out if t]

    def _cut(self, block: str, offsets: list[tuple[int, int]], a: int, b: int) -> list[tuple[int, int]]:
        """Token ranges of at most `max_tokens` covering [a, b), cut before a word where possible."""
        out = []
        while b - a > self.max_tokens:
            j = a + self.max_tokens
            lo = a + max(1, self.max_tokens // 2)
            while j > lo and not _starts_word(block, offsets[j][0]):
                j -= 1
            if j <= lo:
                j = a + self.max_tokens  # no word start in the second half of the window: hard cut
            out.append((a, j))
            a = j
        out.append((a, b))
        return out

    @staticmethod
    def _piece(block: str, offsets: list[tuple[int, int]], r: tuple[int, int]) -> tuple[str, int]:
        return block[offsets[r[0]][0] : offsets[r[1] - 1][1]].strip(), r[1] - r[0]


def _starts_word(block: str, c: int) -> bool:
    """True if a token starting at char `c` begins a word (byte-level BPE tokens carry their leading space)."""
    return block[c].isspace() or (c > 0 and block[c - 1].isspace())


def _blocks(text: str) -> Iterator[str]:
    """`text` in pieces of about `_BLOCK_CHARS`, cut at blank lines (or lines, or anywhere) when it is long."""
    while len(text) > _BLOCK_CHARS:
        cut = text.rfind("\n\n", 0, _BLOCK_CHARS)
        if cut <= 0:
            cut = text.rfind("\n", 0, _BLOCK_CHARS)
        if cut <= 0:
            cut = text.rfind(" ", 0, _BLOCK_CHARS)
        if cut <= 0:
            cut = _BLOCK_CHARS
        yield text[:cut]
        text = text[cut:]
    yield text


# ---- files ---------------------------------------------------------------------------------------------------
def _collect(paths: Sequence[Union[str, os.PathLike]], extensions: Sequence[str], summary: IngestSummary) -> list[str]:
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    files: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        rp = os.path.realpath(p)
        if rp not in seen:
            seen.add(rp)
            files.append(rp)

    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            for dirpath, dirnames, names in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(names):
                    if name.startswith("."):
                        continue
                    full = os.path.join(dirpath, name)
                    if os.path.splitext(name)[1].lower() in exts:
                        add(full)
                    else:
                        summary.files_skipped.append((os.path.realpath(full), "unsupported file type"))
        elif os.path.isfile(p):
            add(p)  # named explicitly: read whatever its extension, as text
        else:
            summary.files_skipped.append((os.path.abspath(p), "no such file or folder"))
    return files


def _read_text(path: str) -> tuple[Optional[str], str]:
    """(text, "") or (None, reason)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    if b"\x00" in data[:_SNIFF_BYTES]:
        return None, "binary file (NUL bytes)"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text ({e.reason} at byte {e.start})"
    return text.replace("\r\n", "\n").replace("\r", "\n"), ""


def _passages_of_file(path: str, text: str, chunker: Chunker, summary: IngestSummary) -> list[Passage]:
    out: list[Passage] = []
    if path.lower().endswith(".jsonl"):
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                summary.records_skipped.append((where, f"invalid json: {e.msg}"))
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or not rec["text"].strip():
                summary.records_skipped.append((where, 'not an object with a non-empty string "text"'))
                continue
            md = rec.get("metadata", {})
            if not isinstance(md, dict):
                summary.records_skipped.append((where, '"metadata" is not an object'))
                continue
            rid = rec.get("id")
            if rid is not None and not isinstance(rid, (str, int)):
                summary.records_skipped.append((where, '"id" is not a string or number'))
                continue
            chunks = chunker.chunk(rec["text"])
            for i, (t, n) in enumerate(chunks):
                if rid is not None:
                    pid = str(rid) if len(chunks) == 1 else f"{rid}#{i}"
                else:
                    pid = f"{path}:{lineno}#{i}:{text_hash(t)[:12]}"
                meta = {"source": path, "line": lineno, "chunk": i, **md}
                out.append(Passage(pid, t, meta, n))
    else:
        for i, (t, n) in enumerate(chunker.chunk(text)):
            out.append(Passage(f"{path}#{i}:{text_hash(t)[:12]}", t, {"source": path, "chunk": i}, n))
    # one id once (a jsonl file may repeat an id: the last record wins)
    last = {p.id: j for j, p in enumerate(out)}
    if len(last) != len(out):
        summary.records_skipped.append((path, f"{len(out) - len(last)} passage(s) with a repeated id; last kept"))
        out = [p for j, p in enumerate(out) if last[p.id] == j]
    return out


def iter_passages(
    paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    max_passage_tokens: int = 256,
    *,
    tokenizer: Any = None,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    summary: Optional[IngestSummary] = None,
) -> Iterator[tuple[str, list[Passage]]]:
    """(file, passages) for every readable file under `paths`, without touching a memory.

    Files that cannot be read are recorded in `summary.files_skipped` (pass one to see them).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    summary = summary if summary is not None else IngestSummary()
    chunker = Chunker(max_passage_tokens, tokenizer)
    for path in _collect(list(paths), extensions, summary):
        text, why = _read_text(path)
        if text is None:
            logger.warning("ingest: skipping %s: %s", path, why)
            summary.files_skipped.append((path, why))
            continue
        summary.files_read += 1
        yield path, _passages_of_file(path, text, chunker, summary)


def ingest(
    paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    memory: Any,
    max_passage_tokens: int = 256,
    *,
    batch_size: int = 8,
    commit_every: int = 64,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    tokenizer: Any = None,
    show_progress: bool = True,
    save: bool = True,
    on_progress: Optional[Callable[[IngestSummary], None]] = None,
) -> IngestSummary:
    """Read files and folders into `memory`, skipping passages it already has.

    Args:
        paths: Files and/or folders (folders are walked recursively; hidden entries are ignored, other files
            than `extensions` are reported as skipped). A file named explicitly is read as text whatever its
            extension (`.jsonl`: one json object per line with "text", optional "metadata" and "id").
        memory: A `GistMemory`.
        max_passage_tokens: Token budget of a passage (the model's tokenizer).
        batch_size: Passages per compression batch.
        commit_every: Passages per `add_texts` call (the unit of progress that survives a kill).
        extensions: File types taken from folders.
        tokenizer: Tokenizer for the budget; default `memory.model.tokenizer` (word count if it has none).
        show_progress: Show a progress bar.
        save: Call `memory.save()` at the end (persistent memories).
        on_progress: Called with the running summary after each file is read and after each commit (for a
            caller's own progress display, e.g. the CLI's).

    Returns:
        An `IngestSummary` (files read/skipped with reasons, passages added / already present, tokens, seconds).
    """
    t0 = time.perf_counter()
    if commit_every < 1:
        raise ValueError(f"commit_every must be >= 1, got {commit_every}")
    tok = tokenizer if tokenizer is not None else getattr(getattr(memory, "model", None), "tokenizer", None)
    summary = IngestSummary()
    from tqdm.auto import tqdm

    bar = tqdm(desc="ingesting", unit="passage", disable=not show_progress)
    try:
        for _path, passages in iter_passages(
            paths, max_passage_tokens, tokenizer=tok, extensions=extensions, summary=summary
        ):
            present = memory.has_ids([p.id for p in passages])
            todo = [p for p in passages if p.id not in present]
            summary.passages_present += len(passages) - len(todo)
            bar.update(len(passages) - len(todo))
            if on_progress is not None:
                on_progress(summary)
            for i in range(0, len(todo), commit_every):
                group = todo[i : i + commit_every]
                memory.add_texts(
                    [p.text for p in group],
                    metadatas=[p.metadata for p in group],
                    ids=[p.id for p in group],
                    batch_size=batch_size,
                    show_progress=False,
                )
                summary.passages_added += len(group)
                summary.tokens_added += sum(p.num_tokens for p in group)
                bar.update(len(group))
                if on_progress is not None:
                    on_progress(summary)
    finally:
        bar.close()
    if save and getattr(memory, "path", None) is not None:
        memory.save()
    summary.seconds = time.perf_counter() - t0
    return summary
