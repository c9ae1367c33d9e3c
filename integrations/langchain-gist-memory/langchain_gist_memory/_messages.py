"""Messages -> text: what each message says, and how a conversation splits into turns.

A turn is a human message and everything after it up to the next human message (AI replies, tool calls, tool
results). Messages before the first human message form a turn of their own. System messages are not part of any
turn: they become the model's system prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

GIST_MEMORY_KEY = "gist_memory"
"""`additional_kwargs` key of a message that stands for compressed turns (written by `GistMemoryMiddleware`)."""

_MEDIA_BLOCKS = {"image", "image_url", "audio", "input_audio", "video", "file", "document", "media"}
_SKIPPED_BLOCKS = {"tool_call", "tool_call_chunk", "tool_use", "reasoning", "thinking", "server_tool_call",
                   "server_tool_result", "non_standard", "invalid_tool_call"}


def message_text(msg: BaseMessage, index: int = 0) -> str:
    """The text of a message (text blocks joined); media blocks are refused.

    Raises:
        ValueError: The message holds an image/audio/file block, or content of an unknown shape.
    """
    content = msg.content
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"message {index} has content of type {type(content).__name__}; expected str or list")
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
            continue
        if not isinstance(block, dict):
            raise ValueError(f"message {index} has a content block of type {type(block).__name__}")
        kind = block.get("type")
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif kind in _MEDIA_BLOCKS:
            raise ValueError(
                f"message {index} holds a {kind!r} block; ChatGist reads text only (a local text model cannot "
                f"see images, audio or files)"
            )
        elif kind in _SKIPPED_BLOCKS:
            continue
        else:
            raise ValueError(f"message {index} holds a content block of unknown type {kind!r}")
    return "".join(parts)


def role_of(msg: BaseMessage, index: int = 0) -> str:
    """`system`, `user`, `assistant`, `tool` or a ChatMessage's own role.

    Raises:
        ValueError: A message type ChatGist cannot place in a conversation.
    """
    if not isinstance(msg, BaseMessage):
        raise ValueError(f"message {index} is a {type(msg).__name__}, not a langchain BaseMessage")
    if isinstance(msg, SystemMessage):
        return "system"
    if isinstance(msg, HumanMessage):
        return "user"
    if isinstance(msg, AIMessage):
        return "assistant"
    if isinstance(msg, (ToolMessage, FunctionMessage)):
        return "tool"
    if isinstance(msg, ChatMessage):
        role = (msg.role or "").strip().lower()
        if not role:
            raise ValueError(f"message {index} is a ChatMessage without a role")
        return {"human": "user", "ai": "assistant", "developer": "system"}.get(role, role)
    raise ValueError(
        f"message {index} has type {msg.type!r} ({type(msg).__name__}), which ChatGist cannot place in a "
        f"conversation; use system, human, ai, tool or chat messages"
    )


def tool_calls_text(msg: BaseMessage) -> str:
    """An AI message's tool calls as the model writes them (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`,
    one per line; the format `ChatGist` decodes tool calls in), or ""."""
    calls = getattr(msg, "tool_calls", None) or []
    if not calls:
        return ""
    from gist_memory.model.constrained import format_tool_calls

    return format_tool_calls([{"name": c.get("name"), "arguments": c.get("args", {})} for c in calls])


def tool_name(msg: BaseMessage, names: Optional[dict[str, str]] = None) -> Optional[str]:
    """The tool a tool message answers: its own name, else the name of the call it answers (by id)."""
    return getattr(msg, "name", None) or (names or {}).get(str(getattr(msg, "tool_call_id", "") or ""))


def render_line(msg: BaseMessage, role: str, text: str, names: Optional[dict[str, str]] = None) -> str:
    """One message as a line of a rendered conversation (empty string for a message that says nothing).

    `names`: tool-call id -> tool name of the calls seen so far (names a tool result that does not name itself).
    """
    text = text.strip()
    if role == "assistant":
        body = "\n".join(x for x in (text, tool_calls_text(msg)) if x)
        return f"Assistant: {body}" if body else ""
    if not text:
        return ""
    if role == "user":
        name = getattr(msg, "name", None)
        return f"User ({name}): {text}" if name else f"User: {text}"
    if role == "tool":
        name = tool_name(msg, names)
        return f"Tool ({name}): {text}" if name else f"Tool: {text}"
    return f"{role.capitalize()}: {text}"


def core_message(msg: BaseMessage, role: str, text: str,
                 names: Optional[dict[str, str]] = None) -> Optional[dict[str, str]]:
    """One message as `GistModel` reads it in a chat (`{"role": "user"|"assistant", "content": ...}`), or None.

    The model's chat template knows user and assistant turns; an assistant's tool calls are written after its text
    in the format the model writes them, a tool result is a user message in a `<tool_response>` block, and a message
    of another role is a user message that names where it came from.
    """
    line = render_line(msg, role, text, names)
    if not line:
        return None
    if role == "assistant":
        return {"role": "assistant", "content": line[len("Assistant: "):]}
    if role == "tool":
        from gist_memory.model.constrained import format_tool_result

        return {"role": "user", "content": format_tool_result(text.strip(), tool_name(msg, names))}
    if role == "user" and not getattr(msg, "name", None):
        return {"role": "user", "content": text.strip()}
    return {"role": "user", "content": line}


@dataclass
class Turn:
    """Consecutive non-system messages opened by a human message (or the messages before the first one)."""

    lines: list[str] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    gist: Optional[dict[str, Any]] = None  # a middleware marker: {"keys": [...], "texts": [...]}
    messages: list[dict[str, str]] = field(default_factory=list)  # the same messages as `core_message`s

    def chat(self) -> list[dict[str, str]]:
        """The turn as chat messages for the model (consecutive messages of one role joined by a newline)."""
        out: list[dict[str, str]] = []
        for m in self.messages:
            if out and out[-1]["role"] == m["role"]:
                out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n" + m["content"]}
            else:
                out.append(dict(m))
        return out

    @property
    def text(self) -> str:
        return "\n".join(x for x in self.lines if x)

    @property
    def empty(self) -> bool:
        return not self.text and not self.gist


@dataclass
class Conversation:
    """Messages split into a system prompt, turns and the texts cut out of them."""

    system: list[str]
    turns: list[Turn]
    only_human_text: Optional[str]  # the last human message's text when it is the whole conversation


def split_conversation(messages: Sequence[BaseMessage], texts: Sequence[str]) -> Conversation:
    """Group messages into turns. `texts[i]` is message i's text (known passages already cut out)."""
    system: list[str] = []
    turns: list[Turn] = []
    cur: Optional[Turn] = None
    n_non_system = 0
    names: dict[str, str] = {}  # tool-call id -> tool name, to name the results
    for i, (msg, text) in enumerate(zip(messages, texts, strict=True)):
        role = role_of(msg, i)
        marker = (msg.additional_kwargs or {}).get(GIST_MEMORY_KEY) if hasattr(msg, "additional_kwargs") else None
        if marker:
            if not isinstance(marker, dict) or not isinstance(marker.get("texts"), list):
                raise ValueError(f"message {i} has a malformed {GIST_MEMORY_KEY!r} marker")
            turns.append(Turn(gist=marker, message_ids=[msg.id] if msg.id else []))
            cur = None
            continue
        if role == "system":
            if text.strip():
                system.append(text.strip())
            continue
        n_non_system += 1
        if role == "user" or cur is None:
            cur = Turn()
            turns.append(cur)
        for c in getattr(msg, "tool_calls", None) or []:
            if c.get("id"):
                names[str(c["id"])] = str(c.get("name"))
        cur.lines.append(render_line(msg, role, text, names))
        cm = core_message(msg, role, text, names)
        if cm is not None:
            cur.messages.append(cm)
        if msg.id:
            cur.message_ids.append(str(msg.id))
    only = None
    if n_non_system == 1 and turns and not turns[-1].gist and isinstance(messages[-1], HumanMessage):
        only = texts[-1].strip()
    return Conversation(system=system, turns=[t for t in turns if not t.empty], only_human_text=only)
