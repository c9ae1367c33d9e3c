"""`GistMemoryMiddleware`: a LangChain v1 agent middleware that compresses older turns instead of summarising them.

    chat = ChatGist(model=model)
    agent = create_agent(chat, tools=[], middleware=[GistMemoryMiddleware(chat, trigger=("messages", 40), keep_turns=4)],
                         checkpointer=InMemorySaver(), store=InMemoryStore())

Where `SummarizationMiddleware` spends an LLM call to replace old messages with a summary, this middleware runs one
compression pass: the old turns are replaced in the agent state by a single marker message that lists them (their
texts stay in the marker, so nothing is lost), and `ChatGist` reads the marker's turns from their gist states. The
states live in the chat's LRU and, when the agent has a store, in it (`LangGraphStateStore`), so a resumed thread
compresses nothing again.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Optional

from langchain.agents.middleware.types import AgentMiddleware, AgentState, ModelRequest, ModelResponse
from langchain_core.messages import AnyMessage, BaseMessage, HumanMessage, RemoveMessage
from langchain_core.runnables import RunnableBinding
from langgraph.graph.message import REMOVE_ALL_MESSAGES
from langgraph.runtime import Runtime

from langchain_gist_memory._messages import GIST_MEMORY_KEY, Turn, message_text, render_line, role_of
from langchain_gist_memory._states import StateStore
from langchain_gist_memory.chat_models import ChatGist

MARKER_SOURCE = "gist_memory"


def _unwrap(model: Any) -> Any:
    while isinstance(model, RunnableBinding):
        model = model.bound
    return model


class GistMemoryMiddleware(AgentMiddleware):
    """Replace turns older than the last `keep_turns` by one marker message read from gist states.

    Args:
        chat: The agent's `ChatGist` (its compressor and state cache are used).
        trigger: When to compress: `("messages", n)` (more than n messages in the state) or `("tokens", n)`
            (more than n tokens of message text).
        keep_turns: Turns kept as messages (a turn is a human message and what follows it).
        store: Where states persist (default: the agent's LangGraph store if it has one, else the chat's
            `state_store`).
    """

    def __init__(
        self,
        chat: ChatGist,
        *,
        trigger: tuple[str, int] = ("messages", 40),
        keep_turns: int = 4,
        store: Optional[StateStore] = None,
    ) -> None:
        super().__init__()
        if not isinstance(chat, ChatGist):
            raise TypeError(f"chat must be a ChatGist, got {type(chat).__name__}")
        kind, n = trigger
        if kind not in ("messages", "tokens") or int(n) < 1:
            raise ValueError(f"trigger must be ('messages', n) or ('tokens', n) with n >= 1, got {trigger!r}")
        if keep_turns < 0:
            raise ValueError(f"keep_turns must be >= 0, got {keep_turns}")
        self.chat = chat
        self.trigger = (kind, int(n))
        self.keep_turns = int(keep_turns)
        self.store = store

    # ---- helpers -------------------------------------------------------------------------------------
    def _state_store(self, runtime: Optional[Runtime]) -> Optional[StateStore]:
        if self.store is not None:
            return self.store
        lg = getattr(runtime, "store", None) if runtime is not None else None
        if lg is not None:
            from langchain_gist_memory.stores import LangGraphStateStore

            return LangGraphStateStore(lg)
        return self.chat.state_store

    def _triggered(self, messages: Sequence[BaseMessage]) -> bool:
        kind, n = self.trigger
        if kind == "messages":
            return len(messages) > n
        total = 0
        for i, m in enumerate(messages):
            marker = (m.additional_kwargs or {}).get(GIST_MEMORY_KEY)
            if not marker:
                total += self.chat._n_tokens(message_text(m, i))
        return total > n

    def compress_state(self, messages: Sequence[AnyMessage], runtime: Optional[Runtime] = None) -> Optional[list]:
        """The state update that folds old turns into the marker, or None when there is nothing to fold."""
        if not self._triggered(messages):
            return None
        # turn starts: each human message (markers and system messages are kept as they are)
        starts = [i for i, m in enumerate(messages) if isinstance(m, HumanMessage)
                  and not (m.additional_kwargs or {}).get(GIST_MEMORY_KEY)]
        if len(starts) <= self.keep_turns:
            return None
        cutoff = starts[len(starts) - self.keep_turns] if self.keep_turns else len(messages)
        if self.keep_turns == 0:  # keep the current turn at least
            cutoff = starts[-1]
        old_texts: list[str] = []
        old_ids: list[list[str]] = []
        kept_before: list[BaseMessage] = []
        cur: Optional[Turn] = None
        for i, m in enumerate(messages[:cutoff]):
            marker = (m.additional_kwargs or {}).get(GIST_MEMORY_KEY)
            if marker:
                old_texts += [str(t) for t in marker.get("texts", [])]
                old_ids += [[] for _ in marker.get("texts", [])]
                cur = None
                continue
            role = role_of(m, i)
            if role == "system":
                kept_before.append(m)
                continue
            if role == "user" or cur is None:
                if cur is not None and cur.text:
                    old_texts.append(cur.text)
                    old_ids.append(cur.message_ids[:1])
                cur = Turn()
            cur.lines.append(render_line(m, role, message_text(m, i)))
            if m.id:
                cur.message_ids.append(str(m.id))
        if cur is not None and cur.text:
            old_texts.append(cur.text)
            old_ids.append(cur.message_ids[:1])
        if not old_texts:
            return None
        # compress now (once per turn: the chat's cache and the store know the older ones)
        self.chat.compress_texts(old_texts, old_ids, state_store=self._state_store(runtime))
        marker_msg = HumanMessage(
            content=f"[{len(old_texts)} earlier turns of this conversation are kept as gist states]",
            id=f"gist-memory-{uuid.uuid4().hex}",
            additional_kwargs={
                "lc_source": MARKER_SOURCE,
                GIST_MEMORY_KEY: {
                    "texts": old_texts,
                    "keys": [self.chat.model.state_key(t) for t in old_texts],
                    "fingerprint": str(self.chat.model.fingerprint),
                },
            },
        )
        return [RemoveMessage(id=REMOVE_ALL_MESSAGES), *kept_before, marker_msg, *messages[cutoff:]]

    # ---- hooks ---------------------------------------------------------------------------------------
    def before_model(self, state: AgentState, runtime: Runtime) -> Optional[dict[str, Any]]:
        """Fold old turns into the marker when the trigger is met."""
        messages = list(state["messages"])
        for m in messages:
            if m.id is None:
                m.id = str(uuid.uuid4())
        update = self.compress_state(messages, runtime)
        return {"messages": update} if update is not None else None

    async def abefore_model(self, state: AgentState, runtime: Runtime) -> Optional[dict[str, Any]]:
        """Async `before_model` (the compression runs in a worker thread)."""
        import asyncio

        return await asyncio.to_thread(self.before_model, state, runtime)

    def _request(self, request: ModelRequest) -> ModelRequest:
        if not isinstance(_unwrap(request.model), ChatGist):
            raise TypeError(
                f"GistMemoryMiddleware needs the agent's model to be a ChatGist (only it can read gist states), "
                f"got {type(_unwrap(request.model)).__name__}; use SummarizationMiddleware for other models"
            )
        store = self._state_store(request.runtime)
        if store is None or "state_store" in request.model_settings:
            return request
        return request.override(model_settings={**request.model_settings, "state_store": store})

    def wrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
    ) -> ModelResponse:
        """Check the model reads gist states and hand it the state store."""
        return handler(self._request(request))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse:
        """Async `wrap_model_call`."""
        return await handler(self._request(request))


__all__ = ["GistMemoryMiddleware", "MARKER_SOURCE"]
