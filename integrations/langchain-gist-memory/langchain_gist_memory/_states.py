"""Where compressed turns live: an in-memory LRU in front of an optional persistent `StateStore`.

A turn's state is keyed by `model.state_key(turn_text)` (content hash + model fingerprint), so a turn is compressed
once per model, whatever process asks for it, and a different model never gets another model's state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:  # gist_memory (and torch) load only when a state is handled
    from gist_memory import GistState

logger = logging.getLogger(__name__)


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
    """Persistent home of turn states (`GistHistoryStore`, `LangGraphStateStore`, or your own)."""

    def get_states(self, keys: Sequence[str], fingerprint: str) -> dict[str, GistState]:
        """The stored states among `keys` written by the model `fingerprint` (missing keys are left out)."""
        ...

    def put_states(self, entries: Sequence[StateEntry]) -> None:
        """Persist states (idempotent: putting a key twice keeps one copy)."""
        ...


class StateCache:
    """LRU of turn states in front of an optional `StateStore`; compresses what neither holds, in one batch.

    Args:
        max_states: How many states the LRU keeps.

    Attributes:
        compressed_texts: How many texts this cache has sent to `model.compress` (for tests and metrics).
    """

    def __init__(self, max_states: int = 4096) -> None:
        self.max_states = int(max_states)
        self._lru: OrderedDict[str, GistState] = OrderedDict()
        self._lock = threading.RLock()
        self.compressed_texts = 0

    def __len__(self) -> int:
        return len(self._lru)

    def clear(self) -> None:
        """Forget every state held in RAM."""
        with self._lock:
            self._lru.clear()

    def _remember(self, key: str, state: GistState) -> None:
        self._lru[key] = state
        self._lru.move_to_end(key)
        while len(self._lru) > self.max_states:
            self._lru.popitem(last=False)

    def states_for(
        self,
        model: Any,
        texts: Sequence[str],
        message_ids: Optional[Sequence[Sequence[str]]] = None,
        store: Optional[StateStore] = None,
    ) -> tuple[list[GistState], dict[str, Any]]:
        """The states of `texts` (in order): from RAM, else from `store`, else compressed now (and stored).

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
