"""gist-memory: compressed memory for RAG and chat apps.

Passages are split into sentences, each sentence gets a few learned gist tokens (and keeps a few raw anchor
tokens), and one forward pass leaves their key/value rows as a compact `GistState` that is spliced straight into
the model's KV cache at answer time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from gist_memory.config import GistConfig


def _version() -> str:
    """The installed distribution's version; the pyproject.toml beside an uninstalled checkout otherwise."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gist-memory")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        try:
            text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8")
        except OSError:
            return "0+unknown"
        m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
        return m.group(1) if m else "0+unknown"


__version__ = _version()

# The rest is imported when first used: `import gist_memory` must not pay for torch, transformers, FAISS or spaCy
# (`gist-memory --help` imports this package). name -> module that defines it.
_LAZY = {
    "GistModel": "gist_memory.model",
    "GistMemory": "gist_memory.store",
    "GistStore": "gist_memory.store",
    "GistState": "gist_memory.state",  # gist_memory.state imports torch at module level
    "StateFormatError": "gist_memory.state",
}

if TYPE_CHECKING:
    from gist_memory.model import GistModel
    from gist_memory.state import GistState, StateFormatError
    from gist_memory.store import GistMemory, GistStore


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gist_memory' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["GistConfig", "GistModel", "GistMemory", "GistStore", "GistState", "StateFormatError", "__version__"]
