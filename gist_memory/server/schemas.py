"""Request bodies of the OpenAI-compatible routes (the fields clients send; unknown fields are accepted and ignored).

Tools (`tools`, `tool_choice`, `parallel_tool_calls`) and structured output (`response_format`) are checked in
`gist_memory.server.openai.chat_job`; history messages may carry `tool_calls` (assistant) or answer one (`role:
"tool"`, `tool_call_id`).

Fields the server understands beyond OpenAI's (send them as `extra_body` from the OpenAI client):
`memory` (a memory name, instead of or beside `model="gist-memory:<name>"`), `k` (passages read), `filter`
(metadata filter for the search), `top_k` and `repetition_penalty` (sampling).
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    """`stream_options`: `include_usage` adds a last chunk with `usage` and no choices."""

    include_usage: bool = False


class ContentPart(_Body):
    """One part of a message's content; only `{"type": "text", "text": ...}` is read."""

    type: str
    text: Optional[str] = None


class FunctionCall(_Body):
    """The function of a tool call in an assistant message: its name and arguments (a JSON string)."""

    name: str
    arguments: Union[str, dict[str, Any], None] = None


class ToolCall(_Body):
    """A tool call in an assistant message of the history (as the server returned it)."""

    id: Optional[str] = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(_Body):
    """A chat message: role system | developer | user | assistant | tool, content a string or text parts.

    An assistant message may carry `tool_calls` (content then may be null); a tool message answers the call named
    by `tool_call_id`.
    """

    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None


class _Sampling(_Body):
    """What both completion routes share."""

    model: str
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    n: Optional[int] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    # gist-memory's own
    memory: Optional[str] = None
    k: Optional[int] = None
    filter: Optional[dict[str, Any]] = None
    top_k: Optional[int] = Field(default=None, ge=0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None
    function_call: Any = None
    response_format: Optional[dict[str, Any]] = None


class CompletionRequest(_Sampling):
    """`POST /v1/completions` (the prompt is answered as one user turn: the model is a chat model)."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    logprobs: Optional[int] = None
