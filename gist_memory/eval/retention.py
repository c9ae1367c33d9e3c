"""Retention QA evaluation: multiple choice by answer log-likelihood, for gist states, full text, truncation and
no context, all through the same `GistModel` prompts.

Methods:
    gist:  the passages' states (whatever compressor the model has) + the question.
    full:  the passages as raw text in the prompt.
    none:  the question alone.
    trunc: each passage cut to the same number of tokens as its state keeps, as raw text.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from gist_memory.data.qa import QAItem, choice_continuations, question_prompt

METHODS = ("gist", "full", "none", "trunc")


@dataclass
class RetentionResult:
    """Accuracy per method and kind, the achieved compression ratio, and the calibrated gist accuracy."""

    n: int
    accuracy: dict[str, float]
    by_kind: dict[str, dict[str, float]]
    ratio: float
    calibrated: Optional[float] = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        """One markdown table row: ratio and accuracy per method."""
        cells = [f"{self.ratio:.2f}x"] + [f"{self.accuracy.get(m, float('nan')):.3f}" for m in METHODS]
        cal = "" if self.calibrated is None else f"{self.calibrated:.3f}"
        return "| " + " | ".join(cells + [cal]) + " |"


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])


def truncate_to(model, text: str, n_tokens: int) -> str:  # noqa: ANN001 - GistModel
    """The first `n_tokens` tokens of `text` as text."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][: max(1, n_tokens)]
    return model.tokenizer.decode(ids)


def evaluate_retention(
    model,  # noqa: ANN001 - GistModel
    items: Sequence[QAItem],
    methods: Sequence[str] = ("gist", "full", "none"),
    calibrate: bool = True,
) -> RetentionResult:
    """Score every item with every method; accuracy = share of items whose answer has the highest log-prob.

    `calibrated` scores the gist method by log p(choice | states) - log p(choice | no context), which removes
    how likely a name or code is on its own (reported beside, never instead of, plain accuracy).
    """
    t0 = time.perf_counter()
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
    need_none = "none" in methods or (calibrate and "gist" in methods)
    hits: dict[str, list[int]] = {m: [] for m in methods}
    cal_hits: list[int] = []
    kinds: dict[str, dict[str, list[int]]] = {}
    raw, kept = 0, 0
    for item in items:
        q = question_prompt(item)
        conts = choice_continuations(item)
        scores: dict[str, list[float]] = {}
        states = None
        if "gist" in methods or "trunc" in methods:
            states = model.compress(item.passages)
            raw += sum(s.num_tokens for s in states)
            kept += sum(s.num_kept for s in states)
        if "gist" in methods:
            scores["gist"] = model.score_choices(q, conts, states=states)
        if "full" in methods:
            scores["full"] = model.score_choices("\n\n".join(item.passages) + "\n\n" + q, conts)
        if "trunc" in methods:
            assert states is not None
            ctx = "\n\n".join(truncate_to(model, p, s.num_kept) for p, s in zip(item.passages, states))
            scores["trunc"] = model.score_choices(ctx + "\n\n" + q, conts)
        if need_none:
            scores["none"] = model.score_choices(q, conts)
        for m in methods:
            ok = int(_argmax(scores[m]) == item.answer_index)
            hits[m].append(ok)
            kinds.setdefault(item.kind, {}).setdefault(m, []).append(ok)
        if calibrate and "gist" in methods:
            cal = [a - b for a, b in zip(scores["gist"], scores["none"])]
            cal_hits.append(int(_argmax(cal) == item.answer_index))
    n = len(items)
    acc = {m: sum(v) / max(1, len(v)) for m, v in hits.items()}
    by_kind = {k: {m: sum(v) / max(1, len(v)) for m, v in d.items()} for k, d in kinds.items()}
    return RetentionResult(
        n=n,
        accuracy=acc,
        by_kind=by_kind,
        ratio=raw / max(1, kept) if kept else float("nan"),
        calibrated=(sum(cal_hits) / max(1, len(cal_hits))) if cal_hits else None,
        seconds=time.perf_counter() - t0,
    )
