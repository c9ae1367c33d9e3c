"""ChatGist on the tiny random Llama: compression work per turn, positions read, metadata, routes, bad input.

The tiny model writes gibberish: these tests assert on structure and counts, never on the text.
"""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, RemoveMessage, SystemMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_gist_memory import ChatGist, GistRetriever, PassageRegistry

GIST_KEYS = {
    "raw_tokens", "positions_read", "positions_held", "prompt_tokens", "kept_rows", "compression_ratio", "compressed_turns",
    "raw_turns", "passages", "gist_ids", "new_compressions", "states_from_store", "compress_s", "ttft_s", "total_s",
}


class CountingCompress:
    """Wraps `model.compress`: records every text it is asked to compress."""

    def __init__(self, model) -> None:  # noqa: ANN001
        self.inner = model.compress
        self.texts: list[str] = []
        self.calls = 0

    def __call__(self, texts, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN204
        texts = [texts] if isinstance(texts, str) else list(texts)
        self.calls += 1
        self.texts += texts
        return self.inner(texts, *args, **kwargs)


@pytest.fixture
def counter(gist_tiny, monkeypatch):  # noqa: ANN001, ANN201
    c = CountingCompress(gist_tiny)
    monkeypatch.setattr(gist_tiny, "compress", c)
    return c


def user(t: int) -> str:
    return f"Question {t}: what is the code of item {t}, and where is it kept? Please answer briefly."


def reply(t: int) -> str:
    return f"The code of item {t} is QX-{1000 + t}. It is kept in the north archive, shelf {t % 7}."


def run_conversation(chat: ChatGist, turns: int) -> list[dict]:
    msgs: list[BaseMessage] = [SystemMessage("You are a helpful archivist.")]
    out = []
    for t in range(1, turns + 1):
        msgs.append(HumanMessage(user(t)))
        r = chat.invoke(msgs)
        out.append(r.response_metadata["gist"])
        msgs.append(AIMessage(reply(t)))
    return out


def test_fifty_turns_each_turn_compressed_once_and_positions_grow_by_raw_over_ratio(gist_tiny, counter):
    keep = 2
    chat = ChatGist(model=gist_tiny, keep_recent=keep, max_tokens=2)
    meta = run_conversation(chat, 50)

    # each turn compressed exactly once: 50 turns, the last `keep` + the current one are still text
    assert len(counter.texts) == 50 - keep - 1
    assert len(set(counter.texts)) == len(counter.texts)
    assert chat.state_cache.compressed_texts == len(counter.texts)
    # the compression work per turn is flat: one new turn per call once the window is full, never a backlog
    assert [m["new_compressions"] for m in meta] == [0] * (keep + 1) + [1] * (50 - keep - 1)
    assert [m["compressed_turns"] for m in meta] == [max(0, t - keep - 1) for t in range(1, 51)]
    # the text read stays flat (recent turns only); positions grow by about raw/ratio per turn
    assert max(m["prompt_tokens"] for m in meta[keep + 1 :]) - min(m["prompt_tokens"] for m in meta[keep + 1 :]) < 20
    a, b = meta[9], meta[49]
    d_raw = b["raw_tokens"] - a["raw_tokens"]
    d_read = b["positions_read"] - a["positions_read"]
    ratio = b["compression_ratio"]
    assert ratio > 2
    assert d_read == pytest.approx(d_raw / ratio, rel=0.25)
    assert b["kept_rows"] == pytest.approx(b["raw_tokens"] / ratio, rel=1e-3)

    # the uncompressed twin at turn 50 (every turn as text, the same code path) reads every raw token
    counter.texts.clear()
    msgs = [SystemMessage("You are a helpful archivist.")]
    for t in range(1, 51):
        msgs += [HumanMessage(user(t))] + ([AIMessage(reply(t))] if t < 50 else [])
    twin = ChatGist(model=gist_tiny, keep_recent=1000, max_tokens=2, max_prompt_tokens=100_000).invoke(msgs)
    full = twin.response_metadata["gist"]
    assert counter.texts == []
    assert full["raw_tokens"] == 0 and full["compressed_turns"] == 0
    assert full["positions_read"] > 2.5 * b["positions_read"]


def test_invoke_metadata_usage_and_stream_agree(gist_tiny):
    chat = ChatGist(model=gist_tiny, keep_recent=1, max_tokens=6)
    msgs = [SystemMessage("Be brief.")]
    for t in range(1, 5):
        msgs += [HumanMessage(user(t)), AIMessage(reply(t))]
    msgs.append(HumanMessage("And the last one?"))
    r = chat.invoke(msgs)
    assert isinstance(r, AIMessage)
    g = r.response_metadata["gist"]
    assert GIST_KEYS <= set(g)
    assert r.response_metadata["model_name"] == chat.model_name
    assert r.response_metadata["finish_reason"] in ("stop", "length")
    um = r.usage_metadata
    assert um["input_tokens"] == g["positions_read"] >= g["positions_held"] > g["prompt_tokens"]
    assert um["total_tokens"] == um["input_tokens"] + um["output_tokens"]
    assert um["input_token_details"]["cache_read"] == g["positions_read"] - g["prompt_tokens"]
    assert g["compressed_turns"] == 3 and g["raw_turns"] == 2 and g["raw_tokens"] > 0

    chunks = list(chat.stream(msgs))
    assert chunks[-1].chunk_position == "last"
    assert sum(1 for c in chunks if c.usage_metadata and c.usage_metadata["input_tokens"]) == 1
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.content == r.content  # greedy: same answer either way
    assert full.usage_metadata["input_tokens"] == um["input_tokens"]
    assert full.response_metadata["gist"]["new_compressions"] == 0  # the turns were compressed by invoke


def test_async_and_batch(gist_tiny):
    chat = ChatGist(model=gist_tiny, keep_recent=0, max_tokens=3)
    convs = [[HumanMessage(user(1)), AIMessage(reply(1)), HumanMessage(user(k))] for k in (2, 3, 4)]
    out = chat.batch(convs)
    assert [type(x) for x in out] == [AIMessage] * 3
    assert all(x.response_metadata["gist"]["compressed_turns"] == 1 for x in out)

    async def go():  # noqa: ANN202
        a = await chat.ainvoke(convs[0])
        pieces = [c async for c in chat.astream(convs[1])]
        b = await chat.abatch(convs)
        return a, pieces, b

    a, pieces, b = asyncio.run(go())
    assert a.content == out[0].content
    assert pieces[-1].chunk_position == "last"
    assert [x.content for x in b] == [x.content for x in out]


def test_keep_recent_and_agent_turns(gist_tiny, counter):
    chat = ChatGist(model=gist_tiny, keep_recent=0, max_tokens=2)
    msgs = [
        HumanMessage("What is the weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "weather", "args": {"city": "Paris"}, "id": "c1"}]),
        ToolMessage("Sunny, 21 degrees.", tool_call_id="c1", name="weather"),
        AIMessage("It is sunny in Paris."),
        HumanMessage("And tomorrow?"),
    ]
    g = chat.invoke(msgs).response_metadata["gist"]
    assert g["compressed_turns"] == 1 and g["raw_turns"] == 1
    (text,) = counter.texts
    assert text.splitlines() == [
        "User: What is the weather in Paris?",
        'Assistant: <tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>',
        "Tool (weather): Sunny, 21 degrees.",
        "Assistant: It is sunny in Paris.",
    ]
    assert chat.compress_history(msgs)["new_compressions"] == 0
    assert chat.invoke(msgs, keep_recent=5).response_metadata["gist"]["compressed_turns"] == 0


def test_direct_route_gist_ids(gist_tiny, hash_embedder, docs):
    from gist_memory import GistMemory

    mem = GistMemory(model=gist_tiny, embedder=hash_embedder)
    ids = mem.add_texts(docs, show_progress=False)
    chat = ChatGist(model=gist_tiny, memory=mem, max_tokens=2)
    r = chat.invoke("What is the archive code?", gist_ids=ids[:2])
    g = r.response_metadata["gist"]
    assert g["gist_ids"] == 2
    assert g["raw_tokens"] == sum(mem.get(i).state.num_tokens for i in ids[:2])
    assert g["positions_read"] < g["prompt_tokens"] + g["raw_tokens"]
    with pytest.raises(ValueError, match="not in"):
        chat.invoke("q", gist_ids=["nope"])
    with pytest.raises(ValueError, match="memory"):
        ChatGist(model=gist_tiny).invoke("q", gist_ids=ids[:1])
    st = mem.get(ids[0]).state
    assert chat.invoke("q", gist_states=[st]).response_metadata["gist"]["gist_ids"] == 1
    mem.close()


def test_transparent_route_splices_retrieved_passages(gist_tiny, hash_embedder, docs):
    from gist_memory import GistMemory

    mem = GistMemory(model=gist_tiny, embedder=hash_embedder)
    mem.add_texts(docs, show_progress=False)
    reg = PassageRegistry()
    retriever = GistRetriever(memory=mem, k=2, registry=reg)
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from this context:\n\n{context}"), ("human", "{question}")]
    )
    question = "What is the archive code of the northern wing?"
    found = retriever.invoke(question)
    assert len(found) == 2 and len(reg) == 2
    assert {"id", "score", "gist_state_key"} <= set(found[0].metadata)
    messages = prompt.invoke({"context": "\n\n".join(d.page_content for d in found), "question": question})

    spliced = ChatGist(model=gist_tiny, registry=reg, max_tokens=2).invoke(messages)
    plain = ChatGist(model=gist_tiny, registry=reg, splice_passages=False, max_tokens=2).invoke(messages)
    g, p = spliced.response_metadata["gist"], plain.response_metadata["gist"]
    assert g["passages"] == 2 and p["passages"] == 0
    assert g["raw_tokens"] == sum(mem.get(d.id).state.num_tokens for d in found)
    assert g["prompt_tokens"] < p["prompt_tokens"] - g["raw_tokens"] // 2
    assert g["positions_read"] < p["positions_read"]
    # a passage deleted from its memory since it was retrieved is read as text again
    mem.delete([found[0].id])
    again = ChatGist(model=gist_tiny, registry=reg, max_tokens=2).invoke(messages)
    assert again.response_metadata["gist"]["passages"] == 1
    mem.close()


class OddMessage(BaseMessage):
    type: str = "odd"


def test_bad_messages(gist_tiny):
    chat = ChatGist(model=gist_tiny, max_tokens=2)
    with pytest.raises(ValueError, match="'odd'"):
        chat.invoke([HumanMessage("hi"), OddMessage(content="x")])
    with pytest.raises(ValueError, match="cannot place"):
        chat.invoke([RemoveMessage(id="x"), HumanMessage("hi")])
    with pytest.raises(ValueError, match="reads text only"):
        chat.invoke([HumanMessage([{"type": "text", "text": "look"}, {"type": "image", "url": "http://x/y.png"}])])
    with pytest.raises(ValueError, match="no messages"):
        chat.invoke([])
    with pytest.raises(ValueError, match="expected an OpenAI tool dict"):
        chat.invoke("hi", tools=[1])
    with pytest.raises(ValueError, match="cannot switch"):
        chat.invoke("hi", model="gpt-x")
    with pytest.raises(ValueError, match="GistModel"):
        ChatGist(model=object())
    # empty messages are skipped, not fatal
    r = chat.invoke([HumanMessage(""), AIMessage(""), HumanMessage("  "), AIMessage("ok"), HumanMessage("hi")],
                    keep_recent=0)
    assert r.response_metadata["gist"]["compressed_turns"] == 1


def test_fifty_thousand_token_message_is_compressed_once(gist_tiny, counter):
    import random

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog Paris archive code station metres river city".split()
    sents = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(2400)]
    big = " ".join(sents) + " Now, what was the third word?"
    n_big = len(gist_tiny.tokenizer(big, add_special_tokens=False)["input_ids"])
    assert n_big >= 50_000
    chat = ChatGist(model=gist_tiny, keep_recent=0, max_tokens=2, max_prompt_tokens=2048)

    msgs = [HumanMessage(big)]
    g = chat.invoke(msgs).response_metadata["gist"]
    assert g["prompt_tokens"] <= 2048 + 64  # only the last piece is read as text
    assert g["raw_tokens"] > n_big - 2100
    assert g["positions_read"] < g["raw_tokens"] / 2
    n_first = len(counter.texts)

    msgs += [AIMessage("It was quick."), HumanMessage("Thanks!")]
    g2 = chat.invoke(msgs).response_metadata["gist"]
    # the head pieces are reused: only the last piece (+ the reply) is new work
    assert g2["new_compressions"] == 1 and len(counter.texts) == n_first + 1
    assert g2["compressed_turns"] == n_first + 1


def test_recent_turns_reach_the_model_as_chat_messages(gist_tiny, monkeypatch):
    seen = []
    inner = gist_tiny.stream

    def spy(prompt, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append((prompt, kwargs.get("system_prompt")))
        return inner(prompt, *args, **kwargs)

    monkeypatch.setattr(gist_tiny, "stream", spy)
    chat = ChatGist(model=gist_tiny, keep_recent=5, max_tokens=3)
    msgs = [
        SystemMessage("Be brief."),
        HumanMessage("What is the weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "weather", "args": {"city": "Paris"}, "id": "c1"}]),
        ToolMessage("Sunny, 21 degrees.", tool_call_id="c1", name="weather"),
        AIMessage("It is sunny in Paris."),
        HumanMessage("And tomorrow?"),
    ]
    r = chat.invoke(msgs)
    prompt, system = seen[-1]
    assert system == "Be brief."
    assert prompt == [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>'},
        {"role": "user", "content": '<tool_response name="weather">\nSunny, 21 degrees.\n</tool_response>'},
        {"role": "assistant", "content": "It is sunny in Paris."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    gen = {"max_new_tokens": 3, "stop": ["\nUser:", "\nUser ("]}
    assert r.content == gist_tiny.generate(prompt, system_prompt="Be brief.", **gen)
    chat.invoke([HumanMessage("Hello there")])
    assert seen[-1][0] == "Hello there"  # a lone human message stays a plain prompt


def test_concurrent_invokes_need_no_lock_and_match_calls_alone(gist_tiny):
    from concurrent.futures import ThreadPoolExecutor

    chat = ChatGist(model=gist_tiny, keep_recent=1, max_tokens=4)
    convs = []
    for k in range(4):
        msgs: list[BaseMessage] = [SystemMessage("Be brief.")]
        for t in range(1, 3 + k):
            msgs += [HumanMessage(user(t + 10 * k)), AIMessage(reply(t + 10 * k))]
        msgs.append(HumanMessage(f"Last question {k}?"))
        convs.append(msgs)
    alone = [chat.invoke(c) for c in convs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(chat.invoke, convs * 4))
    for i, r in enumerate(together):
        a = alone[i % len(convs)]
        assert r.content == a.content
        g, ga = r.response_metadata["gist"], a.response_metadata["gist"]
        assert (g["positions_read"], g["raw_tokens"], g["kept_rows"]) == (
            ga["positions_read"], ga["raw_tokens"], ga["kept_rows"])


def test_passage_order_relevance_reads_the_most_relevant_passage_last(gist_tiny, docs, monkeypatch):
    """`passage_order="relevance"` (the default): passage states are read in the model's own relevance order for
    the last message (most relevant last); `given` keeps the order they came in; a bad order is refused."""
    states = gist_tiny.compress(docs[:3])
    q = "What is the archive code?"
    rel = gist_tiny.relevance(q, states)
    want = sorted(range(3), key=lambda i: (rel[i], -i))
    seen: list[list] = []
    stream = gist_tiny.stream

    def spy(prompt, states=None, **kw):  # noqa: ANN001, ANN202
        seen.append(list(states or []))
        return stream(prompt, states=states, **kw)

    monkeypatch.setattr(gist_tiny, "stream", spy)
    assert want != [0, 1, 2]
    ChatGist(model=gist_tiny, max_tokens=1, passage_order="given").invoke(q, gist_states=states)
    ChatGist(model=gist_tiny, max_tokens=1, passage_order="relevance").invoke(q, gist_states=states)
    ChatGist(model=gist_tiny, max_tokens=1, passage_order="given").invoke(q, gist_states=states,
                                                                        passage_order="relevance")
    ChatGist(model=gist_tiny, max_tokens=1).invoke(q, gist_states=states)
    assert [[id(s) for s in got] for got in seen] == [[id(s) for s in states]] + [[id(states[i]) for i in want]] * 3
    with pytest.raises(ValueError, match="passage_order"):
        ChatGist(model=gist_tiny, passage_order="random")
    with pytest.raises(ValueError, match="passage_order"):
        ChatGist(model=gist_tiny).invoke(q, gist_states=states, passage_order="random")
