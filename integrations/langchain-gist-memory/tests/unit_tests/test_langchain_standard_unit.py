"""langchain-tests `ChatModelUnitTests` on ChatGist over the tiny random Llama."""

from __future__ import annotations

import pytest
from langchain_gist_memory import ChatGist
from langchain_tests.unit_tests import ChatModelUnitTests


class TestChatGistUnit(ChatModelUnitTests):
    @pytest.fixture(autouse=True)
    def _model(self, gist_tiny):  # noqa: ANN001
        self._gist = gist_tiny

    @property
    def chat_model_class(self) -> type[ChatGist]:
        return ChatGist

    @property
    def chat_model_params(self) -> dict:
        return {"model": self._gist, "keep_recent": 2}

    @property
    def supports_model_override(self) -> bool:
        return False  # one local model per ChatGist

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True
