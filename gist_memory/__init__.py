"""gist-memory: compressed memory for RAG and chat apps.

Passages are split into sentences, each sentence gets a few learned gist tokens (and keeps a few raw anchor
tokens), and one forward pass leaves their key/value rows as a compact `GistState` that is spliced straight into
the model's KV cache at answer time.
"""

from gist_memory.config import GistConfig
from gist_memory.state import GistState, StateFormatError

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing the package must not load torch-heavy modules twice
    if name == "GistModel":
        from gist_memory.model import GistModel

        return GistModel
    if name == "GistMemory":
        from gist_memory.store import GistMemory

        return GistMemory
    if name == "GistStore":
        from gist_memory.store import GistStore

        return GistStore
    raise AttributeError(f"module 'gist_memory' has no attribute {name!r}")


__all__ = ["GistConfig", "GistModel", "GistMemory", "GistStore", "GistState", "StateFormatError", "__version__"]
