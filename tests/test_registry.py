"""The one passage registry both integrations use (gist_memory.registry)."""

from __future__ import annotations

import pytest

from gist_memory.registry import MIN_PASSAGE_CHARS, PassageRegistry

P = [
    "Maren Voss became the chief curator in 1912. The archive code is QX-4471!",
    "The quick brown fox jumps over the lazy dog. It was a sunny day in Paris.",
    "Python is a programming language. Numbers like 2,318 metres and 3.14 matter.",
]


def test_rules_short_passages_bounds_and_order(tiny_model):
    reg = PassageRegistry(tiny_model, max_passages=2)
    short = "Too short to match."
    assert len(short) < MIN_PASSAGE_CHARS
    k_short = reg.add_texts([short], compress=False)[0]
    assert k_short in reg and reg.splice(f"Context: {short} Question?").keys == []  # known, never matched
    k0, k1 = reg.add_texts(P[:2], compress=False)
    assert k_short not in reg and len(reg) == 2  # the oldest registration was forgotten
    sp, states = reg.splice_states(f"Context:\n{P[1]}\n\n{P[0]}\n\nQuestion: who?")
    assert sp.keys == [k1, k0] and "Question: who?" in sp.text and P[0] not in sp.text
    assert [s.text_hash for s in states] == [s.text_hash for s in tiny_model.compress([P[1], P[0]])]
    with pytest.raises(ValueError, match="max_passages"):
        PassageRegistry(tiny_model, max_passages=0)


def test_foreign_states_are_refused_and_deleted_passages_read_as_text(tiny_model, tiny_base_dir):
    from gist_memory import GistConfig, GistMemory, GistModel
    from gist_memory.testing import HashingEmbedder

    other = GistModel.from_base(tiny_base_dir, GistConfig(gists_per_sentence=3), device="cpu")
    reg = PassageRegistry(tiny_model)
    with pytest.raises(ValueError, match="another model"):
        reg.add_state(P[0], other.compress([P[0]])[0])
    with pytest.raises(ValueError, match="another text"):
        reg.add_state(P[0], tiny_model.compress([P[1]])[0])
    mem = GistMemory(tiny_model, None, embedder=HashingEmbedder())
    ids = mem.add_texts(P, show_progress=False)
    keys = reg.add_hits(mem, [mem.get(i) for i in ids[:2]])
    prompt = f"{P[0]}\n\n{P[1]}\n\nQ?"
    sp, states = reg.splice_states(prompt)
    assert sp.keys == keys and len(states) == 2
    mem.delete([ids[0]])
    sp, states = reg.splice_states(prompt)
    assert sp.keys == keys[1:] and P[0] in sp.text and len(states) == 1  # deleted: read as text, forgotten
    assert keys[0] not in reg
    mem.close()


def test_one_default_per_model(tiny_model):
    assert PassageRegistry.for_model(tiny_model) is PassageRegistry.for_model(tiny_model)
