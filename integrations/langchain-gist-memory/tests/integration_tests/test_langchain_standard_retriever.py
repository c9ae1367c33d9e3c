"""langchain-tests `RetrieversIntegrationTests` on GistRetriever over a GistMemory (tiny model, hashing embedder)."""

from __future__ import annotations

import pytest
from langchain_gist_memory import GistRetriever, PassageRegistry
from langchain_tests.integration_tests import RetrieversIntegrationTests


class TestGistRetrieverStandard(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True)
    def _memory(self, gist_tiny, hash_embedder, docs):  # noqa: ANN001
        from gist_memory import GistMemory

        mem = GistMemory(model=gist_tiny, path=None, embedder=hash_embedder)
        mem.add_texts(docs, metadatas=[{"n": i} for i in range(len(docs))], show_progress=False)
        self._mem = mem
        yield
        mem.close()

    @property
    def retriever_constructor(self) -> type[GistRetriever]:
        return GistRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"memory": self._mem, "registry": PassageRegistry()}

    @property
    def retriever_query_example(self) -> str:
        return "Who was the chief curator of the archive?"
