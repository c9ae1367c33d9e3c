"""`GistLLM`: a LlamaIndex LLM over a `GistModel` that reads known passages from their gist states.

Stock LlamaIndex hands an LLM text only. `GistLLM` looks at the prompt (or chat messages) it is given, finds every
span that is a known passage (registered in its `GistRegistry` by a `GistCompressedRetriever`, by `register`, or
by a `GistMemory`), cuts it out and splices the passage's gist state into the model's KV cache instead. Everything
else is read as ordinary tokens. Query engines, chat engines, postprocessors and source attribution stay as they
are.

Structured output and tools are decoded under a grammar (`gist_memory.model.constrained`), so they always parse and
validate, even from a small model: `structured_predict` / `as_structured_llm` / a query engine's `output_cls` decode
the Pydantic class's JSON schema directly, and `GistLLM` is a `FunctionCallingLLM` (`chat_with_tools`,
`predict_and_call`, `FunctionAgent`), its tool calls written as `<tool_call>{"name": ..., "arguments": ...}
</tool_call>` and read back into `ToolCallBlock`s. Known passages are read from their states in both.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import re
import warnings
from collections.abc import AsyncGenerator, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.llm import (
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictInProgressEvent,
    LLMStructuredPredictStartEvent,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.types import PydanticProgramMode
from llama_index.llms.gist_memory.registry import GistRegistry

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

logger = logging.getLogger(__name__)
dispatcher = get_dispatcher(__name__)

GEN_KWARGS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "stop", "seed")
CONSTRAINT_KWARGS = ("schema", "tools", "tool_choice", "parallel_tool_calls")
_SYSTEM_ROLES = {MessageRole.SYSTEM, MessageRole.DEVELOPER}
_END = object()
_ASSISTANT_ROLES = {MessageRole.ASSISTANT, MessageRole.CHATBOT, MessageRole.MODEL}
_TOOL_ROLES = {MessageRole.TOOL, MessageRole.FUNCTION}


class GistTextFallbackWarning(UserWarning):
    """Known passages reached `GistLLM` in a form it cannot match (truncated or rewritten): read as text."""


_CITATION_HEADER = re.compile(r"(?:^|\n)Source \d+:\n")
_LIST_START = re.compile(r"\[['\"]")


def _new_usage() -> Any:
    """A `gist_memory` `Usage` for one call: the model fills it (the model is shared; usage is per call)."""
    from gist_memory.model.usage import Usage

    return Usage()


def _constrained() -> Any:
    """`gist_memory.model.constrained` (imported on first use: it loads the model package, torch included)."""
    from gist_memory.model import constrained

    return constrained


class _Plan:
    """What one call reads: the system prompt, the prompt (text or chat messages) and the spliced states."""

    def __init__(self, prompt: Any, system_prompt: Optional[str], keys: list[str], states: list[Any]) -> None:
        self.prompt = prompt
        self.system_prompt = system_prompt
        self.keys = keys
        self.states = states


class GistLLM(FunctionCallingLLM):
    """A LlamaIndex LLM that answers with a `GistModel`, reading known passages from their gist states.

    Each response carries `additional_kwargs["gist"]` (also kept as `last_gist_usage`): `raw_tokens` (tokens of
    the passages the states stood for), `positions_read` (cache rows + prompt tokens the model attended over),
    `prompt_tokens`, `kept_rows`, `passages`, `state_keys`, `context` (`gist`: states were spliced; `none`: no
    known passage, plain generation), `ttft_s` and `total_s`.

    Structured output: `structured_predict(Model, prompt)` (and its async and streaming twins,
    `as_structured_llm(Model)`, a query engine's `output_cls`) decodes `Model`'s JSON schema under a grammar: the
    answer always validates, no retry or output parser involved. Tools: `chat_with_tools` / `predict_and_call` /
    `FunctionAgent` decode tool calls under a grammar too (`tool_required=True` or `tool_choice=<name>` force a
    call); a response's calls are `ToolCallBlock`s in `message.blocks` (and OpenAI-style dicts in
    `additional_kwargs["tool_calls"]`), read by `get_tool_calls_from_response`. Tool results and earlier calls in
    the history are written in the format the model writes calls in.

    Args:
        model: The `GistModel`.
        registry: The `GistRegistry` of known passages (default: the model's shared one, which
            `GistCompressedRetriever.from_defaults(model=...)` registers into).
        max_new_tokens: Tokens to generate at most.
        splice: False reads every passage as text (the full-text twin of the same pipeline, for comparison).
        generate_kwargs: Defaults for `GistModel.generate` (`do_sample`, `temperature`, `top_p`, `stop`, ...).
        context_window: Window LlamaIndex packs prompts into (default: the base model's).

    Example:
        >>> llm = GistLLM(model=model, max_new_tokens=128)
        >>> engine = RetrieverQueryEngine.from_args(GistCompressedRetriever.from_defaults(retriever=r, model=model),
        ...                                         llm=llm)
    """

    model: Any = Field(exclude=True, description="The GistModel that answers.")
    registry: Any = Field(default=None, exclude=True, description="Known passages and their states.")
    max_new_tokens: int = Field(default=256, gt=0, description="Tokens to generate at most.")
    splice: bool = Field(default=True, description="Replace known passages by their gist states.")
    generate_kwargs: dict = Field(default_factory=dict, description="Defaults for GistModel.generate.")
    context_window: Optional[int] = Field(default=None, description="Context window (default: the model's).")
    first_tool_choice: Optional[str] = Field(
        default=None, description="Tool choice of a reply to the user when tools are offered with 'auto'."
    )

    _last_usage: dict = PrivateAttr(default_factory=dict)
    _warned: set = PrivateAttr(default_factory=set)

    def __init__(self, model: Any, registry: Optional[GistRegistry] = None, **kwargs: Any) -> None:
        if not hasattr(model, "generate") or not hasattr(model, "stream"):
            raise ValueError("GistLLM needs a GistModel (an object with generate/stream)")
        bad = set(kwargs.get("generate_kwargs") or {}) - set(GEN_KWARGS)
        if bad:
            raise ValueError(f"unsupported generate_kwargs {sorted(bad)}; supported: {list(GEN_KWARGS)}")
        super().__init__(model=model, registry=registry if registry is not None else GistRegistry.for_model(model), **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "GistLLM"

    @property
    def metadata(self) -> LLMMetadata:
        """Chat model metadata; the window is the base model's `max_position_embeddings` unless given."""
        window = self.context_window
        if window is None:
            cfg = getattr(getattr(self.model, "model", None), "config", None)
            window = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        return LLMMetadata(
            context_window=window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=str(getattr(self.model, "name", "gist-model")),
        )

    @property
    def last_gist_usage(self) -> dict:
        """The `gist` usage dict of the last finished completion."""
        return dict(self._last_usage)

    def register(self, obj: Any, compress: bool = False) -> list[str]:
        """Make passages known: an index (its docstore), nodes, documents or texts (see `GistRegistry.register`)."""
        return self.registry.register(obj, compress=compress)

    # ---- planning -------------------------------------------------------------------------------------
    def _splice(self, text: str) -> tuple[str, list[str], list[Any]]:
        if not self.splice:
            return text, [], []
        path, lists = None, False
        if "['" in text or '["' in text:  # response_mode="simple_summarize": the context arrives as str(list)
            text, _ = self._decode_lists(text)
            lists = True
            path = "response_mode='simple_summarize' (its context was truncated to the context window)"
        if _CITATION_HEADER.search(text):  # CitationQueryEngine: passages re-chunked into "Source N:" blocks
            self._learn_citation_chunks(text)
            path = path or "CitationQueryEngine (passages re-chunked into 'Source N:' blocks)"
        sp, states = self.registry.splice_states(text)
        rest = sp.text if sp.keys else text
        cut_short = getattr(self.registry, "cut_short", None)
        if cut_short is not None:
            # a passage cut short inside a list literal is looked for in the literal's text
            n_cut = cut_short(self.model.normalize(self._decode_lists(rest, known_only=False)[0] if lists else rest))
            if n_cut:
                self._warn_text_fallback(path or "a prompt whose passages were truncated or rewritten (e.g. by a "
                                         "node postprocessor or a custom synthesizer)", n_cut)
        return rest, sp.keys, states

    def _decode_lists(self, text: str, known_only: bool = True) -> tuple[str, int]:
        """Replace every Python list-of-str literal in `text` that holds a known passage by its items' text.

        LlamaIndex's `SimpleSummarize` passes `context_str=[joined chunks]`, which a prompt template formats as the
        list's repr (quotes, escaped newlines): no passage would match it. Literals holding no known passage (a
        list a user wrote) are left as they are, unless `known_only` is False.
        """
        out, pos, n = [], 0, 0
        for m in _LIST_START.finditer(text):
            s = m.start()
            if s < pos:
                continue
            quote = text[s + 1]
            end = text.find(quote + "]", s + 2)
            tries = 0
            while end != -1 and tries < 64:
                try:
                    val = ast.literal_eval(text[s : end + 2])
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    val = None
                if isinstance(val, list) and val and all(isinstance(v, str) for v in val):
                    joined = "\n".join(val)
                    if not known_only or self.registry.find(joined)[1]:
                        out += [text[pos:s], joined]
                        pos, n = end + 2, n + 1
                    break
                end, tries = text.find(quote + "]", end + 1), tries + 1
        out.append(text[pos:])
        return "".join(out), n

    def _learn_citation_chunks(self, text: str) -> None:
        """Register each "Source N:" chunk of a `CitationQueryEngine` prompt that is part of a known passage, so
        it is read from a state (compressed on first use, cached after) instead of as text."""
        holds = getattr(self.registry, "holds", None)
        if holds is None:
            return
        norm = self.model.normalize(text)
        heads = list(_CITATION_HEADER.finditer(norm))
        for i, h in enumerate(heads):
            block = norm[h.end() : heads[i + 1].start() if i + 1 < len(heads) else len(norm)]
            block = block.split("\n------")[0]
            paras = block.split("\n\n")
            for j in range(len(paras), 0, -1):  # the next node's metadata lines may follow the chunk
                chunk = "\n\n".join(paras[:j]).strip()
                if len(chunk) < 32:
                    break
                if holds(chunk):
                    self.registry.add_texts([chunk], compress=False)
                    break

    def _warn_text_fallback(self, path: str, n: int) -> None:
        if path in self._warned:
            return
        self._warned.add(path)
        warnings.warn(
            f"GistLLM: {n} known passage(s) reached the model cut short or rewritten by {path}; they are read as "
            f"text, not from their gist states (use GistSynthesizer, or a larger context_window, to read states)",
            GistTextFallbackWarning,
            stacklevel=4,
        )

    def _plan_prompt(self, prompt: str, system_prompt: Optional[str]) -> _Plan:
        rest, keys, states = self._splice(prompt)
        return _Plan(rest, system_prompt, keys, states)

    def _plan_messages(self, messages: Sequence[ChatMessage]) -> _Plan:
        sys_parts, turns, keys, states = [], [], [], []
        names: dict[str, str] = {}  # tool-call id -> tool name, to name the results that do not name themselves
        for m in messages:
            content = m.content or ""
            rest, k, st = self._splice(content)
            keys += k
            states += st
            if m.role in _SYSTEM_ROLES:
                if rest.strip():
                    sys_parts.append(rest)
            elif m.role in _ASSISTANT_ROLES:
                calls = _tool_calls_of(m)
                if calls:
                    for c in calls:
                        if c.get("id"):
                            names[str(c["id"])] = str(c.get("name"))
                    written = _constrained().format_tool_calls(calls)
                    rest = "\n".join(x for x in (rest.strip(), written) if x)
                turns.append((m.role, rest))
            elif m.role in _TOOL_ROLES:
                kw = m.additional_kwargs or {}
                name = kw.get("name") or kw.get("tool_name") or names.get(str(kw.get("tool_call_id") or ""))
                turns.append((MessageRole.TOOL, _constrained().format_tool_result(rest.strip(), name)))
            else:
                turns.append((m.role, rest))
        prompt = _core_messages(turns)
        system = "\n\n".join(sys_parts) or None
        return _Plan(prompt, system, keys, states)

    def _gen_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        out = {"max_new_tokens": self.max_new_tokens, **self.generate_kwargs}
        for k, v in kwargs.items():
            if k in GEN_KWARGS or (k in CONSTRAINT_KWARGS and v is not None):
                out[k] = v
            elif k != "formatted":
                logger.debug("GistLLM ignores the argument %r", k)
        return out

    def _usage(self, plan: _Plan, call_usage: Any) -> dict[str, Any]:
        u = call_usage.to_dict()
        u.update(
            passages=len(plan.states),
            state_keys=list(plan.keys),
            context="gist" if plan.states else ("text" if not self.splice else "none"),
            spliced=bool(plan.states),
        )
        u.setdefault("raw_tokens", int(sum(s.num_tokens for s in plan.states)))
        if not plan.states:
            u["note"] = (
                "splicing disabled: passages read as text" if not self.splice
                else "no known passage in the prompt: plain generation"
            )
        self._last_usage = u
        return u

    # ---- generation -----------------------------------------------------------------------------------
    def _run(self, plan: _Plan, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        usage = _new_usage()
        text = self.model.generate(plan.prompt, states=plan.states or None, system_prompt=plan.system_prompt,
                                   usage=usage, **self._gen_kwargs(kwargs))
        return text, self._usage(plan, usage)

    def _run_stream(self, plan: _Plan, kwargs: dict[str, Any]) -> Iterator[tuple[str, Optional[dict]]]:
        """(delta, None) per piece, then ("", usage) once the model is done."""
        usage = _new_usage()
        gen = self.model.stream(plan.prompt, states=plan.states or None, system_prompt=plan.system_prompt,
                                usage=usage, **self._gen_kwargs(kwargs))
        try:
            for piece in gen:
                yield piece, None
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()  # a consumer that stops early still ends the model's stream (and fills `usage`)
        yield "", self._usage(plan, usage)

    def _complete_plan(self, prompt: str, formatted: bool) -> _Plan:
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        return self._plan_prompt(prompt, None if formatted else self.system_prompt)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Complete `prompt`, reading its known passages from their gist states."""
        text, usage = self._run(self._complete_plan(prompt, formatted), kwargs)
        return CompletionResponse(text=text, additional_kwargs={"gist": usage})

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """Like `complete`, yielding responses as text arrives; the last one (empty delta) carries the usage."""
        plan = self._complete_plan(prompt, formatted)

        def gen() -> CompletionResponseGen:
            acc = ""
            for delta, usage in self._run_stream(plan, kwargs):
                acc += delta
                extra = {"gist": usage} if usage is not None else {}
                yield CompletionResponse(text=acc, delta=delta, additional_kwargs=extra)

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer a conversation; known passages in any message (system included) are read from their states.

        `tools=` (OpenAI-style dicts), `tool_choice=`, `parallel_tool_calls=` and `schema=` decode under a grammar
        (see `chat_with_tools` and `structured_predict`, which pass them).
        """
        return self._chat_result(self._plan_messages(messages), kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Like `chat`, streaming; the last response (empty delta) carries the usage. Tool calls are not streamed
        as text: they arrive whole, as `ToolCallBlock`s of the last response."""
        return self._chat_stream(self._plan_messages(messages), kwargs)

    def _chat_result(self, plan: _Plan, kwargs: dict[str, Any]) -> ChatResponse:
        tools = self._offered_tools(kwargs)
        text, usage = self._run(plan, kwargs)
        return ChatResponse(message=_reply(text, tools), additional_kwargs={"gist": usage})

    def _chat_stream(self, plan: _Plan, kwargs: dict[str, Any]) -> ChatResponseGen:
        """Responses as text arrives. With tools offered, text that starts (or may start) a tool call is held back:
        the calls come whole in the last response (with the usage), free text streams as usual."""
        return self._chat_pieces(plan, kwargs, self._offered_tools(kwargs))  # bad tools fail here, not on next()

    def _chat_pieces(self, plan: _Plan, kwargs: dict[str, Any], tools: Optional[list[Any]]) -> ChatResponseGen:
        acc, sent = "", 0
        for delta, usage in self._run_stream(plan, kwargs):
            acc += delta
            if usage is not None:
                msg = _reply(acc, tools)
                rest = "" if _tool_calls_of(msg) else acc[sent:]
                yield ChatResponse(message=msg, delta=rest, additional_kwargs={"gist": usage})
                return
            if tools is not None and _maybe_tool_calls(acc):
                continue
            piece, sent = acc[sent:], len(acc)
            yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=acc), delta=piece)

    def _offered_tools(self, kwargs: dict[str, Any]) -> Optional[list[Any]]:
        """The normalized tools of a call that may answer with tool calls (None: no tools, or tool_choice none)."""
        if not kwargs.get("tools"):
            return None
        c = _constrained()
        tools = c.normalize_tools(kwargs["tools"])
        return None if c.normalize_tool_choice(kwargs.get("tool_choice"), tools) == "none" else tools

    # ---- async: the model runs in a worker thread, the event loop stays free -------------------------------
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        plan = await asyncio.to_thread(self._complete_plan, prompt, formatted)
        text, usage = await asyncio.to_thread(self._run, plan, kwargs)
        return CompletionResponse(text=text, additional_kwargs={"gist": usage})

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        plan = await asyncio.to_thread(self._complete_plan, prompt, formatted)

        async def gen() -> CompletionResponseAsyncGen:
            acc = ""
            async for delta, usage in _athread(self._run_stream(plan, kwargs)):
                acc += delta
                extra = {"gist": usage} if usage is not None else {}
                yield CompletionResponse(text=acc, delta=delta, additional_kwargs=extra)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        plan = await asyncio.to_thread(self._plan_messages, messages)
        return await asyncio.to_thread(self._chat_result, plan, kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        plan = await asyncio.to_thread(self._plan_messages, messages)

        async def gen() -> ChatResponseAsyncGen:
            async for r in _athread(self._chat_stream(plan, kwargs)):
                yield r

        return gen()

    # ---- tools (FunctionCallingLLM) ------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: Optional[Union[str, ChatMessage]] = None,
        chat_history: Optional[list[ChatMessage]] = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: Optional[Union[str, dict]] = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The `chat` arguments of a call with `tools`: OpenAI-style tool dicts, `tool_choice` ("auto", "required"
        when `tool_required`, a tool's name or `{"type": "function", "function": {"name": ...}}`, "none") and
        `parallel_tool_calls` (False: at most one call)."""
        specs = [t.metadata.to_openai_tool(skip_length_check=True) for t in tools]
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(user_msg)
        out: dict[str, Any] = {"messages": messages, **kwargs}
        if specs:
            if tool_choice is None:
                tool_choice = "required" if tool_required else "auto"
                if self.first_tool_choice and not _answered_by_tools(messages):
                    tool_choice = self.first_tool_choice
            out.update(tools=specs, tool_choice=tool_choice, parallel_tool_calls=bool(allow_parallel_tool_calls))
        return out

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The tool calls of a `chat_with_tools` response (its `ToolCallBlock`s, or OpenAI-style
        `additional_kwargs["tool_calls"]`).

        Raises:
            ValueError: No tool call, when `error_on_no_tool_call`.
        """
        calls = _tool_calls_of(response.message)
        if not calls and error_on_no_tool_call:
            raise ValueError(
                "Expected at least one tool call, but the model answered in text (tool_choice 'auto'); pass "
                "tool_required=True or tool_choice=<a tool's name>, or set GistLLM(first_tool_choice='required'), "
                "to make it call a tool"
            )
        return [ToolSelection(tool_id=c.get("id") or "", tool_name=str(c["name"]), tool_kwargs=c["arguments"])
                for c in calls]

    # ---- structured output: the output class's JSON schema, decoded under a grammar ------------------------
    def _structured_call(self, output_cls: type[BaseModel], prompt: BasePromptTemplate,
                         llm_kwargs: Optional[dict[str, Any]], prompt_args: dict[str, Any]
                         ) -> tuple[list[ChatMessage], dict[str, Any]]:
        messages = self._extend_messages(list(prompt.format_messages(llm=self, **prompt_args)))
        kwargs = {k: v for k, v in (llm_kwargs or {}).items()
                  if k not in ("tools", "tool_choice", "tool_required", "parallel_tool_calls")}
        kwargs["schema"] = output_cls
        return messages, kwargs

    def _schema_mode(self) -> bool:
        """Whether structured output decodes the schema itself (the default program mode); other modes
        (`PydanticProgramMode.FUNCTION`, `LLM`, ...) run LlamaIndex's programs over this LLM."""
        return self.pydantic_program_mode == PydanticProgramMode.DEFAULT

    @dispatcher.span
    def structured_predict(self, output_cls: type[BaseModel], prompt: BasePromptTemplate,
                           llm_kwargs: Optional[dict[str, Any]] = None, **prompt_args: Any) -> BaseModel:
        """An `output_cls` instance answering `prompt`: its JSON schema is decoded under a grammar, so the answer
        always validates (no output parser, no retry). Known passages in the prompt are read from their states.
        `llm_kwargs` go to `chat` (e.g. `max_new_tokens`, `temperature`)."""
        if not self._schema_mode():
            return super().structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        dispatcher.event(LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt,
                                                        template_args=prompt_args))
        messages, kwargs = self._structured_call(output_cls, prompt, llm_kwargs, prompt_args)
        out = output_cls.model_validate_json(self.chat(messages, **kwargs).message.content or "")
        dispatcher.event(LLMStructuredPredictEndEvent(output=out))
        return out

    @dispatcher.span
    async def astructured_predict(self, output_cls: type[BaseModel], prompt: BasePromptTemplate,
                                  llm_kwargs: Optional[dict[str, Any]] = None, **prompt_args: Any) -> BaseModel:
        """Async `structured_predict`."""
        if not self._schema_mode():
            return await super().astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        dispatcher.event(LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt,
                                                        template_args=prompt_args))
        messages, kwargs = self._structured_call(output_cls, prompt, llm_kwargs, prompt_args)
        r = await self.achat(messages, **kwargs)
        out = output_cls.model_validate_json(r.message.content or "")
        dispatcher.event(LLMStructuredPredictEndEvent(output=out))
        return out

    @dispatcher.span
    def stream_structured_predict(self, output_cls: type[BaseModel], prompt: BasePromptTemplate,
                                  llm_kwargs: Optional[dict[str, Any]] = None, **prompt_args: Any
                                  ) -> Generator[Any, None, None]:
        """Partial `output_cls` objects as the JSON arrives (fields filled so far), then the complete, validated
        one."""
        if not self._schema_mode():
            yield from super().stream_structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
            return
        dispatcher.event(LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt,
                                                        template_args=prompt_args))
        messages, kwargs = self._structured_call(output_cls, prompt, llm_kwargs, prompt_args)
        partial = _Partial(output_cls)
        for r in self.stream_chat(messages, **kwargs):
            obj = partial.feed(r)
            if obj is not None:
                dispatcher.event(LLMStructuredPredictInProgressEvent(output=obj))
                yield obj
        dispatcher.event(LLMStructuredPredictEndEvent(output=partial.last))

    @dispatcher.span
    async def astream_structured_predict(self, output_cls: type[BaseModel], prompt: BasePromptTemplate,
                                         llm_kwargs: Optional[dict[str, Any]] = None, **prompt_args: Any
                                         ) -> AsyncGenerator[Any, None]:
        """Async `stream_structured_predict`."""
        if not self._schema_mode():
            return await super().astream_structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        messages, kwargs = self._structured_call(output_cls, prompt, llm_kwargs, prompt_args)
        stream = await self.astream_chat(messages, **kwargs)

        async def gen() -> AsyncGenerator[Any, None]:
            dispatcher.event(LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt,
                                                            template_args=prompt_args))
            partial = _Partial(output_cls)
            async for r in stream:
                obj = partial.feed(r)
                if obj is not None:
                    dispatcher.event(LLMStructuredPredictInProgressEvent(output=obj))
                    yield obj
            dispatcher.event(LLMStructuredPredictEndEvent(output=partial.last))

        return gen()

    # ---- the direct route (no text matching) -----------------------------------------------------------
    def complete_with_states(
        self, prompt: str, states: Sequence[Any], system_prompt: Optional[str] = None, **kwargs: Any
    ) -> CompletionResponse:
        """Complete `prompt` reading exactly `states` (used by `GistSynthesizer`); no passage matching."""
        plan = _Plan(prompt, system_prompt or self.system_prompt, [], list(states))
        text, usage = self._run(plan, kwargs)
        return CompletionResponse(text=text, additional_kwargs={"gist": usage})

    def stream_complete_with_states(
        self, prompt: str, states: Sequence[Any], system_prompt: Optional[str] = None, **kwargs: Any
    ) -> CompletionResponseGen:
        """Streaming `complete_with_states`; the last response (empty delta) carries the usage."""
        plan = _Plan(prompt, system_prompt or self.system_prompt, [], list(states))

        def gen() -> CompletionResponseGen:
            acc = ""
            for delta, usage in self._run_stream(plan, kwargs):
                acc += delta
                extra = {"gist": usage} if usage is not None else {}
                yield CompletionResponse(text=acc, delta=delta, additional_kwargs=extra)

        return gen()


def _core_messages(turns: Sequence[tuple[Any, str]]) -> Any:
    """The conversation as `GistModel` takes it: a str for a lone user message, else {role, content} messages.

    The model knows system (passed apart), user and assistant; a tool or function result (already a
    `<tool_response>` block) is read as a user message, another role as a user message naming its role.
    Consecutive messages of one role are joined. A conversation that does not end with the user
    (the model answers the user) is flattened into one user message, as before 0.3.
    """
    if len(turns) == 1 and turns[0][0] == MessageRole.USER:
        return turns[0][1]
    msgs: list[dict[str, str]] = []
    for role, text in turns:
        if role in _ASSISTANT_ROLES:
            core, content = "assistant", text
        elif role in (MessageRole.USER, MessageRole.TOOL):
            core, content = "user", text
        else:
            core, content = "user", f"{role.value}: {text}"
        if msgs and msgs[-1]["role"] == core:
            msgs[-1]["content"] += "\n" + content
        else:
            msgs.append({"role": core, "content": content})
    if not msgs or msgs[-1]["role"] != "user":
        return "\n".join(f"{role.value}: {text}" for role, text in turns)
    return msgs


async def _athread(it: Iterator[Any]):  # noqa: ANN202 - async generator
    """Drive a blocking iterator from a worker thread, one item at a time."""
    while True:
        item = await asyncio.to_thread(next, it, _END)
        if item is _END:
            return
        yield item


class _Partial:
    """Partial objects of a streamed structured answer: each response's JSON so far, closed and validated against
    a lenient copy of the class; the last response's JSON against the class itself."""

    def __init__(self, output_cls: type[BaseModel]) -> None:
        self.output_cls = output_cls
        self.last: Any = None
        self._flexible: Any = None

    def feed(self, r: ChatResponse) -> Any:
        """The object after response `r` (None when it adds nothing new)."""
        text = r.message.content or ""
        if "gist" in r.additional_kwargs:  # the last response: the complete answer
            self.last = self.output_cls.model_validate_json(text)
            return self.last
        if not r.delta:
            return None
        from llama_index.core.program.utils import _repair_incomplete_json, create_flexible_model

        if self._flexible is None:
            self._flexible = create_flexible_model(self.output_cls)
        try:
            obj = self._flexible.model_validate_json(_repair_incomplete_json(text))
        except ValueError:  # pydantic's ValidationError too: a prefix the simple repair cannot close
            return None
        if obj == self.last:
            return None
        self.last = obj
        return obj


def _tool_calls_of(msg: ChatMessage) -> list[dict[str, Any]]:
    """A message's tool calls as `{"id", "name", "arguments"}` dicts: its `ToolCallBlock`s, else OpenAI-style
    `additional_kwargs["tool_calls"]` (dicts or the OpenAI client's objects)."""
    out = []
    for b in msg.blocks:
        if isinstance(b, ToolCallBlock):
            out.append({"id": b.tool_call_id, "name": b.tool_name, "arguments": _arguments(b.tool_kwargs)})
    if out:
        return out
    for c in (msg.additional_kwargs or {}).get("tool_calls") or []:
        if hasattr(c, "model_dump"):
            c = c.model_dump()
        if not isinstance(c, dict):
            continue
        fn = c.get("function") or c
        out.append({"id": c.get("id"), "name": fn.get("name"),
                    "arguments": _arguments(fn.get("arguments", fn.get("args", {})))})
    return out


def _arguments(args: Any) -> dict[str, Any]:
    """Tool-call arguments as a dict (from a dict or a JSON string; anything else: {})."""
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return {}
    return dict(args) if isinstance(args, dict) else {}


def _maybe_tool_calls(text: str) -> bool:
    """Whether streamed `text` is, or may still become, tool calls (it starts with the marker, or is a prefix)."""
    mark = _constrained().TOOL_CALL_OPEN
    return text.startswith(mark) or mark.startswith(text)


def _reply(text: str, tools: Optional[list[Any]]) -> ChatMessage:
    """The assistant message of a generated `text`: tool calls (as `ToolCallBlock`s and OpenAI-style
    `additional_kwargs["tool_calls"]`) when tools were offered and the text is calls, else the text."""
    c = _constrained() if tools is not None else None
    if c is None or not text.startswith(c.TOOL_CALL_OPEN):
        return ChatMessage(role=MessageRole.ASSISTANT, content=text)
    content, calls = c.parse_tool_calls(text, tools)
    blocks: list[Any] = [TextBlock(text=content)] if content else []
    blocks += [ToolCallBlock(tool_call_id=k.id, tool_name=k.name, tool_kwargs=k.arguments) for k in calls]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks,
                       additional_kwargs={"tool_calls": [k.to_openai() for k in calls]})


def _answered_by_tools(messages: Sequence[ChatMessage]) -> bool:
    """Whether a tool result follows the last user message (the model has called a tool for this question)."""
    for m in reversed(messages):
        if m.role in _TOOL_ROLES:
            return True
        if m.role == MessageRole.USER:
            return False
    return False
