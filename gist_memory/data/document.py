"""What a corpus source yields: `Document`s, and the two errors of reading sources (`SourceMissing`, `CorpusError`).

Also the two places sources are found without importing them: installed packages and the sources cache folders
(`$GIST_MEMORY_SOURCES`, `~/.cache/gist-memory/sources`). Pure Python.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


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


def write_jsonl(path, records) -> None:  # noqa: ANN001 - a str/Path and an iterable of json-able dicts
    """Write records as JSON lines through a temporary file renamed into place (a reader never sees half)."""
    import json
    import os
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
