"""`PassageRegistry`: passages whose gist states are known, found by their text inside a prompt.

Stock LangChain chains paste retrieved documents into a message as text. `GistRetriever` registers every passage it
returns here (with the `GistMemory` that holds its state), and `ChatGist` cuts each registered passage out of the
messages it is given and reads its state instead of its tokens.

The rules are those of `gist_memory.registry.PassageRegistry`, the one registry both integrations use: this class
holds one of those per model (a LangChain registry is created before any model is known), so registering through
it and reading through `ChatGist` follow exactly the same matching, checking and bounds as LlamaIndex's `GistLLM`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from gist_memory.registry import MIN_PASSAGE_CHARS
from gist_memory.registry import PassageRegistry as CoreRegistry

if TYPE_CHECKING:
    from gist_memory import GistState

__all__ = ["MIN_PASSAGE_CHARS", "PassageRegistry", "default_registry"]


@dataclass
class _Entry:
    """A registered passage found in a text (what `PassageRegistry.find` returns)."""

    text: str
    key: str
    registry: CoreRegistry

    def load(self) -> GistState:
        return self.registry.states([self.key])[0]


class PassageRegistry:
    """Known passages (text -> where its gist state is), per model, most recently registered kept, bounded.

    Args:
        max_passages: How many passages are remembered per model (the oldest registrations are forgotten first).
    """

    def __init__(self, max_passages: int = 2048) -> None:
        self.max_passages = int(max_passages)
        self._by_model: weakref.WeakKeyDictionary[Any, CoreRegistry] = weakref.WeakKeyDictionary()
        self._pending: dict[str, list[tuple[str, GistState]]] = {}  # fingerprint -> states registered before
        self._lock = threading.RLock()

    def for_model(self, model: Any) -> CoreRegistry:
        """The core registry of `model` (created on first use; states registered for it before are added)."""
        with self._lock:
            reg = self._by_model.get(model)
            if reg is None:
                reg = self._by_model[model] = CoreRegistry(model, max_passages=self.max_passages)
            pending = self._pending.pop(str(model.fingerprint), [])
        for text, state in pending:
            reg.add_state(text, state)
        return reg

    def __len__(self) -> int:
        with self._lock:
            return sum(len(r) for r in self._by_model.values()) + sum(len(v) for v in self._pending.values())

    def clear(self) -> None:
        """Forget every passage."""
        with self._lock:
            for r in self._by_model.values():
                r.clear()
            self._pending.clear()

    def register_hits(self, memory: Any, hits: Sequence[Any]) -> None:
        """Register search hits of `memory` (objects with `.id` and `.text`, e.g. `GistMemory.search` results)."""
        self.for_model(memory.model).add_hits(memory, hits)

    def register_ids(self, memory: Any, ids: Sequence[str]) -> None:
        """Register passages of `memory` by id (their texts are read from it).

        Raises:
            KeyError: An id is not in `memory`.
        """
        self.for_model(memory.model).add_ids(memory, ids)

    def register_state(self, state: GistState, text: Optional[str] = None) -> None:
        """Register a state directly (its text is `text`, or the text the state was compressed from)."""
        text = text if text is not None else state.text
        if not text:
            raise ValueError("the state carries no text; pass text=")
        with self._lock:
            regs = [r for m, r in self._by_model.items() if str(m.fingerprint) == state.model_fingerprint]
            if not regs:  # its model has not asked yet: added when it does (`for_model`)
                self._pending.setdefault(state.model_fingerprint, []).append((text, state))
                return
        regs[0].add_state(text, state)

    def find(self, text: str, model: Any = None) -> list[tuple[int, int, _Entry]]:
        """Occurrences `(start, end, entry)` of registered passages in `text` (normalised by the model), in text
        order, for `model` (default: every model registered so far). Longer passages win where two overlap."""
        with self._lock:
            regs = [self.for_model(model)] if model is not None else list(self._by_model.values())
        out: list[tuple[int, int, _Entry]] = []
        for reg in regs:
            norm, found = reg.find(text)
            out += [(s, e, _Entry(norm[s:e], key, reg)) for s, e, key in found]
        return sorted(out, key=lambda x: x[0])


_DEFAULT = PassageRegistry()


def default_registry() -> PassageRegistry:
    """The process-wide registry `GistRetriever` and `ChatGist` share unless given their own."""
    return _DEFAULT
