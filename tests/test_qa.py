"""Retention QA builder: item invariants, determinism, (de)serialisation, prompts, shipped assets."""

from __future__ import annotations

import json
import random
import re

import pytest

from gist_memory.data import qa_build
from gist_memory.data.qa import (
    ASSETS_DIR,
    BLANK,
    KINDS,
    QABuildError,
    QAItem,
    answer_in_prediction,
    choice_continuations,
    exact_match,
    load_qa,
    normalize_answer,
    pick_choice,
    question_prompt,
    save_qa,
)
from gist_memory.data.qa_build import build_qa

ASSETS = ASSETS_DIR


def _occurs(needle: str, text: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", text, flags=re.I) is not None


@pytest.fixture(scope="module")
def passages() -> list[dict]:
    rows = [json.loads(line) for line in (ASSETS / "sample_corpus" / "passages.jsonl").open(encoding="utf-8")]
    return [r for r in rows if r["source"] == "wiki"]


@pytest.fixture(scope="module")
def items(passages) -> list[QAItem]:
    return build_qa(passages, n=36, seed=0)


def check_item(it: QAItem) -> None:
    """The invariants every item of its kind must hold."""
    assert it.kind in KINDS
    assert len(it.choices) == 4 and len(set(it.choices)) == 4
    assert it.choices[it.answer_index] == it.answer
    norm = [normalize_answer(c) for c in it.choices]
    assert len(set(norm)) == 4
    for i, a in enumerate(norm):  # no choice hides inside another
        assert all(i == j or a not in b for j, b in enumerate(norm))
    holder = it.passages[it.answer_passage]
    assert it.answer in holder
    if it.kind == "planted_single":
        assert len(it.passages) == 1
        assert it.meta["fact"] in holder
        for c in it.choices:
            if c != it.answer:
                assert not _occurs(c, holder), (c, holder)
    elif it.kind == "planted_distractors":
        assert len(it.passages) == 4
        subjects = it.meta["subjects"]
        assert len(set(subjects)) == 4
        assert it.subject in it.question
        assert [p for p in it.passages if _occurs(it.subject, p)] == [holder]
        for s, p in zip(subjects, it.passages, strict=True):
            assert [q for q in it.passages if _occurs(s, q)] == [p]
        for c in it.choices:  # each planted value sits in exactly one passage
            assert sum(_occurs(c, p) for p in it.passages) == 1
    else:
        assert len(it.passages) == 1
        orig = it.meta["original"]
        assert not _occurs(orig, holder)
        if not orig[0].isdigit():
            assert orig.casefold() not in holder.casefold()
        assert BLANK in it.question and it.answer not in it.question
        sentence = it.question.removeprefix("Fill in the blank: ").replace(BLANK, it.answer)
        assert sentence in holder
        for c in it.choices:
            if c != it.answer:
                assert not _occurs(c, holder)


def test_items_hold_their_invariants(items):
    assert [it.kind for it in items[:3]] == list(KINDS)
    assert {it.kind: sum(1 for x in items if x.kind == it.kind) for it in items} == dict.fromkeys(KINDS, 12)
    for it in items:
        check_item(it)
    assert len({it.id for it in items}) == len(items)


def test_planted_fact_at_sentence_boundary(passages):
    rng = random.Random(1)
    it = qa_build.make_planted_single(passages[0]["text"], rng)
    text = it.passages[0]
    k = it.meta["inserted_after_sentences"]
    spans = qa_build.sentence_spans(text)
    assert text[spans[k][0] : spans[k][1]] == it.meta["fact"]
    assert text.replace(it.meta["fact"] + " ", "", 1).replace(" " + it.meta["fact"], "", 1) == passages[0]["text"]


def test_determinism(passages):
    a = [x.to_dict() for x in build_qa(passages, n=12, seed=5)]
    b = [x.to_dict() for x in build_qa(passages, n=12, seed=5)]
    c = [x.to_dict() for x in build_qa(passages, n=12, seed=6)]
    assert a == b
    assert a != c


def test_save_load_roundtrip(items, tmp_path):
    p = tmp_path / "qa.jsonl"
    save_qa(items, p)
    back = load_qa(p)
    assert [x.to_dict() for x in back] == [x.to_dict() for x in items]
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n', encoding="utf-8")
    with pytest.raises(QABuildError, match="not a QA item"):
        load_qa(tmp_path / "bad.jsonl")
    with pytest.raises(QABuildError, match="no QA file"):
        load_qa(tmp_path / "missing.jsonl")


def test_prompts_and_matching(items):
    it = items[0]
    assert question_prompt(it) == f"Question: {it.question}\nAnswer:"
    assert it.no_context_prompt == question_prompt(it)
    assert choice_continuations(it) == [" " + c for c in it.choices]
    assert normalize_answer("The  QX-4471.") == "qx4471"
    assert normalize_answer("2,318 metres") == "2318 metres"
    assert exact_match("qx-4471", "QX-4471")
    assert not exact_match("QX-4472", "QX-4471")
    assert answer_in_prediction("The catalogue code is QX-4471.", "QX-4471")
    assert not answer_in_prediction("The code is QX-44710.", "QX-4471")
    assert pick_choice([-3.0, -1.0, -1.0, -2.0]) == 1


def test_swap_refuses_partial_tokens():
    text = "In the 1990s the band formed; by 1990 it toured widely across many countries."
    assert qa_build.swap_entity(text, "1990", "year", "1955") is None
    text2 = "Stanley Kubrick directed it in 1968. Kubrick later moved to England."
    new = qa_build.swap_entity(text2, "Stanley Kubrick", "person", "Maren Vosswick")
    assert new is not None and "Kubrick" not in new and new.count("Vosswick") == 2


def test_odd_text_does_not_crash():
    texts = [
        "🚀🚀 " * 40,
        "東京は日本の首都であり、世界最大の都市圏の一つです。" * 10,
        "Zürich — Ærøskøbing, naïve café in 1887 hosted 2,400 guests and the ÖBB orchestra. " * 5,
        "هذه فقرة باللغة العربية تتحدث عن التاريخ والثقافة. " * 10,
    ]
    rng = random.Random(0)
    for t in texts:
        assert qa_build.make_cloze_swap(t, rng) is None or qa_build.make_cloze_swap(t, rng).kind == "cloze_swap"
    padded = [t + " " + " ".join(["word"] * 30) for t in texts]
    out = build_qa(padded, n=4, kinds=("planted_single", "planted_distractors"), seed=0, min_words=1, max_words=10_000)
    for it in out:
        check_item(it)


def test_bad_requests():
    with pytest.raises(QABuildError, match="unknown QA kind"):
        build_qa(["a b c"], kinds=("nope",))
    with pytest.raises(QABuildError, match="need at least 4 passages"):
        build_qa(["word " * 50] * 3, n=2)
    with pytest.raises(QABuildError, match="could not build"):
        build_qa(["plain lowercase words only here " * 10] * 5, n=3, kinds=("cloze_swap",))


def test_shipped_assets():
    path = ASSETS / "qa_dev.jsonl"
    assert path.stat().st_size < 1_000_000
    dev = load_qa()
    assert 120 <= len(dev) <= 200
    kinds = {k: sum(1 for it in dev if it.kind == k) for k in KINDS}
    assert min(kinds.values()) >= 40
    for it in dev:
        check_item(it)
    sc = ASSETS / "sample_corpus"
    assert sum(p.stat().st_size for p in sc.iterdir()) < 200_000
    rows = [json.loads(line) for line in (sc / "passages.jsonl").open(encoding="utf-8")]
    assert len(rows) >= 40
    assert all({"id", "title", "text", "source", "license", "url"} <= set(r) for r in rows)
    attribution = (sc / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "CC BY-SA 4.0" in attribution
    # the QA passages and the sample corpus come from different articles
    qa_docs = {d for it in dev for d in it.meta["doc_ids"]}
    assert not qa_docs & {"wiki:" + r["title"] for r in rows if r["source"] == "wiki"}


def test_eval_qa_keeps_the_old_import_path():
    """`gist_memory.eval.qa` (0.2) re-exports the QA items from `gist_memory.data`."""
    from gist_memory.eval import qa as old

    assert old.QAItem is QAItem and old.build_qa is build_qa and old.load_qa is load_qa
    assert old.FACT_TEMPLATES is qa_build.FACT_TEMPLATES and old.ASSETS_DIR == ASSETS_DIR
