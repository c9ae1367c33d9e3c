"""langchain-tests `ChatModelIntegrationTests` on ChatGist over the bundled SmolLM2-135M-Instruct (slow).

The training-free `pool+anchors` compressor at ratio 4 (no trained adapter needed). Tool calling, structured
output, JSON mode and image/audio/PDF input are beyond a 135M local text model: ChatGist does not declare them
(`has_tool_calling`, `has_structured_output` and `supports_*_inputs` False; `bind_tools` raises saying what to use
instead), so the suite skips those tests itself.
"""

from __future__ import annotations

import pytest
from langchain_gist_memory import ChatGist
from langchain_tests.integration_tests import ChatModelIntegrationTests

pytestmark = pytest.mark.slow


class TestChatGistIntegration(ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _model(self, smol_pool):  # noqa: ANN001
        self._gist = smol_pool

    @property
    def chat_model_class(self) -> type[ChatGist]:
        return ChatGist

    @property
    def chat_model_params(self) -> dict:
        return {"model": self._gist, "keep_recent": 1, "max_tokens": 12}

    @property
    def supports_model_override(self) -> bool:
        return False  # one local model per ChatGist

    @property
    def supports_json_mode(self) -> bool:
        return False

    # ChatGist defines bind_tools / with_structured_output only to raise a message saying what to use instead
    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False
