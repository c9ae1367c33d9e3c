"""LangGraph persistence (checkpointer + store keep messages and gist states) and the LangChain v1 agent middleware."""

from __future__ import annotations

import sqlite3

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_gist_memory import ChatGist, LangGraphStateStore
from langchain_gist_memory._messages import GIST_MEMORY_KEY


class CountingCompress:
    def __init__(self, model) -> None:  # noqa: ANN001
        self.inner = model.compress
        self.texts: list[str] = []

    def __call__(self, texts, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN204
        texts = list(texts)
        self.texts += texts
        return self.inner(texts, *args, **kwargs)


def say(t: int) -> str:
    return f"Turn {t}: box {t} holds {t * 3} red marbles. Please remember it."


def build_graph(chat: ChatGist, path):  # noqa: ANN001, ANN201
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.runtime import Runtime
    from langgraph.store.sqlite import SqliteStore

    conn = sqlite3.connect(path, check_same_thread=False)
    store_conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)  # SqliteStore wants autocommit
    saver, store = SqliteSaver(conn), SqliteStore(store_conn)
    saver.setup()
    store.setup()

    def call_model(state: MessagesState, runtime: Runtime) -> dict:
        return {"messages": [chat.invoke(state["messages"], state_store=LangGraphStateStore(runtime.store))]}

    builder = StateGraph(MessagesState)
    builder.add_node("model", call_model)
    builder.add_edge(START, "model")
    return builder.compile(checkpointer=saver, store=store), (conn, store_conn)


def test_langgraph_checkpointer_and_store_survive_a_restart(tmp_path, gist_tiny, monkeypatch):
    path = tmp_path / "graph.sqlite"
    cfg = {"configurable": {"thread_id": "t-1"}}
    c1 = CountingCompress(gist_tiny)
    monkeypatch.setattr(gist_tiny, "compress", c1)
    graph, conns = build_graph(ChatGist(model=gist_tiny, keep_recent=1, max_tokens=2), path)
    for t in range(1, 9):
        out = graph.invoke({"messages": [HumanMessage(say(t))]}, cfg)
    assert len(out["messages"]) == 16
    assert len(c1.texts) == 6 and len(set(c1.texts)) == 6
    for c in conns:
        c.close()

    # restart: new connection, new graph, a chat with an empty cache
    c2 = CountingCompress(gist_tiny)
    monkeypatch.setattr(gist_tiny, "compress", c2)
    graph2, conns2 = build_graph(ChatGist(model=gist_tiny, keep_recent=1, max_tokens=2), path)
    out = graph2.invoke({"messages": [HumanMessage(say(9))]}, cfg)
    g = out["messages"][-1].response_metadata["gist"]
    assert len(out["messages"]) == 18
    assert g["compressed_turns"] == 7 and g["states_from_store"] == 6 and g["new_compressions"] == 1
    assert len(c2.texts) == 1
    # the states sit in the store under the model fingerprint, with their texts
    items = graph2.store.search(("gist_memory", "turn_states", gist_tiny.fingerprint), limit=100)
    assert len(items) == 7 and all(it.value["text"].startswith("User: Turn") for it in items)
    for c in conns2:
        c.close()


def test_langgraph_state_store_rejects_other_stores():
    with pytest.raises(ValueError, match="BaseStore"):
        LangGraphStateStore(object())


def test_agent_middleware_compresses_old_turns_instead_of_summarising(gist_tiny, monkeypatch):
    from langchain.agents import create_agent
    from langchain_gist_memory import GistMemoryMiddleware
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.store.memory import InMemoryStore

    c = CountingCompress(gist_tiny)
    monkeypatch.setattr(gist_tiny, "compress", c)
    chat = ChatGist(model=gist_tiny, keep_recent=1000, max_tokens=2)  # the middleware decides what is old
    mw = GistMemoryMiddleware(chat, trigger=("messages", 6), keep_turns=2)
    store = InMemoryStore()
    agent = create_agent(chat, tools=[], middleware=[mw], checkpointer=InMemorySaver(), store=store)
    cfg = {"configurable": {"thread_id": "a-1"}}
    sizes, metas = [], []
    for t in range(1, 11):
        out = agent.invoke({"messages": [HumanMessage(say(t))]}, cfg)
        sizes.append(len(out["messages"]))
        metas.append(out["messages"][-1].response_metadata["gist"])
    msgs = out["messages"]
    marker = msgs[0]
    assert GIST_MEMORY_KEY in marker.additional_kwargs and marker.additional_kwargs["lc_source"] == "gist_memory"
    # nothing lost: the marker keeps every folded turn's text, the rest are messages
    texts = marker.additional_kwargs[GIST_MEMORY_KEY]["texts"]
    assert [x.splitlines()[0] for x in texts] == [f"User: {say(t)}" for t in range(1, len(texts) + 1)]
    assert [m.content for m in msgs[1:] if isinstance(m, HumanMessage)] == [
        say(t) for t in range(len(texts) + 1, 11)
    ]
    assert max(sizes) <= 1 + 2 * 3 + 1  # bounded: marker + kept turns + the new turn
    # each turn compressed once, and the model reads the folded turns from their states
    assert len(c.texts) == len(set(c.texts)) == len(texts)
    assert metas[-1]["compressed_turns"] == len(texts) and metas[-1]["new_compressions"] == 0
    assert len(store.search(("gist_memory", "turn_states", gist_tiny.fingerprint), limit=100)) == len(texts)
    assert isinstance(msgs[-1], AIMessage)


def test_middleware_refuses_models_that_cannot_read_states(gist_tiny):
    from langchain.agents import create_agent
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_gist_memory import GistMemoryMiddleware

    chat = ChatGist(model=gist_tiny)
    with pytest.raises(ValueError, match="trigger"):
        GistMemoryMiddleware(chat, trigger=("turns", 3))
    with pytest.raises(TypeError, match="ChatGist"):
        GistMemoryMiddleware(FakeListChatModel(responses=["x"]))  # type: ignore[arg-type]
    agent = create_agent(FakeListChatModel(responses=["x"]), tools=[], middleware=[GistMemoryMiddleware(chat)])
    with pytest.raises(TypeError, match="needs the agent's model to be a ChatGist"):
        agent.invoke({"messages": [HumanMessage("hi")]})


def test_langgraph_state_store_writes_the_chosen_dtype_and_reads_older_entries(gist_tiny):
    import base64

    from langchain_gist_memory._states import StateEntry
    from langgraph.store.memory import InMemoryStore

    from gist_memory.store.store import DEFAULT_STORAGE_DTYPE

    st = gist_tiny.compress(["Box 7 holds 21 red marbles. Please remember it."])[0]
    fp = st.model_fingerprint
    store = InMemoryStore()
    sizes = {}
    for dtype in ("float32", "int4", None):
        lg = LangGraphStateStore(store, namespace=("t", dtype or "default"), storage_dtype=dtype)
        assert lg.storage_dtype == (dtype or DEFAULT_STORAGE_DTYPE)
        lg.put_states([StateEntry(key="k1", state=st, text=st.text, message_ids=["m1"])])
        got = lg.get_states(["k1"], fp)["k1"]
        assert got.num_kept == st.num_kept and got.keys.shape == st.keys.shape
        tol = 0.0 if dtype == "float32" else 0.5
        assert float((got.keys.float() - st.keys.float()).abs().max()) <= tol + 1e-6
        item = store.get(lg._ns(fp), "k1")
        sizes[lg.storage_dtype] = len(base64.b64decode(item.value["state"]))
    assert max(sizes["int4"], sizes[DEFAULT_STORAGE_DTYPE]) < sizes["float32"]  # (scales weigh much on a tiny model)
    # an entry of an older version (full precision, no "storage" field) still reads
    store.put(("t", "old", fp), "k2", {"state": base64.b64encode(st.to_bytes()).decode("ascii"), "text": st.text,
                                       "message_ids": [], "num_tokens": st.num_tokens, "num_kept": st.num_kept})
    assert LangGraphStateStore(store, namespace=("t", "old")).get_states(["k2"], fp)["k2"].num_kept == st.num_kept
    with pytest.raises(ValueError, match="storage_dtype"):
        LangGraphStateStore(store, storage_dtype="int3")
