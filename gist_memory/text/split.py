"""Sentence splitting with spaCy and the mapping from sentences/anchors to token spans.

The splitter that trains a model must be the one that serves it: its settings live in `GistConfig`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Optional, Union

import numpy as np

# a word with a digit (numbers, dates, codes such as QX-4471), or a capitalised word
_WORD = re.compile(r"[^\W_](?:[\w'’.\-/:,]*[^\W_])?", re.UNICODE)
_STOP_CAPS = frozenset(
    "a an and as at but by for from he her his i if in into is it its of on or our she so than that the their "
    "then there these they this those to was we were what when where which while who with you your after "
    "before during however also although because each many most some such one".split()
)


def normalize_text(text: str) -> str:
    """The normalisation applied before hashing and compressing: NFC, `\\r\\n` -> `\\n`, outer whitespace stripped.

    Inner whitespace is kept (code and lists depend on it).
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text holds a lone surrogate at character {e.start} (not valid Unicode text); "
                         "decode the source bytes with errors='replace' first") from e
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return text.strip()


@lru_cache(maxsize=8)
def _load_nlp(splitter: str, spacy_model: Optional[str], language: str):  # noqa: ANN202 - spaCy Language
    import spacy

    if splitter == "senter":
        try:
            nlp = spacy.load(spacy_model, exclude=["lemmatizer"])  # type: ignore[arg-type]
        except OSError as e:
            raise ValueError(f"spaCy pipeline {spacy_model!r} for splitter='senter' is not installed: {e}") from e
        if "senter" in nlp.component_names and "parser" in nlp.component_names:
            nlp.disable_pipe("parser")
        if "senter" in nlp.disabled:
            nlp.enable_pipe("senter")
    else:
        try:
            nlp = spacy.blank(language)
        except Exception as e:  # spaCy raises ImportError/ValueError for unknown languages
            raise ValueError(f"spaCy has no blank pipeline for language {language!r}: {e}") from e
        nlp.add_pipe("sentencizer")
    nlp.max_length = 50_000_000
    return nlp


class SentenceSplitter:
    """Splits text into sentence character spans and picks anchor spans.

    Args:
        splitter: `sentencizer` (rule-based, no model) or `senter` (a trained spaCy pipeline).
        spacy_model: The pipeline for `senter` (e.g. `en_core_web_sm`); its `ner`, if any, feeds `entities`.
        language: Language code for `spacy.blank` with the `sentencizer`.
    """

    def __init__(self, splitter: str = "sentencizer", spacy_model: Optional[str] = None, language: str = "en"):
        self.splitter = splitter
        self.spacy_model = spacy_model
        self.language = language
        self.nlp = _load_nlp(splitter, spacy_model, language)

    @classmethod
    def from_config(cls, config) -> SentenceSplitter:  # noqa: ANN001 - GistConfig (avoid import cycle)
        """The splitter a `GistConfig` names."""
        return cls(config.splitter, config.spacy_model, config.language)

    def split(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the sentences of `text` (whitespace trimmed; empty sentences dropped).

        Newline runs also end a sentence (lists, code and headings rarely carry full stops).
        """
        spans: list[tuple[int, int]] = []
        if not text.strip():
            return spans
        # paragraph/line breaks are hard boundaries; spaCy splits inside each block
        for block in re.finditer(r"[^\n]+", text):
            b0 = block.start()
            doc = self.nlp(block.group())
            for sent in doc.sents:
                s, e = _trim(text, b0 + sent.start_char, b0 + sent.end_char)
                if e > s:
                    spans.append((s, e))
        return spans

    def entity_spans(self, text: str) -> list[tuple[int, int]]:
        """spaCy NER spans when the pipeline has `ner`, else an empty list."""
        if "ner" not in self.nlp.pipe_names:
            return []
        return [(ent.start_char, ent.end_char) for ent in self.nlp(text).ents]


def _trim(text: str, s: int, e: int) -> tuple[int, int]:
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def anchor_char_spans(
    text: str,
    sentence_spans: Sequence[tuple[int, int]],
    policy: Union[str, Callable[[str], list[tuple[int, int]]]],
    splitter: Optional[SentenceSplitter] = None,
) -> list[tuple[int, int, int]]:
    """Character spans whose tokens keep their raw K/V, with a priority (lower is kept first).

    Policies: `none`; `capitalized` (numbers/codes first, then capitalised words that are not a stop word);
    `surprisal` (no rule spans: words are ranked from the model's reading, see `word_token_index`);
    `capitalized+surprisal` (the `capitalized` spans here; surprisal ranks the other words after them);
    `recall` (no rule spans: words are ranked by the attention the model pays them while reproducing the text);
    `capitalized+recall` (the `capitalized` spans here; recall ranks the other words after them);
    `entities` (the same plus spaCy NER spans when the pipeline has `ner`); or a callable on the text.

    Returns:
        A list of `(start, end, priority)`.
    """
    if policy in ("none", "surprisal", "recall"):
        return []  # `surprisal` / `recall` rank words later, from the model's reading (`word_token_index`)
    if callable(policy):
        out = []
        for s, e in policy(text):
            if not (0 <= int(s) < int(e) <= len(text)):
                raise ValueError(f"anchor callable returned span ({s}, {e}) outside the text of length {len(text)}")
            out.append((int(s), int(e), 0))
        return out
    out = []
    for m in _WORD.finditer(text):
        w = m.group()
        if any(c.isdigit() for c in w):
            out.append((m.start(), m.end(), 0))
        elif w[0].isupper() and w.lower() not in _STOP_CAPS:
            out.append((m.start(), m.end(), 1 if w.isupper() or len(w) > 1 else 2))
    if policy == "entities" and splitter is not None:
        out.extend((s, e, 1) for s, e in splitter.entity_spans(text))
    return out


def word_token_index(offsets: np.ndarray, text: str) -> np.ndarray:
    """Per token: the index of the word it belongs to (words as the anchor rules see them), -1 for none
    (spaces, punctuation)."""
    spans = [(m.start(), m.end(), i) for i, m in enumerate(_WORD.finditer(text))]
    return anchor_token_mask(offsets, spans, len(text))


def token_pieces(
    offsets: np.ndarray,
    sentence_spans: Sequence[tuple[int, int]],
    max_tokens: int,
    min_tokens: int = 1,
) -> list[tuple[int, int]]:
    """Token spans `[start, end)` of the sentence pieces, from fast-tokenizer offsets.

    A token belongs to the sentence that contains its last character (so a leading-space token such as
    " The" goes with the sentence it starts). Every token lands in exactly one piece; pieces are contiguous and
    cover all tokens. Sentences longer than `max_tokens` are cut; pieces shorter than `min_tokens` are merged
    into the following one while the merge stays within `max_tokens`.

    Args:
        offsets: (N, 2) character offsets of the tokens.
        sentence_spans: Character spans of the sentences, in order.
        max_tokens: Longest piece.
        min_tokens: Shortest piece worth its own gists (pieces are merged up to it).
    """
    n = int(len(offsets))
    if n == 0:
        return []
    offsets = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
    last_char = np.maximum(offsets[:, 1] - 1, offsets[:, 0])
    if len(sentence_spans):
        starts = np.asarray([s for s, _ in sentence_spans], dtype=np.int64)
        sent_of_tok = np.searchsorted(starts, last_char, side="right") - 1
        sent_of_tok = np.clip(sent_of_tok, 0, len(starts) - 1)
    else:
        sent_of_tok = np.zeros(n, dtype=np.int64)
    # sentence ids are non-decreasing along tokens; a piece starts wherever the id changes
    sent_of_tok = np.maximum.accumulate(sent_of_tok)
    change = np.flatnonzero(np.diff(sent_of_tok)) + 1
    bounds = np.concatenate([[0], change, [n]])
    pieces: list[tuple[int, int]] = []
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        for s in range(a, b, max_tokens):
            pieces.append((s, min(s + max_tokens, b)))
    if min_tokens > 1 and len(pieces) > 1:
        merged: list[tuple[int, int]] = []
        cur_s, cur_e = pieces[0]
        for s, e in pieces[1:]:
            if cur_e - cur_s < min_tokens and e - cur_s <= max_tokens:
                cur_e = e
            else:
                merged.append((cur_s, cur_e))
                cur_s, cur_e = s, e
        if merged and cur_e - cur_s < min_tokens and cur_e - merged[-1][0] <= max_tokens:
            merged[-1] = (merged[-1][0], cur_e)
        else:
            merged.append((cur_s, cur_e))
        pieces = merged
    return pieces


def anchor_token_mask(
    offsets: np.ndarray, anchor_spans: Sequence[tuple[int, int, int]], text_length: int
) -> np.ndarray:
    """Per token: the anchor priority (0 = kept first) or -1 if the token is not an anchor.

    A token is an anchor if its first or last character lies in an anchor span (tokens never straddle words
    except for a leading space, which the last character covers). O(chars + tokens), no token x span matrix.
    """
    n = int(len(offsets))
    prio = np.full(n, -1, dtype=np.int64)
    if n == 0 or not anchor_spans:
        return prio
    big = np.iinfo(np.int64).max
    char_prio = np.full(max(1, text_length), big, dtype=np.int64)
    for s, e, p in anchor_spans:  # one step per anchor word, not per token
        seg = char_prio[s:e]
        np.minimum(seg, p, out=seg)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
    ts = np.clip(offsets[:, 0], 0, len(char_prio) - 1)
    te = np.clip(offsets[:, 1] - 1, 0, len(char_prio) - 1)
    p = np.minimum(char_prio[ts], char_prio[te])
    nonempty = offsets[:, 1] > offsets[:, 0]
    hit = (p != big) & nonempty
    prio[hit] = p[hit]
    return prio
