"""One passage registry for every integration: known passages, found by their text inside a prompt, read from
their gist states.

Stock LlamaIndex and LangChain pipelines paste retrieved passages into the prompt as text. A retriever registers
each passage it returns here; the LLM wrapper cuts every registered passage out of the prompt and reads its state
instead of its tokens. One set of rules for both:

- a passage is known by its exact text after `model.normalize`, keyed by `model.state_key(text)` (content hash +
  model fingerprint): a text that changed gets a new key and a new state, never a stale one;
- only passages of at least `MIN_PASSAGE_CHARS` characters are matched inside prompts (shorter texts occur by
  chance inside other text); at each position the longest known passage wins, matches never overlap;
- a state is served only if it was written by this model from this exact text (fingerprint and text hash checked);
  one that cannot be loaded any more (deleted from its memory) is recompressed from the text it stands for;
- both the states (LRU, bytes) and the known passages (oldest registration forgotten first, count) are bounded;
- one lock guards everything; `for_model` gives the registry every integration built on a model shares.

    registry = PassageRegistry.for_model(model)
    registry.add_texts(["passage one ...", ...])        # known from now on
    registry.add_hits(memory, memory.search("q"))       # GistMemory hits: states loaded from the memory
    spliced = registry.splice(prompt)                  # spans that are known passages, cut out
    states = registry.states(spliced.keys)             # their states, in prompt order
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

PREFIX_CHARS = 16
"""Characters of a passage's start used to index it (a prompt position is only compared with passages sharing it)."""
MIN_PASSAGE_CHARS = 32
"""Shorter passages are never matched inside prompts (they are too likely to occur by chance inside other text)."""
DEFAULT_MAX_BYTES_IN_RAM = 512 * 2**20
DEFAULT_MAX_PASSAGES = 65536

_DEFAULTS: weakref.WeakKeyDictionary[Any, dict[type, PassageRegistry]] = weakref.WeakKeyDictionary()
_DEFAULTS_LOCK = threading.Lock()


@dataclass
class SplicedPrompt:
    """A prompt with its known passages cut out.

    Attributes:
        text: The prompt without the passages (what the model still reads as tokens).
        keys: State keys of the passages, in the order they appeared.
        spans: Character spans `(start, end)` of the passages in `prompt`.
        prompt: The normalised prompt the spans refer to.
    """

    text: str
    keys: list[str] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    prompt: str = ""


class PassageRegistry:
    """Known passages (text -> state key) and their gist states (LRU in RAM, optionally a `GistStore`).

    Args:
        model: The `GistModel` whose states these are (states of another model are never served).
        max_bytes_in_ram: Byte budget of the LRU of states; evicted states are reloaded (from `store`, or the
            memory they came from) or recompressed from their text.
        max_passages: How many passages are known at most (the oldest registration is forgotten first).
        store: Optional `gist_memory.GistStore` that keeps states across processes.
    """

    def __init__(self, model: Any, *, max_bytes_in_ram: int = DEFAULT_MAX_BYTES_IN_RAM,
                 max_passages: int = DEFAULT_MAX_PASSAGES, store: Any = None) -> None:
        for attr in ("compress", "normalize", "state_key", "fingerprint"):
            if not hasattr(model, attr):
                raise ValueError(f"model has no {attr!r}; PassageRegistry needs a GistModel")
        if max_bytes_in_ram < 0:
            raise ValueError(f"max_bytes_in_ram must be >= 0, got {max_bytes_in_ram}")
        if max_passages < 1:
            raise ValueError(f"max_passages must be >= 1, got {max_passages}")
        self.max_passages = int(max_passages)
        self.model = model
        self.store = store
        self.max_bytes_in_ram = int(max_bytes_in_ram)
        self._lock = threading.RLock()
        self._texts: OrderedDict[str, str] = OrderedDict()  # key -> normalised text, oldest registration first
        self._hashes: dict[str, str] = {}  # key -> sha256 of the normalised text
        self._prefix: dict[str, list[str]] = {}  # first PREFIX_CHARS chars -> keys, longest text first
        self._loaders: dict[str, Callable[[], Any]] = {}  # key -> reload a state from where it came from
        self._alive: dict[str, Callable[[], bool]] = {}  # key -> does its source still hold it
        self._states: OrderedDict[str, Any] = OrderedDict()
        self._nbytes = 0
        self.stats = {"compressed": 0, "served": 0, "reloaded": 0}

    @classmethod
    def for_model(cls, model: Any) -> PassageRegistry:
        """The default registry of `model`, shared by every `GistLLM` and retriever built on it."""
        with _DEFAULTS_LOCK:
            per_class = _DEFAULTS.setdefault(model, {})  # a subclass (e.g. LlamaIndex's) has its own default
            reg = per_class.get(cls)
            if reg is None:
                reg = per_class[cls] = cls(model)
            return reg

    # ---- registering ----------------------------------------------------------------------------------
    def key_for(self, text: str) -> str:
        """State key of `text` (content hash + model fingerprint)."""
        return self.model.state_key(text)

    def _known(self, norm: str) -> str:
        key = self.model.state_key(norm)
        with self._lock:
            if key in self._texts:
                self._texts.move_to_end(key)
                return key
            self._texts[key] = norm
            self._hashes[key] = hashlib.sha256(norm.encode("utf-8", "surrogatepass")).hexdigest()
            if len(norm) >= MIN_PASSAGE_CHARS:  # a new list, never sorted in place: `find` may be reading it
                bucket = [*self._prefix.get(norm[:PREFIX_CHARS], []), key]
                self._prefix[norm[:PREFIX_CHARS]] = sorted(bucket, key=lambda k: -len(self._texts[k]))
            while len(self._texts) > self.max_passages:
                self._forget(next(iter(self._texts)))
        return key

    def _forget(self, key: str) -> None:
        """Drop a passage (the caller holds the lock)."""
        norm = self._texts.pop(key)
        self._hashes.pop(key, None)
        self._loaders.pop(key, None)
        self._alive.pop(key, None)
        st = self._states.pop(key, None)
        if st is not None:
            self._nbytes -= st.nbytes
        head = norm[:PREFIX_CHARS]
        bucket = [k for k in self._prefix.get(head, []) if k != key]
        if bucket:
            self._prefix[head] = bucket
        else:
            self._prefix.pop(head, None)

    def add_texts(self, texts: Iterable[str], compress: bool = True) -> list[str]:
        """Make passages known; returns their state keys in order.

        Args:
            texts: Passage texts, exactly as they will appear in prompts.
            compress: Compute missing states now (batched); False defers that to the first prompt that holds
                the passage.

        Raises:
            ValueError: A text is not a str or is empty after normalisation.
        """
        keys = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}] is a {type(t).__name__}, not a str")
            norm = self.model.normalize(t)
            if not norm.strip():
                raise ValueError(f"texts[{i}] is empty or whitespace only")
            keys.append(self._known(norm))
        if compress:
            self.states(keys)
        return keys

    def add_state(
        self, text: str, state: Any = None, loader: Optional[Callable[[], Any]] = None,
        alive: Optional[Callable[[], bool]] = None,
    ) -> str:
        """Register a passage whose state lives elsewhere (a `GistMemory` hit); returns its key.

        Args:
            text: The passage text the state was compressed from.
            state: Its `GistState` (must come from this registry's model), or None to load it when first needed.
            loader: How to get the state (back after eviction); without one the text is recompressed.
            alive: Whether the passage still exists where it came from; `splice_states` reads a passage that no
                longer does as text (and forgets it).

        Raises:
            ValueError: The state is of another model or another text.
        """
        norm = self.model.normalize(text)
        if not norm.strip():
            raise ValueError("text is empty or whitespace only")
        key = self._known(norm)
        if state is not None:
            self._check(key, state)
        with self._lock:
            if loader is not None:
                self._loaders[key] = loader
            if alive is not None:
                self._alive[key] = alive
            if state is not None:
                self._put(key, state)
        return key

    def add_hits(self, memory: Any, hits: Sequence[Any]) -> list[str]:
        """Make search hits of a `GistMemory` known (objects with `.id` and `.text`); their states are loaded from
        `memory` when first needed (recompressed from the text if the memory no longer holds them)."""
        keys = []
        for h in hits:
            if not str(h.text).strip():
                continue
            keys.append(self.add_state(h.text, loader=_memory_loader(memory, h.id),
                                       alive=_memory_alive(memory, h.id)))
        return keys

    def add_ids(self, memory: Any, ids: Sequence[str]) -> list[str]:
        """Make passages of `memory` known by id (their texts are read from it).

        Raises:
            KeyError: An id is not in `memory`.
        """
        hits = []
        for pid in ids:
            hit = memory.get(pid)
            if hit is None:
                raise KeyError(f"no passage {pid!r} in {memory!r}")
            hits.append(hit)
        return self.add_hits(memory, hits)

    def __contains__(self, key: object) -> bool:
        return key in self._texts

    def __len__(self) -> int:
        return len(self._texts)

    def text(self, key: str) -> str:
        """The normalised text of a known passage."""
        return self._texts[key]

    def clear(self) -> None:
        """Forget every passage and state."""
        with self._lock:
            self._texts.clear()
            self._hashes.clear()
            self._prefix.clear()
            self._loaders.clear()
            self._alive.clear()
            self._states.clear()
            self._nbytes = 0

    # ---- states ---------------------------------------------------------------------------------------
    def _check(self, key: str, state: Any) -> None:
        if state.model_fingerprint != self.model.fingerprint:
            raise ValueError(
                f"state of passage {key[:12]} was written by another model (fingerprint "
                f"{state.model_fingerprint[:12]}, this model {self.model.fingerprint[:12]})"
            )
        if state.text_hash != self._hashes[key]:
            raise ValueError(
                f"state of passage {key[:12]} was compressed from another text (text hash {state.text_hash[:12]}); "
                f"the model's normalisation must match model.normalize"
            )

    def _put(self, key: str, state: Any) -> None:
        old = self._states.pop(key, None)
        if old is not None:
            self._nbytes -= old.nbytes
        if state.nbytes > self.max_bytes_in_ram:
            return
        self._states[key] = state
        self._nbytes += state.nbytes
        while self._nbytes > self.max_bytes_in_ram and self._states:
            _, ev = self._states.popitem(last=False)
            self._nbytes -= ev.nbytes

    def _store_key(self, key: str) -> str:
        return self.store.key_for(self._hashes[key], self.model.fingerprint)

    def states(self, keys: Sequence[str]) -> list[Any]:
        """The states of known passages, in order (loaded, reloaded or compressed in one batch as needed).

        Raises:
            KeyError: A key that was never registered.
        """
        out: list[Any] = [None] * len(keys)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, key in enumerate(keys):
                if key not in self._texts:
                    raise KeyError(f"unknown passage key {key!r}; register its text first")
                st = self._states.get(key)
                if st is not None:
                    self._states.move_to_end(key)
                    out[i] = st
                else:
                    missing.setdefault(key, []).append(i)
            for key in list(missing):
                st = None
                if self.store is not None:
                    st = self.store.get(self._store_key(key), model_fingerprint=self.model.fingerprint)
                if st is None and key in self._loaders:
                    try:
                        st = self._loaders[key]()
                        self._check(key, st)
                    except (ValueError, KeyError, OSError):
                        st = None
                if st is not None:
                    self.stats["reloaded"] += 1
                    self._put(key, st)
                    for i in missing.pop(key):
                        out[i] = st
            if missing:
                todo = list(missing)
                fresh = self.model.compress([self._texts[k] for k in todo])
                self.stats["compressed"] += len(todo)
                for key, st in zip(todo, fresh, strict=True):
                    self._check(key, st)
                    self._put(key, st)
                    if self.store is not None:
                        self.store.put(st)
                    for i in missing[key]:
                        out[i] = st
            self.stats["served"] += len(keys)
        return out

    # ---- prompts --------------------------------------------------------------------------------------
    def find(self, prompt: str) -> tuple[str, list[tuple[int, int, str]]]:
        """Known passages in `prompt`: (normalised prompt, [(start, end, key), ...]) left to right, no overlaps.

        At each position the longest known passage starting there wins.
        """
        text = self.model.normalize(prompt)
        found: list[tuple[int, int, str]] = []
        if not self._prefix:
            return text, found
        prefix, texts = self._prefix, self._texts
        i, n = 0, len(text) - PREFIX_CHARS
        while i <= n:
            bucket = prefix.get(text[i : i + PREFIX_CHARS])
            if bucket:
                for key in bucket:
                    t = texts.get(key)  # None: forgotten meanwhile by another thread
                    if t is not None and text.startswith(t, i):
                        found.append((i, i + len(t), key))
                        i += len(t)
                        break
                else:
                    i += 1
            else:
                i += 1
        return text, found

    def splice(self, prompt: str) -> SplicedPrompt:
        """Cut every known passage out of `prompt`; whitespace left between adjacent passages goes too."""
        text, found = self.find(prompt)
        return self._cut(text, found)

    def splice_states(self, prompt: str) -> tuple[SplicedPrompt, list[Any]]:
        """`splice` and the states of the passages cut out, in prompt order: what an LLM wrapper reads.

        A passage whose source no longer holds it (deleted from its `GistMemory` since it was retrieved) stays in
        the prompt as text and is forgotten.
        """
        text, found = self.find(prompt)
        keep = []
        for s, e, key in found:
            alive = self._alive.get(key)
            if alive is not None and not _safe(alive):
                with self._lock:
                    if key in self._texts:
                        self._forget(key)
                continue
            keep.append((s, e, key))
        sp = self._cut(text, keep)
        return sp, (self.states(sp.keys) if sp.keys else [])

    @staticmethod
    def _cut(text: str, found: list[tuple[int, int, str]]) -> SplicedPrompt:
        if not found:
            return SplicedPrompt(text=text, prompt=text)
        parts, last = [], 0
        for s, e, _ in found:
            parts.append(text[last:s])
            last = e
        parts.append(text[last:])
        kept = [p for j, p in enumerate(parts) if j in (0, len(parts) - 1) or p.strip()]
        return SplicedPrompt(
            text="".join(kept).strip(),
            keys=[k for _, _, k in found],
            spans=[(s, e) for s, e, _ in found],
            prompt=text,
        )


def _memory_loader(memory: Any, pid: str) -> Callable[[], Any]:
    def load() -> Any:
        hit = memory.get(pid)
        if hit is None:
            raise KeyError(pid)
        return hit.state

    return load


def _memory_alive(memory: Any, pid: str) -> Callable[[], bool]:
    return lambda: pid in memory


def _safe(alive: Callable[[], bool]) -> bool:
    try:
        return bool(alive())
    except Exception:  # noqa: BLE001 - a source that cannot answer is treated as gone: read the text
        return False
