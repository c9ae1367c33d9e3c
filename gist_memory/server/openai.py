"""OpenAI-compatible routes: `/v1/chat/completions` (SSE streaming or not), `/v1/completions`, `/v1/models`.

The OpenAI Python client, LangChain's `ChatOpenAI` and LlamaIndex's `OpenAILike` talk to these unchanged. A request
reads a memory when it names one: `model="gist-memory:<name>"` or the extra body field `memory`; then the `k`
passages that best match the last user message are answered from their gist states, and `usage` reports the
positions the model read (`prompt_tokens`) beside the raw tokens they stand for (`prompt_raw_tokens`, see
`usage_fields`). Errors are OpenAI error objects: `{"error": {"message", "type", "param", "code"}}`.

Tools and structured output (`/v1/chat/completions`): `tools` + `tool_choice` ("auto", "none", "required", or
`{"type": "function", "function": {"name": ...}}`) + `parallel_tool_calls`, and `response_format`
(`{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"schema": {...}}}`), are decoded under a
grammar (`gist_memory.model.constrained`): tool calls always name a tool and carry arguments that validate, a JSON
answer always validates. Tool calls come back as `message.tool_calls` with `finish_reason: "tool_calls"`; streamed,
as OpenAI `delta.tool_calls` chunks (`ToolCallStream`). The history may hold assistant messages with `tool_calls`
and `role: "tool"` results.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gist_memory.server.schemas import ChatCompletionRequest, CompletionRequest
from gist_memory.server.service import Answer, BadInput, GistService

MODEL_ID = "gist-memory"
MAX_TOKENS = 4096
MAX_K = 16
MAX_STOP = 4
CREATED = int(time.time())


class OpenAIError(Exception):
    """A refused request, answered as `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None) -> None:  # noqa: A002 - OpenAI's field name
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or error_type(status)


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    return {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
               type: Optional[str] = None) -> dict[str, Any]:  # noqa: A002
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type or error_type(status), "param": param, "code": code}}


def error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code, e.type), status_code=e.status)


# ---- usage ---------------------------------------------------------------------------------------------------
def usage_fields(usage: dict[str, Any], passages: int) -> dict[str, Any]:
    """OpenAI `usage` from `call_usage`, with what the states stood for beside it.

    - `prompt_tokens`: positions the model read for the prompt: the states' kept rows plus the raw prompt tokens
      (template, system prompt, conversation, question);
    - `completion_tokens`, `total_tokens`: as in OpenAI;
    - `prompt_raw_tokens`: the same prompt had the passages been pasted as raw text (the states' raw tokens in
      place of their rows);
    - `state_positions` / `state_raw_tokens`: the rows the passages' states take / the raw tokens they stand for;
    - `passages`: passages read; `compression_ratio`: state_raw_tokens / state_positions (None without states).
    """
    read = int(usage.get("positions_read", 0))
    kept = int(usage.get("kept_rows", 0))
    raw = int(usage.get("raw_tokens", 0))
    new = int(usage.get("new_tokens", 0))
    return {"prompt_tokens": read, "completion_tokens": new, "total_tokens": read + new,
            "prompt_raw_tokens": read - kept + raw, "state_positions": kept, "state_raw_tokens": raw,
            "passages": int(passages), "compression_ratio": round(raw / kept, 3) if kept else None}


def source_fields(hits: list[Any]) -> list[dict[str, Any]]:
    """The passages read, best first (an extra top-level `sources` field of the response)."""
    return [{"id": h.id, "score": round(float(h.score), 4), "text": h.text, "metadata": dict(h.metadata or {})}
            for h in hits]


# ---- request -> answer arguments -----------------------------------------------------------------------------
class Job:
    """A checked request: what `GistService.answer` is called with.

    `tools`: the (normalized) tools when the answer may be tool calls, else None; `structured`: True when the
    answer is one JSON value (`response_format`).
    """

    def __init__(self, prompt: Any, query: str, gen: dict[str, Any], memory: Optional[str], k: int,
                 filter: Optional[dict[str, Any]], tools: Optional[list[Any]] = None,  # noqa: A002
                 structured: bool = False) -> None:
        self.prompt, self.query, self.gen, self.memory, self.k, self.filter = prompt, query, gen, memory, k, filter
        self.tools, self.structured = tools, structured


def model_ids(svc: GistService) -> list[str]:
    """What `/v1/models` lists: the plain model, then one id per memory."""
    return [MODEL_ID] + [f"{MODEL_ID}:{name}" for name in svc.memories]


def resolve_memory(svc: GistService, model: str, memory: Optional[str]) -> Optional[str]:
    """The memory a request names (`model="gist-memory:<name>"` and/or `memory`), or None."""
    if model == MODEL_ID:
        name = None
    elif model.startswith(MODEL_ID + ":"):
        name = model[len(MODEL_ID) + 1:]
    else:
        raise OpenAIError(400, f"The model {model!r} does not exist; this server serves "
                               f"{', '.join(model_ids(svc))}", param="model", code="model_not_found")
    if memory is not None:
        if name is not None and name != memory:
            raise OpenAIError(400, f"model names memory {name!r} but memory is {memory!r}", param="memory",
                              code="invalid_value")
        name = memory
    if name is not None and name not in svc.memories:
        raise OpenAIError(400, f"no memory {name!r}; this server has {', '.join(svc.memories)}",
                          param="model" if memory is None else "memory", code="model_not_found")
    return name


def _gen_kwargs(svc: GistService, req: Any, max_tokens: Optional[int]) -> dict[str, Any]:
    if req.n not in (None, 1):
        raise OpenAIError(400, "n must be 1 (one choice per request)", param="n", code="unsupported_value")
    for p in ("presence_penalty", "frequency_penalty"):
        if getattr(req, p):
            raise OpenAIError(400, f"{p} is not supported (use repetition_penalty)", param=p,
                              code="unsupported_parameter")
    if req.logit_bias:
        raise OpenAIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
    n = svc.max_new_tokens if max_tokens is None else int(max_tokens)
    if not 1 <= n <= MAX_TOKENS:
        raise OpenAIError(400, f"max_tokens must be between 1 and {MAX_TOKENS}, got {n}", param="max_tokens",
                          code="invalid_value")
    gen: dict[str, Any] = {"max_new_tokens": n}
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or not all(stop):
        raise OpenAIError(400, f"stop must be up to {MAX_STOP} non-empty strings", param="stop", code="invalid_value")
    if stop:
        gen["stop"] = stop
    if req.temperature:  # omitted or 0: greedy
        gen.update(do_sample=True, temperature=float(req.temperature))
        if req.top_p is not None:
            gen["top_p"] = float(req.top_p)
        if req.top_k:
            gen["top_k"] = int(req.top_k)
    if req.seed is not None:
        gen["seed"] = int(req.seed)
    if req.repetition_penalty is not None:
        gen["repetition_penalty"] = float(req.repetition_penalty)
    return gen


def _job(svc: GistService, req: Any, prompt: Any, query: str, max_tokens: Optional[int]) -> Job:
    memory = resolve_memory(svc, req.model, req.memory)
    k = svc.k if req.k is None else int(req.k)
    if not 1 <= k <= MAX_K:
        raise OpenAIError(400, f"k must be between 1 and {MAX_K}, got {k}", param="k", code="invalid_value")
    return Job(prompt, query, _gen_kwargs(svc, req, max_tokens), memory, k, req.filter)


def _text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise OpenAIError(400, f"messages[{i}].content is missing", param=f"messages[{i}].content",
                          code="invalid_value")
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise OpenAIError(400, f"messages[{i}].content: only text parts are supported, got {part.type!r}",
                              param=f"messages[{i}].content", code="unsupported_value")
        parts.append(part.text)
    return "\n".join(parts)


def _constrained() -> Any:
    """`gist_memory.model.constrained` (imported on first use: the server loads no torch before a model does)."""
    from gist_memory.model import constrained

    return constrained


def _response_schema(response_format: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The JSON schema a `response_format` asks for (None: free text)."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise OpenAIError(400, "response_format.json_schema must be an object with a 'schema'",
                              param="response_format.json_schema", code="invalid_value")
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise OpenAIError(400, "response_format.json_schema.schema must be a JSON schema (an object)",
                              param="response_format.json_schema.schema", code="invalid_value")
        return schema
    raise OpenAIError(400, f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                      param="response_format.type", code="unsupported_value")


def _constraint_gen(req: ChatCompletionRequest) -> tuple[dict[str, Any], Optional[list[Any]], bool]:
    """The generation kwargs of a request's tools / response_format, its tools when the answer may be tool
    calls, and whether the answer is JSON; bad tools, choices or schemas are 400s naming the field."""
    if req.functions or req.function_call is not None:
        raise OpenAIError(400, "functions / function_call (the deprecated API) are not supported; send tools and "
                               "tool_choice", param="functions", code="unsupported_parameter")
    schema = _response_schema(req.response_format)
    c = _constrained()
    tools: Optional[list[Any]] = None
    if req.tools:
        try:
            tools = c.normalize_tools(req.tools)
        except ValueError as e:
            raise OpenAIError(400, str(e), param="tools", code="invalid_value") from None
        try:
            choice = c.normalize_tool_choice(req.tool_choice, tools)
        except ValueError as e:
            raise OpenAIError(400, str(e), param="tool_choice", code="invalid_value") from None
        if choice == "none":
            tools = None
    elif req.tool_choice not in (None, "none", "auto"):
        raise OpenAIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
    if tools and schema is not None:
        raise OpenAIError(400, "response_format together with tools is not supported: the answer is either tool "
                               "calls or one JSON value (send tool_choice='none' for the JSON answer)",
                          param="response_format", code="unsupported_value")
    if tools:
        parallel = True if req.parallel_tool_calls is None else bool(req.parallel_tool_calls)
        gen = {"tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel}
        param = "tools"
    elif schema is not None:
        gen, param = {"schema": schema}, "response_format"
    else:
        return {}, None, False
    try:
        c.build_constraint(**gen)  # compiles the grammar: an invalid schema is refused before anything runs
    except ValueError as e:
        raise OpenAIError(400, str(e), param=param, code="invalid_value") from None
    return gen, tools, schema is not None


def _chat_messages(req: ChatCompletionRequest) -> tuple[list[dict[str, str]], str]:
    """The conversation as the model reads it, and the search query (the last user message).

    An assistant message's tool calls are written after its text as the model writes calls
    (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`); a tool result is a user message holding a
    `<tool_response name="...">` block (named by the call it answers).
    """
    msgs: list[dict[str, str]] = []
    names: dict[str, str] = {}  # tool-call id -> tool name
    last_role, query = None, ""
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant", "tool"):
            raise OpenAIError(400, f"messages[{i}].role {m.role!r} is not supported (system, developer, user, "
                                   "assistant, tool)", param=f"messages[{i}].role", code="unsupported_value")
        if role == "assistant" and m.tool_calls:
            text = _text(m.content, i) if m.content is not None else ""
            calls = []
            for tc in m.tool_calls:
                if tc.id:
                    names[tc.id] = tc.function.name
                calls.append({"name": tc.function.name, "arguments": tc.function.arguments or {}})
            written = _constrained().format_tool_calls(calls)
            msgs.append({"role": "assistant", "content": "\n".join(x for x in (text.strip(), written) if x)})
        elif role == "tool":
            name = m.name or names.get(m.tool_call_id or "")
            msgs.append({"role": "user", "content": _constrained().format_tool_result(_text(m.content, i).strip(),
                                                                                       name)})
        else:
            msgs.append({"role": role, "content": _text(m.content, i)})
            if role == "user":
                query = msgs[-1]["content"]
        last_role = role
    if last_role not in ("user", "tool"):
        raise OpenAIError(400, f"the last message must be the user's or a tool result, got {last_role!r}",
                          param="messages", code="invalid_value")
    if last_role == "user" and not msgs[-1]["content"].strip():
        raise OpenAIError(400, "the last user message is empty", param="messages", code="invalid_value")
    return msgs, query


def chat_job(svc: GistService, req: ChatCompletionRequest) -> Job:
    """Check a chat request; the messages become the model's conversation, the last user turn the search query.

    With tools or a response_format, stop strings reach the model, which applies them to free text only (the
    text of a `tool_choice: "auto"` answer), never to a tool call or a JSON answer.
    """
    if req.logprobs or req.top_logprobs:
        raise OpenAIError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
    if not req.messages:
        raise OpenAIError(400, "messages is empty", param="messages", code="invalid_value")
    constraint, tools, structured = _constraint_gen(req)
    msgs, query = _chat_messages(req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    job = _job(svc, req, msgs, query, max_tokens)
    if constraint:
        job.gen.update(constraint)
    job.tools, job.structured = tools, structured
    return job


def completion_job(svc: GistService, req: CompletionRequest) -> Job:
    """Check a completion request; the prompt is answered as one user turn and is the search query."""
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise OpenAIError(400, "prompt must be one string (token ids and batches are not supported)",
                              param="prompt", code="unsupported_value")
        prompt = prompt[0]
    if not prompt.strip():
        raise OpenAIError(400, "prompt is empty", param="prompt", code="invalid_value")
    for p in ("echo", "suffix"):
        if getattr(req, p):
            raise OpenAIError(400, f"{p} is not supported", param=p, code="unsupported_parameter")
    if req.best_of not in (None, 1):
        raise OpenAIError(400, "best_of must be 1", param="best_of", code="unsupported_value")
    if req.logprobs:
        raise OpenAIError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
    return _job(svc, req, prompt, prompt, req.max_tokens)


def run(svc: GistService, job: Job, on_text: Any = None, cancelled: Any = lambda: False) -> Answer:
    """Answer a job; the model's and the memory's errors about the request become 400s."""
    try:
        return svc.answer(job.prompt, job.gen, memory=job.memory, query=job.query, k=job.k, filter=job.filter,
                          on_text=on_text, cancelled=cancelled)
    except BadInput as e:
        raise OpenAIError(e.status, e.message) from None
    except (ValueError, TypeError) as e:
        msg = str(e)
        if "max_new_tokens" in msg and "too small" in msg:  # a budget below the shortest valid structured answer
            raise OpenAIError(400, msg.replace("max_new_tokens", "max_tokens"), param="max_tokens",
                              code="invalid_value") from None
        raise OpenAIError(400, msg, code="invalid_value") from None


def reply_message(job: Job, a: Answer) -> tuple[dict[str, Any], str]:
    """The assistant `message` of an answer and its `finish_reason`: tool calls (`tool_calls`, content null,
    "tool_calls") when the answer is calls; a JSON answer is complete ("stop") even when it used every token."""
    c = _constrained() if job.tools is not None else None
    if c is not None and a.text.startswith(c.TOOL_CALL_OPEN):
        _, calls = c.parse_tool_calls(a.text, job.tools)
        return ({"role": "assistant", "content": None, "refusal": None,
                 "tool_calls": [k.to_openai() for k in calls]}, "tool_calls")
    finish = "stop" if job.structured else a.finish_reason
    return {"role": "assistant", "content": a.text, "refusal": None}, finish


_CALL_HEAD = re.compile(r'\n?<tool_call>\{"name": "([A-Za-z0-9_\-.]{1,64})", "arguments": ')
_DECODER = json.JSONDecoder()


class ToolCallStream:
    """The streamed pieces of an answer that may be tool calls, as OpenAI chat-completion `delta`s.

    Free text (it does not start with `<tool_call>`) streams as `content` once it cannot be the start of a call.
    Tool calls stream as `tool_calls` deltas: a first one per call with its `index`, `id`, `type` and the
    function's `name` (and empty `arguments`) once the name is written, then the `arguments` JSON text as it is
    decoded, so the concatenated `arguments` of a call is its arguments object.
    """

    def __init__(self, tools: list[Any]) -> None:
        self.tools = tools
        self.text = ""
        self.mode: Optional[str] = None  # None (undecided), "text" or "calls"
        self.calls: list[dict[str, Any]] = []  # {"id", "name"} of each call started
        self._pos = 0  # where the next call starts in `text`
        self._args: Optional[int] = None  # where the open call's arguments start
        self._sent = 0  # characters of the open call's arguments sent

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """The deltas to send after `piece` (possibly none: text that may still become a call waits)."""
        mark = _constrained().TOOL_CALL_OPEN
        self.text += piece
        if self.mode is None:
            if self.text.startswith(mark):
                self.mode = "calls"
            elif mark.startswith(self.text):
                return []
            else:
                self.mode = "text"
                return [{"content": self.text}]
        elif self.mode == "text":
            return [{"content": piece}] if piece else []
        return self._call_deltas()

    def _call_deltas(self) -> list[dict[str, Any]]:
        close = "}" + _constrained().TOOL_CALL_CLOSE
        out: list[dict[str, Any]] = []
        while True:
            if self._args is None:
                m = _CALL_HEAD.match(self.text, self._pos)
                if m is None:
                    return out
                call = {"id": f"call_{uuid.uuid4().hex[:24]}", "name": m.group(1)}
                self.calls.append(call)
                out.append({"tool_calls": [{"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                                            "function": {"name": call["name"], "arguments": ""}}]})
                self._args, self._sent = m.end(), 0
            try:
                end: Optional[int] = _DECODER.raw_decode(self.text, self._args)[1]
            except json.JSONDecodeError:  # the arguments object is still open
                end = None
            upto = len(self.text) if end is None else end
            new = self.text[self._args + self._sent : upto]
            if new:
                out.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": new}}]})
                self._sent += len(new)
            if end is None or not self.text.startswith(close, end):
                return out
            self._pos, self._args = end + len(close), None

    def finish(self) -> tuple[list[dict[str, Any]], bool]:
        """The last deltas once the answer is complete, and whether it was tool calls.

        Raises:
            ValueError: Text that starts as tool calls but does not parse (the grammar prevents it).
        """
        if self.mode != "calls":
            rest = [{"content": self.text}] if self.mode is None and self.text else []
            return rest, False
        _, calls = _constrained().parse_tool_calls(self.text, self.tools)
        out = []
        if [k.name for k in calls] != [c["name"] for c in self.calls]:  # not in the expected layout: send whole
            out = [{"tool_calls": [{"index": i, **k.to_openai()}]} for i, k in enumerate(calls)]
        return out, True


# ---- responses -----------------------------------------------------------------------------------------------
def _chat_chunk(cid: str, model: str, delta: dict[str, Any], finish: Optional[str] = None) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def _text_chunk(cid: str, model: str, text: str, finish: Optional[str] = None) -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def _sse(obj: Any) -> str:
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)) + "\n\n"


async def _stream(svc: GistService, job: Job, chat: bool, model: str, include_usage: bool) -> StreamingResponse:
    """Decode in a thread and relay the pieces as server-sent events.

    The first event is awaited before the response starts, so a request the model refuses still gets a JSON
    error with its status; a client that goes away stops the decoding after the current piece.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def put(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            cancel.set()

    def work() -> None:
        try:
            put(("done", run(svc, job, on_text=lambda t: put(("text", t)), cancelled=cancel.is_set)))
        except OpenAIError as e:
            put(("error", e))
        except Exception as e:  # noqa: BLE001 - reported to the client, the server keeps serving
            put(("error", OpenAIError(500, f"internal error ({type(e).__name__})", code="internal_error")))

    threading.Thread(target=work, name="gist-memory-stream", daemon=True).start()
    try:
        first = await queue.get()
    except BaseException:
        cancel.set()
        raise
    if first[0] == "error":
        return error_response(first[1])  # type: ignore[return-value]

    cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    calls = ToolCallStream(job.tools) if chat and job.tools is not None else None

    def chunk(text: str, finish: Optional[str] = None) -> dict[str, Any]:
        return _chat_chunk(cid, model, {"content": text}, finish) if chat else _text_chunk(cid, model, text, finish)

    async def events() -> AsyncIterator[str]:
        item = first
        try:
            if chat:
                yield _sse(_chat_chunk(cid, model, {"role": "assistant", "content": ""}))
            while True:
                kind, val = item
                if kind == "text":
                    if calls is None:
                        yield _sse(chunk(val))
                    else:
                        for delta in calls.feed(val):
                            yield _sse(_chat_chunk(cid, model, delta))
                elif kind == "error":
                    yield _sse(error_body(val.status, val.message, val.param, val.code))
                    break
                else:
                    finish = "stop" if job.structured else val.finish_reason
                    if calls is not None:
                        try:
                            rest, were_calls = calls.finish()
                        except ValueError as e:
                            err = OpenAIError(500, f"tool calls did not parse: {e}", code="internal_error")
                            yield _sse(error_body(err.status, err.message, err.param, err.code))
                            break
                        for delta in rest:
                            yield _sse(_chat_chunk(cid, model, delta))
                        finish = "tool_calls" if were_calls else finish
                    last = chunk("", finish)
                    if chat:
                        last["choices"][0]["delta"] = {}
                    last["sources"] = source_fields(val.sources)
                    yield _sse(last)
                    if include_usage:
                        u = chunk("")
                        u["choices"] = []
                        u["usage"] = usage_fields(val.usage, len(val.sources))
                        yield _sse(u)
                    break
                item = await queue.get()
            yield _sse("[DONE]")
        finally:
            cancel.set()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _chat_response(model: str, a: Answer, job: Job) -> dict[str, Any]:
    try:
        message, finish = reply_message(job, a)
    except ValueError as e:  # the grammar prevents it
        raise OpenAIError(500, f"tool calls did not parse: {e}", code="internal_error") from None
    return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage_fields(a.usage, len(a.sources)), "sources": source_fields(a.sources)}


def _completion_response(model: str, a: Answer) -> dict[str, Any]:
    return {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "text": a.text, "logprobs": None, "finish_reason": a.finish_reason}],
            "usage": usage_fields(a.usage, len(a.sources)), "sources": source_fields(a.sources)}


def _model_card(mid: str) -> dict[str, Any]:
    return {"id": mid, "object": "model", "created": CREATED, "owned_by": "gist-memory"}


# ---- routes --------------------------------------------------------------------------------------------------
def openai_router(svc: GistService) -> APIRouter:
    """The `/v1` routes over `svc` (mounted by `create_app`)."""
    r = APIRouter(prefix="/v1")

    @r.get("/models")
    def models() -> dict:
        return {"object": "list", "data": [_model_card(m) for m in model_ids(svc)]}

    @r.get("/models/{model_id:path}")
    def model(model_id: str) -> dict:
        if model_id not in model_ids(svc):
            raise OpenAIError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
        return _model_card(model_id)

    @r.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        job = chat_job(svc, req)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream(svc, job, True, req.model, usage)
        answer = await _in_thread(svc, job)
        return _chat_response(req.model, answer, job)

    @r.post("/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        job = completion_job(svc, req)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream(svc, job, False, req.model, usage)
        answer = await _in_thread(svc, job)
        return _completion_response(req.model, answer)

    return r


async def _in_thread(svc: GistService, job: Job) -> Answer:
    """`run` in a worker thread; a client that goes away while it waits cancels the decoding."""
    cancel = threading.Event()
    try:
        return await asyncio.to_thread(run, svc, job, None, cancel.is_set)
    except asyncio.CancelledError:
        cancel.set()
        raise
