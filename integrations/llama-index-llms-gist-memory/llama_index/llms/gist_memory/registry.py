"""`GistRegistry`: the passages a `GistLLM` may replace by their gist states.

It is `gist_memory.registry.PassageRegistry` (the one registry both integrations use, with one set of rules:
exact text after `model.normalize`, keyed by `model.state_key`, passages of at least `MIN_PASSAGE_CHARS` matched
in prompts, states checked for model and text, byte-bounded LRU) plus what LlamaIndex needs: nodes are registered
by the text a synthesizer shows the LLM, and marked with their state key.

    registry = GistRegistry.for_model(model)           # the one GistLLM(model) and the retriever share
    registry.add_texts(["passage one ...", ...])        # known from now on
    spliced = registry.splice(prompt)                  # spans that are known passages, cut out
    states = registry.states(spliced.keys)             # their states, in prompt order
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gist_memory.registry import (
    DEFAULT_MAX_BYTES_IN_RAM,
    MIN_PASSAGE_CHARS,
    PREFIX_CHARS,
    PassageRegistry,
    SplicedPrompt,
)

__all__ = ["DEFAULT_MAX_BYTES_IN_RAM", "GistRegistry", "METADATA_KEY", "MIN_PASSAGE_CHARS", "PREFIX_CHARS",
           "SplicedPrompt", "mark_node", "node_llm_text"]

METADATA_KEY = "gist_state_key"
"""Node metadata key holding the state key (excluded from the LLM and embedding views of the node)."""



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


class GistRegistry(PassageRegistry):
    """Known passages (text -> state key) and their gist states, with LlamaIndex node registration.

    Args:
        model: The `GistModel` whose states these are (states of another model are never served).
        max_bytes_in_ram: Byte budget of the LRU of states; evicted states are reloaded (from `store`, or the
            memory they came from) or recompressed from their text.
        max_passages: How many passages are known at most (the oldest registration is forgotten first).
        store: Optional `gist_memory.GistStore` that keeps states across processes.
    """

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

    # ---- prompts that carry passages in another form -------------------------------------------------------
    def holds(self, text: str) -> bool:
        """Whether normalised `text` (>= `MIN_PASSAGE_CHARS`) lies inside a known passage (a chunk of one)."""
        if len(text) < MIN_PASSAGE_CHARS:
            return False
        with self._lock:
            texts = list(self._texts.values())
        return any(text in t for t in texts)

    def cut_short(self, text: str) -> int:
        """How many known passages start in normalised `text` (their first `MIN_PASSAGE_CHARS` characters or more)
        without appearing there whole: truncated or rewritten, so read as text."""
        n, i, last = 0, 0, len(text) - PREFIX_CHARS
        while i <= last:
            bucket = self._prefix.get(text[i : i + PREFIX_CHARS])
            if bucket:
                heads = [t for t in (self._texts.get(k) for k in bucket) if t is not None]
                if any(text.startswith(t[:MIN_PASSAGE_CHARS], i) for t in heads) and not any(
                    text.startswith(t, i) for t in heads
                ):
                    n += 1
                    i += MIN_PASSAGE_CHARS
                    continue
            i += 1
        return n
