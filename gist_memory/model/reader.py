"""Reading states: the prefix cache, splicing states after it, running the base LM, and usage reports.

`prepare` builds the cache an answer starts from (the chat template's opening from a byte-bounded LRU, then each
state re-rotated to its offset); `forward_ids` runs the untouched base weights after it. Scoring and generation
both read through here and report a `Usage` per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Optional

import torch

from gist_memory.model import kv
from gist_memory.model.prompt import Prompt
from gist_memory.model.usage import Usage, usage_of
from gist_memory.state import GistState


class Reading:
    """Mixin of `GistModel`: the prefix cache, `check_states`, `prepare`, `forward_ids`, usage reporting."""

    #: Where states' heads keep uneven numbers of rows (`GistConfig.head_budget` "global" / "layer"), a read's
    #: cache stores each head's real rows only (`kv.cache_from_layers`): its memory is the kept rows, not every
    #: head padded to its layer's widest; each forward lays a layer out padded while it attends (measured:
    #: `scripts/head_budget_widths.py` for the bytes, docs/benchmarks.md for the step time). False: keep the
    #: padded layout (a little faster per decoding step, e.g. `gist-memory serve --padded-cache`). Outputs are
    #: the same either way.
    packed_cache: bool = True

    # ---- prefix cache ------------------------------------------------------------------------------
    @property
    def prefix_cache_bytes(self) -> int:
        """Most bytes the prefix cache (K/V of chat-template openings) may hold; set it to resize (0: off)."""
        return self._prefix_budget

    @prefix_cache_bytes.setter
    def prefix_cache_bytes(self, value: int) -> None:
        value = int(value)
        if value < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {value}")
        with self._lock:
            self._prefix_budget = value
            self._evict_prefixes()

    def cache_info(self) -> dict[str, int]:
        """What the model's own caches hold now: prefix entries, their bytes and the budget."""
        with self._lock:
            return {"prefix_entries": len(self._prefix_cache), "prefix_bytes": self._prefix_bytes,
                    "prefix_budget_bytes": self._prefix_budget}

    def _evict_prefixes(self) -> None:
        while self._prefix_cache and self._prefix_bytes > self._prefix_budget:
            _, layers = self._prefix_cache.popitem(last=False)
            self._prefix_bytes -= _layers_bytes(layers)

    # ---- reading states ----------------------------------------------------------------------------
    def check_states(self, states: Optional[Sequence[GistState]]) -> list[GistState]:
        """Refuse states written by another model (or not states at all) with a ValueError naming both."""
        if not states:
            return []
        out = []
        for i, st in enumerate(states):
            if not isinstance(st, GistState):
                raise ValueError(f"states[{i}] is a {type(st).__name__}, not a GistState")
            if st.model_fingerprint != self.fingerprint:
                writer = st.meta.get("model_name", "another model")
                raise ValueError(
                    f"states[{i}] was written by {writer} (fingerprint {st.model_fingerprint[:12]}), "
                    f"not by this model {self.name} (fingerprint {self.fingerprint[:12]}); recompress it"
                )
            out.append(st)
        return out

    def prefix_cache(self, prefix_ids: list[int]) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
        """K/V of the raw prefix (the chat template's opening), cached per model state.

        It never sees a passage, so it is computed without gradients even while training (the trainer clears
        the cache every step, when the weights change).
        """
        if not prefix_ids:
            return None
        key = (tuple(prefix_ids), self.fingerprint)
        with self._lock:
            hit = self._prefix_cache.get(key)
            if hit is not None:
                self._prefix_cache.move_to_end(key)
                return hit
        # computed outside the lock (two threads may both compute a new prefix; the results are equal)
        ids = torch.as_tensor([prefix_ids], device=self.device)
        with torch.no_grad():
            out = self.model.get_decoder()(input_ids=ids,
                                           position_ids=torch.arange(len(prefix_ids), device=self.device)[None],
                                           use_cache=True)
        layers = [(k.detach(), v.detach()) for k, v in kv.cache_layers(kv.out_cache(out))]
        size = _layers_bytes(layers)
        with self._lock:
            if key in self._prefix_cache:
                return self._prefix_cache[key]
            if size <= self._prefix_budget and self._fingerprint == key[1]:  # not stale after invalidation
                self._prefix_cache[key] = layers
                self._prefix_bytes += size
                self._evict_prefixes()
        return layers

    _prefix_kv = prefix_cache

    def prepare(
        self,
        prompt: Prompt,
        states: Optional[Sequence[GistState]] = None,
        system_prompt: Optional[str] = None,
        context_prefix: str = "",
        reserve: int = 0,
    ) -> tuple[Optional[list[tuple[torch.Tensor, torch.Tensor]]], int, list[int]]:
        """The cache the answer starts from: (per-layer K/V or None, next position, ids still to feed).

        `reserve`: positions the caller will add after the prompt (e.g. `max_new_tokens`), counted when deciding
        whether a `gapped` placement still fits the model's window (`splice_mode`).

        With states: the raw prefix's K/V plus the re-rotated states; the suffix ids remain to be fed.
        Without: no cache; the whole templated prompt remains to be fed (the full-text / no-context twin).
        `context_prefix` is raw text placed right before the states (e.g. "Context information is below.").
        """
        states = self.check_states(states)
        before, after = self._template(prompt, bool(states), system_prompt, context_prefix)
        if not states:
            return None, 0, self.encode(before)
        prefix_ids = self.encode(before)
        after_ids = self.encode(after)
        prefix = self.prefix_cache(prefix_ids)
        layers, pos = kv.splice(
            prefix, len(prefix_ids), states, self.rope,
            self.splice_mode(len(prefix_ids), states, len(after_ids) + max(0, int(reserve))),
            device=self.device, dtype=self.dtype,
        )  # fmt: skip
        return layers, pos, after_ids

    def splice_mode(self, prefix_len: int, states: Sequence[GistState], suffix_len: int = 0) -> str:
        """The position mode states are spliced with: the config's, except that `gapped` placements whose
        positions would run past the model's window (`max_position_embeddings`; e.g. a long chat, whose gaps
        count every raw token ever compressed) are packed instead, so no row sits at a position the model
        never saw in training."""
        mode = self.config.position_mode
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if mode == "gapped" and isinstance(limit, int) and limit > 0:
            if prefix_len + sum(int(st.span) for st in states) + suffix_len > limit:
                return "packed"
        return mode

    def reading(self, layers, adapted: Optional[bool] = None):  # noqa: ANN001, ANN201
        """Context for a reader call after `layers`: the base weights, except for an *adapted* reader (an
        adapter saved with "reader": "adapted", kept for the frozen-vs-adapted comparison of the quality
        evaluation), whose writer LoRA also acts on every token read after states. Without states (`layers`
        None or False) every reader is the base model. `adapted` overrides the model's setting (a training
        teacher)."""
        on = self.reader_adapted if adapted is None else adapted
        if on and layers is not None and layers is not False and self.writer is not None and self.writer.r > 0:
            return self.writer.writing()
        return contextlib.nullcontext()

    def forward_ids(self, ids: torch.Tensor, layers, start: int, adapted: Optional[bool] = None):  # noqa: ANN001, ANN201
        """Run the reader (the base LM) on ids (B, S) after cached per-layer K/V at position `start`.

        `layers`: per-layer (keys, values) of shape (1 or B, H, T, D) (e.g. from `prepare`), or None.
        Returns (logits (B, S, V), the updated cache). Gradients flow into `layers` if they carry any.
        `adapted`: see `reading` (None: the model's own reader).
        """
        B, S = ids.shape
        cache = None
        if layers is not None:
            cache = kv.cache_from_layers(kv.with_key_mask([(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))
                                                           for k, v in layers], kv.key_mask_of(layers)),
                                         packed=self.packed_cache)
        pos = (start + torch.arange(S, device=ids.device))[None].expand(B, -1)
        with self.reading(layers, adapted):
            out = kv.call(self.model, cache=cache, input_ids=ids, position_ids=pos, use_cache=True)
        return out.logits, kv.out_cache(out)

    _forward = forward_ids

    # ---- usage -------------------------------------------------------------------------------------
    def _usage(self, states, cached, fed: int, **extra: Any) -> Usage:  # noqa: ANN001
        """`cached`: positions of the cache read before the fed ids (an int), or the layers that hold them."""
        if not isinstance(cached, int):
            cached = 0 if cached is None else kv.mean_width(cached)
        return usage_of(states, cached + fed, fed, self.packed_cache, **extra)

    def _report(self, usage: Optional[Usage], measured: Usage) -> None:
        """Fill the caller's `usage` and this thread's (deprecated) `last_usage`."""
        if usage is not None:
            usage.update(measured)
        self._last_usage.value = measured.to_dict()

    @property
    def last_usage(self) -> dict[str, Any]:
        """Deprecated (use `usage=` or `generate_with_usage`): the calling thread's last call's usage, as a dict.

        Per thread, so concurrent callers do not read each other's numbers; `{}` before a call in this thread.
        """
        return dict(self._last_usage.value)

    @last_usage.setter
    def last_usage(self, value: dict[str, Any]) -> None:
        self._last_usage.value = dict(value)


def _layers_bytes(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return int(sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers))

