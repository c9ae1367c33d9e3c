"""Stock LlamaIndex paths that used to read passages as text without a word: `response_mode="simple_summarize"`
(context formatted as a list's repr) and `CitationQueryEngine` (passages re-chunked into "Source N:" blocks).
They read states now; where they cannot (a passage cut short), one warning names the path."""

from __future__ import annotations

import warnings

import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.query_engine import CitationQueryEngine, RetrieverQueryEngine
from llama_index.core.schema import TextNode
from llama_index.llms.gist_memory import GistLLM, GistTextFallbackWarning
from llama_index.retrievers.gist_memory import GistCompressedRetriever

Q = "archive code QX-4471 curator"
LONG = (
    "Maren Voss became the chief curator of the northern archive in 1912. She catalogued every map by hand. "
    "The archive code of the northern wing is QX-4471, and visitors need a pass to enter it. "
    "In 1920 the maps moved to a new building near the harbour, where they were kept in dry cabinets. "
    "The curator wrote a guide to the collection that is still printed today. "
) * 3


def _retriever(model, registry, nodes, embed, k=2):
    base = VectorStoreIndex(nodes, embed_model=embed).as_retriever(similarity_top_k=k)
    return GistCompressedRetriever.from_defaults(retriever=base, model=model, registry=registry)


def test_simple_summarize_reads_states(li_tiny_model, registry, nodes, embed, llm):
    r = _retriever(li_tiny_model, registry, nodes, embed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GistTextFallbackWarning)
        resp = RetrieverQueryEngine.from_args(r, llm=llm, response_mode="simple_summarize").query(Q)
    g = llm.last_gist_usage
    assert g["context"] == "gist" and g["passages"] == 2
    assert g["state_keys"] == [n.node.metadata["gist_state_key"] for n in resp.source_nodes]
    twin = GistLLM(model=li_tiny_model, registry=registry, max_new_tokens=6, splice=False)
    RetrieverQueryEngine.from_args(r, llm=twin, response_mode="simple_summarize").query(Q)
    assert g["positions_read"] < twin.last_gist_usage["positions_read"]


def test_simple_summarize_truncated_context_warns_once_naming_the_path(li_tiny_model, registry, nodes, embed):
    r = _retriever(li_tiny_model, registry, nodes, embed)
    small = GistLLM(model=li_tiny_model, registry=registry, max_new_tokens=6, context_window=150)
    engine = RetrieverQueryEngine.from_args(r, llm=small, response_mode="simple_summarize")
    with pytest.warns(GistTextFallbackWarning, match="simple_summarize"):
        engine.query(Q)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GistTextFallbackWarning)
        engine.query(Q)  # once


def test_a_list_a_user_wrote_is_left_alone(li_tiny_model, registry, llm):
    prompt = "What does ['a', 'b'] print in Python?"
    assert llm._splice(prompt)[0] == prompt


def test_citation_query_engine_reads_states(li_tiny_model, registry, nodes, embed, llm):
    r = _retriever(li_tiny_model, registry, nodes, embed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GistTextFallbackWarning)
        resp = CitationQueryEngine.from_args(VectorStoreIndex([]), retriever=r, llm=llm).query(Q)
    assert len(resp.source_nodes) == 2 and resp.source_nodes[0].node.get_content().startswith("Source 1:")
    g = llm.last_gist_usage
    assert g["context"] == "gist" and g["passages"] == 2


def test_citation_query_engine_reads_each_chunk_of_a_long_passage_from_a_state(li_tiny_model, registry, embed, llm):
    node = TextNode(id_="long", text=LONG)
    r = _retriever(li_tiny_model, registry, [node], embed, k=1)
    engine = CitationQueryEngine.from_args(VectorStoreIndex([]), retriever=r, llm=llm, citation_chunk_size=48,
                                           citation_chunk_overlap=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GistTextFallbackWarning)
        resp = engine.query(Q)
    n_chunks = len(resp.source_nodes)
    assert n_chunks > 1
    assert llm.last_gist_usage["passages"] == n_chunks  # every chunk from a state
    before = registry.stats["compressed"]
    engine.query(Q)
    assert registry.stats["compressed"] == before  # chunks compressed once, cached
