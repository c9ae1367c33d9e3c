"""GistLLM and GistRegistry on a tiny random model: structure, splicing, streaming, async (never answer text)."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.llms import LLM
from llama_index.core.prompts import PromptTemplate
from llama_index.llms.gist_memory import METADATA_KEY, GistLLM, GistRegistry

QA = "Context information is below.\n---------------------\n{ctx}\n---------------------\nQuery: {q}\nAnswer: "


def _prompt(passages, q="Who became curator?"):
    return QA.format(ctx="\n\n".join(passages), q=q)


# ---- registry ---------------------------------------------------------------------------------------------
def test_registry_finds_known_passages_in_order(registry, passages):
    keys = registry.add_texts(passages[:2], compress=False)
    prompt = _prompt([passages[1], passages[2], passages[0]])
    sp = registry.splice(prompt)
    assert sp.keys == [keys[1], keys[0]]  # order of appearance; passages[2] is unknown
    assert passages[0] not in sp.text and passages[1] not in sp.text
    assert passages[2] in sp.text and "Query: Who became curator?" in sp.text
    for (s, e), k in zip(sp.spans, sp.keys, strict=True):
        assert sp.prompt[s:e] == registry.text(k)


def test_registry_unknown_prompt_and_longest_match(registry, passages):
    assert registry.splice("nothing known here at all, really").keys == []
    short, long_ = passages[0].split(" The archive")[0], passages[0]
    k_short, k_long = registry.add_texts([short, long_], compress=False)
    assert registry.splice(_prompt([long_])).keys == [k_long]
    assert registry.splice(_prompt([short + " Something else."])).keys == [k_short]


def test_registry_normalises_and_keys_by_content(registry, passages):
    k1 = registry.add_texts(["  " + passages[0].replace(". ", ".\r\n") + "\n"], compress=False)[0]
    assert registry.splice(_prompt([passages[0].replace(". ", ".\n")])).keys == [k1]
    k2 = registry.add_texts([passages[0] + " Changed."], compress=False)[0]
    assert k2 != k1


def test_registry_compresses_once_and_reloads_after_eviction(li_tiny_model, passages):
    reg = GistRegistry(li_tiny_model)
    keys = reg.add_texts(passages)
    assert reg.stats["compressed"] == 3
    st = reg.states(keys)
    assert reg.stats["compressed"] == 3 and [s.num_tokens > 0 for s in st] == [True] * 3
    tiny = GistRegistry(li_tiny_model, max_bytes_in_ram=st[0].nbytes)  # holds one state at most
    k = tiny.add_texts(passages)
    again = tiny.states(k)
    assert [s.text_hash for s in again] == [s.text_hash for s in st]
    assert tiny.stats["compressed"] > 3  # evicted ones were recompressed from their text


def test_registry_refuses_a_state_of_another_text(registry, li_tiny_model, passages):
    st = li_tiny_model.compress([passages[1]])[0]
    with pytest.raises(ValueError, match="another text"):
        registry.add_state(passages[0], st)


def test_register_nodes_marks_copies(registry, passages):
    from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

    node = TextNode(text=passages[0], metadata={"title": "Voss"})
    (marked,) = registry.add_nodes([NodeWithScore(node=node, score=0.5)], compress=False)
    assert marked.score == 0.5 and METADATA_KEY not in node.metadata  # the caller's node is untouched
    md = marked.node.metadata
    assert md["title"] == "Voss" and md[METADATA_KEY] in registry
    assert METADATA_KEY not in marked.node.get_content(metadata_mode=MetadataMode.LLM)
    assert METADATA_KEY not in marked.node.get_content(metadata_mode=MetadataMode.EMBED)
    assert registry.text(md[METADATA_KEY]) == marked.node.get_content(metadata_mode=MetadataMode.LLM)


# ---- the LLM ------------------------------------------------------------------------------------------------
@pytest.fixture
def llm(li_tiny_model, registry):
    return GistLLM(model=li_tiny_model, registry=registry, max_new_tokens=8)


def test_metadata_and_defaults(li_tiny_model, llm):
    assert isinstance(llm, LLM)
    md = llm.metadata
    assert md.is_chat_model and md.num_output == 8 and md.context_window == 4096
    assert GistLLM(model=li_tiny_model).registry is GistRegistry.for_model(li_tiny_model)
    with pytest.raises(ValueError, match="generate_kwargs"):
        GistLLM(model=li_tiny_model, generate_kwargs={"beams": 2})


def test_complete_splices_known_passages(llm, registry, li_tiny_model, passages):
    keys = registry.add_texts(passages[:2])
    prompt = _prompt(passages[:2])
    r = llm.complete(prompt, formatted=True)
    g = r.additional_kwargs["gist"]
    assert g == llm.last_gist_usage
    assert g["context"] == "gist" and g["passages"] == 2 and g["state_keys"] == keys
    states = registry.states(keys)
    assert g["raw_tokens"] == sum(s.num_tokens for s in states)
    assert g["kept_rows"] == sum(s.num_kept for s in states)
    assert g["positions_read"] < g["raw_tokens"] + g["prompt_tokens"] + 40  # states instead of raw passages
    assert g["ttft_s"] is not None and g["ttft_s"] >= 0
    # the same call through the core API gives the same text
    rest = registry.splice(prompt).text
    assert r.text == li_tiny_model.generate(rest, states=states, max_new_tokens=8)

    text_twin = GistLLM(model=li_tiny_model, registry=registry, max_new_tokens=8, splice=False)
    t = text_twin.complete(prompt, formatted=True).additional_kwargs["gist"]
    assert t["context"] == "text" and t["passages"] == 0 and t["raw_tokens"] == 0
    assert g["positions_read"] < t["positions_read"]


def test_unknown_prompt_is_plain_generation(llm, li_tiny_model):
    r = llm.complete("Tell me about nothing in particular.")
    g = r.additional_kwargs["gist"]
    assert g["context"] == "none" and g["passages"] == 0 and "plain generation" in g["note"]
    assert r.text == li_tiny_model.generate("Tell me about nothing in particular.", max_new_tokens=8)


def test_stream_complete_yields_the_complete_text(llm, registry, passages):
    registry.add_texts(passages)
    prompt = _prompt(passages)
    full = llm.complete(prompt, formatted=True)
    chunks = list(llm.stream_complete(prompt, formatted=True))
    assert "".join(c.delta or "" for c in chunks) == full.text == chunks[-1].text
    assert chunks[-1].additional_kwargs["gist"]["passages"] == 3
    assert all("gist" not in c.additional_kwargs for c in chunks[:-1])


def test_chat_reads_passages_from_system_and_user_messages(llm, registry, li_tiny_model, passages):
    keys = registry.add_texts(passages)
    msgs = [
        ChatMessage(role=MessageRole.SYSTEM, content="Use the context below.\n----\n" + passages[2] + "\n----\n"),
        ChatMessage(role=MessageRole.USER, content=_prompt(passages[:2])),
    ]
    r = llm.chat(msgs)
    g = r.additional_kwargs["gist"]
    assert g["state_keys"] == [keys[2], keys[0], keys[1]] and g["context"] == "gist"
    assert r.message.role == MessageRole.ASSISTANT and r.message.additional_kwargs == {}
    states = registry.states(g["state_keys"])
    expect = li_tiny_model.generate(
        registry.splice(_prompt(passages[:2])).text, states=states, max_new_tokens=8,
        system_prompt="Use the context below.\n----\n\n----",
    )
    assert r.message.content == expect
    streamed = list(llm.stream_chat(msgs))
    assert "".join(c.delta or "" for c in streamed) == r.message.content
    assert streamed[-1].additional_kwargs["gist"]["passages"] == 3


def test_chat_history_is_kept(llm, registry, passages):
    registry.add_texts(passages[:1])
    msgs = [
        ChatMessage(role=MessageRole.SYSTEM, content="Context:\n" + passages[0]),
        ChatMessage(role=MessageRole.USER, content="Who is the curator?"),
        ChatMessage(role=MessageRole.ASSISTANT, content="Maren Voss."),
        ChatMessage(role=MessageRole.USER, content="Since when?"),
    ]
    r = llm.chat(msgs)
    g = r.additional_kwargs["gist"]
    assert g["passages"] == 1
    assert g["prompt_tokens"] > llm.chat(msgs[:2] + msgs[3:]).additional_kwargs["gist"]["prompt_tokens"]


def test_predict_with_a_prompt_template(llm, registry, passages):
    registry.add_texts(passages[:2])
    tmpl = PromptTemplate(QA.replace("{ctx}", "{context_str}").replace("{q}", "{query_str}"))
    out = llm.predict(tmpl, context_str="\n\n".join(passages[:2]), query_str="Who?")
    assert isinstance(out, str) and llm.last_gist_usage["passages"] == 2


def test_async_matches_sync(llm, registry, passages):
    registry.add_texts(passages)
    prompt = _prompt(passages)
    msgs = [ChatMessage(role=MessageRole.USER, content=prompt)]
    sync_text = llm.complete(prompt, formatted=True).text

    async def run():
        a = await llm.acomplete(prompt, formatted=True)
        c = await llm.achat(msgs)
        pieces = [r.delta async for r in await llm.astream_complete(prompt, formatted=True)]
        chat_pieces = [r async for r in await llm.astream_chat(msgs)]
        return a, c, pieces, chat_pieces

    a, c, pieces, chat_pieces = asyncio.run(run())
    assert a.text == sync_text == c.message.content == "".join(pieces)
    assert chat_pieces[-1].message.content == sync_text
    assert a.additional_kwargs["gist"]["passages"] == 3
    assert chat_pieces[-1].additional_kwargs["gist"]["passages"] == 3


def test_direct_route_with_states(llm, registry, li_tiny_model, passages):
    states = registry.states(registry.add_texts(passages[:2]))
    r = llm.complete_with_states("Who became curator?", states)
    g = r.additional_kwargs["gist"]
    assert g["passages"] == 2 and g["raw_tokens"] == sum(s.num_tokens for s in states)
    assert r.text == li_tiny_model.generate("Who became curator?", states=states, max_new_tokens=8)
    none = llm.complete_with_states("Who became curator?", [])
    assert none.additional_kwargs["gist"]["context"] == "none"


def test_chat_reaches_the_model_as_messages(llm, li_tiny_model, monkeypatch):
    seen = []
    inner = li_tiny_model.stream

    def spy(prompt, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(prompt)
        return inner(prompt, *args, **kwargs)

    monkeypatch.setattr(li_tiny_model, "stream", spy)
    msgs = [
        ChatMessage(role=MessageRole.SYSTEM, content="Be brief."),
        ChatMessage(role=MessageRole.USER, content="Who is the curator?"),
        ChatMessage(role=MessageRole.ASSISTANT, content="Maren Voss."),
        ChatMessage(role=MessageRole.TOOL, content="lookup: since 1912"),
        ChatMessage(role=MessageRole.USER, content="Since when?"),
    ]
    r = llm.chat(msgs)
    assert seen[-1] == [
        {"role": "user", "content": "Who is the curator?"},
        {"role": "assistant", "content": "Maren Voss."},
        {"role": "user", "content": "<tool_response>\nlookup: since 1912\n</tool_response>\nSince when?"},
    ]
    want = li_tiny_model.generate(seen[-1], system_prompt="Be brief.", max_new_tokens=llm.max_new_tokens)
    assert r.message.content == want
    llm.chat(msgs[1:2])
    assert seen[-1] == "Who is the curator?"  # a lone user message stays a plain prompt
    llm.chat(msgs[1:3])  # ends with the assistant: the model cannot answer that turn, so it is flattened
    assert seen[-1] == "user: Who is the curator?\nassistant: Maren Voss."


def test_concurrent_calls_need_no_lock_and_match_calls_alone(llm, registry, passages):
    from concurrent.futures import ThreadPoolExecutor

    registry.add_texts(passages)
    prompts = [_prompt(passages[i:] + passages[:i], q=f"Question {i}?") for i in range(3)] + ["Plain question?"]
    alone = [(r.text, r.additional_kwargs["gist"]) for r in (llm.complete(p, formatted=True) for p in prompts)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda p: llm.complete(p, formatted=True), prompts * 4))
    for i, r in enumerate(together):
        text, g = alone[i % len(prompts)]
        got = r.additional_kwargs["gist"]
        assert r.text == text
        assert (got["positions_read"], got["raw_tokens"], got["passages"]) == (
            g["positions_read"], g["raw_tokens"], g["passages"])
