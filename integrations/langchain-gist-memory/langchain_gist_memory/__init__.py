"""LangChain integration of gist-memory.

- `ChatGist`: a chat model over a `GistModel` that reads older turns and retrieved passages as gist states.
- `GistRetriever`: a retriever over a `GistMemory` (registers what it returns, so `ChatGist` splices it).
- `GistHistoryStore` / `GistChatMessageHistory`: SQLite chat history that keeps each turn's gist state.
- `LangGraphStateStore`: keeps turn states in a LangGraph `BaseStore`.
- `GistMemoryMiddleware`: a LangChain v1 agent middleware that compresses older turns instead of summarising.
"""

from langchain_gist_memory._states import StateCache, StateEntry, StateStore
from langchain_gist_memory.history import GistChatMessageHistory, GistHistoryStore, HistoryError
from langchain_gist_memory.registry import PassageRegistry, default_registry


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("langchain-gist-memory")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _version()


def __getattr__(name: str):  # torch-heavy and optional parts load on first use
    if name == "ChatGist":
        from langchain_gist_memory.chat_models import ChatGist

        return ChatGist
    if name == "GistRetriever":
        from langchain_gist_memory.retrievers import GistRetriever

        return GistRetriever
    if name == "LangGraphStateStore":
        from langchain_gist_memory.stores import LangGraphStateStore

        return LangGraphStateStore
    if name == "GistMemoryMiddleware":
        from langchain_gist_memory.middleware import GistMemoryMiddleware

        return GistMemoryMiddleware
    raise AttributeError(f"module 'langchain_gist_memory' has no attribute {name!r}")


__all__ = [
    "ChatGist",
    "GistChatMessageHistory",
    "GistHistoryStore",
    "GistMemoryMiddleware",
    "GistRetriever",
    "HistoryError",
    "LangGraphStateStore",
    "PassageRegistry",
    "StateCache",
    "StateEntry",
    "StateStore",
    "__version__",
    "default_registry",
]
