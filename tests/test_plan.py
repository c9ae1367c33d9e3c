"""Row budgets of a plan: the passage-level anchor allocation (pure arithmetic) and its effect on real text."""

from __future__ import annotations

import numpy as np
import pytest

from gist_memory import GistConfig
from gist_memory.model.plan import make_plan, passage_allocation, piece_budgets
from gist_memory.text import SentenceSplitter


def _prio(n: int, cands: dict[int, int]) -> np.ndarray:
    p = np.full(n, -1, dtype=np.int64)
    for t, v in cands.items():
        p[t] = v
    return p


@pytest.mark.parametrize("compressor", ["gist", "pool+anchors"])
def test_total_rows_never_exceed_the_budget_and_every_piece_keeps_a_row(compressor):
    rng = np.random.default_rng(0)
    cfg = GistConfig(target_ratio=4.0, anchors="capitalized", compressor=compressor, max_anchor_fraction=0.75)
    for _ in range(300):
        lengths = rng.integers(1, 40, size=rng.integers(1, 8)).tolist()
        pieces, s = [], 0
        for n in lengths:
            pieces.append((s, s + n))
            s += n
        prio = np.where(rng.random(s) < rng.random(), rng.integers(0, 3, size=s), -1)
        budgets = piece_budgets(lengths, cfg.target_ratio)
        anchors, other = passage_allocation(pieces, prio, budgets, cfg)
        assert int(anchors.sum()) + sum(other) <= sum(budgets)
        assert not anchors[prio < 0].any()  # only candidates become anchors
        for (a, b), o in zip(pieces, other):
            rest = (b - a) - int(anchors[a:b].sum())
            if compressor == "gist":
                assert o >= 1
            else:
                assert (o >= 1) == (rest > 0) and o <= rest
        if compressor == "gist":
            assert anchors.sum() <= int(sum(budgets) * cfg.max_anchor_fraction)


def test_whole_runs_by_priority_then_position():
    # two pieces of 20 tokens; budget 10 rows; a 5-token code (prio 0) late in piece 1, names (prio 1) early
    pieces = [(0, 20), (20, 40)]
    prio = _prio(40, {2: 1, 3: 1, 30: 0, 31: 0, 32: 0, 33: 0, 34: 0, 10: 1})
    cfg = GistConfig(target_ratio=4.0, anchors="capitalized", max_anchor_fraction=0.75)
    anchors, other = passage_allocation(pieces, prio, [5, 5], cfg)
    assert anchors[30:35].all()  # the whole code, although it sits in one sentence whose own budget is 5
    assert anchors[[2, 3]].all()  # then the earliest name run (2 tokens); cap is 7, so the 1-token name waits
    assert not anchors[10] and int(anchors.sum()) == 7
    assert sum(other) == 3 and min(other) >= 1


def test_a_run_that_does_not_fit_is_skipped_for_a_shorter_one():
    pieces = [(0, 16)]
    prio = _prio(16, {0: 0, 1: 0, 2: 0, 3: 0, 8: 0})  # a 4-token number, then a 1-token number
    cfg = GistConfig(target_ratio=4.0, anchors="capitalized", max_anchor_fraction=0.5)
    anchors, other = passage_allocation(pieces, prio, [4], cfg)  # cap 2 rows of anchors
    assert anchors.tolist() == [i == 8 for i in range(16)]
    assert other == [3]


def test_passage_budget_keeps_a_code_whole_where_the_sentence_budget_cut_it(tiny_model):
    text = ("The Grimholm archive's catalogue code is VZ-4559-QK-7781. The archive stands by the river. "
            "It was built of grey stone and has been repaired many times over the years by local workers.")
    tok, sp = tiny_model.tokenizer, SentenceSplitter()
    code = text.index("VZ-4559-QK-7781")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    idx = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < code + 15 and e > code]
    base = dict(target_ratio=4.0, anchors="capitalized", max_sentence_tokens=48, max_anchor_fraction=0.75)
    plans = {mode: make_plan(text, tok, GistConfig(**base, anchor_budget=mode), sp) for mode in ("passage", "sentence")}
    assert plans["passage"].anchors[idx].all()
    assert not plans["sentence"].anchors[idx].all()
    for p in plans.values():  # same budget either way
        assert abs(p.num_tokens / p.num_kept - 4.0) <= 0.4 * 4.0


def test_anchor_budget_is_validated_and_serialised():
    with pytest.raises(ValueError, match="anchor_budget"):
        GistConfig(anchor_budget="document")
    d = GistConfig(target_ratio=4.0, anchor_budget="sentence").to_dict()
    assert GistConfig.from_dict(d).anchor_budget == "sentence"
    assert GistConfig().anchor_budget == "passage"


def test_surprisal_ranks_whole_words_after_the_rule_and_waits_for_scores(tiny_model):
    from gist_memory.model.plan import finish_plan

    tok = tiny_model.tokenizer
    text = "The shutters of the boathouse were painted teal. Harlow kept the key."
    splitter = SentenceSplitter.from_config(GistConfig())
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = enc["offset_mapping"]
    t0 = text.index("teal")
    teal = [i for i, (s, e) in enumerate(spans) if s < t0 + 4 and e > t0]
    scores = np.ones(len(spans))
    scores[teal] = 9.0  # the model found "teal" surprising
    for policy, rule_first in (("surprisal", False), ("capitalized+surprisal", True)):
        cfg = GistConfig(target_ratio=4.0, anchors=policy, compressor="pool+anchors", max_anchor_fraction=0.75)
        provisional = make_plan(text, tok, cfg, splitter)
        assert not provisional.scored  # no scores yet: a provisional plan
        final = finish_plan(provisional, cfg, splitter, scores)
        assert final.scored and final.anchors[teal].all()  # every token of the surprising word, kept whole
        harlow = [i for i, (s, e) in enumerate(spans) if text[s:e].strip() == "Harlow"]
        assert bool(final.anchors[harlow].all()) or not rule_first
        assert final.num_kept == provisional.num_kept  # the same row budget, spent differently
    with pytest.raises(ValueError, match="token_scores"):
        finish_plan(provisional, cfg, splitter, np.ones(3))
    # a rule policy needs no scores
    assert make_plan(text, tok, GistConfig(target_ratio=4.0, anchors="capitalized"), splitter).scored


def test_word_ranking_by_mean_or_by_sum_of_token_scores():
    """`how="mean"` ranks by the mean over a word's tokens, `"sum"` (the policies' ranking) by their total."""
    from gist_memory.model.plan import surprisal_priorities

    text = "aa bbbbbb cc"
    offsets = np.array([[0, 2], [3, 5], [5, 7], [7, 9], [10, 12]])  # "bbbbbb" is three tokens
    scores = np.array([0.5, 0.3, 0.3, 0.3, 0.0])
    prio = np.full(5, -1)
    by_sum = surprisal_priorities(prio, offsets, text, scores)
    by_mean = surprisal_priorities(prio, offsets, text, scores, how="mean")
    assert by_sum[1] < by_sum[0]  # 0.9 summed beats 0.5
    assert by_mean[0] < by_mean[1]  # 0.5 beats a mean of 0.3
    assert len(set(by_mean[1:4])) == 1  # a word's tokens share one priority
