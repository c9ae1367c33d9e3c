"""The default storage dtype (docs/scale.md, "Smaller states") and where a memory's states live (`states=`)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from gist_memory.store import GistMemory, GistStore, key_for
from gist_memory.store.store import DEFAULT_STORAGE_DTYPE, STORAGE_DTYPES
from gist_memory.store.testing import FakeGistModel, HashingEmbedder

TEXTS = ["The Velmora lighthouse was built in 1887.", "The Orvik bridge opened in 1911."]


def test_default_is_int8_for_new_stores_and_memories(tmp_path):
    assert DEFAULT_STORAGE_DTYPE == "int8" and DEFAULT_STORAGE_DTYPE in STORAGE_DTYPES
    model = FakeGistModel()
    st = model.compress(TEXTS[:1])[0]
    store = GistStore(tmp_path / "s")
    assert store.storage_dtype == "int8" and store.key_of(st) == key_for(st.text_hash, st.model_fingerprint)
    mem = GistMemory(model, tmp_path / "m", embedder=HashingEmbedder())
    mem.add_texts(TEXTS, show_progress=False)
    assert mem.storage_dtype == "int8" and mem.store.storage_dtype == "int8"
    key = mem.get(mem.ids()[0]).state_key
    assert key == key_for(mem.get(mem.ids()[0]).state.text_hash, model.fingerprint, "int8")
    mem.close()
    # the choice is recorded; a reopened memory keeps it, and a user can choose another for a new one
    assert GistMemory.load(tmp_path / "m", model=model, embedder=HashingEmbedder()).storage_dtype == "int8"
    assert GistMemory(model, tmp_path / "f", embedder=HashingEmbedder(), storage_dtype="float32").storage_dtype == "float32"
    with pytest.raises(ValueError, match="storage_dtype"):
        GistMemory(model, None, embedder=HashingEmbedder(), storage_dtype="int3")


def test_a_memory_from_before_the_dtype_was_recorded_stays_float32(tmp_path):
    model = FakeGistModel()
    mem = GistMemory(model, tmp_path / "m", embedder=HashingEmbedder(), storage_dtype="float32")
    ids = mem.add_texts(TEXTS, show_progress=False)
    mem.close()
    db = sqlite3.connect(tmp_path / "m" / "memory.sqlite")
    db.execute("DELETE FROM meta WHERE key = 'storage_dtype'")  # as an old memory left it
    db.commit()
    db.close()
    back = GistMemory.load(tmp_path / "m", model=model, embedder=HashingEmbedder())
    assert back.storage_dtype == "float32"
    assert back.states_for([back.get(i) for i in ids]) and back.stats["recomputed"] == 0  # its states still found


def test_states_elsewhere_are_recorded_and_found_again(tmp_path):
    model = FakeGistModel()
    shared = tmp_path / "shared"
    mem = GistMemory(model, tmp_path / "m", embedder=HashingEmbedder(), states=[f"local://{shared}"])
    ids = mem.add_texts(TEXTS, show_progress=False)
    assert mem.stats == {"compressed": 2, "recomputed": 0}
    mem.close()
    assert not (tmp_path / "m" / "states").exists() and len(list(shared.rglob("*.safetensors"))) == 2
    db = sqlite3.connect(tmp_path / "m" / "memory.sqlite")
    assert json.loads(db.execute("SELECT value FROM meta WHERE key = 'states'").fetchone()[0]) == [f"local://{shared}"]
    db.close()
    calls = model.compress_calls
    back = GistMemory.load(tmp_path / "m", model=model, embedder=HashingEmbedder())  # no states=: the recorded one
    got = back.states_for([back.get(i) for i in ids])
    assert len(got) == 2 and model.compress_calls == calls and back.stats["recomputed"] == 0
    assert back.store.stats["hits_disk"] == 2  # read from the recorded store (its only tier)
