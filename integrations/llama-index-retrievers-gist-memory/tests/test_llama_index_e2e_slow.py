"""End to end on the bundled SmolLM2-135M-Instruct (training-free pool+anchors at 4x): a stock query engine answers
a question whose answer is in the documents, reading the retrieved passages from their gist states."""

from __future__ import annotations

import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import TextNode
from llama_index.llms.gist_memory import GistLLM
from llama_index.retrievers.gist_memory import GistCompressedRetriever

DOCS = [
    ("Abuja", "Abuja is the capital city of Nigeria, situated at the geographic midpoint of the country within the "
     "Federal Capital Territory. It replaced Lagos as the capital on 12 December 1991."),
    ("Mount Elbrus", "Mount Elbrus is the highest mountain in Russia and Europe. It is a dormant stratovolcano rising "
     "5,642 m above sea level."),
    ("Robert Fulton", "Robert Fulton was an American engineer who developed the first commercially successful "
     "steamboat. In 1807 it traveled on the Hudson River from New York City to Albany."),
]


@pytest.mark.slow
def test_query_engine_answers_from_gist_states(embed):
    from llama_index.llms.gist_memory import GistRegistry

    from gist_memory import GistConfig, GistModel

    model = GistModel.from_base(None, GistConfig(compressor="pool+anchors", target_ratio=4), device="cpu")
    nodes = [TextNode(id_=t, text=x, metadata={"title": t}) for t, x in DOCS]
    base = VectorStoreIndex(nodes, embed_model=embed).as_retriever(similarity_top_k=2)
    registry = GistRegistry(model)
    retriever = GistCompressedRetriever.from_defaults(retriever=base, model=model, registry=registry)
    llm = GistLLM(model=model, registry=registry, max_new_tokens=24)
    resp = RetrieverQueryEngine.from_args(retriever, llm=llm).query("What is the capital city of Nigeria?")

    assert resp.source_nodes[0].node.node_id == "Abuja"
    g = llm.last_gist_usage
    assert g["context"] == "gist" and g["passages"] == 2
    assert g["kept_rows"] * 2 < g["raw_tokens"]  # states are much smaller than the passages
    text_llm = GistLLM(model=model, registry=registry, max_new_tokens=24, splice=False)
    plain = RetrieverQueryEngine.from_args(retriever, llm=text_llm).query("What is the capital city of Nigeria?")
    assert g["positions_read"] < text_llm.last_gist_usage["positions_read"]
    assert "Abuja" in resp.response, resp.response
    assert isinstance(plain.response, str)
