"""`ChatGist`: a LangChain chat model over a `GistModel` that reads old turns and known passages as gist states.

    chat = ChatGist(model=GistModel.from_pretrained(), keep_recent=4, max_tokens=256)
    chat.invoke(messages)                              # turns older than the last 4 are read from their states
    chat.invoke(messages, gist_ids=["doc-1", "doc-7"])  # direct route: passages of `memory` by id

The model's prompt is laid out as `[system prompt][compressed turns][retrieved passages]["\\n\\n" + recent turns]`;
the recent turns go to the model as chat messages (user/assistant, through its chat template), and the states sit
at the start of the first of them.
Each turn is compressed once (keyed by content hash + model fingerprint) and kept in an LRU and, when a
`state_store` is given, persistently, so a restarted app reads old turns without compressing them again.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from gist_memory import GistState
from langchain_gist_memory._messages import Turn, message_text, role_of, split_conversation
from langchain_gist_memory._states import DEFAULT_MAX_BYTES, StateCache, StateStore
from langchain_gist_memory.registry import PassageRegistry, default_registry

_CALL_KWARGS = {
    "gist_ids", "gist_states", "keep_recent", "raw_token_budget", "max_tokens", "temperature", "top_p", "repetition_penalty", "seed",
    "state_store",
}
_IGNORED_KWARGS = {"stream", "ls_structured_output_format"}
_TOOLS_UNSUPPORTED = (
    "ChatGist does not support tool calling yet ({what}): the local model is not constrained to emit valid tool "
    "calls. Use instead: a tool-calling chat model (e.g. ChatOpenAI pointed at `gist-memory serve`, or any hosted "
    "model) with GistMemoryMiddleware to keep its older turns as gist states, or ChatGist without tools"
)
_STRUCTURED_UNSUPPORTED = (
    "ChatGist does not support with_structured_output yet (method={method!r}): it needs tool calling or JSON mode. "
    "Use instead: `ChatGist | PydanticOutputParser(pydantic_object=...)` (put `parser.get_format_instructions()` "
    "in the prompt) or JsonOutputParser, or a tool-calling chat model"
)
_TURN_STOPS = ("\nUser:", "\nUser (")


def _new_usage() -> Any:
    """A `gist_memory` `Usage` for one call: the model fills it (one model serves many threads; usage is per call)."""
    from gist_memory.model.usage import Usage

    return Usage()


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
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    seed: Optional[int] = None
    stop: Optional[list[str]] = None
    max_prompt_tokens: int = Field(default=2048, ge=16)
    memory: Any = Field(default=None, exclude=True)
    registry: Optional[PassageRegistry] = Field(default=None, exclude=True)
    splice_passages: bool = True
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

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any) -> Any:
        """Not supported yet: raises `NotImplementedError` saying what to use instead."""
        names = [getattr(t, "name", None) or getattr(t, "__name__", None) or type(t).__name__ for t in tools]
        raise NotImplementedError(_TOOLS_UNSUPPORTED.format(what=f"bind_tools({names})"))

    def with_structured_output(self, schema: Any = None, *, include_raw: bool = False, **kwargs: Any) -> Any:
        """Not supported yet: raises `NotImplementedError` saying what to use instead."""
        raise NotImplementedError(_STRUCTURED_UNSUPPORTED.format(method=kwargs.get("method", "function_calling")))

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
        tooling = unknown & {"tools", "tool_choice", "functions", "function_call", "response_format", "parallel_tool_calls"}
        if tooling:
            raise TypeError(f"ChatGist got unsupported arguments {sorted(tooling)}: "
                            + _TOOLS_UNSUPPORTED.format(what=f"call arguments {sorted(tooling)}"))
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
        states = turn_states + passage_states + direct

        stops = list(stop) if stop is not None else (list(self.stop) if self.stop else [])
        if conv.only_human_text is not None and len(turns) == 1 and not states:
            prompt = conv.only_human_text
        else:
            prompt = _chat_messages(raw)  # the recent turns as real chat messages
            if self.stop_at_next_turn and raw:  # old turns are read as "User: ..." lines: never continue them
                stops += [s for s in _TURN_STOPS if s not in stops]
        gen = {
            "max_new_tokens": int(kwargs.get("max_tokens", self.max_tokens)),
            "temperature": float(kwargs.get("temperature", self.temperature)),
            "top_p": float(kwargs.get("top_p", self.top_p)),
            "repetition_penalty": float(kwargs.get("repetition_penalty", self.repetition_penalty)),
            "seed": kwargs.get("seed", self.seed),
            "stop": stops or None,
        }
        gen["do_sample"] = gen["temperature"] > 0
        if not gen["do_sample"]:
            gen["temperature"] = 1.0
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
            "prompt_tokens": fed,
            "kept_rows": kept,
            "compression_ratio": round(raw / kept, 3) if kept else None,
            "ttft_s": usage.get("ttft_s"),
            "total_s": usage.get("total_s"),
            **plan.info,
        }
        finish = "length" if new >= plan.gen_kwargs["max_new_tokens"] else "stop"
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
        msg = AIMessage(content="".join(text), usage_metadata=um, response_metadata=meta)
        return ChatResult(generations=[ChatGeneration(message=msg)], llm_output={"model_name": self.model_name})

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        plan = self._plan(messages, stop, kwargs)
        for piece, usage in self._run(plan):
            if usage is None:
                if not piece:
                    continue
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager:
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
            else:
                um, meta = self._metadata(plan, usage)
                yield ChatGenerationChunk(
                    message=AIMessageChunk(content="", usage_metadata=um, response_metadata=meta, chunk_position="last")
                )
