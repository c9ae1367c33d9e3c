"""`PassageRegistry`: passages whose gist states are known, found by their text inside a prompt.

Stock LangChain chains paste retrieved documents into a message as text. `GistRetriever` registers every passage it
returns here (with the `GistMemory` that holds its state), and `ChatGist` cuts each registered passage out of the
messages it is given and reads its state instead of its tokens.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from gist_memory import GistState

MIN_PASSAGE_CHARS = 32  # shorter texts are too likely to occur by chance inside other text


@dataclass
class _Entry:
    text: str
    memory: Any = None  # GistMemory holding the state (by id), or None when `state` is given
    pid: Optional[str] = None
    state: Optional[GistState] = None

    def load(self) -> GistState:
        if self.state is not None:
            return self.state
        hit = self.memory.get(self.pid)
        if hit is None:
            raise KeyError(self.pid)
        return hit.state


class PassageRegistry:
    """Known passages (text -> where its gist state is), most recently registered first, bounded.

    Args:
        max_passages: How many passages are remembered (the oldest registrations are forgotten first).
    """

    def __init__(self, max_passages: int = 2048) -> None:
        self.max_passages = int(max_passages)
        self._by_text: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._by_text)

    def clear(self) -> None:
        """Forget every passage."""
        with self._lock:
            self._by_text.clear()

    def _put(self, entry: _Entry) -> None:
        text = entry.text.strip()
        if len(text) < MIN_PASSAGE_CHARS:
            return
        entry.text = text
        with self._lock:
            self._by_text[text] = entry
            self._by_text.move_to_end(text)
            while len(self._by_text) > self.max_passages:
                self._by_text.popitem(last=False)

    def register_hits(self, memory: Any, hits: Sequence[Any]) -> None:
        """Register search hits of `memory` (objects with `.id` and `.text`, e.g. `GistMemory.search` results)."""
        for h in hits:
            self._put(_Entry(h.text, memory=memory, pid=h.id))

    def register_ids(self, memory: Any, ids: Sequence[str]) -> None:
        """Register passages of `memory` by id (their texts are read from it).

        Raises:
            KeyError: An id is not in `memory`.
        """
        for pid in ids:
            hit = memory.get(pid)
            if hit is None:
                raise KeyError(f"no passage {pid!r} in {memory!r}")
            self._put(_Entry(hit.text, memory=memory, pid=pid))

    def register_state(self, state: GistState, text: Optional[str] = None) -> None:
        """Register a state directly (its text is `text`, or the text the state was compressed from)."""
        text = text if text is not None else state.text
        if not text:
            raise ValueError("the state carries no text; pass text=")
        self._put(_Entry(text, state=state))

    def find(self, text: str) -> list[tuple[int, int, _Entry]]:
        """Non-overlapping occurrences `(start, end, entry)` of registered passages in `text`, in text order.

        Longer passages win where two overlap.
        """
        if not text or not self._by_text:
            return []
        with self._lock:
            entries = list(self._by_text.values())
        found: list[tuple[int, int, _Entry]] = []
        for e in sorted(entries, key=lambda x: -len(x.text)):
            if len(e.text) > len(text):
                continue
            start = text.find(e.text)
            while start >= 0:
                end = start + len(e.text)
                if all(end <= s or start >= t for s, t, _ in found):
                    found.append((start, end, e))
                start = text.find(e.text, end)
        return sorted(found, key=lambda x: x[0])


_DEFAULT = PassageRegistry()


def default_registry() -> PassageRegistry:
    """The process-wide registry `GistRetriever` and `ChatGist` share unless given their own."""
    return _DEFAULT
