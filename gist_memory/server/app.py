"""The server behind `gist-memory serve`: the RAG web page and its JSON API, and OpenAI-compatible routes.

    gist-memory serve                          # http://127.0.0.1:8000, documents kept in RAM
    gist-memory serve --sample --store mem/    # preload the sample corpus, keep documents in mem/

`create_app(model, memory)` returns the FastAPI app (what `gist-memory serve` runs with uvicorn). The page is one
static HTML/JS/CSS set under `static/` with no external assets; it writes every text it shows through
`textContent`, never as HTML.

Web API (JSON; errors are `{"error": "..."}` with a 4xx/5xx status, and the app keeps serving after them):
    GET    /api/info               model, passages in memory, limits
    GET    /api/documents          documents added through the app
    POST   /api/documents          {"title", "text"}: add a pasted document
    POST   /api/upload             multipart `files`: .txt/.md documents (UTF-8, at most max_upload_bytes each)
    DELETE /api/documents/{id}     remove a document's passages
    POST   /api/ask                {"question", "k"?, "full_answer"?}: answer + sources + costs vs full text

OpenAI-compatible API (`gist_memory.server.openai`; errors are OpenAI error objects):
    GET    /v1/models              `gist-memory` and `gist-memory:<memory>` for each memory
    POST   /v1/chat/completions    chat, streamed as server-sent events with `"stream": true`
    POST   /v1/completions         a prompt answered as one user turn

See docs/server.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from gist_memory.server.openai import OpenAIError, error_body, error_response, openai_router
from gist_memory.server.service import (
    MAX_FILES,
    MAX_UPLOAD_BYTES,
    TEXT_EXTENSIONS,
    BadInput,
    GistService,
    clean_title,
    decode_text,
)

logger = logging.getLogger("gist_memory.server")

STATIC = Path(__file__).resolve().parent / "static"


def is_openai_path(path: str) -> bool:
    """Whether `path` belongs to the OpenAI-compatible routes (whose errors are OpenAI error objects)."""
    return path == "/v1" or path.startswith("/v1/")


def error_json(path: str, status: int, message: str, param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    """The error body for `path`: an OpenAI error object under /v1, else the web API's `{"error": "..."}`."""
    return error_body(status, message, param, code) if is_openai_path(path) else {"error": message}


class DocIn(BaseModel):
    """A pasted document."""

    title: str = ""
    text: str


class AskIn(BaseModel):
    """A question; `full_answer` also decodes a whole answer from the full text (else its first token only)."""

    question: str
    k: Optional[int] = None
    full_answer: bool = False


def create_app(model: Any, memory: Optional[Any] = None, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, k: int = 3,
               max_new_tokens: int = 64, max_passage_tokens: int = 192, model_description: str = "",
               memories: Optional[Mapping[str, Any]] = None) -> FastAPI:
    """The FastAPI app; `app.state.gist` is its `GistService`.

    Args:
        model: A `GistModel`.
        memory: A `GistMemory` built with `model` (default: in RAM): the page's documents, and the memory
            `gist-memory:default` of the OpenAI routes.
        max_upload_bytes: Largest accepted document (requests are capped a little above it).
        k: Passages read per question (the OpenAI routes' default too).
        max_new_tokens: Answer length (the OpenAI routes' default when a request gives no `max_tokens`).
        max_passage_tokens: Passage size documents are cut to.
        model_description: Shown in the page header.
        memories: More memories the OpenAI routes can name, by name (`gist-memory:<name>`).
    """
    svc = GistService(model, memory, max_upload_bytes=max_upload_bytes, k=k, max_new_tokens=max_new_tokens,
                      max_passage_tokens=max_passage_tokens, model_description=model_description, memories=memories)
    app = FastAPI(title="gist-memory", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gist = svc
    # a multipart body holds up to MAX_FILES documents plus framing
    app.add_middleware(BodyLimit, limit=svc.max_upload_bytes * 2 + 64 * 1024)

    @app.exception_handler(BadInput)
    async def _bad_input(request: Request, e: BadInput) -> JSONResponse:
        return JSONResponse(error_json(request.url.path, e.status, e.message), status_code=e.status)

    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, e: OpenAIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if is_openai_path(path) and e.status_code in (404, 405):
            code = "unknown_url" if e.status_code == 404 else "method_not_allowed"
            return JSONResponse(error_body(e.status_code, f"Invalid URL ({request.method} {path})", code=code),
                                status_code=e.status_code)
        return JSONResponse(error_json(path, e.status_code, str(e.detail)), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts, params = [], []
        for x in e.errors()[:3]:
            where = ".".join(str(p) for p in x.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {x.get('msg', 'invalid')}")
            params.append(where)
        if is_openai_path(request.url.path):  # OpenAI answers a malformed body with 400
            return JSONResponse(error_body(400, "invalid request: " + "; ".join(parts),
                                           param=params[0] if params else None, code="invalid_request_body"),
                                status_code=400)
        return JSONResponse({"error": "bad request: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        logger.exception("request failed")
        msg = f"internal error ({type(e).__name__}); the app keeps running"
        return JSONResponse(error_json(request.url.path, 500, msg, code="internal_error"), status_code=500)

    app.include_router(openai_router(svc))

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
                await _send_error(send, scope, 400, "bad Content-Length header")
                return
            if n > self.limit:
                await _send_error(send, scope, 413, f"request too large ({n / 1024:.0f} KiB; the limit is "
                                                        f"{self.limit / 1024:.0f} KiB)")
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
                await _send_error(send, scope, 413, f"request too large (the limit is {self.limit / 1024:.0f} KiB)")


class _TooLarge(Exception):
    pass


async def _send_error(send: Any, scope: dict, status: int, message: str) -> None:
    data = json.dumps(error_json(scope.get("path", ""), status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
