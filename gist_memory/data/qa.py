"""Retention QA items: the record (`QAItem`), the prompt a reader sees, answer matching, and jsonl I/O.

`question_prompt(item)` is the text the reader sees after the context (or with none, for the no-context baseline),
`choice_continuations(item)` the strings to score as log p(choice | context + question), `normalize_answer` /
`exact_match` / `answer_in_prediction` match generated answers. How items are made from held-out text:
`gist_memory.data.qa_build`. Pure Python (no torch).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

KINDS: tuple[str, ...] = ("planted_single", "planted_distractors", "cloze_swap")
BLANK = "____"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


class QABuildError(ValueError):
    """QA items could not be built from the given texts (too few, too short, unknown kind, ...)."""


@dataclass
class QAItem:
    """One multiple-choice retention question.

    Attributes:
        id: Stable id within its set.
        kind: `planted_single`, `planted_distractors` or `cloze_swap`.
        passages: The context passages, in the order the reader gets them.
        question: The question text (without the `Question:`/`Answer:` frame; see `question_prompt`).
        answer: The correct answer string (one of `choices`).
        choices: Four candidate answers of the same type.
        answer_index: Index of `answer` in `choices`.
        answer_passage: Index of the passage that holds the answer.
        subject: The subject the question names (planted kinds), else "".
        meta: Provenance and construction details (template, insertion sentence, swapped entity, source doc ids).
    """

    id: str
    kind: str
    passages: list[str]
    question: str
    answer: str
    choices: list[str]
    answer_index: int
    answer_passage: int = 0
    subject: str = ""
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QAItem:
        """Inverse of `to_dict` (unknown keys are kept in `meta`)."""
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        item = cls(**kwargs)
        if extra:
            item.meta = {**item.meta, **extra}
        if item.choices[item.answer_index] != item.answer:
            raise ValueError(f"QA item {item.id!r}: choices[answer_index] != answer")
        return item

    @property
    def no_context_prompt(self) -> str:
        """The prompt of the no-context baseline (the same question frame, no passages)."""
        return question_prompt(self)


# --------------------------------------------------------------------------------------------------------------
# prompts and answer matching


def question_prompt(item: QAItem) -> str:
    """The text the reader sees after the (compressed or raw) context: `Question: ...\\nAnswer:`."""
    return f"Question: {item.question}\nAnswer:"


def choice_continuations(item: QAItem) -> list[str]:
    """The continuations to score, one per choice, each with a leading space (`" QX-4471"`)."""
    return [" " + c for c in item.choices]


def context_text(item: QAItem, sep: str = "\n\n") -> str:
    """The passages joined as raw text (the full-text baseline's context)."""
    return sep.join(item.passages)


def full_text_prompt(item: QAItem) -> str:
    """Context and question as one plain-text prompt (full-text baseline without a chat template)."""
    return context_text(item) + "\n\n" + question_prompt(item)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"‘", "’", "“", "”", "–", "—"}


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces.

    `"QX-4471"` -> `"qx4471"`, `"2,318 metres"` -> `"2318 metres"`, `"The Morning Heron."` -> `"morning heron"`.
    """
    s = s.lower()
    s = "".join(c for c in s if c not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answer: str) -> bool:
    """Normalised equality."""
    return normalize_answer(prediction) == normalize_answer(answer)


def answer_in_prediction(prediction: str, answer: str) -> bool:
    """Whether the normalised answer occurs as whole words in the normalised prediction (lenient EM)."""
    a, p = normalize_answer(answer), normalize_answer(prediction)
    return bool(a) and re.search(r"(?<!\w)" + re.escape(a) + r"(?!\w)", p) is not None


def pick_choice(scores: Sequence[float]) -> int:
    """Index of the best-scoring choice (first one on ties)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


# --------------------------------------------------------------------------------------------------------------
# files


def save_qa(items: Iterable[QAItem], path: Union[str, Path]) -> None:
    """Writes items as JSON lines (temporary file renamed into place)."""
    from gist_memory.data.document import write_jsonl

    write_jsonl(path, (it.to_dict() for it in items))


def load_qa(path: Optional[Union[str, Path]] = None) -> list[QAItem]:
    """Reads items written by `save_qa` (default: the shipped `qa_dev.jsonl`).

    Raises:
        QABuildError: The file is missing or a line is not a QA item.
    """
    p = Path(path) if path is not None else ASSETS_DIR / "qa_dev.jsonl"
    if not p.is_file():
        raise QABuildError(f"no QA file at {str(p)!r}")
    items = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(QAItem.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError, ValueError, IndexError) as e:
                raise QABuildError(f"{p}:{lineno}: not a QA item ({e})") from e
    return items
