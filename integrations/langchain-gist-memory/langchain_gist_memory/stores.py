"""LangGraph persistence: keep turn gist states in a LangGraph `BaseStore` next to the graph's checkpoints.

    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.store.sqlite import SqliteStore

    def call_model(state: MessagesState, *, store: BaseStore):
        chat_store = LangGraphStateStore(store)
        return {"messages": [chat.invoke(state["messages"], state_store=chat_store)]}

    graph = builder.compile(checkpointer=SqliteSaver(conn), store=SqliteStore(conn))

The checkpointer keeps the messages (as it always does); the store keeps each compressed turn's state under
`namespace + (model fingerprint,)`, keyed by `model.state_key(turn text)`, as base64 of the safetensors bytes (json
stores accept it; never pickle). A restarted graph reads old turns from the store and compresses nothing again.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from typing import Any, Optional

from gist_memory import GistState, StateFormatError
from langchain_gist_memory._states import StateEntry

logger = logging.getLogger(__name__)


class LangGraphStateStore:
    """A `StateStore` over any LangGraph `BaseStore` (InMemoryStore, SqliteStore, PostgresStore, ...).

    Args:
        store: The LangGraph store (e.g. the one injected into a node as `store`).
        namespace: Namespace prefix of the states; the model fingerprint is appended.
        storage_dtype: How the states are written: `int8` (the library's default, `DEFAULT_STORAGE_DTYPE`),
            `int4`, `float16`, `bfloat16` or `float32` (docs/scale.md, "Smaller states"). Entries written in any
            dtype, and the full-precision ones of older versions, are all read back.
    """

    def __init__(self, store: Any, namespace: Sequence[str] = ("gist_memory", "turn_states"),
                 storage_dtype: Optional[str] = None) -> None:
        from gist_memory.store.store import DEFAULT_STORAGE_DTYPE, STORAGE_DTYPES

        try:
            from langgraph.store.base import BaseStore
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("LangGraphStateStore needs langgraph: pip install 'langchain-gist-memory[langgraph]'") from e
        if not isinstance(store, BaseStore):
            raise ValueError(f"store must be a langgraph BaseStore, got {type(store).__name__}")
        self.store = store
        self.namespace = tuple(namespace)
        self.storage_dtype = storage_dtype or DEFAULT_STORAGE_DTYPE
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {list(STORAGE_DTYPES)}, got {storage_dtype!r}")

    def _ns(self, fingerprint: str) -> tuple[str, ...]:
        return (*self.namespace, str(fingerprint))

    def get_states(self, keys: Sequence[str], fingerprint: str) -> dict[str, GistState]:
        """Stored states among `keys` written by the model `fingerprint`."""
        from langgraph.store.base import GetOp

        from gist_memory.store.store import decode_entry

        ns = self._ns(fingerprint)
        items = self.store.batch([GetOp(ns, k) for k in keys])
        out: dict[str, GistState] = {}
        for k, item in zip(keys, items, strict=True):
            if item is None:
                continue
            try:
                data = base64.b64decode(item.value["state"])
                st = decode_entry(data) if item.value.get("storage") else GistState.from_bytes(data)
            except (KeyError, TypeError, ValueError, StateFormatError) as e:
                logger.warning("LangGraph store: state %s is unreadable (%s); it will be recompressed", k[:12], e)
                continue
            if st.model_fingerprint == fingerprint:
                out[k] = st
        return out

    def put_states(self, entries: Sequence[StateEntry]) -> None:
        """Store states in `storage_dtype` (not indexed for semantic search)."""
        from langgraph.store.base import PutOp

        from gist_memory.store.store import encode_entry

        ops = []
        for e in entries:
            value = {
                "state": base64.b64encode(encode_entry(e.state, self.storage_dtype, e.key)).decode("ascii"),
                "storage": self.storage_dtype,
                "text": e.text,
                "message_ids": list(e.message_ids),
                "num_tokens": int(e.state.num_tokens),
                "num_kept": int(e.state.num_kept),
            }
            ops.append(PutOp(self._ns(e.state.model_fingerprint), e.key, value, index=False))
        if ops:
            self.store.batch(ops)

    def __repr__(self) -> str:
        return f"LangGraphStateStore({type(self.store).__name__}, namespace={self.namespace})"
