"""`ChatGist`: a LangChain chat model over a `GistModel` that reads old turns and known passages as gist states.

    chat = ChatGist(model=GistModel.from_pretrained(), keep_recent=4, max_tokens=256)
    chat.invoke(messages)                              # turns older than the last 4 are read from their states
    chat.invoke(messages, gist_ids=["doc-1", "doc-7"])  # direct route: passages of `memory` by id
    chat.bind_tools([search, add_note]).invoke(messages)  # AIMessage.tool_calls, decoded under a grammar
    chat.with_structured_output(Answer).invoke(question)  # an Answer instance, always valid

The model's prompt is laid out as `[system prompt][compressed turns][retrieved passages]["\\n\\n" + recent turns]`;
the recent turns go to the model as chat messages (user/assistant, through its chat template), and the states sit
at the start of the first of them.
Each turn is compressed once (keyed by content hash + model fingerprint) and kept in an LRU and, when a
`state_store` is given, persistently, so a restarted app reads old turns without compressing them again.

Tool calls and structured output are decoded under a grammar by the core (`GistModel.generate(..., tools=...)` /
`schema=`, see `gist_memory.model.constrained`), so every tool call and every structured answer parses and
validates against its schema, whatever the model's size; states still replace the passages and old turns.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal, Optional

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    FunctionMessage,
    HumanMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call, tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from gist_memory import GistState
from langchain_gist_memory._messages import Turn, message_text, role_of, split_conversation
from langchain_gist_memory._states import DEFAULT_MAX_BYTES, StateCache, StateStore
from langchain_gist_memory.registry import PassageRegistry, default_registry

_CALL_KWARGS = {
    "gist_ids", "gist_states", "passage_order", "keep_recent", "raw_token_budget", "max_tokens", "temperature", "top_p", "repetition_penalty", "seed",
    "state_store", "tools", "tool_choice", "parallel_tool_calls", "response_format", "structured_max_tokens",
}
_IGNORED_KWARGS = {"stream", "ls_structured_output_format"}
_LEGACY_TOOL_KWARGS = {"functions", "function_call"}
_TURN_STOPS = ("\nUser:", "\nUser (")
PASSAGE_ORDERS = ("given", "relevance")
_METHODS = ("json_schema", "function_calling", "json_mode")


def _new_usage() -> Any:
    """A `gist_memory` `Usage` for one call: the model fills it (one model serves many threads; usage is per call)."""
    from gist_memory.model.usage import Usage

    return Usage()


def _constraint(tools: Optional[Sequence[Any]] = None, tool_choice: Any = None,
                parallel_tool_calls: Optional[bool] = None, response_format: Any = None) -> dict[str, Any]:
    """The core's generation arguments for the tools / response format of one call ({} for free text).

    Raises:
        ValueError: Both tools and a response format, an unknown response format, a bad tool or tool choice.
    """
    from gist_memory.model.constrained import build_constraint

    schema = None
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
            schema = response_format["json_schema"].get("schema")
            if not isinstance(schema, dict):
                raise ValueError("response_format json_schema has no 'schema' dict")
        elif kind != "text":
            raise ValueError(f"response_format must be {{'type': 'text' | 'json_object' | 'json_schema', ...}}, "
                             f"got {response_format!r:.120}")
    if schema is not None and tools:
        raise ValueError("ChatGist takes either tools (bind_tools) or a response format (with_structured_output), "
                         "not both in one call")
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    c = build_constraint(schema=schema, tools=tools or None, tool_choice=tool_choice, parallel_tool_calls=parallel)
    if c is None:
        return {}
    if c.kind == "json":
        return {"schema": schema}
    return {"tools": list(tools or []), "tool_choice": c.tool_choice, "parallel_tool_calls": c.parallel_tool_calls}


def _answered_by_tools(messages: Sequence[BaseMessage]) -> bool:
    """True when a tool result follows the last human message (the turn's tools have been called)."""
    for m in reversed(messages):
        if isinstance(m, (ToolMessage, FunctionMessage)):
            return True
        if isinstance(m, HumanMessage):
            return False
    return False


def _message_parts(plan: _Plan, text: str) -> tuple[str, list[dict[str, Any]]]:
    """(content, LangChain tool calls) of a reply: tool calls only when tools were bound."""
    from gist_memory.model.constrained import normalize_tools, parse_tool_calls

    tools = plan.gen_kwargs.get("tools")
    if not tools:
        return text, []
    content, calls = parse_tool_calls(text, normalize_tools(tools))
    return content, [tool_call(name=c.name, args=c.arguments, id=c.id) for c in calls]


def _chat_messages(turns: Sequence[Turn]) -> Any:
    """The recent turns as the model's chat messages; a str when they do not end with the user (flattened)."""
    msgs: list[dict[str, str]] = []
    for t in turns:
        for m in t.chat():
            if msgs and msgs[-1]["role"] == m["role"]:
                msgs[-1] = {"role": m["role"], "content": msgs[-1]["content"] + "\n" + m["content"]}
            else:
                msgs.append(m)
    if msgs and msgs[-1]["role"] == "user":
        return msgs
    return "\n".join(t.text for t in turns)


@dataclass
class _Plan:
    """What one call reads: the prompt text, the system prompt, the states, and what they stand for."""

    prompt: Any  # str, or chat messages ({role, content})
    system_prompt: Optional[str]
    states: list[GistState]
    gen_kwargs: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


class ChatGist(BaseChatModel):
    """A local chat model that reads older turns and retrieved passages from their gist states.

    Args:
        model: The `GistModel` (e.g. `GistModel.from_pretrained()`).
        keep_recent: Complete turns before the current one that are read as text; older ones are read from their
            gist states. A turn is a human message and the replies/tool results that follow it.
        raw_token_budget: The most tokens of recent turns read as text (None: no budget, `keep_recent` alone
            decides). Older recent turns are compressed until the rest fits; the current turn and the last complete
            exchange before it always stay verbatim, whatever their size (`max_prompt_tokens` still bounds them).
            A long chat then reads a small fraction of its raw tokens while the model still sees the last exchange
            word for word.
        max_tokens: Tokens to generate at most.
        structured_max_tokens: Tokens at most of tool calls and structured answers (None: `max_tokens`). The answer
            is closed in time to fit (a long string argument ends early); a budget below the shortest valid answer
            is a ValueError.
        first_tool_choice: The `tool_choice` of a turn's first reply when tools are bound with no choice (or
            "auto"), e.g. "any": a model too small to pick a tool by itself (the bundled SmolLM2-135M answers in
            text) then calls one before it answers; once a tool result follows the human's message, "auto" again.
            None (default): always "auto".
        parallel_tool_calls: Let a reply hold several tool calls (default); False: at most one (also per call or in
            `bind_tools`).
        temperature: 0 decodes greedily; above 0 samples.
        top_p: Nucleus sampling (with temperature > 0).
        repetition_penalty: HF-style repetition penalty (1.0 = none).
        seed: Sampling seed.
        stop: Stop strings.
        max_prompt_tokens: The most tokens read as text. When the recent turns are longer, more of them are
            compressed; when the current message alone is longer, its head is compressed and its last
            `max_prompt_tokens // 2` tokens are read as text.
        stop_at_next_turn: Stop when the model starts writing the user's next turn (`\nUser:`): compressed turns
            are written as `User: ...` / `Assistant: ...` lines (recent turns go to the model as chat messages).
        memory: A `GistMemory` whose passages `invoke(..., gist_ids=[...])` reads.
        registry: Where known passages are looked up (default: the registry `GistRetriever` fills).
        splice_passages: Cut known passages out of the messages and read their states.
        passage_order: The order passage states (spliced, `gist_ids`, `gist_states`) are read in: `relevance`
            (the default): the model scores how well each predicts the last message (`GistModel.relevance`, the
            states in one padded pass) and reads the most relevant last, nearest the question; `given`: as they
            come, no pass. Turn states keep their order. Also per call.
        state_store: Persistent home of turn states (`GistHistoryStore`, `LangGraphStateStore`, ...).
        cache_size: Turn states kept in RAM (at most).
        cache_bytes: Bytes of turn states kept in RAM (at most; the least recently used go first).
        model_name: Name reported in metadata and traces (default: the GistModel's name).
        streaming: Stream by default in `invoke` (LangChain standard parameter).
        timeout / max_retries: Accepted for compatibility with LangChain's standard parameters; a local model is
            neither interrupted nor retried.
    """

    model: Any = Field(exclude=True)
    keep_recent: int = Field(default=4, ge=0)
    raw_token_budget: Optional[int] = Field(default=None, ge=0)
    max_tokens: int = Field(default=256, ge=1)
    structured_max_tokens: Optional[int] = Field(default=None, ge=1)
    first_tool_choice: Optional[str] = None
    parallel_tool_calls: bool = True
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    seed: Optional[int] = None
    stop: Optional[list[str]] = None
    max_prompt_tokens: int = Field(default=2048, ge=16)
    memory: Any = Field(default=None, exclude=True)
    registry: Optional[PassageRegistry] = Field(default=None, exclude=True)
    splice_passages: bool = True
    passage_order: str = "relevance"
    state_store: Any = Field(default=None, exclude=True)
    cache_size: int = Field(default=4096, ge=0)
    cache_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=0)
    stop_at_next_turn: bool = True
    model_name: Optional[str] = None
    streaming: bool = False
    timeout: Optional[float] = None
    max_retries: Optional[int] = None

    model_config = ConfigDict(arbitrary_types_allowed=True)

    _cache: StateCache = PrivateAttr(default_factory=StateCache)
    _pieces_cache: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ChatGist:
        for attr in ("compress", "stream", "state_key", "fingerprint", "tokenizer"):
            if not hasattr(self.model, attr):
                raise ValueError(f"model has no {attr!r}: ChatGist needs a gist_memory.GistModel")
        if self.state_store is not None and not isinstance(self.state_store, StateStore):
            raise ValueError("state_store must have get_states(keys, fingerprint) and put_states(entries)")
        if self.passage_order not in PASSAGE_ORDERS:
            raise ValueError(f"passage_order must be one of {', '.join(PASSAGE_ORDERS)}, got {self.passage_order!r}")
        if self.model_name is None:
            self.model_name = str(getattr(self.model, "name", type(self.model).__name__))
        self._cache.max_states = self.cache_size
        self._cache.max_bytes = self.cache_bytes
        return self

    # ---- LangChain plumbing -----------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "gist-memory"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "keep_recent": self.keep_recent,
            "raw_token_budget": self.raw_token_budget,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="gist_memory",
            ls_model_name=model if isinstance(model, str) else str(self.model_name),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: Any = None,
        parallel_tool_calls: Optional[bool] = None,
        strict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Runnable:
        """This chat model with `tools` bound: its replies may carry `AIMessage.tool_calls`.

        The reply is decoded under a grammar, so every call names a bound tool and its arguments validate against
        the tool's schema. The model writes either text or tool calls (never both).

        Args:
            tools: LangChain tools, Pydantic classes, TypedDicts, functions or OpenAI tool dicts (anything
                `convert_to_openai_tool` takes).
            tool_choice: None or "auto" (text or calls, the model decides), "none" (text), "any" / "required" /
                True (at least one call), a tool's name or `{"type": "function", "function": {"name": ...}}`
                (exactly one call of that tool).
            parallel_tool_calls: False: at most one call per reply (default: the chat model's `parallel_tool_calls`).
            strict: Accepted for compatibility: the grammar enforces every schema strictly anyway.
            **kwargs: Bound call arguments (e.g. `structured_max_tokens`).

        Raises:
            ValueError: A tool whose schema cannot be used, or a `tool_choice` that names no bound tool.
        """
        from gist_memory.model.constrained import normalize_tool_choice, normalize_tools

        formatted = [convert_to_openai_tool(t) for t in tools]
        normalize_tool_choice(tool_choice, normalize_tools(formatted))  # bad input fails here, not on invoke
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = bool(parallel_tool_calls)
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: Any = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Runnable:
        """A runnable that answers with an instance of `schema` (a Pydantic object, or a dict).

        Every answer parses and validates: it is decoded under a grammar made from the schema.

        Args:
            schema: A Pydantic model class, a TypedDict, or a JSON schema / OpenAI tool dict. May be None only
                with `method="json_mode"` (then any JSON object, returned as a dict).
            method: "json_schema" (the answer is the JSON object itself; default), "function_calling" (the
                answer is a forced call of a tool whose arguments are the schema) or "json_mode" (a JSON object;
                of `schema` when one is given).
            include_raw: Return `{"raw": AIMessage, "parsed": ..., "parsing_error": ...}` instead.
            strict: Accepted for compatibility: the grammar is always strict.
            **kwargs: None are supported (a ValueError names them).

        Raises:
            ValueError: An unknown method, unsupported arguments, no schema where one is needed, or a schema the
                grammar engine cannot use.
        """
        from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
        from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser

        if kwargs:
            raise ValueError(f"with_structured_output got unsupported arguments {sorted(kwargs)}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}")
        if schema is None and method != "json_mode":
            raise ValueError(f"method={method!r} needs a schema (only method='json_mode' works without one)")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)  # pydantic 2, or 1 (pydantic.v1)
        fmt = {"kwargs": {"method": method}, "schema": schema}
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, parallel_tool_calls=False,
                                  ls_structured_output_format=fmt)
            parser: Runnable = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        else:
            if schema is None:
                response_format: dict[str, Any] = {"type": "json_object"}
                fmt = {"kwargs": {"method": method}, "schema": {"type": "object"}}
            else:
                if is_pydantic:
                    js = schema.model_json_schema() if hasattr(schema, "model_json_schema") else schema.schema()
                else:
                    js = convert_to_json_schema(schema)
                response_format = {"type": "json_schema", "json_schema": {"name": js.get("title", "answer"),
                                                                          "schema": js}}
                _constraint(response_format=response_format)  # a schema the engine refuses fails here
            llm = self.bind(response_format=response_format, ls_structured_output_format=fmt)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")

    @property
    def state_cache(self) -> StateCache:
        """The in-RAM LRU of turn states (the core `TurnCompressor`; its `compressed_texts` counts the texts this
        chat compressed)."""
        return self._cache

    # ---- planning ------------------------------------------------------------------------------------
    def _n_tokens(self, text: str) -> int:
        return len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def _cut_passages(self, texts: list[str]) -> tuple[list[str], list[GistState]]:
        """Cut registered passages out of message texts; returns the texts left and the passages' states.

        The rules are the core registry's (`gist_memory.registry`): a passage deleted from its memory since it
        was retrieved is read as text.
        """
        reg = self.registry if self.registry is not None else default_registry()
        if not self.splice_passages or not len(reg):
            return texts, []
        core = reg.for_model(self.model)
        out, states = [], []
        for text in texts:
            sp, found = core.splice_states(text)
            if sp.keys:
                text = re.sub(r"\n{3,}", "\n\n", sp.text).strip()
                states += found
            out.append(text)
        return out, states

    def _pieces(self, text: str) -> list[str]:
        """`text` cut into pieces of at most `max_prompt_tokens` tokens (at sentence or word boundaries).

        Cuts are counted from the start, so a text and the same text with more appended share their leading
        pieces: a long message compressed piece by piece while it is the current one is not compressed again
        when it becomes an old turn.
        """
        n_max = self.max_prompt_tokens
        if len(text.encode("utf-8")) <= n_max:  # bytes bound byte-level BPE token counts from above
            return [text]
        hit = self._pieces_cache.get(text)
        if hit is not None:
            return hit
        offs = self.model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        pieces, start, tok = [], 0, n_max
        while tok < len(offs):
            cut = offs[tok][0]
            window = text[max(start, cut - 400) : cut]
            for pat in ("\n", ". ", "? ", "! ", " "):
                j = window.rfind(pat)
                if j > 0:
                    cut = cut - len(window) + j + len(pat)
                    break
            if cut > start and text[start:cut].strip():
                pieces.append(text[start:cut])
                start = cut
            tok += n_max
        pieces.append(text[start:])
        pieces = [p for p in pieces if p.strip()] or [text]
        if len(self._pieces_cache) > 256:
            self._pieces_cache.clear()
        self._pieces_cache[text] = pieces
        return pieces

    def _plan(self, messages: Sequence[BaseMessage], stop: Optional[list[str]], kwargs: dict[str, Any]) -> _Plan:
        unknown = set(kwargs) - _CALL_KWARGS - _IGNORED_KWARGS - {"model"}
        legacy = unknown & _LEGACY_TOOL_KWARGS
        if legacy:
            raise TypeError(f"ChatGist got unsupported arguments {sorted(legacy)} (OpenAI's legacy function calling); "
                            "use instead: bind_tools(...) / tools=[...] and tool_choice=...")
        if unknown:
            raise TypeError(f"ChatGist got unsupported arguments {sorted(unknown)}; supported: {sorted(_CALL_KWARGS)}")
        override = kwargs.get("model")
        if override is not None and override != self.model_name:
            raise ValueError(f"ChatGist runs one local model ({self.model_name}); it cannot switch to {override!r}")
        if not messages:
            raise ValueError("ChatGist got no messages")
        keep_recent = int(kwargs.get("keep_recent", self.keep_recent))
        if keep_recent < 0:
            raise ValueError(f"keep_recent must be >= 0, got {keep_recent}")
        budget = kwargs.get("raw_token_budget", self.raw_token_budget)
        if budget is not None and int(budget) < 0:
            raise ValueError(f"raw_token_budget must be >= 0 or None, got {budget}")
        store = kwargs.get("state_store", self.state_store)
        t0 = time.perf_counter()

        for i, m in enumerate(messages):
            role_of(m, i)  # refuse unknown message types before any work
        texts = [message_text(m, i) for i, m in enumerate(messages)]
        texts, passage_states = self._cut_passages(texts)
        conv = split_conversation(messages, texts)
        turns = conv.turns

        # which turns are read as text: the current one (last) and `keep_recent` before it, within the token budget
        n_raw = min(len(turns), keep_recent + 1)
        while n_raw and turns[len(turns) - n_raw].gist:  # a middleware marker is never "recent"
            n_raw -= 1
        raw = turns[len(turns) - n_raw :] if n_raw else []
        old = turns[: len(turns) - n_raw]
        sizes = [self._n_tokens(t.text) for t in raw]
        while len(raw) > 1 and sum(sizes) > self.max_prompt_tokens:
            old.append(raw.pop(0))
            sizes.pop(0)
        if budget is not None:  # the token budget: never the current turn nor the last exchange before it
            while len(raw) > 2 and sum(sizes) > int(budget):
                old.append(raw.pop(0))
                sizes.pop(0)

        # texts read from states, in order: old turns (long ones in pieces; markers expand to their own texts) and
        # the head of an over-long current turn
        chunks: list[tuple[str, list[str]]] = []
        for t in old:
            if t.gist:
                chunks += [(piece, []) for x in t.gist.get("texts", []) if str(x).strip() for piece in self._pieces(str(x))]
            else:
                for j, piece in enumerate(self._pieces(t.text)):
                    chunks.append((piece, t.message_ids[:1] if j == 0 else []))
        if raw and sizes[0] > self.max_prompt_tokens:
            *head, tail = self._pieces(raw[0].text)
            chunks += [(piece, []) for piece in head]
            raw = [Turn(lines=[tail.strip()], message_ids=raw[0].message_ids,
                        messages=[{"role": "user", "content": tail.strip()}])]
        turn_states: list[GistState] = []
        stats: dict[str, Any] = {"cached": 0, "loaded": 0, "compressed": 0, "compress_s": 0.0}
        if chunks:
            turn_states, stats = self._cache.states_for(
                self.model, [c for c, _ in chunks], [ids for _, ids in chunks], store=store
            )

        direct = self._direct_states(kwargs)
        passages = passage_states + direct
        order = kwargs.get("passage_order", self.passage_order)
        if order not in PASSAGE_ORDERS:
            raise ValueError(f"passage_order must be one of {', '.join(PASSAGE_ORDERS)}, got {order!r}")
        if order == "relevance" and len(passages) > 1 and texts[-1].strip():
            rel = self.model.relevance(texts[-1], passages)
            from gist_memory.model.scoring import reading_order_by_relevance

            passages = [passages[i] for i in reading_order_by_relevance(rel)]
        states = turn_states + passages

        stops = list(stop) if stop is not None else (list(self.stop) if self.stop else [])
        if conv.only_human_text is not None and len(turns) == 1 and not states:
            prompt = conv.only_human_text
        else:
            prompt = _chat_messages(raw)  # the recent turns as real chat messages
            if self.stop_at_next_turn and raw:  # old turns are read as "User: ..." lines: never continue them
                stops += [s for s in _TURN_STOPS if s not in stops]
        tooling = {k: kwargs[k] for k in ("tools", "tool_choice", "parallel_tool_calls", "response_format")
                   if k in kwargs}
        tooling.setdefault("parallel_tool_calls", self.parallel_tool_calls)
        if (self.first_tool_choice and tooling.get("tools") and tooling.get("tool_choice") in (None, "auto")
                and not _answered_by_tools(messages)):
            tooling["tool_choice"] = self.first_tool_choice
        constraint = _constraint(**tooling)
        budget = int(kwargs.get("max_tokens", self.max_tokens))
        if constraint:
            budget = int(kwargs.get("structured_max_tokens") or self.structured_max_tokens or budget)
        gen = {
            "max_new_tokens": budget,
            "temperature": float(kwargs.get("temperature", self.temperature)),
            "top_p": float(kwargs.get("top_p", self.top_p)),
            "repetition_penalty": float(kwargs.get("repetition_penalty", self.repetition_penalty)),
            "seed": kwargs.get("seed", self.seed),
            "stop": stops or None,
        }
        gen["do_sample"] = gen["temperature"] > 0
        if not gen["do_sample"]:
            gen["temperature"] = 1.0
        gen.update(constraint)
        info = {
            "compressed_turns": len(chunks),
            "raw_turns": len(raw),
            "raw_turn_tokens": int(sum(sizes)),
            "passages": len(passage_states),
            "gist_ids": len(direct),
            "new_compressions": stats["compressed"],
            "states_from_store": stats["loaded"],
            "compress_s": round(stats["compress_s"], 4),
            "plan_s": round(time.perf_counter() - t0, 4),
        }
        system = "\n\n".join(conv.system) if conv.system else None
        return _Plan(prompt=prompt, system_prompt=system, states=states, gen_kwargs=gen, info=info)

    def _direct_states(self, kwargs: dict[str, Any]) -> list[GistState]:
        out: list[GistState] = []
        ids = kwargs.get("gist_ids")
        if ids:
            if isinstance(ids, str):
                ids = [ids]
            if self.memory is None:
                raise ValueError("gist_ids need ChatGist(memory=<GistMemory>) to look the ids up in")
            for pid in ids:
                hit = self.memory.get(pid)
                if hit is None:
                    raise ValueError(f"gist id {pid!r} is not in {self.memory!r}")
                out.append(hit.state)
        given = kwargs.get("gist_states")
        if given:
            for i, st in enumerate(given):
                if not isinstance(st, GistState):
                    raise ValueError(f"gist_states[{i}] is a {type(st).__name__}, not a GistState")
            out += list(given)
        return out

    def compress_texts(
        self,
        texts: Sequence[str],
        message_ids: Optional[Sequence[Sequence[str]]] = None,
        state_store: Optional[StateStore] = None,
    ) -> list[GistState]:
        """The states `ChatGist` reads for `texts` (long texts in pieces), compressing only what no cache holds.

        Args:
            texts: Rendered turns (`User: ...\nAssistant: ...`).
            message_ids: Per text, the ids of its messages (the first one keeps the state in a history).
            state_store: Where states persist (default: this chat's `state_store`).
        """
        chunks: list[tuple[str, list[str]]] = []
        for i, text in enumerate(texts):
            ids = list(message_ids[i][:1]) if message_ids is not None else []
            chunks += [(piece, ids if j == 0 else []) for j, piece in enumerate(self._pieces(text))]
        if not chunks:
            return []
        store = state_store if state_store is not None else self.state_store
        states, _ = self._cache.states_for(self.model, [c for c, _ in chunks], [m for _, m in chunks], store=store)
        return states

    def compress_history(self, messages: Sequence[BaseMessage], **kwargs: Any) -> dict[str, Any]:
        """Compress the turns a call with `messages` would read from states, without generating.

        Useful to do the work ahead of the next question (e.g. right after an answer was sent).

        Returns:
            The planning info (`compressed_turns`, `new_compressions`, ...).
        """
        return self._plan(messages, None, kwargs).info

    # ---- generation ----------------------------------------------------------------------------------
    def _run(self, plan: _Plan) -> Iterator[tuple[str, Optional[dict[str, Any]]]]:
        """Yield (text piece, None) while generating, then ("", usage) once."""
        usage = _new_usage()
        pieces = self.model.stream(
            plan.prompt, states=plan.states or None, system_prompt=plan.system_prompt, usage=usage, **plan.gen_kwargs
        )
        try:
            for piece in pieces:
                yield piece, None
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # ends the model's stream, which fills `usage`
        yield "", usage.to_dict()

    def _metadata(self, plan: _Plan, usage: dict[str, Any]) -> tuple[UsageMetadata, dict[str, Any]]:
        read = int(usage.get("positions_read", 0))
        fed = int(usage.get("prompt_tokens", read))
        new = int(usage.get("new_tokens", 0))
        raw = int(usage.get("raw_tokens", 0))
        kept = int(usage.get("kept_rows", 0))
        um = UsageMetadata(
            input_tokens=read,
            output_tokens=new,
            total_tokens=read + new,
            input_token_details={"cache_read": max(0, read - fed)},
        )
        gist = {
            "raw_tokens": raw,
            "positions_read": read,
            "positions_held": int(usage.get("positions_held") or read),
            "prompt_tokens": fed,
            "kept_rows": kept,
            "compression_ratio": round(raw / kept, 3) if kept else None,
            "ttft_s": usage.get("ttft_s"),
            "total_s": usage.get("total_s"),
            **plan.info,
        }
        finish = "length" if new >= plan.gen_kwargs["max_new_tokens"] else "stop"
        if plan.gen_kwargs.get("tools") or plan.gen_kwargs.get("schema"):
            finish = "stop"  # a constrained answer is always complete: the budget closes it early instead
        meta = {"model_name": self.model_name, "model_provider": "gist_memory", "finish_reason": finish, "gist": gist}
        return um, meta

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> ChatResult:
        plan = self._plan(messages, stop, kwargs)
        text, usage = [], {}
        for piece, u in self._run(plan):
            if u is not None:
                usage = u
            elif piece:
                text.append(piece)
        um, meta = self._metadata(plan, usage)
        content, calls = _message_parts(plan, "".join(text))
        if calls:
            meta["finish_reason"] = "tool_calls"
        msg = AIMessage(content=content, tool_calls=calls, usage_metadata=um, response_metadata=meta)
        return ChatResult(generations=[ChatGeneration(message=msg)], llm_output={"model_name": self.model_name})

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        from gist_memory.model.constrained import TOOL_CALL_OPEN

        plan = self._plan(messages, stop, kwargs)
        held: Optional[str] = "" if plan.gen_kwargs.get("tools") else None  # what may still be the start of calls
        for piece, usage in self._run(plan):
            if usage is None:
                if held is not None:  # tool calls come as one chunk at the end; free text streams once it is clear
                    held += piece
                    if held.startswith(TOOL_CALL_OPEN) or TOOL_CALL_OPEN.startswith(held):
                        continue
                    piece, held = held, None
                if not piece:
                    continue
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager:
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
            else:
                um, meta = self._metadata(plan, usage)
                if held:
                    content, calls = _message_parts(plan, held)
                    chunks = [tool_call_chunk(name=c["name"], args=json.dumps(c["args"], ensure_ascii=False),
                                              id=c["id"], index=i) for i, c in enumerate(calls)]
                    if calls:
                        meta["finish_reason"] = "tool_calls"
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=content, tool_call_chunks=chunks))
                    if run_manager:
                        run_manager.on_llm_new_token(content, chunk=chunk)
                    yield chunk
                yield ChatGenerationChunk(
                    message=AIMessageChunk(content="", usage_metadata=um, response_metadata=meta, chunk_position="last")
                )
