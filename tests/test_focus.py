"""`GistModel.relevance` / `focus`: the reader judges which passage a question is about, and reads it last."""

from __future__ import annotations

import pytest

from gist_memory import GistModel
from gist_memory.eval.heldout.run import apart_config, read_label

PASSAGES = [
    "Records from the Alderwell guild list Malte Vogler as its first treasurer. The guild met in a stone hall.",
    "The harbour of Kettlewick froze in the winter of 1891, and the ferries stopped for six weeks.",
    "Records from the Yarrowmoor guild list Ilian Griebel as its first treasurer. Its seal shows a heron.",
    "A vampire is a mythical creature that subsists by feeding on the vital essence of the living.",
]


def test_a_raw_state_and_its_text_get_the_same_relevance(tiny_base_dir):
    """Rows written after the template head are the reader's own rows for the text, so the query-likelihood of
    a state equals that of the same text in the prompt: one scorer for states and raw passages."""
    gm = GistModel.from_base(tiny_base_dir, apart_config("template"), device="cpu")
    texts = ["The old mill by the river was rebuilt in 1907.", "Oslo has a harbour and a fish market."]
    states = gm.compress(texts)
    q = "When was the mill rebuilt?"
    assert gm.relevance(q, states) == pytest.approx(gm.relevance(q, texts), abs=1e-3)
    assert gm.relevance(q, [states[1], states[0]]) == pytest.approx(gm.relevance(q, states)[::-1], abs=1e-5)


def test_focus_orders_keeps_and_checks(tiny_model):
    gm = tiny_model
    texts = ["Alpha was here in 1901.", "Beta sailed to Oslo.", "Gamma kept bees."]
    rel = gm.relevance("Who sailed to Oslo?", texts)
    order = sorted(range(3), key=lambda i: rel[i])
    assert gm.focus("Who sailed to Oslo?", texts) == [texts[i] for i in order]  # the most relevant last
    assert gm.focus("Who sailed to Oslo?", texts, keep=2) == [texts[i] for i in order[1:]]
    states = gm.compress(texts)
    kept = gm.focus("Who sailed to Oslo?", states, keep=1)
    assert len(kept) == 1 and any(kept[0] is s for s in states)
    assert gm.focus("anything", texts[:1], keep=3) == texts[:1]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="keep"):
            gm.focus("q", texts, keep=bad)
    with pytest.raises(ValueError, match="query"):
        gm.relevance("  ", texts)
    with pytest.raises(ValueError, match="contexts\\[1\\] is empty"):
        gm.relevance("q", ["a text", " "])
    with pytest.raises(ValueError, match="contexts\\[0\\] is a int"):
        gm.relevance("q", [3])


def test_batched_relevance_scores_what_one_pass_each_scores(tiny_base_dir, monkeypatch):
    """Contexts share padded forwards (states of different widths, per-head anchor rows with masked slots, raw
    texts, a last chunk of one): every score is the one a forward of its own gives."""
    from gist_memory import GistConfig

    cfg = GistConfig(anchors="recall", head_anchors=True, head_budget="global", head_budget_cap=4)
    gm = GistModel.from_base(tiny_base_dir, cfg, device="cpu")
    states = gm.compress(PASSAGES)
    assert len({s.num_rows for s in states}) > 1  # the rows differ in width
    mixed = [states[0], PASSAGES[1], states[2], states[3], PASSAGES[0]]
    q = "Who was the first treasurer of the Yarrowmoor guild?"
    one = gm.relevance(q, mixed, batch_size=1)
    from gist_memory.model import batching

    calls = []
    real = batching.padded_forward
    monkeypatch.setattr(batching, "padded_forward", lambda m, rows, **kw: calls.append(len(rows)) or real(m, rows, **kw))
    for bs in (2, 8):
        assert gm.relevance(q, mixed, batch_size=bs) == pytest.approx(one, abs=1e-3)
    assert calls == [2, 2, 5]  # batch 2: two pairs and a last context alone; batch 8: one forward
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            gm.relevance(q, mixed, batch_size=bad)


def test_read_label_names_the_arrangement():
    assert read_label() is None
    assert read_label("relevance") == "relevance order"
    assert read_label("relevance", 1) == "relevance order, top 1"
    with pytest.raises(ValueError, match="relevance read order"):
        read_label("given", 2)
    with pytest.raises(ValueError, match="unknown read order"):
        read_label("random")


@pytest.mark.slow
def test_the_bundled_reader_finds_the_passage_a_question_is_about():
    """Among passages of one template, the question's subject (a name only one passage has) decides: the
    passage about it is read last, as text and as states."""
    gm = GistModel.from_base(None, apart_config("template"), device="cpu")
    q = "Who was the first treasurer of the Yarrowmoor guild?"
    assert gm.focus(q, PASSAGES)[-1] is PASSAGES[2]
    states = gm.compress(PASSAGES)
    assert gm.focus(q, states, keep=1)[0] is states[2]
    q = "When did the harbour of Kettlewick freeze?"
    assert gm.focus(q, PASSAGES, keep=1) == [PASSAGES[1]]
