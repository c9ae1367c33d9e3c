"""A small RAG web app over gist-memory: upload or paste documents, ask, and see the answer, its sources, the
compression ratio, and a chart of the KV memory and time to first token that reading gist states saved against
the same passages pasted as raw text.

    gist-memory serve                          # http://127.0.0.1:8000, documents kept in RAM
    gist-memory serve --sample --store mem/    # preload the sample corpus, keep documents in mem/

`create_app(model, memory)` returns the FastAPI app (what `gist-memory serve` runs with uvicorn). The page is one
static HTML/JS/CSS set under `static/` with no external assets; it writes every text it shows through
`textContent`, never as HTML.

API (JSON; errors are `{"error": "..."}` with a 4xx/5xx status, and the app keeps serving after them):
    GET    /api/info               model, passages in memory, limits
    GET    /api/documents          documents added through the app
    POST   /api/documents          {"title", "text"}: add a pasted document
    POST   /api/upload             multipart `files`: .txt/.md documents (UTF-8, at most max_upload_bytes each)
    DELETE /api/documents/{id}     remove a document's passages
    POST   /api/ask                {"question", "k"?, "full_answer"?}: answer + sources + costs vs full text
"""

import json
import logging
import threading
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from gist_memory.demo import compare, kv_bytes_per_position
from gist_memory.state.gist_state import text_hash
from gist_memory.store import GistMemory
from gist_memory.store.ingest import Chunker

logger = logging.getLogger("gist_memory.rag_web_app")

STATIC = Path(__file__).resolve().parent / "static"
TEXT_EXTENSIONS = (".txt", ".md", ".markdown")
MAX_UPLOAD_BYTES = 1024 * 1024
MAX_QUESTION_CHARS = 2000
MAX_FILES = 20


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
    """The app's state: the model, the memory, the documents added through the app; one request at a time
    touches the model (a lock), so concurrent requests queue instead of interleaving.

    Args:
        model: A `GistModel`.
        memory: A `GistMemory` built with `model` (default: a new one in RAM).
        max_upload_bytes: Largest accepted document.
        k: Passages read per question (default).
        max_new_tokens: Answer length.
        max_passage_tokens: Documents are cut into passages of at most this many tokens.
        model_description: Shown on the page.
    """

    def __init__(self, model: Any, memory: Optional[Any] = None, *, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 k: int = 3, max_new_tokens: int = 64, max_passage_tokens: int = 192,
                 model_description: str = "") -> None:
        self.model = model
        self.memory = memory if memory is not None else GistMemory(model, None)
        self.max_upload_bytes = int(max_upload_bytes)
        self.k = int(k)
        self.max_new_tokens = int(max_new_tokens)
        self.chunker = Chunker(max_passage_tokens, model.tokenizer)
        self.model_description = model_description or str(getattr(model, "name", "gist model"))
        self.per_position = kv_bytes_per_position(model)
        self.lock = threading.Lock()
        self.docs: dict[str, dict[str, Any]] = {}
        self._warm = False

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
        with self.lock:
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

        with self.lock:
            n = add_records(self.memory, records, progress)
            for r in records:
                self.docs[r["id"]] = {"id": r["id"], "title": clean_title(r.get("title", r["id"])),
                                      "source": r.get("source", "sample"), "passages": 1, "tokens": None,
                                      "kept_rows": None, "ratio": None}
        return n

    def delete_document(self, doc_id: str) -> int:
        """Remove a document's passages; returns how many were removed."""
        with self.lock:
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
        with self.lock:
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
                "kv_bytes_per_position": self.per_position}


class DocIn(BaseModel):
    """A pasted document."""

    title: str = ""
    text: str


class AskIn(BaseModel):
    """A question; `full_answer` also decodes a whole answer from the full text (else its first token only)."""

    question: str
    k: Optional[int] = None
    full_answer: bool = False


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413, declared or streamed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                await _send_json(send, 400, {"error": "bad Content-Length header"})
                return
            if n > self.limit:
                await _send_json(send, 413, {"error": f"request too large ({n / 1024:.0f} KiB; the limit is "
                                                      f"{self.limit / 1024:.0f} KiB)"})
                return
        seen = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        async def tracking_send(msg: dict) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, {"error": f"request too large (the limit is {self.limit / 1024:.0f} KiB)"})


class _TooLarge(Exception):
    pass


async def _send_json(send: Any, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app(model: Any, memory: Optional[Any] = None, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, k: int = 3,
               max_new_tokens: int = 64, max_passage_tokens: int = 192, model_description: str = "") -> FastAPI:
    """The FastAPI app; `app.state.gist` is its `GistService`.

    Args:
        model: A `GistModel`.
        memory: A `GistMemory` built with `model` (default: in RAM).
        max_upload_bytes: Largest accepted document (requests are capped a little above it).
        k: Passages read per question.
        max_new_tokens: Answer length.
        max_passage_tokens: Passage size documents are cut to.
        model_description: Shown in the page header.
    """
    svc = GistService(model, memory, max_upload_bytes=max_upload_bytes, k=k, max_new_tokens=max_new_tokens,
                      max_passage_tokens=max_passage_tokens, model_description=model_description)
    app = FastAPI(title="gist-memory RAG", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gist = svc
    # a multipart body holds up to MAX_FILES documents plus framing
    app.add_middleware(BodyLimit, limit=svc.max_upload_bytes * 2 + 64 * 1024)

    @app.exception_handler(BadInput)
    async def _bad_input(_: Request, e: BadInput) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for x in e.errors()[:3]:
            where = ".".join(str(p) for p in x.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {x.get('msg', 'invalid')}")
        return JSONResponse({"error": "bad request: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        logger.exception("request failed")
        return JSONResponse({"error": f"internal error ({type(e).__name__}); the app keeps running"},
                            status_code=500)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    def info() -> dict:
        return svc.info()

    @app.get("/api/documents")
    def documents() -> dict:
        return {"documents": list(svc.docs.values())}

    @app.post("/api/documents")
    def add_document(doc: DocIn) -> dict:
        return svc.add_document(doc.title, doc.text, source="pasted")

    @app.post("/api/upload")
    def upload(files: list[UploadFile] = File(...)) -> dict:  # noqa: B008
        if len(files) > MAX_FILES:
            raise BadInput(400, f"at most {MAX_FILES} files at once")
        added, rejected = [], []
        for f in files:
            name = clean_title(f.filename or "upload", "upload")
            try:
                if not name.lower().endswith(TEXT_EXTENSIONS):
                    raise BadInput(415, f"{name}: only {', '.join(TEXT_EXTENSIONS)} files are accepted")
                data = f.file.read(svc.max_upload_bytes + 1)
                text = decode_text(data, name, svc.max_upload_bytes)
                added.append(svc.add_document(name, text, source="upload"))
            except BadInput as e:
                rejected.append({"name": name, "error": e.message, "status": e.status})
        if not added:
            status = rejected[0]["status"] if len(rejected) == 1 else 400
            msg = "; ".join(r["error"] for r in rejected) or "no files"
            return JSONResponse({"error": msg, "rejected": rejected}, status_code=status)  # type: ignore[return-value]
        return {"added": added, "rejected": rejected}

    @app.delete("/api/documents/{doc_id}")
    def delete_document(doc_id: str) -> dict:
        return {"removed": svc.delete_document(doc_id)}

    @app.post("/api/ask")
    def ask(q: AskIn) -> dict:
        return svc.ask(q.question, k=q.k, full_answer=q.full_answer)

    return app


if __name__ == "__main__":  # python examples/rag_web_app/app.py [serve options]
    import sys

    from gist_memory.cli import main

    main(["serve", *sys.argv[1:]])
