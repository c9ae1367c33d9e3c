"""Where compressed turns live: the core's `TurnCompressor` (an LRU bounded by bytes in front of an optional
persistent `StateStore`), under the names this package has always exported.

A turn's state is keyed by `model.state_key(turn_text)` (content hash + model fingerprint), so a turn is compressed
once per model, whatever process asks for it, and a different model never gets another model's state. The rules
live in `gist_memory.chat`, shared with every other integration.
"""

from __future__ import annotations

from typing import Optional

from gist_memory.chat import DEFAULT_MAX_BYTES, StateEntry, StateStore, TurnCompressor

__all__ = ["DEFAULT_MAX_BYTES", "StateCache", "StateEntry", "StateStore"]


class StateCache(TurnCompressor):
    """LRU of turn states in front of an optional `StateStore`; compresses what neither holds, in one batch.

    The core `gist_memory.chat.TurnCompressor`, bounded by count as before and by bytes as well.

    Args:
        max_states: How many states the LRU keeps.
        max_bytes: Byte budget of the states kept in RAM.

    Attributes:
        compressed_texts: How many texts this cache has sent to `model.compress` (for tests and metrics).
    """

    def __init__(self, max_states: Optional[int] = 4096, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(max_bytes=max_bytes, max_states=max_states)
