"""GistCompressedRetriever and GistSynthesizer on a tiny random model: structure only (never answer text)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode
from llama_index.retrievers.gist_memory import METADATA_KEY, GistCompressedRetriever, GistSynthesizer

Q = "archive code QX-4471 curator"


class FixedRetriever(BaseRetriever):
    """Returns the same nodes for every query (so a test can change a node's text between calls)."""

    def __init__(self, nodes):
        super().__init__()
        self.nodes = nodes

    def _retrieve(self, query_bundle):
        return [NodeWithScore(node=n, score=1.0 - 0.1 * i) for i, n in enumerate(self.nodes)]


def _wrapped(model, registry, nodes, embed, k=2):
    index = VectorStoreIndex(nodes, embed_model=embed)
    base = index.as_retriever(similarity_top_k=k)
    return index, base, GistCompressedRetriever.from_defaults(retriever=base, model=model, registry=registry)


def test_wrapped_retriever_keeps_scores_and_metadata(li_tiny_model, registry, nodes, embed):
    index, base, r = _wrapped(li_tiny_model, registry, nodes, embed)
    plain, got = base.retrieve(Q), r.retrieve(Q)
    assert [(n.node.node_id, n.score) for n in got] == [(n.node.node_id, n.score) for n in plain]
    assert got[0].node.node_id == "n0"
    for n in got:
        md = n.node.metadata
        assert md["topic"] and md[METADATA_KEY] in registry
        assert md[METADATA_KEY] == registry.key_for(n.node.get_content(metadata_mode=MetadataMode.LLM))
        for mode in (MetadataMode.LLM, MetadataMode.EMBED):
            assert METADATA_KEY not in n.node.get_content(metadata_mode=mode)
        assert METADATA_KEY not in index.docstore.get_node(n.node.node_id).metadata  # stored nodes untouched
    assert registry.stats["compressed"] == 2
    r.retrieve(Q)
    assert registry.stats["compressed"] == 2  # cached


def test_query_engine_reads_retrieved_nodes_as_states(li_tiny_model, registry, nodes, embed, llm):
    _, _, r = _wrapped(li_tiny_model, registry, nodes, embed)
    resp = RetrieverQueryEngine.from_args(r, llm=llm).query(Q)
    assert len(resp.source_nodes) == 2 and resp.source_nodes[0].score is not None
    g = llm.last_gist_usage
    assert g["context"] == "gist" and g["passages"] == 2
    assert g["state_keys"] == [n.node.metadata[METADATA_KEY] for n in resp.source_nodes]
    states = registry.states(g["state_keys"])
    assert g["raw_tokens"] == sum(s.num_tokens for s in states)

    from llama_index.llms.gist_memory import GistLLM

    twin = GistLLM(model=li_tiny_model, registry=registry, max_new_tokens=6, splice=False)
    RetrieverQueryEngine.from_args(r, llm=twin).query(Q)
    assert g["positions_read"] < twin.last_gist_usage["positions_read"]


def test_as_query_engine_after_register(li_tiny_model, registry, nodes, embed, llm):
    index = VectorStoreIndex(nodes, embed_model=embed)
    assert len(llm.register(index)) == len(nodes) and registry.stats["compressed"] == 0  # lazy
    resp = index.as_query_engine(llm=llm, similarity_top_k=2).query(Q)
    assert len(resp.source_nodes) == 2
    assert llm.last_gist_usage["passages"] == 2 and registry.stats["compressed"] == 2


def test_streaming_query_engine_yields_the_same_text(li_tiny_model, registry, nodes, embed, llm):
    _, _, r = _wrapped(li_tiny_model, registry, nodes, embed)
    full = RetrieverQueryEngine.from_args(r, llm=llm).query(Q)
    stream = RetrieverQueryEngine.from_args(r, llm=llm, streaming=True).query(Q)
    assert "".join(stream.response_gen) == full.response
    assert llm.last_gist_usage["passages"] == 2 and len(stream.source_nodes) == 2


def test_async_retrieve_and_query(li_tiny_model, registry, nodes, embed, llm):
    _, _, r = _wrapped(li_tiny_model, registry, nodes, embed)
    sync = RetrieverQueryEngine.from_args(r, llm=llm).query(Q)

    async def run():
        got = await r.aretrieve(Q)
        resp = await RetrieverQueryEngine.from_args(r, llm=llm).aquery(Q)
        return got, resp

    got, resp = asyncio.run(run())
    assert [n.node.node_id for n in got] == [n.node.node_id for n in sync.source_nodes]
    assert resp.response == sync.response and llm.last_gist_usage["passages"] == 2


def test_changed_node_is_recompressed(li_tiny_model, registry, llm):
    node = TextNode(id_="doc", text="Maren Voss became the chief curator in 1912.", metadata={"v": 1})
    r = GistCompressedRetriever.from_defaults(retriever=FixedRetriever([node]), model=li_tiny_model,
                                              registry=registry)
    k1 = r.retrieve("q")[0].node.metadata[METADATA_KEY]
    node.text = "Maren Voss became the chief curator in 1913."
    (hit,) = r.retrieve("q")
    k2 = hit.node.metadata[METADATA_KEY]
    assert k2 != k1 and registry.stats["compressed"] == 2
    st = registry.states([k2])[0]
    text = hit.node.get_content(metadata_mode=MetadataMode.LLM)
    assert "1913" in text and st.text_hash == hashlib.sha256(text.encode()).hexdigest()
    RetrieverQueryEngine.from_args(r, llm=llm).query("q")
    assert llm.last_gist_usage["state_keys"] == [k2]


def test_memory_backed_retriever_serves_stored_states(li_tiny_model, registry, nodes, embed, llm):
    r = GistCompressedRetriever.from_defaults(nodes=nodes, model=li_tiny_model, registry=registry, embed_model=embed,
                                              similarity_top_k=2)
    got = r.retrieve(Q)
    assert [n.node.node_id for n in got][0] == "n0" and len(got) == 2
    assert got[0].score >= got[1].score and got[0].node.metadata["topic"] == "archive"
    assert got[0].node.get_content(metadata_mode=MetadataMode.LLM) == nodes[0].text
    assert registry.stats["compressed"] == 0  # states came from the memory's store
    resp = RetrieverQueryEngine.from_args(r, llm=llm).query(Q)
    assert llm.last_gist_usage["passages"] == 2 and len(resp.source_nodes) == 2
    assert registry.stats["compressed"] == 0
    docs = GistCompressedRetriever.from_defaults(documents=[Document(text=nodes[1].text)], model=li_tiny_model,
                                                 registry=registry, embed_model=embed, storage_dtype="int4")
    assert len(docs.memory) == 1 and len(docs.retrieve("fox")) == 1
    # the storage dtype: the library default unless chosen
    assert r.memory.storage_dtype == "int8" and docs.memory.store.storage_dtype == "int4"


def test_from_defaults_rejects_bad_arguments(li_tiny_model, nodes):
    with pytest.raises(ValueError, match="exactly one"):
        GistCompressedRetriever.from_defaults(nodes=nodes, documents=[], model=li_tiny_model)
    with pytest.raises(ValueError, match="model="):
        GistCompressedRetriever.from_defaults(retriever=FixedRetriever(nodes))


# ---- the direct route --------------------------------------------------------------------------------------
def test_gist_synthesizer_hands_states_by_node(li_tiny_model, registry, nodes, embed, llm):
    _, _, r = _wrapped(li_tiny_model, registry, nodes, embed)
    engine = RetrieverQueryEngine(r, response_synthesizer=GistSynthesizer(llm=llm))
    resp = engine.query(Q)
    g = resp.metadata["gist"]
    # read by relevance (the default); the sources stay in the retriever's order
    assert g["passages"] == 2 and g["read_order"] == "relevance"
    assert sorted(g["state_keys"]) == sorted(n.node.metadata[METADATA_KEY] for n in resp.source_nodes)
    assert resp.metadata["n0"]["topic"] == "archive"
    RetrieverQueryEngine.from_args(r, llm=llm).query(Q)  # the transparent route reads the QA template as tokens
    assert g["prompt_tokens"] < llm.last_gist_usage["prompt_tokens"]
    stream = RetrieverQueryEngine(r, response_synthesizer=GistSynthesizer(llm=llm, streaming=True)).query(Q)
    assert "".join(stream.response_gen) == resp.response
    assert stream.metadata["gist"]["passages"] == 2

    async def run():
        a = await engine.aquery(Q)
        s = await RetrieverQueryEngine(r, response_synthesizer=GistSynthesizer(llm=llm, streaming=True)).aquery(Q)
        return a, "".join([t async for t in s.async_response_gen()])

    a, streamed = asyncio.run(run())
    assert a.response == resp.response == streamed


def test_gist_synthesizer_recompresses_stale_nodes_and_handles_no_context(li_tiny_model, registry, llm):
    node = TextNode(id_="doc", text="Maren Voss became the chief curator in 1912.")
    (marked,) = registry.add_nodes([NodeWithScore(node=node, score=1.0)])
    stale_key = marked.node.metadata[METADATA_KEY]
    marked.node.text = "Maren Voss became the chief curator in 1913."
    synth = GistSynthesizer(llm=llm)
    states, keys = synth.states_for_nodes([marked])
    assert keys[0] != stale_key and "1913" in states[0].text
    empty = synth.synthesize("Who is the curator?", [])
    g = empty.metadata["gist"]
    assert g["context"] == "none" and "without context" in g["note"] and empty.source_nodes == []
    assert isinstance(empty.response, str)


def test_memory_backed_lazy_states_load_from_the_store(li_tiny_model, registry, nodes, embed, llm):
    r = GistCompressedRetriever.from_defaults(nodes=nodes, model=li_tiny_model, registry=registry, embed_model=embed,
                                              similarity_top_k=2, compress=False)
    got = r.retrieve(Q)
    assert all(n.node.metadata[METADATA_KEY] in registry for n in got)
    RetrieverQueryEngine.from_args(r, llm=llm).query(Q)
    assert llm.last_gist_usage["passages"] == 2
    assert registry.stats["compressed"] == 0 and registry.stats["reloaded"] == 2  # loaded from the memory's store


def test_gist_synthesizer_reads_the_most_relevant_node_last(li_tiny_model, registry, nodes, llm):
    """`read_order="relevance"` (the default) orders the states by the model's own query likelihood (the most
    relevant next to the question); `top_n` reads only the best ones and reports only those as sources."""
    retrieved = [NodeWithScore(node=n, score=1.0) for n in nodes[:3]]
    states, _ = GistSynthesizer(llm=llm).states_for_nodes(retrieved)
    rel = li_tiny_model.relevance(Q, states)
    order = sorted(range(3), key=lambda i: rel[i])
    plain = GistSynthesizer(llm=llm, read_order="given").synthesize(Q, retrieved)
    assert "relevance" not in plain.metadata["gist"]
    ranked = GistSynthesizer(llm=llm, read_order="relevance").synthesize(Q, retrieved)
    g = ranked.metadata["gist"]
    keys = plain.metadata["gist"]["state_keys"]
    assert order != [0, 1, 2] and g["state_keys"] == [keys[i] for i in order] and g["read_order"] == "relevance"
    assert GistSynthesizer(llm=llm).synthesize(Q, retrieved).metadata["gist"]["state_keys"] == g["state_keys"]
    assert g["relevance"] == pytest.approx(dict(zip(keys, rel)), abs=1e-4)
    assert len(ranked.source_nodes) == 3  # every retrieved node stays a source when all are read
    top = GistSynthesizer(llm=llm, read_order="relevance", top_n=1).synthesize(Q, retrieved)
    assert top.metadata["gist"]["state_keys"] == [keys[order[-1]]] and top.metadata["gist"]["passages"] == 1
    assert [n.node.node_id for n in top.source_nodes] == [retrieved[order[-1]].node.node_id]
    for bad in ({"read_order": "random"}, {"read_order": "given", "top_n": 2}, {"read_order": "relevance", "top_n": 0}):
        with pytest.raises(ValueError, match="read_order|top_n"):
            GistSynthesizer(llm=llm, **bad)
