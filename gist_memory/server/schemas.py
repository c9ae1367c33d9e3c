"""Request bodies of the OpenAI-compatible routes (the fields clients send; unknown fields are accepted and ignored).

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


class ChatMessage(_Body):
    """A chat message: role system | developer | user | assistant, content a string or text parts."""

    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


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
    tool_choice: Any = None
    functions: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None


class CompletionRequest(_Sampling):
    """`POST /v1/completions` (the prompt is answered as one user turn: the model is a chat model)."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    logprobs: Optional[int] = None
