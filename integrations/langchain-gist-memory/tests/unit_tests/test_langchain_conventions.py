"""LangChain conventions: the public names, the version from package metadata, messages for what is not supported,
and what `init_chat_model` can and cannot do."""

from __future__ import annotations

from importlib.metadata import version

import langchain_gist_memory
import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool

EXPECTED_ALL = [
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


def test_all_is_pinned_and_every_name_imports():
    assert sorted(langchain_gist_memory.__all__) == sorted(EXPECTED_ALL)
    for name in langchain_gist_memory.__all__:
        assert getattr(langchain_gist_memory, name) is not None, name


def test_version_comes_from_package_metadata():
    assert langchain_gist_memory.__version__ == version("langchain-gist-memory")


@tool
def lookup(query: str) -> str:
    """Look something up."""
    return query


def test_unsupported_arguments_name_what_to_use(gist_tiny):
    from langchain_gist_memory import ChatGist

    chat = ChatGist(model=gist_tiny, max_tokens=2)
    with pytest.raises(TypeError, match=r"unsupported arguments \['functions'\].*legacy.*bind_tools"):
        chat.invoke([HumanMessage("hi")], functions=[{"name": "f"}])
    with pytest.raises(TypeError, match="unsupported arguments.*supported"):
        chat.invoke([HumanMessage("hi")], frobnicate=1)
    with pytest.raises(ValueError, match="not one of the tools"):
        chat.bind_tools([lookup], tool_choice="nope")
    with pytest.raises(ValueError, match="unsupported arguments"):
        chat.with_structured_output({"title": "x", "type": "object", "properties": {}}, frobnicate=1)
    with pytest.raises(ValueError, match="method must be one of"):
        chat.with_structured_output({"title": "x", "type": "object", "properties": {}}, method="xml")


def test_init_chat_model_has_no_registration_hook():
    """langchain's provider table is closed (a private dict): `init_chat_model(..., model_provider="gist_memory")`
    cannot build ChatGist (docs/langchain.md says so). If this starts to pass, register ChatGist and document it."""
    from langchain.chat_models import init_chat_model

    with pytest.raises(ValueError, match="Unsupported provider"):
        init_chat_model("smollm2", model_provider="gist_memory")
