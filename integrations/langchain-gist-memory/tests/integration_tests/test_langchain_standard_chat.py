"""langchain-tests `ChatModelIntegrationTests` on ChatGist over the bundled SmolLM2-135M-Instruct (slow).

The training-free `pool+anchors` compressor at ratio 4 (no trained adapter needed). Tool calling, tool choice,
structured output and JSON mode are on: ChatGist decodes them under a grammar, so even a 135M model's calls and
answers always parse and validate. Image/audio/PDF input stays off (`supports_*_inputs` False: a local text model),
and so does model override (one local model per ChatGist); the suite skips those tests itself.

Free-text replies stop at 12 tokens (`max_tokens`); tool calls and structured answers get 40
(`structured_max_tokens`): the shortest tool call of the suite's tools is 27-32 SmolLM2 tokens. SmolLM2-135M never
picks a tool by itself (with tool_choice "auto" it answers in text), so `first_tool_choice="any"` makes the first
reply of a turn with tools bound a call, as an agent needs (`test_agent_loop`); after the tool's result it is "auto".
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
        return {"model": self._gist, "keep_recent": 1, "max_tokens": 12, "structured_max_tokens": 40,
                "first_tool_choice": "any"}

    @property
    def supports_model_override(self) -> bool:
        return False  # one local model per ChatGist

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True
