"""Stock LlamaIndex chat engines over GistCompressedRetriever + GistLLM, several turns (structure only)."""

from __future__ import annotations

import asyncio

from llama_index.core import VectorStoreIndex
from llama_index.core.chat_engine import CondensePlusContextChatEngine, ContextChatEngine
from llama_index.retrievers.gist_memory import METADATA_KEY, GistCompressedRetriever

TURNS = ["Who became the chief curator?", "What is the archive code?", "Where was the sunny day?"]


def _retriever(model, registry, nodes, embed):
    base = VectorStoreIndex(nodes, embed_model=embed).as_retriever(similarity_top_k=2)
    return GistCompressedRetriever.from_defaults(retriever=base, model=model, registry=registry)


def test_context_chat_engine_several_turns(li_tiny_model, registry, nodes, embed, llm):
    engine = ContextChatEngine.from_defaults(retriever=_retriever(li_tiny_model, registry, nodes, embed), llm=llm)
    prompt_tokens = []
    for turn in TURNS:
        resp = engine.chat(turn)
        g = llm.last_gist_usage
        assert len(resp.source_nodes) == 2 and g["context"] == "gist" and g["passages"] == 2
        assert g["state_keys"] == [n.node.metadata[METADATA_KEY] for n in resp.source_nodes]
        assert g["kept_rows"] < g["raw_tokens"]
        prompt_tokens.append(g["prompt_tokens"])
    assert len(engine.chat_history) == 2 * len(TURNS)
    assert prompt_tokens[-1] > prompt_tokens[0]  # the history is read as tokens

    from llama_index.llms.gist_memory import GistLLM

    twin = GistLLM(model=li_tiny_model, registry=registry, max_new_tokens=6, splice=False)
    twin_engine = ContextChatEngine.from_defaults(retriever=engine._retriever, llm=twin)
    twin_engine.chat(TURNS[0])
    engine.reset()
    engine.chat(TURNS[0])
    assert llm.last_gist_usage["positions_read"] < twin.last_gist_usage["positions_read"]

    stream = engine.stream_chat("And the fox?")
    text = "".join(stream.response_gen)
    assert isinstance(text, str) and llm.last_gist_usage["passages"] == 2

    async def run():
        return await engine.achat("Which code again?")

    resp = asyncio.run(run())
    assert len(resp.source_nodes) == 2 and llm.last_gist_usage["passages"] == 2


def test_condense_plus_context_chat_engine(li_tiny_model, registry, nodes, embed, llm):
    engine = CondensePlusContextChatEngine.from_defaults(
        retriever=_retriever(li_tiny_model, registry, nodes, embed), llm=llm
    )
    for turn in TURNS[:2]:
        resp = engine.chat(turn)
        assert len(resp.source_nodes) == 2
        g = llm.last_gist_usage
        assert g["context"] == "gist" and g["passages"] == 2
    # the condense step (turn 2) is a prompt without passages: plain generation, same LLM
    assert len(engine.chat_history) == 4

    async def run():
        r = await engine.astream_chat(TURNS[2])
        return r, "".join([t async for t in r.async_response_gen()])

    r, text = asyncio.run(run())
    assert isinstance(text, str) and len(r.source_nodes) == 2 and llm.last_gist_usage["passages"] == 2
