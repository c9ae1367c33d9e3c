"""`GistSynthesizer`: the direct route. Retrieved nodes go to the model as gist states, no text matching.

    engine = RetrieverQueryEngine(retriever, response_synthesizer=GistSynthesizer(llm=GistLLM(model=model)))

Each node's state is found by its content key (the `gist_state_key` a `GistCompressedRetriever` set, checked
against the node's current text: a node whose text changed is recompressed). The prompt the model reads as tokens
is only `qa_template` with the question. With no nodes the model answers without context and the response says
so in `metadata["gist"]`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Optional, Union

from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.callbacks import CallbackManager
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.prompts import PromptTemplate
from llama_index.core.response_synthesizers.base import BaseSynthesizer
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.types import RESPONSE_TEXT_TYPE
from llama_index.llms.gist_memory import METADATA_KEY, GistLLM, node_llm_text

DEFAULT_QA_TEMPLATE = PromptTemplate(
    "Answer the question using only the passages above.\nQuestion: {query_str}\nAnswer:"
)
DEFAULT_NO_CONTEXT_TEMPLATE = PromptTemplate(
    "No passages were found for this question. Say so, then answer briefly if you can.\n"
    "Question: {query_str}\nAnswer:"
)
NO_CONTEXT_NOTE = "no passages retrieved: answered without context"
READ_ORDERS = ("given", "relevance")


class GistSynthesizer(BaseSynthesizer):
    """Answers from the retrieved nodes' gist states (handed over by node, not found in a prompt).

    Args:
        llm: The `GistLLM` (default: `GistLLM(model=model)`).
        model: The `GistModel`, if `llm` is not given.
        qa_template: Prompt read after the states (`{query_str}`).
        no_context_template: Prompt used when retrieval returned nothing.
        streaming: Return `StreamingResponse`s.
        callback_manager: LlamaIndex callback manager.
        read_order: `relevance` (the default): the model first scores how well each node's state predicts the
            question (`GistModel.relevance`, the states in one padded pass) and reads the most relevant last, next
            to the question, where a small reader binds facts best; `given`: the retriever's order, no pass.
            `source_nodes` stay in the retriever's order either way (unless `top_n`).
        top_n: With `read_order="relevance"`: read only the `top_n` most relevant nodes (the response's
            `source_nodes` are then the nodes read). `metadata["gist"]["relevance"]` holds every node's score.
    """

    def __init__(
        self,
        llm: Optional[GistLLM] = None,
        model: Any = None,
        qa_template: Optional[Union[str, PromptTemplate]] = None,
        no_context_template: Optional[Union[str, PromptTemplate]] = None,
        streaming: bool = False,
        callback_manager: Optional[CallbackManager] = None,
        read_order: str = "relevance",
        top_n: Optional[int] = None,
    ) -> None:
        if read_order not in READ_ORDERS:
            raise ValueError(f"read_order must be one of {', '.join(READ_ORDERS)}, got {read_order!r}")
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
            raise ValueError(f"top_n must be a positive int or None, got {top_n!r}")
        if top_n is not None and read_order != "relevance":
            raise ValueError("top_n needs read_order='relevance' (it keeps the most relevant nodes)")
        if llm is None:
            if model is None:
                raise ValueError("GistSynthesizer needs llm= (a GistLLM) or model= (a GistModel)")
            llm = GistLLM(model=model)
        if not isinstance(llm, GistLLM):
            raise ValueError(f"GistSynthesizer needs a GistLLM, got {type(llm).__name__}")
        super().__init__(llm=llm, callback_manager=callback_manager, streaming=streaming)
        self._gist_llm = llm
        self._qa_template = _template(qa_template, DEFAULT_QA_TEMPLATE)
        self._no_context_template = _template(no_context_template, DEFAULT_NO_CONTEXT_TEMPLATE)
        self._read_order = read_order
        self._top_n = top_n

    def _get_prompts(self) -> dict[str, Any]:
        return {"qa_template": self._qa_template, "no_context_template": self._no_context_template}

    def _update_prompts(self, prompts: dict[str, Any]) -> None:
        if "qa_template" in prompts:
            self._qa_template = _template(prompts["qa_template"], DEFAULT_QA_TEMPLATE)
        if "no_context_template" in prompts:
            self._no_context_template = _template(prompts["no_context_template"], DEFAULT_NO_CONTEXT_TEMPLATE)

    # ---- states by node -----------------------------------------------------------------------------------
    def states_for_nodes(self, nodes: Sequence[NodeWithScore]) -> tuple[list[Any], list[str]]:
        """(states, keys) of `nodes` in order; a node whose text no longer matches its key is recompressed."""
        registry = self._gist_llm.registry
        texts = [node_llm_text(n.node) for n in nodes]
        keys = []
        for n, text in zip(nodes, texts, strict=True):
            key = (n.node.metadata or {}).get(METADATA_KEY)
            if key is None or key not in registry or registry.key_for(text) != key:
                key = registry.add_texts([text], compress=False)[0]
            keys.append(key)
        return registry.states(keys), keys

    def _prepare(
        self, query: Union[str, QueryBundle], nodes: list[NodeWithScore]
    ) -> tuple[str, list[Any], list, list[NodeWithScore], dict[str, float]]:
        """(prompt, states, keys, the nodes read, relevance by key) in reading order."""
        query_str = query.query_str if isinstance(query, QueryBundle) else str(query)
        if not nodes:
            return self._no_context_template.format(query_str=query_str), [], [], [], {}
        states, keys = self.states_for_nodes(nodes)
        nodes, relevance = list(nodes), {}
        if self._read_order == "relevance" and len(states) > 1 and query_str.strip():
            rel = self._gist_llm.model.relevance(query_str, states)
            relevance = dict(zip(keys, rel))
            from gist_memory.model.scoring import reading_order_by_relevance

            order = reading_order_by_relevance(rel, self._top_n)  # most relevant last
            states, keys, nodes = [states[i] for i in order], [keys[i] for i in order], [nodes[i] for i in order]
        return self._qa_template.format(query_str=query_str), states, keys, nodes, relevance

    def _metadata(self, sources: list[NodeWithScore], usage: Optional[dict]) -> dict[str, Any]:
        md: dict[str, Any] = dict(self._get_metadata_for_response([n.node for n in sources]) or {})
        if usage is not None:
            md["gist"] = usage
        return md

    def _annotate(self, usage: dict[str, Any], keys: list[str], relevance: dict[str, float]) -> dict[str, Any]:
        usage = dict(usage)
        usage["state_keys"] = keys
        if relevance:
            usage["read_order"] = self._read_order
            usage["relevance"] = dict(relevance)
        if not keys:
            usage["context"] = "none"
            usage["note"] = NO_CONTEXT_NOTE
        return usage

    def _sources(self, nodes: Sequence[NodeWithScore], read: Sequence[NodeWithScore],
                 additional: Optional[Sequence[NodeWithScore]]) -> list[NodeWithScore]:  # fmt: skip
        """The response's source nodes: the retrieved ones, or with `top_n` the ones read (in reading order)."""
        return list(read if self._top_n is not None else nodes) + list(additional or [])

    # ---- synthesis --------------------------------------------------------------------------------------------
    def synthesize(
        self,
        query: Union[str, QueryBundle],
        nodes: list[NodeWithScore],
        additional_source_nodes: Optional[Sequence[NodeWithScore]] = None,
        **response_kwargs: Any,
    ) -> Union[Response, StreamingResponse]:
        """Answer `query` reading the states of `nodes` (without context, and saying so, when there are none)."""
        query_str = query.query_str if isinstance(query, QueryBundle) else str(query)
        with self._callback_manager.event(CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: query_str}) as ev:
            prompt, states, keys, read, rel = self._prepare(query, nodes)
            sources = self._sources(nodes, read, additional_source_nodes)
            if self._streaming:
                gen = self._gist_llm.stream_complete_with_states(prompt, states, **response_kwargs)
                md = self._metadata(sources, None)
                response: Any = StreamingResponse(self._tokens(gen, md, keys, rel), source_nodes=sources, metadata=md)
            else:
                out = self._gist_llm.complete_with_states(prompt, states, **response_kwargs)
                usage = self._annotate(out.additional_kwargs["gist"], keys, rel)
                self._gist_llm._last_usage = usage
                response = Response(out.text, source_nodes=sources, metadata=self._metadata(sources, usage))
            ev.on_end(payload={EventPayload.RESPONSE: response})
        return response

    def _tokens(self, gen: Any, md: dict[str, Any], keys: list[str], relevance: dict[str, float]):  # noqa: ANN202 - token generator
        for r in gen:
            if "gist" in r.additional_kwargs:
                usage = self._annotate(r.additional_kwargs["gist"], keys, relevance)
                self._gist_llm._last_usage = usage
                md["gist"] = usage
            if r.delta:
                yield r.delta

    async def asynthesize(
        self,
        query: Union[str, QueryBundle],
        nodes: list[NodeWithScore],
        additional_source_nodes: Optional[Sequence[NodeWithScore]] = None,
        **response_kwargs: Any,
    ) -> Union[Response, AsyncStreamingResponse]:
        """Async `synthesize`: the model runs in a worker thread."""
        if not self._streaming:
            return await asyncio.to_thread(self.synthesize, query, nodes, additional_source_nodes, **response_kwargs)
        prompt, states, keys, read, rel = await asyncio.to_thread(self._prepare, query, nodes)
        sources = self._sources(nodes, read, additional_source_nodes)
        gen = self._gist_llm.stream_complete_with_states(prompt, states, **response_kwargs)
        md = self._metadata(sources, None)
        tokens = self._tokens(gen, md, keys, rel)

        async def agen():  # noqa: ANN202
            sentinel = object()
            while True:
                tok = await asyncio.to_thread(next, tokens, sentinel)
                if tok is sentinel:
                    return
                yield tok

        return AsyncStreamingResponse(agen(), source_nodes=sources, metadata=md)

    # ---- the text route (BaseSynthesizer's abstract API): chunks in the prompt, spliced by GistLLM ---------
    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> RESPONSE_TEXT_TYPE:
        """Answer from text chunks: known passages among them are still read from their states by `GistLLM`."""
        prompt = "\n\n".join(c.strip() for c in text_chunks) + "\n\n" + self._qa_template.format(query_str=query_str)
        if self._streaming:
            return (r.delta or "" for r in self._gist_llm.stream_complete(prompt, formatted=True, **response_kwargs))
        return self._gist_llm.complete(prompt, formatted=True, **response_kwargs).text

    async def aget_response(
        self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any
    ) -> RESPONSE_TEXT_TYPE:
        """Async `get_response` (non-streaming)."""
        return await asyncio.to_thread(self.get_response, query_str, text_chunks, **response_kwargs)


def _template(t: Optional[Union[str, PromptTemplate]], default: PromptTemplate) -> PromptTemplate:
    if t is None:
        return default
    return PromptTemplate(t) if isinstance(t, str) else t
