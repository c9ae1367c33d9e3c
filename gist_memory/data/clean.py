"""Text cleaning and passage chunking for corpora: whitespace/control characters, passages of ~40-250 words,
the keyed-hash train/held-out split, near-duplicate fingerprints and a cheap prose test. Pure Python."""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Iterable

MIN_WORDS = 40
TARGET_WORDS = 120
MAX_WORDS = 250

_WS = re.compile(r"\s+")
_SENT_END = re.compile(r"(?<=[.!?;:])[\"'’”)\]]*\s+(?=[\"'‘“(\[]?[A-Z0-9])")
_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_text(text: str) -> str:
    """NFC-normalise, drop control characters and collapse whitespace (newlines become spaces)."""
    text = unicodedata.normalize("NFC", text)
    text = _CTRL.sub(" ", text)
    return _WS.sub(" ", text).strip()


def word_count(text: str) -> int:
    """Whitespace-separated words."""
    return len(text.split())


def normalized_key(text: str) -> str:
    """The text used for exact-duplicate detection: case-folded letters and digits, single spaces."""
    t = unicodedata.normalize("NFKC", text).casefold()
    t = "".join(c if c.isalnum() else " " for c in t)
    return " ".join(t.split())


def _split_sentences(text: str) -> list[str]:
    """A cheap rule-based sentence split, used only to cut over-long paragraphs into passages."""
    parts = [p.strip() for p in _SENT_END.split(text)]
    return [p for p in parts if p]


def chunk_paragraphs(
    paragraphs: Iterable[str],
    min_words: int = MIN_WORDS,
    target_words: int = TARGET_WORDS,
    max_words: int = MAX_WORDS,
) -> list[str]:
    """Packs consecutive paragraphs into passages of about `min_words`..`max_words` words.

    Paragraphs are merged until a passage reaches `target_words`; one never grows past `max_words`. A paragraph
    longer than `max_words` is cut at sentence ends (a sentence longer than that at word boundaries). A short
    tail joins the previous passage when it fits, else it is dropped. Paragraphs inside a passage are joined with
    a newline.

    Args:
        paragraphs: Paragraph texts in reading order (each already whitespace-cleaned).
        min_words: Shortest passage kept.
        target_words: A passage is closed once it has at least this many words.
        max_words: Longest passage.

    Returns:
        The passages.
    """
    units: list[tuple[str, int, bool]] = []  # (text, words, starts a new paragraph)
    for para in paragraphs:
        n = word_count(para)
        if n == 0:
            continue
        if n <= max_words:
            units.append((para, n, True))
            continue
        first = True
        piece: list[str] = []
        pn = 0
        for sent in _split_sentences(para):
            words = sent.split()
            while len(words) > max_words:  # a run-on "sentence": cut at word boundaries
                if piece:
                    units.append((" ".join(piece), pn, first))
                    first, piece, pn = False, [], 0
                units.append((" ".join(words[:target_words]), target_words, first))
                first = False
                words = words[target_words:]
            if piece and pn + len(words) > target_words:
                units.append((" ".join(piece), pn, first))
                first, piece, pn = False, [], 0
            piece.append(" ".join(words))
            pn += len(words)
        if piece:
            units.append((" ".join(piece), pn, first))

    out: list[str] = []
    cur: list[str] = []
    cur_n = 0

    def flush() -> None:
        nonlocal cur, cur_n
        if cur and cur_n >= min_words:
            out.append("".join(cur).strip())
        cur, cur_n = [], 0

    for text, n, new_para in units:
        if cur and cur_n + n > max_words:
            flush()
        if cur:
            cur.append("\n" if new_para else " ")
        cur.append(text)
        cur_n += n
        if cur_n >= target_words:
            flush()
    if cur:
        if cur_n >= min_words:
            flush()
        elif out and word_count(out[-1]) + cur_n <= max_words:
            out[-1] = out[-1] + "\n" + "".join(cur).strip()
    return out


def _keyed_unit(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from a keyed hash (stable across runs and platforms)."""
    h = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=str(seed).encode("utf-8")).digest()
    return int.from_bytes(h, "big") / 2**64


def is_heldout(doc_id: str, heldout_fraction: float = 0.05, seed: int = 0) -> bool:
    """Whether a document goes to the held-out split (a keyed hash of its id; independent of other documents)."""
    return _keyed_unit(seed, "split:" + doc_id) < heldout_fraction


class NearDuplicateIndex:
    """Cheap near-duplicate detection by sampled word-shingle fingerprints.

    A text's fingerprints are the CRC32s of its word 8-grams that fall in a 1-in-4 sample; a text is a near
    duplicate when at least `threshold` of its fingerprints were already seen in earlier kept texts.
    """

    def __init__(self, shingle: int = 8, sample_mod: int = 4, threshold: float = 0.5, min_fingerprints: int = 4):
        self.shingle = shingle
        self.sample_mod = sample_mod
        self.threshold = threshold
        self.min_fingerprints = min_fingerprints
        self.seen: set[int] = set()

    def fingerprints(self, text: str) -> set[int]:
        """Sampled shingle hashes of `text`."""
        words = normalized_key(text).split()
        k = self.shingle
        fps = set()
        for i in range(max(0, len(words) - k + 1)):
            h = zlib.crc32(" ".join(words[i : i + k]).encode("utf-8"))
            if h % self.sample_mod == 0:
                fps.add(h)
        return fps

    def check_and_add(self, text: str) -> bool:
        """True if `text` is a near duplicate of an earlier one; otherwise remembers it and returns False."""
        fps = self.fingerprints(text)
        if len(fps) >= self.min_fingerprints:
            hits = sum(1 for f in fps if f in self.seen)
            if hits >= self.threshold * len(fps):
                return True
        self.seen.update(fps)
        return False


_WORDLIKE = re.compile(r"^[\"'‘“(\[]*[A-Za-z][\w’'\-]*[\"'’”)\].,;:!?]*$")


def is_prose(text: str, min_words: int = 6) -> bool:
    """A cheap test that a paragraph is running prose (not code, a table or a list of symbols).

    Args:
        text: Whitespace-cleaned paragraph.
        min_words: Fewer words than this is not a paragraph.
    """
    words = text.split()
    if len(words) < min_words or text.startswith((">>>", "$ ", "#", "%", "...")):
        return False
    if not re.search(r"[.!?:][\"'’”)\]]*$", text):
        return False
    letters = sum(c.isalpha() for c in text)
    visible = sum(not c.isspace() for c in text)
    if visible == 0 or letters / visible < 0.72:
        return False
    return sum(1 for w in words if _WORDLIKE.match(w)) >= 0.75 * len(words)
