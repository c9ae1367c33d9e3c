"""`GistRegistry`: the passages a `GistLLM` may replace by their gist states.

A passage is known by its exact text (after `model.normalize`), keyed by `model.state_key(text)`: a content hash
that also names the model, so a node whose text changed gets a new key and a new state, never a stale one.
Registering a text is cheap (a hash and a prefix index); its state is computed when first needed (or at once
with `compress=True`) and kept in a byte-bounded LRU, optionally backed by a `GistStore` on disk.

    registry = GistRegistry.for_model(model)           # the one GistLLM(model) and the retriever share
    registry.add_texts(["passage one ...", ...])        # known from now on
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
"""Characters of a passage's start used to find it in a prompt; shorter passages are not matched in prompts."""
DEFAULT_MAX_BYTES_IN_RAM = 512 * 2**20
METADATA_KEY = "gist_state_key"
"""Node metadata key holding the state key (excluded from the LLM and embedding views of the node)."""

_DEFAULTS: weakref.WeakKeyDictionary[Any, GistRegistry] = weakref.WeakKeyDictionary()
_DEFAULTS_LOCK = threading.Lock()


def node_llm_text(node: Any) -> str:
    """The text a LlamaIndex synthesizer puts into the prompt for `node` (metadata lines included)."""
    from llama_index.core.schema import MetadataMode

    return node.get_content(metadata_mode=MetadataMode.LLM)


def mark_node(node: Any, key: str) -> Any:
    """A shallow copy of `node` whose metadata carries the state key, hidden from the LLM and embedding views.

    The caller's node (often the docstore's own object) is not modified: its hash would change.
    """
    md = dict(node.metadata or {})
    md[METADATA_KEY] = key
    upd: dict[str, Any] = {"metadata": md}
    for attr in ("excluded_llm_metadata_keys", "excluded_embed_metadata_keys"):
        cur = list(getattr(node, attr, None) or [])
        if METADATA_KEY not in cur:
            cur.append(METADATA_KEY)
        upd[attr] = cur
    return node.model_copy(update=upd)


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


class GistRegistry:
    """Known passages (text -> state key) and their gist states (LRU in RAM, optionally a `GistStore`).

    Args:
        model: The `GistModel` whose states these are (states of another model are never served).
        max_bytes_in_ram: Byte budget of the LRU of states; evicted states are reloaded (from `store`, or the
            memory they came from) or recompressed from their text.
        store: Optional `gist_memory.GistStore` that keeps states across processes.
    """

    def __init__(self, model: Any, *, max_bytes_in_ram: int = DEFAULT_MAX_BYTES_IN_RAM, store: Any = None) -> None:
        for attr in ("compress", "normalize", "state_key", "fingerprint"):
            if not hasattr(model, attr):
                raise ValueError(f"model has no {attr!r}; GistRegistry needs a GistModel")
        if max_bytes_in_ram < 0:
            raise ValueError(f"max_bytes_in_ram must be >= 0, got {max_bytes_in_ram}")
        self.model = model
        self.store = store
        self.max_bytes_in_ram = int(max_bytes_in_ram)
        self._lock = threading.RLock()
        self._texts: dict[str, str] = {}  # key -> normalised text
        self._hashes: dict[str, str] = {}  # key -> sha256 of the normalised text
        self._prefix: dict[str, list[str]] = {}  # first PREFIX_CHARS chars -> keys, longest text first
        self._loaders: dict[str, Callable[[], Any]] = {}  # key -> reload a state from where it came from
        self._states: OrderedDict[str, Any] = OrderedDict()
        self._nbytes = 0
        self.stats = {"compressed": 0, "served": 0, "reloaded": 0}

    @classmethod
    def for_model(cls, model: Any) -> GistRegistry:
        """The default registry of `model`, shared by every `GistLLM` and retriever built on it."""
        with _DEFAULTS_LOCK:
            reg = _DEFAULTS.get(model)
            if reg is None:
                reg = cls(model)
                _DEFAULTS[model] = reg
            return reg

    # ---- registering ----------------------------------------------------------------------------------
    def key_for(self, text: str) -> str:
        """State key of `text` (content hash + model fingerprint)."""
        return self.model.state_key(text)

    def _known(self, norm: str) -> str:
        key = self.model.state_key(norm)
        with self._lock:
            if key not in self._texts:
                self._texts[key] = norm
                self._hashes[key] = hashlib.sha256(norm.encode("utf-8", "surrogatepass")).hexdigest()
                if len(norm) >= PREFIX_CHARS:  # a new list, never sorted in place: `find` may be reading it
                    bucket = [*self._prefix.get(norm[:PREFIX_CHARS], []), key]
                    self._prefix[norm[:PREFIX_CHARS]] = sorted(bucket, key=lambda k: -len(self._texts[k]))
        return key

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

    def add_nodes(self, nodes: Iterable[Any], compress: bool = True) -> list[Any]:
        """Make nodes (or `NodeWithScore`s) known by the text a synthesizer shows the LLM; returns marked copies.

        Each returned node carries its state key in `metadata["gist_state_key"]` (excluded from the LLM and
        embedding text); scores are kept. Nodes whose text changed get a new key (and state).
        """
        items = list(nodes)
        base = [getattr(n, "node", n) for n in items]
        keys = self.add_texts([node_llm_text(b) for b in base], compress=compress)
        out = []
        for item, b, key in zip(items, base, keys, strict=True):
            marked = mark_node(b, key)
            if hasattr(item, "node"):
                out.append(item.model_copy(update={"node": marked}))
            else:
                out.append(marked)
        return out

    def add_state(
        self, text: str, state: Any = None, loader: Optional[Callable[[], Any]] = None
    ) -> str:
        """Register a passage whose state lives elsewhere (a `GistMemory` hit); returns its key.

        Args:
            text: The passage text the state was compressed from.
            state: Its `GistState` (must come from this registry's model), or None to load it when first needed.
            loader: How to get the state (back after eviction); without one the text is recompressed.

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
            if state is not None:
                self._put(key, state)
        return key

    def register(self, obj: Any, compress: bool = False) -> list[str]:
        """Make known whatever `obj` holds: an index (its docstore's nodes), nodes, documents or texts.

        Returns the state keys. With `compress=False` (default) states are computed on first use.
        """
        docstore = getattr(obj, "docstore", None)
        if docstore is not None and hasattr(docstore, "docs"):
            obj = list(docstore.docs.values())
        if isinstance(obj, str):
            obj = [obj]
        items = list(obj)
        if all(isinstance(x, str) for x in items):
            return self.add_texts(items, compress=compress)
        marked = self.add_nodes(items, compress=compress)
        return [getattr(m, "node", m).metadata[METADATA_KEY] for m in marked]

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
                    t = texts[key]
                    if text.startswith(t, i):
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
