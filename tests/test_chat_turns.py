"""`gist_memory.chat.TurnCompressor`: each turn compressed once, states served by content key, RAM bounded by bytes
(and optionally by count), a store asked before compressing and never trusted for another model's state."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import pytest

from gist_memory.chat import StateEntry, StateStore, TurnCompressor


@dataclass
class FakeState:
    text: str
    model_fingerprint: str
    nbytes: int


class FakeModel:
    def __init__(self, fingerprint: str = "fp-a", nbytes: int = 100) -> None:
        self.fingerprint = fingerprint
        self.nbytes = nbytes
        self.compressed: list[str] = []

    def state_key(self, text: str) -> str:
        return hashlib.sha256(f"{text}:{self.fingerprint}".encode()).hexdigest()

    def compress(self, texts):  # noqa: ANN001, ANN201
        self.compressed += list(texts)
        return [FakeState(t, self.fingerprint, self.nbytes) for t in texts]


class DictStore:
    def __init__(self) -> None:
        self.data: dict[str, FakeState] = {}
        self.puts: list[StateEntry] = []

    def get_states(self, keys, fingerprint):  # noqa: ANN001, ANN201
        return {k: self.data[k] for k in keys if k in self.data}

    def put_states(self, entries):  # noqa: ANN001, ANN201
        self.puts += entries
        self.data.update({e.key: e.state for e in entries})


def test_each_text_compressed_once_in_order_and_duplicates_share_one_state():
    m, c = FakeModel(), TurnCompressor()
    states, stats = c.states_for(m, ["a", "b", "a"])
    assert [s.text for s in states] == ["a", "b", "a"] and states[0] is states[2]
    assert m.compressed == ["a", "b"] and stats["compressed"] == 2 and c.compressed_texts == 2
    states, stats = c.states_for(m, ["b", "c"])
    assert [s.text for s in states] == ["b", "c"] and m.compressed == ["a", "b", "c"]
    assert stats["cached"] == 1 and stats["compressed"] == 1


def test_ram_is_bounded_by_bytes_least_recently_used_first():
    m, c = FakeModel(nbytes=100), TurnCompressor(max_bytes=250)
    c.states_for(m, ["a", "b"])
    c.states_for(m, ["a"])  # a is now the most recent
    c.states_for(m, ["c"])  # 300 bytes > 250: b goes
    assert len(c) == 2 and c.nbytes == 200
    c.states_for(m, ["a", "c"])
    assert m.compressed == ["a", "b", "c"]
    c.states_for(m, ["b"])
    assert m.compressed[-1] == "b"
    c.max_bytes = 100
    assert len(c) == 1 and c.nbytes == 100
    big = FakeModel(fingerprint="fp-big", nbytes=1000)
    (st,), _ = c.states_for(big, ["huge"])  # larger than the budget: returned, not kept
    assert st.text == "huge" and c.nbytes <= 100
    with pytest.raises(ValueError):
        c.max_bytes = -1


def test_optional_count_bound_and_clear():
    m, c = FakeModel(), TurnCompressor(max_states=2)
    c.states_for(m, ["a", "b", "c"])
    assert len(c) == 2
    c.max_states = 0
    assert len(c) == 0 and c.nbytes == 0
    c.max_states = None
    c.states_for(m, ["a", "b", "c"])
    assert len(c) == 3
    c.clear()
    assert len(c) == 0 and c.nbytes == 0


def test_store_is_asked_first_filled_after_and_never_serves_another_model():
    store = DictStore()
    assert isinstance(store, StateStore)
    m = FakeModel()
    c = TurnCompressor()
    _, stats = c.states_for(m, ["a", "b"], message_ids=[["m1"], []], store=store)
    assert stats["compressed"] == 2 and [e.message_ids for e in store.puts] == [["m1"], []]
    fresh = TurnCompressor()
    _, stats = fresh.states_for(m, ["a", "b"], store=store)
    assert stats["loaded"] == 2 and stats["compressed"] == 0 and m.compressed == ["a", "b"]
    # a store that hands back a state of another model under the asked key is not trusted
    k = m.state_key("x")
    store.data[k] = FakeState("x", "fp-other", 10)
    (st,), stats = fresh.states_for(m, ["x"], store=store)
    assert st.model_fingerprint == "fp-a" and stats["compressed"] == 1


def test_a_failing_store_is_logged_and_the_states_still_served(caplog):
    class Broken(DictStore):
        def put_states(self, entries):  # noqa: ANN001, ANN201
            raise OSError("disk full")

    m, c = FakeModel(), TurnCompressor()
    with caplog.at_level(logging.WARNING, logger="gist_memory.chat"):
        states, _ = c.states_for(m, ["a"], store=Broken())
    assert states[0].text == "a" and "disk full" in caplog.text
