"""`GistRetriever`: a LangChain retriever over a `GistMemory` that registers what it returns.

Every passage it returns is registered in a `PassageRegistry`, so when a stock chain pastes it into a prompt,
`ChatGist` recognises it and reads its gist state instead of its tokens.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, model_validator

from langchain_gist_memory.registry import PassageRegistry, default_registry


class GistRetriever(BaseRetriever):
    """Passages of a `GistMemory` most similar to the query, as `Document`s.

    Args:
        memory: The `GistMemory` to search.
        k: How many passages (also accepted per call: `retriever.invoke(query, k=2)`).
        filter: Metadata filter (`{"key": value}` or `{"key": [v1, v2]}`; also per call).
        registry: Where returned passages are registered for `ChatGist` (default: the shared registry);
            pass `register_passages=False` to skip registration.
        register_passages: Register returned passages (default True).

    Each document's metadata holds the passage metadata plus `id`, `score` and `gist_state_key`.
    """

    memory: Any = Field(exclude=True)
    k: int = Field(default=4, ge=1)
    filter: Optional[dict[str, Any]] = None
    registry: Optional[PassageRegistry] = Field(default=None, exclude=True)
    register_passages: bool = True

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @model_validator(mode="after")
    def _check(self) -> GistRetriever:
        for attr in ("search", "get"):
            if not callable(getattr(self.memory, attr, None)):
                raise ValueError(f"memory has no {attr}(): GistRetriever needs a gist_memory.GistMemory")
        return self

    def _get_relevant_documents(
        self,
        query: str,
        *,
        run_manager: CallbackManagerForRetrieverRun,
        k: Optional[int] = None,
        filter: Optional[dict[str, Any]] = None,
    ) -> list[Document]:
        k = self.k if k is None else int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        hits = self.memory.search(query, k=k, filter=filter if filter is not None else self.filter)
        if self.register_passages and hits:
            (self.registry if self.registry is not None else default_registry()).register_hits(self.memory, hits)
        docs = []
        for h in hits:
            md = dict(h.metadata or {})
            md.update(id=h.id, score=None if math.isnan(h.score) else float(h.score), gist_state_key=h.state_key)
            docs.append(Document(page_content=h.text, metadata=md, id=h.id))
        return docs
