"""`Usage`: what one call to the model read and how long it took, returned with that call.

    u = Usage()
    text = model.generate("question", states=states, usage=u)    # u is filled when the call returns
    text, u = model.generate_with_usage("question", states=states)

Each call fills its own `Usage`, so many threads can share one `GistModel` and each still gets its own numbers.
`GistModel.last_usage` (a dict of the calling thread's last call) remains for callers of 0.2, deprecated.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class Usage:
    """Tokens and timings of one `generate`/`stream`/`score`/`score_choices` call.

    Attributes:
        raw_tokens: Raw tokens the states stand for (0 without states).
        kept_rows: Rows the states keep (gists + anchors; 0 without states).
        positions_read: Positions the answer attended over: cached (prefix + states) plus fed prompt tokens.
        state_positions: Positions the states take in the cache: `kept_rows`, or more where heads keep uneven
            numbers of rows (`GistConfig.head_budget`: the cache is as wide as the widest head).
        positions_held: Positions' worth of keys and values the cache holds between forwards: `positions_read`,
            less the states' empty slots where the cache stores only each head's kept rows
            (`GistModel.packed_cache`, the default). Memory, where `positions_read` is attention work.
        prompt_tokens: Prompt tokens fed through the model (the part not taken from a cache).
        new_tokens: Tokens generated (0 for scoring).
        ttft_s: Seconds to the first generated token (None for scoring, or when no token was picked).
        total_s: Seconds the whole call took.
    """

    raw_tokens: int = 0
    kept_rows: int = 0
    positions_read: int = 0
    state_positions: int = 0
    positions_held: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: Optional[float] = None
    total_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (json-ready)."""
        return dataclasses.asdict(self)

    def update(self, other: Usage) -> None:
        """Copy every field of `other` into this one (how a call fills the caller's out-parameter)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(other, f.name))


def usage_of(states, read: int, fed: int, packed: bool, **extra: Any) -> Usage:  # noqa: ANN001
    """The `Usage` of a call that read `read` positions (cache and fed ids) after `states`; `packed`: whether its
    cache stored only each head's kept rows (`Reading.packed_cache`)."""
    states = states or []
    kept = int(round(sum(s.num_rows for s in states)))
    wide = int(round(sum(s.num_positions for s in states)))
    ragged = any(s.has_empty_slots for s in states)
    return Usage(raw_tokens=int(sum(s.num_tokens for s in states)), kept_rows=kept, state_positions=wide,
                 positions_read=read, positions_held=read - (wide - kept if packed and ragged else 0),
                 prompt_tokens=fed, **extra)


def check_usage(usage: Any) -> Optional[Usage]:
    """`usage` if it is None or a `Usage`; a TypeError naming what was passed otherwise."""
    if usage is not None and not isinstance(usage, Usage):
        raise TypeError(f"usage must be a gist_memory.model.usage.Usage (or None), got {type(usage).__name__}")
    return usage


class LastUsage(threading.local):
    """Per-thread holder of the last call's usage (backs the deprecated `GistModel.last_usage`)."""

    def __init__(self) -> None:
        self.value: dict[str, Any] = {}
