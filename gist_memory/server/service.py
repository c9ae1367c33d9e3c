"""The server's state: the model, its memories and the documents added through the web page.

Requests run concurrently: `GistModel` is safe to call from many threads (each call fills its own `Usage`) and
`GistMemory` guards its own index and store, so the server holds no lock around model or memory calls.
"""

from __future__ import annotations

import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from gist_memory.demo import compare, kv_bytes_per_position
from gist_memory.state.gist_state import text_hash
from gist_memory.store import GistMemory
from gist_memory.store.ingest import Chunker

TEXT_EXTENSIONS = (".txt", ".md", ".markdown")
MAX_UPLOAD_BYTES = 1024 * 1024
MAX_QUESTION_CHARS = 2000
MAX_FILES = 20
DEFAULT_MEMORY = "default"


def call_usage(model: Any) -> dict[str, Any]:
    """Deprecated: the calling thread's last model call's usage (`GistModel.last_usage`).

    The server reads usage per call (`Answer.usage`, filled by the call itself); this remains for callers of 0.2.
    """
    return dict(getattr(model, "last_usage", None) or {})


def _new_usage() -> Any:
    """A `Usage` one model call fills (imported late: the server module loads no torch until a model is used)."""
    from gist_memory.model.usage import Usage

    return Usage()


class BadInput(Exception):
    """A request the app refuses, with the HTTP status and a message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def clean_title(title: str, fallback: str = "untitled") -> str:
    """A title without control characters, at most 200 characters."""
    t = "".join(c for c in str(title) if unicodedata.category(c)[0] != "C").strip()
    return (t[:200] or fallback)


def decode_text(data: bytes, name: str, limit: int) -> str:
    """The UTF-8 text of an uploaded document, or BadInput (too large, binary, not UTF-8, empty)."""
    if len(data) > limit:
        raise BadInput(413, f"{name}: too large ({len(data) / 1024:.0f} KiB; the limit is {limit / 1024:.0f} KiB)")
    if b"\x00" in data[:8192]:
        raise BadInput(415, f"{name}: not a text file (binary content)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadInput(415, f"{name}: not UTF-8 text") from None
    if not text.strip():
        raise BadInput(400, f"{name}: the document is empty")
    return text.replace("\r\n", "\n").replace("\r", "\n")


class GistService:
    """The app's state: the model, its memories and the documents added through the page.

    Requests are served concurrently (no lock around model or memory calls); `answers_in_flight` counts the
    answers being decoded and `last_answer` is the most recently finished one (for monitoring and tests).

    Args:
        model: A `GistModel`.
        memory: A `GistMemory` built with `model` (default: a new one in RAM).
        max_upload_bytes: Largest accepted document.
        k: Passages read per question (default).
        max_new_tokens: Answer length.
        max_passage_tokens: Documents are cut into passages of at most this many tokens.
        model_description: Shown on the page.
        memories: More memories the OpenAI routes can name (`model="gist-memory:<name>"`), by name; `memory` is
            always there as "default".
        batch: Decode concurrent OpenAI-route answers together (`batcher`, prefill and decode batched); False:
            each answer decodes alone in its own thread. Settable later as `batching`.
    """

    def __init__(self, model: Any, memory: Optional[Any] = None, *, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 k: int = 3, max_new_tokens: int = 64, max_passage_tokens: int = 192,
                 model_description: str = "", memories: Optional[Mapping[str, Any]] = None,
                 batch: bool = True) -> None:
        self.model = model
        self.memory = memory if memory is not None else GistMemory(model, None)
        self.memories: dict[str, Any] = {DEFAULT_MEMORY: self.memory}
        for name, m in (memories or {}).items():
            if not name or ":" in name or name == DEFAULT_MEMORY:
                raise ValueError(f"memory names must be non-empty, without ':', and not {DEFAULT_MEMORY!r}: {name!r}")
            self.memories[name] = m
        self.max_upload_bytes = int(max_upload_bytes)
        self.k = int(k)
        self.max_new_tokens = int(max_new_tokens)
        self.chunker = Chunker(max_passage_tokens, model.tokenizer)
        self.model_description = model_description or str(getattr(model, "name", "gist model"))
        self.per_position = kv_bytes_per_position(model)
        self.docs: dict[str, dict[str, Any]] = {}
        self._warm = False
        self._count_lock = threading.Lock()  # guards the two counters below only, never a model call
        self._in_flight = 0
        self.last_answer: Optional[Answer] = None
        self.batching = bool(batch)
        self._batcher: Optional[Any] = None

    # ---- documents --------------------------------------------------------------------------------------
    def add_document(self, title: str, text: str, source: str = "pasted") -> dict[str, Any]:
        """Cut `text` into passages, compress and index them; returns the document record."""
        if not isinstance(text, str) or not text.strip():
            raise BadInput(400, "the document is empty")
        if len(text.encode("utf-8")) > self.max_upload_bytes:
            raise BadInput(413, f"the document is larger than the {self.max_upload_bytes / 1024:.0f} KiB limit")
        title = clean_title(title, fallback=" ".join(text.split())[:60])
        doc_id = "doc-" + text_hash(text)[:12]
        chunks = self.chunker.chunk(text)
        if not chunks:
            raise BadInput(400, "the document holds no text")
        ids = [f"{doc_id}#{i}" for i in range(len(chunks))]
        meta = [{"doc": doc_id, "title": title, "chunk": i, "source": source} for i in range(len(chunks))]
        t0 = time.perf_counter()
        self.memory.add_texts([t for t, _ in chunks], metadatas=meta, ids=ids, show_progress=False)
        hits = [h for h in (self.memory.get(i) for i in ids) if h is not None]
        states = self.memory.states_for(hits)
        raw = sum(s.num_tokens for s in states)
        kept = sum(s.num_kept for s in states)
        rec = {"id": doc_id, "title": title, "source": source, "passages": len(ids), "tokens": raw,
               "kept_rows": kept, "ratio": round(raw / kept, 3) if kept else None,
               "seconds": round(time.perf_counter() - t0, 3)}
        self.docs[doc_id] = rec
        return rec

    def add_records(self, records: Sequence[dict[str, Any]], progress: Any = None) -> int:
        """Add corpus records (`id`, `title`, `text`, ...) as documents of one passage each; returns added."""
        from gist_memory.demo import add_records

        n = add_records(self.memory, records, progress)
        for r in records:
            self.docs[r["id"]] = {"id": r["id"], "title": clean_title(r.get("title", r["id"])),
                                  "source": r.get("source", "sample"), "passages": 1, "tokens": None,
                                  "kept_rows": None, "ratio": None}
        return n

    def delete_document(self, doc_id: str) -> int:
        """Remove a document's passages; returns how many were removed."""
        ids = self.memory.ids(filter={"doc": doc_id}) or ([doc_id] if doc_id in self.memory else [])
        n = self.memory.delete(ids) if ids else 0
        if not n and doc_id not in self.docs:
            raise BadInput(404, f"no document {doc_id!r}")
        self.docs.pop(doc_id, None)
        return n

    # ---- questions --------------------------------------------------------------------------------------
    def ask(self, question: str, k: Optional[int] = None, full_answer: bool = False) -> dict[str, Any]:
        """Answer from gist states and measure the full-text twin (first token only, unless `full_answer`)."""
        if not isinstance(question, str) or not question.strip():
            raise BadInput(400, "the question is empty")
        if len(question) > MAX_QUESTION_CHARS:
            raise BadInput(400, f"the question is longer than {MAX_QUESTION_CHARS} characters")
        k = self.k if k is None else int(k)
        if not 1 <= k <= 16:
            raise BadInput(400, "k must be between 1 and 16")
        if len(self.memory) == 0:
            raise BadInput(400, "add a document first")
        if not self._warm:  # one untimed pass: first-call costs (prefix cache, kernels) would skew the timings
            compare(self.model, self.memory, question.strip(), k=k, max_new_tokens=1, full_new_tokens=1)
            self._warm = True
        c = compare(self.model, self.memory, question.strip(), k=k, max_new_tokens=self.max_new_tokens,
                    full_new_tokens=self.max_new_tokens if full_answer else 1)
        d = c.to_dict()
        d["kv_bytes_per_position"] = self.per_position
        for s in d["sources"]:
            s["title"] = s["title"] or str(s["metadata"].get("source", "")) or s["id"]
        return d

    def info(self) -> dict[str, Any]:
        """What the page shows in its header."""
        return {"model": self.model_description, "passages": len(self.memory), "documents": len(self.docs),
                "max_upload_bytes": self.max_upload_bytes, "k": self.k, "extensions": list(TEXT_EXTENSIONS),
                "kv_bytes_per_position": self.per_position, "states": self.state_stats()}

    def state_stats(self) -> dict[str, dict[str, int]]:
        """Per memory name: states this process computed (`compressed` for new passages, `recomputed` for lost
        ones) and where it read states from (the store's `hits_ram` / `hits_disk` / `hits_shared` / `misses`)."""
        return {name: {**getattr(m, "stats", {}), **getattr(getattr(m, "store", None), "stats", {})}
                for name, m in self.memories.items()}

    # ---- OpenAI-compatible answers -----------------------------------------------------------------------
    def answer(self, prompt: Any, gen: dict[str, Any], memory: Optional[str] = None, query: str = "", k: int = 3,
               filter: Optional[dict[str, Any]] = None, on_text: Optional[Callable[[str], None]] = None,
               cancelled: Callable[[], bool] = lambda: False) -> Answer:
        """Answer `prompt` (a string or chat messages), reading the states of the `k` passages of `memory` that
        best match `query` (none when `memory` is None or empty).

        Args:
            prompt: What `GistModel.stream` takes.
            gen: Its generation kwargs (`max_new_tokens`, `stop`, `do_sample`, `temperature`, `seed`, ...).
            memory: A name in `memories`, or None.
            query: The search query.
            k: Passages to read.
            filter: Metadata filter for the search.
            on_text: Called with each piece of the answer as it is decoded (stop strings already cut).
            cancelled: Polled after each piece; True ends the answer early (the client went away).
        """
        mem = self.memories[memory] if memory is not None else None
        # with tools or a schema the model applies stop strings itself, to free text only (never to a call or JSON)
        constrained = bool(gen.get("tools")) or gen.get("schema") is not None
        stop = StopFilter([] if constrained else (gen.get("stop") or []))
        pieces: list[str] = []

        def emit(text: str) -> None:
            if text:
                pieces.append(text)
                if on_text is not None:
                    on_text(text)

        if cancelled():  # the client left before decoding began
            return Answer("", {}, [], "stop")
        with self._count_lock:
            self._in_flight += 1
        try:
            hits = mem.search(query, k=k, filter=filter) if mem is not None and query.strip() else []
            states = mem.states_for(hits) if hits else []
            used = _new_usage()
            it: Iterator[str] = (self.batcher or self.model).stream(prompt, states=states, usage=used, **gen)
            try:
                for piece in it:
                    emit(stop.feed(piece))
                    if stop.stopped or cancelled():
                        break
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()  # the model's stream fills `used` when it ends
            usage = used.to_dict()
            emit(stop.flush())
            limit = int(gen.get("max_new_tokens", 64))
            ended = "stop" if stop.stopped or int(usage.get("new_tokens", 0)) < limit else "length"
            answer = Answer("".join(pieces), usage, hits, ended)
            self.last_answer = answer
            return answer
        finally:
            with self._count_lock:
                self._in_flight -= 1

    @property
    def batcher(self) -> Optional[Any]:
        """The `gist_memory.server.batcher.Batcher` decoding concurrent answers together (started on first use;
        requests it does not take go to the model directly), or None when `batching` is off."""
        if not self.batching:
            return None
        with self._count_lock:
            if self._batcher is None:
                from gist_memory.server.batcher import Batcher

                self._batcher = Batcher(self.model)
            return self._batcher

    @property
    def answers_in_flight(self) -> int:
        """Answers being decoded right now."""
        with self._count_lock:
            return self._in_flight


@dataclass
class Answer:
    """One OpenAI-route answer: the text, what it cost (`call_usage`), the passages read, and why it ended."""

    text: str
    usage: dict[str, Any]
    sources: list[Any] = field(default_factory=list)
    finish_reason: str = "stop"


class StopFilter:
    """Cuts a stream of text pieces at the first stop string, holding back any tail that could begin one.

    The model stops at stop strings too; this guard keeps a stop string split over several pieces from leaking
    into what the client sees.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The part of `piece` (with what was held back) that is safe to send now."""
        if self.stopped:
            return ""
        text = self.pending + piece
        if not self.stop:
            return text
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.pending = ""
            return text[: min(hits)]
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """What was held back, once the stream ended without a stop string."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
