"""SQLite chat history with gist states: round trip, restart without recompression, bad input, two writers."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables.history import RunnableWithMessageHistory
from langchain_gist_memory import ChatGist, GistChatMessageHistory, GistHistoryStore, HistoryError


class CountingCompress:
    def __init__(self, model) -> None:  # noqa: ANN001
        self.inner = model.compress
        self.texts: list[str] = []

    def __call__(self, texts, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN204
        texts = list(texts)
        self.texts += texts
        return self.inner(texts, *args, **kwargs)


def turn(t: int) -> list[BaseMessage]:
    return [HumanMessage(f"Turn {t}: remember that box {t} holds {t * 3} red marbles."),
            AIMessage(f"Noted: box {t} holds {t * 3} red marbles.")]


def test_round_trip_keeps_types_ids_and_empty_messages(tmp_path):
    db = GistHistoryStore(tmp_path / "h.sqlite")
    h = GistChatMessageHistory("s1", db)
    assert isinstance(h, BaseChatMessageHistory)
    msgs = [
        SystemMessage("Be brief."),
        HumanMessage("hello", name="ann"),
        AIMessage("", tool_calls=[{"name": "lookup", "args": {"q": "x"}, "id": "c1"}]),
        ToolMessage("found x", tool_call_id="c1", name="lookup"),
        ChatMessage(role="critic", content="too long"),
        AIMessage(""),
        HumanMessage("ünïcødé 🙂 " * 3),
    ]
    h.add_messages(msgs)
    got = h.messages
    assert [type(m) for m in got] == [type(m) for m in msgs]
    assert [m.content for m in got] == [m.content for m in msgs]
    assert got[2].tool_calls[0]["name"] == "lookup" and got[1].name == "ann" and got[4].role == "critic"
    assert all(m.id for m in got) and len({m.id for m in got}) == len(got)
    assert GistChatMessageHistory("s2", db).messages == []
    assert db.sessions() == ["s1"] and db.count("s1") == len(msgs)
    h.clear()
    assert h.messages == [] and db.count() == 0
    db.close()


def test_restart_answers_turn_200_without_recompressing(tmp_path, gist_tiny_dir, gist_tiny, monkeypatch):
    from gist_memory import GistConfig, GistModel

    path = tmp_path / "chat.sqlite"
    db = GistHistoryStore(path)
    hist = GistChatMessageHistory("user-1", db)
    for t in range(1, 200):
        hist.add_messages(turn(t))
    question = HumanMessage("Turn 200: how many marbles are in box 7?")

    # the app before the restart: turns 1..195 are compressed once and their states kept on their rows
    c1 = CountingCompress(gist_tiny)
    monkeypatch.setattr(gist_tiny, "compress", c1)
    chat = ChatGist(model=gist_tiny, keep_recent=4, max_tokens=2, state_store=db)
    g1 = chat.invoke([*hist.messages, question]).response_metadata["gist"]
    assert len(c1.texts) == 195 and g1["new_compressions"] == 195 and g1["compressed_turns"] == 195
    assert db.count_states() == 195
    with sqlite3.connect(path) as con:  # the state bytes sit on the row of each turn's first message
        rows = con.execute("SELECT type, length(state) FROM messages WHERE state IS NOT NULL").fetchall()
    assert len(rows) == 195 and {r[0] for r in rows} == {"human"} and min(r[1] for r in rows) > 0
    db.close()

    # restart: a fresh process state (model reloaded from disk, new cache, new connection)
    model2 = GistModel.from_base(gist_tiny_dir, GistConfig(gists_per_sentence=2), device="cpu")
    assert model2.fingerprint == gist_tiny.fingerprint
    c2 = CountingCompress(model2)
    monkeypatch.setattr(model2, "compress", c2)
    db2 = GistHistoryStore(path)
    hist2 = GistChatMessageHistory("user-1", db2)
    chat2 = ChatGist(model=model2, keep_recent=4, max_tokens=2, state_store=db2)
    r = chat2.invoke([*hist2.messages, question])
    g2 = r.response_metadata["gist"]
    assert c2.texts == []  # nothing recompressed
    assert g2["states_from_store"] == 195 and g2["compressed_turns"] == 195
    assert g2["raw_tokens"] == g1["raw_tokens"] and g2["positions_read"] == g1["positions_read"]
    # the next turn compresses exactly the one turn that just aged out
    hist2.add_messages([question, AIMessage("Box 7 holds 21.")])
    g3 = chat2.invoke([*hist2.messages, HumanMessage("Turn 201: and box 8?")]).response_metadata["gist"]
    assert len(c2.texts) == 1 and g3["new_compressions"] == 1 and g3["compressed_turns"] == 196
    db2.close()


def test_another_model_recompresses(tmp_path, gist_tiny_dir, gist_tiny):
    from gist_memory import GistConfig, GistModel

    db = GistHistoryStore(tmp_path / "chat.sqlite")
    msgs = [m for t in range(1, 8) for m in turn(t)] + [HumanMessage("and box 2?")]
    ChatGist(model=gist_tiny, keep_recent=1, max_tokens=2, state_store=db).invoke(msgs)
    other = GistModel.from_base(gist_tiny_dir, GistConfig(gists_per_sentence=3), device="cpu")
    assert other.fingerprint != gist_tiny.fingerprint
    g = ChatGist(model=other, keep_recent=1, max_tokens=2, state_store=db).invoke(msgs).response_metadata["gist"]
    assert g["states_from_store"] == 0 and g["new_compressions"] == 6
    assert db.get_states([gist_tiny.state_key(msgs[0].content)], other.fingerprint) == {}
    db.close()


def test_corrupted_or_foreign_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "garbage.sqlite"
    bad.write_bytes(os.urandom(8192))
    with pytest.raises(HistoryError, match="corrupted"):
        GistHistoryStore(bad)

    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE users (id INTEGER)")
    with pytest.raises(HistoryError, match="something else"):
        GistHistoryStore(foreign)

    with pytest.raises(HistoryError, match="folder"):
        GistHistoryStore(tmp_path)

    # pages damaged after it was written
    path = tmp_path / "damaged.sqlite"
    db = GistHistoryStore(path)
    db.append("s", [HumanMessage("x" * 3000) for _ in range(20)])
    db.close()
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[4096:12288] = os.urandom(8192)
    path.write_bytes(bytes(data))
    with pytest.raises(HistoryError, match="corrupted"):
        _ = GistChatMessageHistory("s", GistHistoryStore(path)).messages


def test_bad_rows_and_messages(tmp_path, gist_tiny, caplog):
    path = tmp_path / "h.sqlite"
    db = GistHistoryStore(path)
    h = GistChatMessageHistory("s", db)

    class OddMessage(BaseMessage):
        type: str = "odd"

    with pytest.raises(TypeError, match="not a langchain BaseMessage"):
        h.add_messages(["just a string"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="'odd'"):
        h.add_messages([HumanMessage("ok"), OddMessage(content="x")])
    assert db.count() == 0  # all or nothing
    with pytest.raises(ValueError, match="session_id"):
        GistChatMessageHistory("", db)

    # a state blob damaged on disk is recompressed (with a warning); the answer does not fail
    msgs = [m for t in range(1, 4) for m in turn(t)]
    h.add_messages(msgs)
    chat = ChatGist(model=gist_tiny, keep_recent=0, max_tokens=2, state_store=db)
    ask = [*h.messages, HumanMessage("and box 1?")]
    assert chat.invoke(ask).response_metadata["gist"]["new_compressions"] == 3
    with sqlite3.connect(path) as con:
        con.execute("UPDATE messages SET state = X'00112233' WHERE state IS NOT NULL")
    fresh = ChatGist(model=gist_tiny, keep_recent=0, max_tokens=2, state_store=db)
    with caplog.at_level(logging.WARNING):
        g = fresh.invoke(ask).response_metadata["gist"]
    assert g["new_compressions"] == 3 and "unreadable" in caplog.text

    # a row whose json was damaged names its row
    with sqlite3.connect(path) as con:
        con.execute("UPDATE messages SET message = '{not json' WHERE row = 2")
    with pytest.raises(HistoryError, match="row 2"):
        _ = h.messages
    db.close()
    with pytest.raises(HistoryError, match="closed"):
        _ = h.messages


WRITER = textwrap.dedent(
    """
    import sys
    from langchain_core.messages import HumanMessage
    from langchain_gist_memory import GistHistoryStore
    db = GistHistoryStore(sys.argv[1], timeout=60)
    for i in range(int(sys.argv[3])):
        db.append("shared", [HumanMessage(f"{sys.argv[2]}-{i}")])
    db.close()
    """
)


def test_two_processes_appending_lose_nothing(tmp_path):
    path = tmp_path / "shared.sqlite"
    GistHistoryStore(path).close()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    n = 150
    import langchain_gist_memory

    import gist_memory

    # the packages as this process imported them (independent of how they were installed)
    roots = {os.path.dirname(os.path.dirname(m.__file__)) for m in (gist_memory, langchain_gist_memory)}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(script), str(path), tag, str(n)], stderr=subprocess.PIPE, env=env)
             for tag in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()[-2000:]
    texts = [m.content for m in GistChatMessageHistory("shared", path).messages]
    assert len(texts) == 2 * n
    for tag in ("a", "b"):
        assert [t for t in texts if t.startswith(tag + "-")] == [f"{tag}-{i}" for i in range(n)]


@pytest.mark.filterwarnings("ignore:RunnableWithMessageHistory is deprecated")
def test_runnable_with_message_history(tmp_path, gist_tiny):
    db = GistHistoryStore(tmp_path / "chat.sqlite")
    chat = ChatGist(model=gist_tiny, keep_recent=1, max_tokens=3, state_store=db)
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a careful archivist."), MessagesPlaceholder("history"), ("human", "{input}")]
    )
    chain = RunnableWithMessageHistory(
        prompt | chat,
        lambda sid: GistChatMessageHistory(sid, db),
        input_messages_key="input",
        history_messages_key="history",
    )
    cfg = {"configurable": {"session_id": "s-1"}}
    metas = []
    for t in range(1, 7):
        out = chain.invoke({"input": f"Box {t} holds {t * 3} marbles. Noted?"}, config=cfg)
        metas.append(out.response_metadata["gist"])
    assert db.count("s-1") == 12
    assert [m["compressed_turns"] for m in metas] == [0, 0, 1, 2, 3, 4]
    assert [m["new_compressions"] for m in metas] == [0, 0, 1, 1, 1, 1]
    assert db.count_states() == 4  # on the rows of turns 1-4
    db.close()
