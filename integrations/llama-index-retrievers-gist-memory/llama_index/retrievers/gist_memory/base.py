"""`GistCompressedRetriever`: any LlamaIndex retriever (or a `GistMemory`) whose nodes come with gist states.

Two modes:
- **wrap** an existing retriever (vector index, BM25, fusion, ...): the nodes it returns are registered in the
  model's `GistRegistry` and compressed if their state is not cached yet (a node whose text changed gets a new
  state: states are keyed by content hash, never by node id alone);
- **serve** from a `GistMemory` (ingested once, states on disk): hits become nodes and their stored states are
  registered without recompression.

Either way the result is ordinary `NodeWithScore`s (scores and metadata intact) whose metadata carries
`gist_state_key`, excluded from the LLM and embedding views, so a `GistLLM` reading the synthesizer's prompt finds
every passage and splices its state.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.constants import DEFAULT_SIMILARITY_TOP_K
from llama_index.core.schema import BaseNode, Document, MetadataMode, NodeWithScore, QueryBundle, TextNode
from llama_index.core.settings import Settings
from llama_index.core.vector_stores.types import FilterCondition, FilterOperator, MetadataFilter, MetadataFilters
from llama_index.llms.gist_memory import METADATA_KEY, GistRegistry
from llama_index.retrievers.gist_memory.embeddings import (
    DEFAULT_EMBEDDER_NAME,
    default_embed_model,
    is_default_embed_model,
)


class LlamaIndexEmbedder:
    """Adapts a LlamaIndex `BaseEmbedding` to the `.encode(list[str]) -> (n, dim)` that `GistMemory` takes.

    Args:
        embed_model: Any LlamaIndex embedding model.
        name: The name a `GistMemory` records for it (default: class and model name; the bundled MiniLM is
            recorded under the name `GistMemory` and `gist-memory ingest` give it, so their memories open here).
    """

    def __init__(self, embed_model: Any, name: Optional[str] = None) -> None:
        self.embed_model = embed_model
        if name is None:
            if is_default_embed_model(embed_model):
                name = DEFAULT_EMBEDDER_NAME
            else:
                name = f"llama-index:{embed_model.class_name()}:{getattr(embed_model, 'model_name', '')}"
        self.name = name

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 embeddings of `texts`."""
        return np.asarray(self.embed_model.get_text_embedding_batch(list(texts)), dtype=np.float32)


_FILTER_HELP = (
    "GistCompressedRetriever serving from a GistMemory supports MetadataFilters with condition AND (nested AND too) "
    "and the operators ==, in and contains; for other operators or OR, wrap a vector store retriever instead: "
    "GistCompressedRetriever.from_defaults(retriever=index.as_retriever(filters=...), model=model)"
)


def memory_filter(filters: Any) -> Optional[dict[str, Any]]:
    """`MetadataFilters` as the `{key: value | [values]}` filter `GistMemory.search` takes (None: no filter).

    A plain dict (the form before 0.2) is accepted with a `DeprecationWarning`.

    Raises:
        ValueError: An operator or condition the memory cannot apply (the message says what to use instead).
    """
    if filters is None:
        return None
    if isinstance(filters, dict):
        warnings.warn(
            "filters as a dict is deprecated; pass llama_index.core.vector_stores.MetadataFilters, e.g. "
            "MetadataFilters(filters=[MetadataFilter(key='topic', value='archive')])",
            DeprecationWarning,
            stacklevel=3,
        )
        return dict(filters) or None
    if isinstance(filters, MetadataFilter):
        filters = MetadataFilters(filters=[filters])
    if not isinstance(filters, MetadataFilters):
        raise ValueError(f"filters must be MetadataFilters, got {type(filters).__name__}")
    out: dict[str, Any] = {}

    def add(fs: MetadataFilters) -> None:
        if len(fs.filters) > 1 and fs.condition not in (None, FilterCondition.AND):
            raise ValueError(f"condition {fs.condition.value!r} is not supported. {_FILTER_HELP}")
        for f in fs.filters:
            if isinstance(f, MetadataFilters):
                add(f)
                continue
            if f.operator in (FilterOperator.EQ, FilterOperator.CONTAINS):
                value: Any = f.value
            elif f.operator == FilterOperator.IN:
                value = list(f.value) if isinstance(f.value, (list, tuple)) else [f.value]
            else:
                raise ValueError(f"filter operator {f.operator.value!r} (key {f.key!r}) is not supported. {_FILTER_HELP}")
            if f.key in out:
                raise ValueError(f"two filters on key {f.key!r} are not supported (use one `in` filter). {_FILTER_HELP}")
            out[f.key] = value

    add(filters)
    return out or None


def _json_safe(md: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(md, default=str))


class GistCompressedRetriever(BaseRetriever):
    """A retriever whose nodes all have a cached gist state, registered for `GistLLM` to splice.

    Build it with `from_defaults`. Exactly one of `retriever` / `memory` is used.

    Args:
        model: The `GistModel` that compresses (default: the memory's model).
        retriever: A LlamaIndex retriever to wrap.
        memory: A `GistMemory` to serve from.
        registry: Where states are registered (default: the model's shared registry, read by `GistLLM(model)`).
        similarity_top_k: Hits per query when serving from `memory` (default LlamaIndex's `DEFAULT_SIMILARITY_TOP_K`).
        filters: `MetadataFilters` applied to `memory.search` (AND of `==`, `in`, `contains`); a plain dict
            (`{"key": value}`) still works and is deprecated.
        compress: Compress missing states at retrieval time (default); False defers it to the LLM call.
        callback_manager: LlamaIndex callback manager.
        verbose: LlamaIndex verbosity flag.
    """

    def __init__(
        self,
        model: Any = None,
        retriever: Optional[BaseRetriever] = None,
        memory: Any = None,
        registry: Optional[GistRegistry] = None,
        similarity_top_k: int = DEFAULT_SIMILARITY_TOP_K,
        filters: Optional[MetadataFilters] = None,
        compress: bool = True,
        callback_manager: Optional[CallbackManager] = None,
        verbose: bool = False,
    ) -> None:
        if (retriever is None) == (memory is None):
            raise ValueError("give exactly one of retriever= (to wrap) or memory= (a GistMemory to serve from)")
        if model is None:
            model = getattr(memory, "model", None)
        if model is None:
            raise ValueError("model= (a GistModel) is required when wrapping a retriever")
        if memory is not None and getattr(memory, "model", model) is not model:
            raise ValueError("memory was opened with another model than model=; its states would not be served")
        if similarity_top_k < 1:
            raise ValueError(f"similarity_top_k must be >= 1, got {similarity_top_k}")
        super().__init__(callback_manager=callback_manager, verbose=verbose)
        self.model = model
        self.retriever = retriever
        self.memory = memory
        self.registry = registry if registry is not None else GistRegistry.for_model(model)
        self.similarity_top_k = int(similarity_top_k)
        self.filters = filters
        self._memory_filter = memory_filter(filters)
        self.compress = compress

    @classmethod
    def from_defaults(
        cls,
        documents: Optional[Sequence[Document]] = None,
        nodes: Optional[Sequence[BaseNode]] = None,
        memory: Any = None,
        retriever: Optional[BaseRetriever] = None,
        model: Any = None,
        similarity_top_k: int = DEFAULT_SIMILARITY_TOP_K,
        *,
        embed_model: Any = None,
        transformations: Optional[list[Any]] = None,
        path: Optional[str] = None,
        registry: Optional[GistRegistry] = None,
        filters: Optional[MetadataFilters] = None,
        show_progress: bool = False,
        storage_dtype: Optional[str] = None,
        **kwargs: Any,
    ) -> GistCompressedRetriever:
        """Wrap `retriever`, serve from `memory`, or build a `GistMemory` from `documents` / `nodes`.

        Args:
            documents: Documents to split (`transformations`, default `Settings.transformations`) and ingest.
            nodes: Nodes to ingest as they are (text + metadata; node ids kept).
            memory: An existing `GistMemory` (its model is used).
            retriever: A retriever to wrap.
            model: The `GistModel` (required unless `memory` is given).
            similarity_top_k: Hits per query from the memory (default `DEFAULT_SIMILARITY_TOP_K`, as LlamaIndex's
                own retrievers).
            embed_model: LlamaIndex embedding for a new memory (default: `default_embed_model()`, the bundled
                all-MiniLM-L6-v2, offline; pass `Settings.embed_model` to use the one you configured).
            transformations: Node parsers for `documents`.
            path: Folder for a persistent new memory (None: in RAM).
            registry: The `GistRegistry` to register into.
            filters: `MetadataFilters` for memory searches (a dict still works, deprecated).
            show_progress: Progress bar while compressing.
            storage_dtype: How a new memory stores its states (`float32`, `bfloat16`, `float16`, `int8`, `int4`;
                None: `gist_memory.store.store.DEFAULT_STORAGE_DTYPE`, int8). To choose it when wrapping a
                retriever, give the registry a store: `GistRegistry(model, store=GistStore(..., storage_dtype=...))`.
            **kwargs: Passed to the constructor (`compress`, `callback_manager`, `verbose`).

        Raises:
            ValueError: Not exactly one source given, or no model.
        """
        given = [x is not None for x in (documents, nodes, memory, retriever)]
        if sum(given) != 1:
            raise ValueError("give exactly one of documents=, nodes=, memory= or retriever=")
        if retriever is not None:
            return cls(model=model, retriever=retriever, registry=registry, similarity_top_k=similarity_top_k,
                       filters=filters, **kwargs)
        if memory is None:
            if model is None:
                raise ValueError("model= (a GistModel) is required to build a memory")
            from gist_memory import GistMemory

            if documents is not None:
                from llama_index.core.ingestion import run_transformations

                nodes = run_transformations(list(documents), transformations or Settings.transformations)
            if embed_model is None:
                embed_model = default_embed_model()
            memory = GistMemory(model=model, path=path, embedder=LlamaIndexEmbedder(embed_model),
                                storage_dtype=storage_dtype)
            add_nodes_to_memory(memory, nodes or [], show_progress=show_progress)
        return cls(model=model, memory=memory, registry=registry, similarity_top_k=similarity_top_k,
                   filters=filters, **kwargs)

    # ---- retrieval --------------------------------------------------------------------------------------
    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        if self.retriever is not None:
            return self._register(self.retriever.retrieve(query_bundle))
        return self._from_memory(query_bundle.query_str)

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        if self.retriever is not None:
            nodes = await self.retriever.aretrieve(query_bundle)
            return await asyncio.to_thread(self._register, nodes)
        return await asyncio.to_thread(self._from_memory, query_bundle.query_str)

    def _register(self, nodes: list[NodeWithScore]) -> list[NodeWithScore]:
        return self.registry.add_nodes(nodes, compress=self.compress)

    def _from_memory(self, query: str) -> list[NodeWithScore]:
        hits = self.memory.search(query, k=self.similarity_top_k, filter=self._memory_filter)
        if hits and self.compress:
            self.memory.states_for(hits)  # one batched load
        out = []
        for h in hits:
            loader = _memory_loader(self.memory, h.id)
            key = self.registry.add_state(h.text, h.state if self.compress else None, loader=loader)
            md = dict(h.metadata)
            md[METADATA_KEY] = key
            # the LLM sees exactly the text the memory compressed: metadata stays for attribution only
            node = TextNode(
                id_=h.id, text=h.text, metadata=md,
                excluded_llm_metadata_keys=list(md), excluded_embed_metadata_keys=list(md),
            )
            out.append(NodeWithScore(node=node, score=float(h.score)))
        return out


def _memory_loader(memory: Any, pid: str):  # noqa: ANN202
    def load() -> Any:
        hit = memory.get(pid)
        if hit is None:
            raise KeyError(pid)
        return hit.state

    return load


def add_nodes_to_memory(memory: Any, nodes: Sequence[BaseNode], show_progress: bool = False) -> list[str]:
    """Ingest LlamaIndex nodes into a `GistMemory` (text, json-safe metadata, node ids); returns the ids."""
    nodes = [n for n in nodes if n.get_content(metadata_mode=MetadataMode.NONE).strip()]
    if not nodes:
        return []
    return memory.add_texts(
        [n.get_content(metadata_mode=MetadataMode.NONE) for n in nodes],
        metadatas=[_json_safe(dict(n.metadata or {})) for n in nodes],
        ids=[n.node_id for n in nodes],
        show_progress=show_progress,
    )
