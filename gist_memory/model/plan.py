"""Planning a text's compression: token ids, sentence pieces, and how many gist/anchor/pooled rows each piece keeps.

No model code here: the budget rules are pure arithmetic on piece lengths and anchor priorities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from gist_memory.config import SCORED_ANCHOR_POLICIES, GistConfig
from gist_memory.text.split import (
    SentenceSplitter,
    anchor_char_spans,
    anchor_token_mask,
    token_pieces,
    word_token_index,
)


@dataclass
class Plan:
    """How one normalised text is compressed.

    Attributes:
        text: The normalised text.
        ids: (N,) raw token ids.
        pieces: Token spans of the sentence pieces.
        char_spans: Character spans of the pieces (for attribution).
        anchors: (N,) bool, tokens kept raw.
        n_other: Per piece, the gist tokens (`gist`) or pooled rows (`pool*`) it keeps.
        scored: False for a provisional plan of a surprisal policy (anchors by the rule part only, waiting for
            the model's token surprisal; `finish_plan` makes the final one).
        head_scores: With `head_anchors`: (L, H, N) per layer and key/value head, the attention that head pays
            each token while the text is repeated; each head keeps its own `anchors.sum()` best tokens.
        rule_anchors: (N,) bool, the tokens the policy's rule part selects (e.g. `capitalized` of
            `capitalized+recall`), before any model scores; None when unknown.
    """

    text: str
    ids: np.ndarray
    pieces: list[tuple[int, int]]
    char_spans: list[tuple[int, int]]
    anchors: np.ndarray
    n_other: list[int]
    scored: bool = True
    offsets: Optional[np.ndarray] = None
    head_scores: Optional[np.ndarray] = None
    rule_anchors: Optional[np.ndarray] = None

    @property
    def num_tokens(self) -> int:
        """Raw tokens."""
        return int(len(self.ids))

    @property
    def num_kept(self) -> int:
        """Rows this plan keeps (anchors + gists/pooled rows)."""
        return int(self.anchors.sum()) + int(sum(self.n_other))


def piece_budgets(lengths: list[int], ratio: float) -> list[int]:
    """Kept rows per piece so that sum(lengths) / sum(budgets) lands near `ratio` (error diffusion, >= 1 each)."""
    out, carry = [], 0.0
    for n in lengths:
        ideal = n / ratio + carry
        b = max(1, int(math.floor(ideal + 0.5)))
        carry = ideal - b
        out.append(b)
    return out


def needs_scores(config: GistConfig) -> bool:
    """True when the config's anchor policy ranks words by the model's token surprisal."""
    return config.compressor != "pool" and isinstance(config.anchors, str) and config.anchors in SCORED_ANCHOR_POLICIES


def surprisal_priorities(prio: np.ndarray, offsets: np.ndarray, text: str, token_scores: np.ndarray,
                         how: str = "sum") -> np.ndarray:
    """Rule priorities extended by model scores: every word the rule left out gets a priority after the rule's
    (0-2), ranked by its tokens' summed score (`how="sum"`, what the policies use: surprisal or recall) or their
    mean (`"mean"`), highest first, ties by position; all tokens of a word share it, so a kept word is kept
    whole. (Recall ranked by the mean kept common words better and names much worse on the dev items:
    docs/evaluation.md.)"""
    word = word_token_index(offsets, text)
    scores = np.asarray(token_scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != len(prio):
        raise ValueError(f"token_scores has {scores.shape[0]} entries for {len(prio)} tokens")
    out = prio.copy()
    free = (word >= 0) & (prio < 0)
    if not free.any():
        return out
    words = np.unique(word[free])
    total = np.bincount(word[free], weights=scores[free], minlength=int(words.max()) + 1)[words]
    if how == "mean":
        total = total / np.bincount(word[free], minlength=int(words.max()) + 1)[words]
    rank = np.empty(len(words), dtype=np.int64)
    rank[np.lexsort((words, -total))] = np.arange(len(words))
    lookup = np.full(int(words.max()) + 1, -1, dtype=np.int64)
    lookup[words] = rank
    first = int(prio.max()) + 1 if (prio >= 0).any() else 0
    out[free] = max(first, 3) + lookup[word[free]]
    return out


def make_plan(text: str, tokenizer, config: GistConfig, splitter: SentenceSplitter,  # noqa: ANN001
              token_scores: Optional[np.ndarray] = None) -> Plan:  # fmt: skip
    """Tokenise, split into pieces and allocate rows for one normalised, non-empty text.

    `token_scores`: per-token surprisal (-log p under the base model) for the `surprisal` policies; without
    them such a plan is provisional (`scored=False`, rule anchors only).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    if len(ids) == 0:
        raise ValueError("text produced no tokens")
    sents = splitter.split(text)
    return _allocate(text, ids, offsets, sents, config, splitter, token_scores)


def finish_plan(plan: Plan, config: GistConfig, splitter: SentenceSplitter, token_scores: np.ndarray) -> Plan:
    """The final plan of a provisional one, given the model's per-token surprisal (same ids and pieces)."""
    assert plan.offsets is not None
    return _allocate(plan.text, plan.ids, plan.offsets, splitter.split(plan.text), config, splitter, token_scores)


def _allocate(text: str, ids: np.ndarray, offsets: np.ndarray, sents, config: GistConfig,  # noqa: ANN001
              splitter: SentenceSplitter, token_scores: Optional[np.ndarray]) -> Plan:  # fmt: skip
    ratio = config.target_ratio
    min_tokens = int(math.ceil(ratio)) if ratio else 1
    pieces = token_pieces(offsets, sents, config.max_sentence_tokens, min_tokens=min_tokens)
    char_spans = [(int(offsets[s, 0]), int(offsets[e - 1, 1])) for s, e in pieces]

    use_anchors = config.compressor != "pool" and config.anchors != "none"
    prio = np.full(len(ids), -1, dtype=np.int64)
    rule = np.zeros(len(ids), dtype=bool)
    scored = True
    if use_anchors:
        spans = anchor_char_spans(text, sents, config.anchors, splitter)
        prio = anchor_token_mask(offsets, spans, len(text))
        rule = prio >= 0
        if needs_scores(config):
            if token_scores is None:
                scored = False
            else:
                prio = surprisal_priorities(prio, offsets, text, token_scores)
    plan = _rows(text, ids, pieces, char_spans, prio, config)
    plan.scored, plan.offsets, plan.rule_anchors = scored, offsets, rule
    return plan


def _rows(text: str, ids: np.ndarray, pieces: list[tuple[int, int]], char_spans: list[tuple[int, int]],
          prio: np.ndarray, config: GistConfig) -> Plan:  # fmt: skip
    ratio = config.target_ratio
    use_anchors = config.compressor != "pool" and config.anchors != "none"
    lengths = [e - s for s, e in pieces]
    budgets = piece_budgets(lengths, ratio) if ratio else None
    if budgets is not None and use_anchors and config.anchor_budget == "passage":
        anchors, n_other = passage_allocation(pieces, prio, budgets, config)
        return Plan(text=text, ids=ids, pieces=pieces, char_spans=char_spans, anchors=anchors, n_other=n_other)
    anchors = np.zeros(len(ids), dtype=bool)
    n_other: list[int] = []
    for i, (s, e) in enumerate(pieces):
        n = e - s
        cand = np.flatnonzero(prio[s:e] >= 0)
        if budgets is None:
            a = min(len(cand), config.max_anchors_per_sentence)
        elif config.compressor == "gist":
            a = min(len(cand), int(budgets[i] * config.max_anchor_fraction), budgets[i] - 1)
        else:  # pool+anchors: pooled rows only need to exist while non-anchor tokens remain
            a = min(len(cand), budgets[i] - 1 if len(cand) < n else budgets[i])
        a = max(0, a)
        if a:
            order = np.lexsort((cand, prio[s:e][cand]))[:a]  # by priority, then position
            anchors[s + cand[order]] = True
        rest = n - a
        if config.compressor == "gist":
            other = config.gists_per_sentence if budgets is None else max(1, budgets[i] - a)
        elif budgets is None:
            other = int(math.ceil(rest / config.pool_chunk))
        else:
            other = min(rest, max(1 if rest else 0, budgets[i] - a))
        n_other.append(int(other))
    return Plan(text=text, ids=ids, pieces=pieces, char_spans=char_spans, anchors=anchors, n_other=n_other)


def passage_allocation(
    pieces: list[tuple[int, int]], prio: np.ndarray, budgets: list[int], config: GistConfig
) -> tuple[np.ndarray, list[int]]:
    """Anchors chosen across the whole text against one budget, then the other rows spread over the pieces.

    Candidates are taken as runs (adjacent tokens of one priority in one piece, i.e. whole numbers, codes and
    names) in order of priority, then position; a run that does not fit is skipped for shorter later ones.
    Every piece keeps at least one gist (`gist`) or one pooled row while it has unanchored tokens
    (`pool+anchors`); the rows left go to the pieces in proportion to their unanchored tokens. The total never
    exceeds `sum(budgets)`, so the achieved ratio stays at the target.
    """
    gist = config.compressor == "gist"
    total = int(sum(budgets))
    n_tok = len(prio)
    piece_of = np.zeros(n_tok, dtype=np.int64)
    for i, (s, e) in enumerate(pieces):
        piece_of[s:e] = i
    lengths = np.asarray([e - s for s, e in pieces], dtype=np.int64)
    cand = np.flatnonzero(prio >= 0)
    cand = cand[np.lexsort((cand, prio[cand]))]
    runs: list[list[int]] = []
    for t in cand.tolist():
        if runs and t == runs[-1][-1] + 1 and prio[t] == prio[runs[-1][-1]] and piece_of[t] == piece_of[runs[-1][-1]]:
            runs[-1].append(t)
        else:
            runs.append([t])
    cap = int(total * config.max_anchor_fraction) if gist else total
    anchors = np.zeros(n_tok, dtype=bool)
    per_piece = np.zeros(len(pieces), dtype=np.int64)

    def needed(a: np.ndarray) -> int:
        return len(pieces) if gist else int(np.count_nonzero(lengths - a > 0))

    used = 0
    for run in runs:
        k = len(run)
        if used + k > cap:
            continue
        trial = per_piece.copy()
        trial[piece_of[run[0]]] += k
        if total - used - k < needed(trial):
            continue
        anchors[run] = True
        per_piece = trial
        used += k
    rest = lengths - per_piece
    base = np.ones(len(pieces), dtype=np.int64) if gist else (rest > 0).astype(np.int64)
    extra = total - used - int(base.sum())
    other = base.copy()
    if extra > 0 and rest.sum() > 0:
        room = np.maximum(rest - base, 0) if not gist else rest.astype(np.float64)
        share = extra * room / max(1e-9, float(room.sum()))
        add = np.floor(share).astype(np.int64)
        left = extra - int(add.sum())
        for i in np.argsort(-(share - add), kind="stable")[:left]:
            add[i] += 1
        if not gist:
            add = np.minimum(add, np.maximum(rest - base, 0))
        other += add
    return anchors, [int(x) for x in other]
