"""Chat-turn compression shared by every integration: old turns compressed once, their states cached by content.

A chat integration renders each old turn as text (e.g. `User: ...\\nAssistant: ...`) and asks a `TurnCompressor`
for the states of those texts. A turn's state is keyed by `model.state_key(text)` (content hash + model
fingerprint), so it is compressed once per model, whatever process asks for it, and a different model never gets
another model's state. The compressor is model-agnostic: the model is passed per call (anything with `compress`,
`state_key` and `fingerprint`, i.e. a `GistModel`), so one cache can serve several models side by side.

- RAM: an LRU bounded by bytes (`max_bytes`, the states' `nbytes`) and optionally by count (`max_states`);
- persistence: an optional `StateStore` (a chat history, a LangGraph store, your own) is asked before compressing
  and given every state compressed; a store that fails to persist is logged, the answer does not depend on it;
- one lock guards the cache; texts no cache holds are compressed in one batch.

    turns = TurnCompressor(max_bytes=256 * 2**20)
    states, stats = turns.states_for(model, ["User: hi\\nAssistant: hello", ...], store=history)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:  # gist_memory.state (and torch) load only when a state is handled
    from gist_memory.state import GistState

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 * 2**20
"""Default byte budget of the turn states a `TurnCompressor` keeps in RAM."""


@dataclass
class StateEntry:
    """A state to persist.

    Attributes:
        key: `model.state_key(text)`.
        state: The gist state of `text`.
        text: The text it stands for (a turn rendered as `User: ...\\nAssistant: ...`).
        message_ids: Ids of the messages the text was rendered from, oldest first (may be empty).
    """

    key: str
    state: GistState
    text: str
    message_ids: list[str] = field(default_factory=list)


@runtime_checkable
class StateStore(Protocol):
    """Persistent home of turn states (a chat history, a LangGraph store, or your own)."""

    def get_states(self, keys: Sequence[str], fingerprint: str) -> dict[str, GistState]:
        """The stored states among `keys` written by the model `fingerprint` (missing keys are left out)."""
        ...

    def put_states(self, entries: Sequence[StateEntry]) -> None:
        """Persist states (idempotent: putting a key twice keeps one copy)."""
        ...


def _nbytes(state: Any) -> int:
    n = getattr(state, "nbytes", None)
    return int(n) if isinstance(n, int) else 0


class TurnCompressor:
    """LRU of turn states (bounded by bytes) in front of an optional `StateStore`; compresses what neither holds.

    Args:
        max_bytes: Byte budget of the states kept in RAM (least recently used evicted first; a state larger than
            the budget is returned but not kept).
        max_states: Optional bound on how many states are kept as well (None: bytes alone decide).

    Attributes:
        compressed_texts: How many texts this cache has sent to `model.compress` (for tests and metrics).
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_states: Optional[int] = None) -> None:
        self._lru: OrderedDict[str, GistState] = OrderedDict()
        self._nbytes_held = 0
        self._lock = threading.RLock()
        self._max_bytes = 0
        self._max_states: Optional[int] = None
        self.max_bytes = max_bytes
        self.max_states = max_states
        self.compressed_texts = 0

    # ---- bounds ----------------------------------------------------------------------------------------
    @property
    def max_bytes(self) -> int:
        """Byte budget of the states kept in RAM; set it to resize (0: keep nothing)."""
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        value = int(value)
        if value < 0:
            raise ValueError(f"max_bytes must be >= 0, got {value}")
        with self._lock:
            self._max_bytes = value
            self._evict()

    @property
    def max_states(self) -> Optional[int]:
        """How many states are kept at most (None: no count bound); set it to resize."""
        return self._max_states

    @max_states.setter
    def max_states(self, value: Optional[int]) -> None:
        if value is not None:
            value = int(value)
            if value < 0:
                raise ValueError(f"max_states must be >= 0 or None, got {value}")
        with self._lock:
            self._max_states = value
            self._evict()

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        """Bytes of the states held in RAM now."""
        return self._nbytes_held

    def clear(self) -> None:
        """Forget every state held in RAM."""
        with self._lock:
            self._lru.clear()
            self._nbytes_held = 0

    def _evict(self) -> None:
        while self._lru and (self._nbytes_held > self._max_bytes
                             or (self._max_states is not None and len(self._lru) > self._max_states)):
            _, old = self._lru.popitem(last=False)
            self._nbytes_held -= _nbytes(old)

    def _remember(self, key: str, state: GistState) -> None:
        old = self._lru.pop(key, None)
        if old is not None:
            self._nbytes_held -= _nbytes(old)
        if _nbytes(state) > self._max_bytes:
            return
        self._lru[key] = state
        self._nbytes_held += _nbytes(state)
        self._evict()

    # ---- states ----------------------------------------------------------------------------------------
    def states_for(
        self,
        model: Any,
        texts: Sequence[str],
        message_ids: Optional[Sequence[Sequence[str]]] = None,
        store: Optional[StateStore] = None,
    ) -> tuple[list[GistState], dict[str, Any]]:
        """The states of `texts` (in order): from RAM, else from `store`, else compressed now (and stored).

        Args:
            model: The `GistModel` (anything with `compress`, `state_key` and `fingerprint`).
            texts: Rendered turns.
            message_ids: Per text, the ids of the messages it was rendered from (passed on to `store`).
            store: Where states persist across processes (None: RAM only).

        Returns:
            (states, stats) with stats `{"cached": n, "loaded": n, "compressed": n, "compress_s": seconds}`.
        """
        keys = [model.state_key(t) for t in texts]
        ids = [list(m) for m in message_ids] if message_ids is not None else [[] for _ in texts]
        stats: dict[str, Any] = {"cached": 0, "loaded": 0, "compressed": 0, "compress_s": 0.0}
        with self._lock:
            got: dict[str, GistState] = {}
            for k in keys:
                st = self._lru.get(k)
                if st is not None:
                    self._lru.move_to_end(k)
                    got[k] = st
            stats["cached"] = sum(1 for k in keys if k in got)
            missing = list(dict.fromkeys(k for k in keys if k not in got))
            if missing and store is not None:
                loaded = store.get_states(missing, str(model.fingerprint))
                for k, st in loaded.items():
                    if st.model_fingerprint != model.fingerprint:  # a store must never serve another model's state
                        continue
                    got[k] = st
                    self._remember(k, st)
                stats["loaded"] = len([k for k in missing if k in got])
                missing = [k for k in missing if k not in got]
            if missing:
                first = {k: i for i, k in reversed(list(enumerate(keys)))}
                todo = [texts[first[k]] for k in missing]
                t0 = time.perf_counter()
                fresh = model.compress(todo)
                stats["compress_s"] = time.perf_counter() - t0
                if len(fresh) != len(todo):
                    raise ValueError(f"model.compress returned {len(fresh)} states for {len(todo)} texts")
                self.compressed_texts += len(todo)
                stats["compressed"] = len(todo)
                entries = []
                for k, st in zip(missing, fresh, strict=True):
                    got[k] = st
                    self._remember(k, st)
                    entries.append(StateEntry(k, st, texts[first[k]], ids[first[k]]))
                if store is not None:
                    try:
                        store.put_states(entries)
                    except Exception as e:  # the answer does not depend on it: warn, keep serving from RAM
                        logger.warning("gist state store %r could not persist %d state(s): %s", store, len(entries), e)
        return [got[k] for k in keys], stats
