"""Batched generation: several independent requests decoded together, one forward per step for all of them.

    from gist_memory.model.batching import BatchRequest, generate_batch

    texts = generate_batch(model, [BatchRequest("Who built it?", states_a, {"max_new_tokens": 32}),
                                   BatchRequest("When?", None, {"stop": ["\\n"]})])

Each request is prepared as `GistModel.generate` prepares it (`prepare`: the cached template opening and its
re-rotated states, the next position, the ids still to feed). The rows' caches are left-padded with zeros to one
length and a (B, L) attention mask hides the pads; position ids are explicit per row (a compressed cache has gaps,
so a row's positions are not its slot numbers). The rows' remaining prompt ids are prefilled, then all rows decode
one token per step in one forward. A finished row leaves the batch at once (`index_select` on the cache, and the
padding columns no row needs any more are cut), so a short answer never waits for a long one; new rows join
between steps (`Decoder.add`), which is how `gist_memory.server.batcher` serves many clients at once.

Greedy output equals `GistModel.generate` token for token (tests/test_batching.py): the pads add exact zeros to
every softmax; what remains are the last-bit differences of batched matrix products. Stop strings, end-of-turn
ids, `max_new_tokens`, `repetition_penalty` and seeded sampling act per row exactly as in `Generating._stream`.
Requests with generation arguments outside `BATCH_GEN_KWARGS`, and models with an adapted reader (its LoRA acts
only on rows that read states), are not batched: `batchable` says so and `GistModel.generate` serves them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from gist_memory.model import kv
from gist_memory.model.generation import _held_back, _stop_index
from gist_memory.model.prompt import Prompt
from gist_memory.model.usage import Usage, check_usage, usage_of
from gist_memory.state import GistState

# what a batched request may set: the arguments of `GistModel.generate` as of this module (any other, such as a
# constrained-decoding schema, is served one request at a time)
BATCH_GEN_KWARGS = frozenset({
    "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id", "stop",
    "seed", "system_prompt", "context_prefix",
})
PREFILL_MODES = ("padded", "rows")


@dataclass
class BatchRequest:
    """One request of a batch.

    Attributes:
        prompt: What `GistModel.generate` takes: a string or chat messages.
        states: The gist states to read (None or []: none).
        gen: Generation arguments, a subset of `BATCH_GEN_KWARGS` (defaults as in `GistModel.generate`).
        usage: A `Usage` to fill when the request ends.
        on_text: Called with each piece of the answer as it is decoded (stop strings already cut), from the
            thread that runs the batch.
        cancelled: Polled before each token; True ends the request where it is (its text so far is the answer).
    """

    prompt: Prompt
    states: Optional[Sequence[GistState]] = None
    gen: dict[str, Any] = field(default_factory=dict)
    usage: Optional[Usage] = None
    on_text: Optional[Callable[[str], None]] = None
    cancelled: Optional[Callable[[], bool]] = None


def adapted_reader(model: Any) -> bool:
    """True when `model` reads states with its writer's LoRA on (an adapted reader): rows with and without states
    would need different weights, so such a model is not batched."""
    return bool(getattr(model, "reader_adapted", False) and getattr(model, "has_lora", False))


def batchable(model: Any, gen: dict[str, Any]) -> bool:
    """Whether a request with generation arguments `gen` can be decoded in a batch by `model`."""
    return hasattr(model, "prepare") and set(gen) <= BATCH_GEN_KWARGS and not adapted_reader(model)


def check_gen(gen: dict[str, Any]) -> None:
    """Refuse generation arguments batching does not take, with a TypeError naming them."""
    unknown = set(gen) - BATCH_GEN_KWARGS
    if unknown:
        raise TypeError(f"generation arguments not supported by batched generation: {sorted(unknown)}; "
                        f"supported: {sorted(BATCH_GEN_KWARGS)} (GistModel.generate serves the others)")


class Row:
    """One request in a batch: its prepared cache, its decoding state and its text.

    Built in the caller's thread (`prepare` runs there, so a bad request fails there); mirrors the loop of
    `Generating._stream` token by token (held-back stop-string prefixes, incomplete UTF-8 at the end, the final
    tail).

    Raises:
        TypeError: Unsupported generation arguments, or `usage` not a `Usage`.
        ValueError: The prompt is empty, or a state was written by another model (as `GistModel.generate`).
    """

    def __init__(self, model: Any, request: BatchRequest, on_done: Optional[Callable[[Row], None]] = None) -> None:
        self.t0 = time.perf_counter()
        check_gen(request.gen)
        check_usage(request.usage)
        g = request.gen
        self.request = request
        self.on_done = on_done
        self.max_new = int(g.get("max_new_tokens", 64))
        self.do_sample = bool(g.get("do_sample", False))
        self.temperature = float(g.get("temperature", 1.0))
        self.top_k = int(g.get("top_k", 0) or 0)
        self.top_p = float(g.get("top_p", 1.0))
        self.repetition_penalty = float(g.get("repetition_penalty", 1.0))
        self.stop = g.get("stop")
        seed = g.get("seed")
        self.rng = torch.Generator(device="cpu").manual_seed(int(seed)) if seed is not None else None
        self.layers, self.start, self.head = model.prepare(request.prompt, request.states, g.get("system_prompt"),
                                                           g.get("context_prefix", ""), reserve=self.max_new)
        # positions read, as the single-request path counts them (layers may differ in width); then one width for
        # all layers, as the padded batch lays them out (narrower layers get masked slots)
        self.read = 0 if self.layers is None else kv.mean_width(self.layers)
        self.packed = bool(getattr(model, "packed_cache", True))
        if self.layers is not None:
            self.layers = kv.uniform_widths(self.layers)
        if not self.head:
            raise ValueError("empty prompt: nothing to generate from")
        self.eos = model._eos_ids(g.get("eos_token_id"))
        self.tokenizer = model.tokenizer
        self.cached = 0 if self.layers is None else int(self.layers[0][0].shape[2])
        self.out_ids: list[int] = []
        self.pieces: list[str] = []
        self.text = ""
        self.emitted = ""
        self.ttft: Optional[float] = None
        self.done = False
        self.cancelled = False
        self.error: Optional[BaseException] = None

    @property
    def answer(self) -> str:
        """The text given so far (the whole answer once `done`)."""
        return "".join(self.pieces)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no repetition penalty: the pick is the argmax of the logits (taken for all rows at once)."""
        return not self.do_sample and self.repetition_penalty == 1.0

    def _emit(self, piece: str) -> None:
        self.pieces.append(piece)
        if self.request.on_text is not None:
            self.request.on_text(piece)

    def take(self, nxt: int) -> bool:
        """Record the picked token `nxt`; True when the row is finished (and `finish` was called)."""
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.t0
        try:
            if nxt in self.eos:
                self.finish()
                return True
            self.out_ids.append(nxt)
            text = self.text = self.tokenizer.decode(self.out_ids, skip_special_tokens=True)
            cut = _stop_index(text, self.stop)
            if cut is not None:
                if cut > len(self.emitted):
                    self._emit(text[len(self.emitted):cut])
                self.emitted = text[:cut]
                self.finish()
                return True
            safe = len(text) - _held_back(text, self.stop)  # a possible start of a stop string waits
            if not text.endswith("\ufffd") and safe > len(self.emitted):
                self._emit(text[len(self.emitted):safe])
                self.emitted = text[:safe]
        except Exception as e:  # noqa: BLE001 - an on_text callback failed: this row ends with its error
            self.finish(error=e)
            return True
        if len(self.out_ids) >= self.max_new:
            self.finish()
            return True
        return False

    def finish(self, *, cancelled: bool = False, error: Optional[BaseException] = None) -> None:
        """End the row: the held-back tail (unless cancelled or failed), its usage, then `on_done`."""
        if self.done:
            return
        self.done, self.cancelled, self.error = True, cancelled, error
        text = self.text
        try:
            if (not cancelled and error is None and _stop_index(text, self.stop) is None
                    and len(text) > len(self.emitted) and not text.endswith("\ufffd")):
                self._emit(text[len(self.emitted):])  # the held-back tail was no stop string after all
        except Exception as e:  # noqa: BLE001
            self.error = e
        self.layers = None  # the batch holds the cache now
        if self.request.usage is not None:
            states = self.request.states or []
            fed = len(self.head)
            self.request.usage.update(usage_of(
                states, self.read + fed, fed, self.packed, new_tokens=len(self.out_ids), ttft_s=self.ttft,
                total_s=time.perf_counter() - self.t0,
            ))
        if self.on_done is not None:
            self.on_done(self)


class Decoder:
    """A running batch: rows decoding together over one left-padded cache.

    State between steps: per-layer K/V (B, H, L, D) in a `DynamicCache`, a (B, L) mask of each row's real
    positions, each row's next position (B,) and the logits (B, V) its next token is picked from.

    Args:
        model: A `GistModel` (its reader must be the base model: see `batchable`).
        prefill: `padded`: the new rows' prompt ids in one forward, right-aligned with pads masked; `rows`: one
            forward per row (exactly the single-request prefill), then merged.
    """

    def __init__(self, model: Any, prefill: str = "padded") -> None:
        if prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {PREFILL_MODES}, got {prefill!r}")
        if adapted_reader(model):
            raise ValueError("this model has an adapted reader (its LoRA reads states): batched generation reads "
                             "with the base weights only; use GistModel.generate")
        self.model = model
        self.prefill = prefill
        self.rows: list[Row] = []
        self.cache: Any = None  # DynamicCache, per layer (B, H, L, D)
        self.mask: Optional[torch.Tensor] = None  # (B, L) long, 1 at real positions
        self.pos: Optional[torch.Tensor] = None  # (B,) next position per row
        self.logits: Optional[torch.Tensor] = None  # (B, V) for each row's next pick
        self.forwards = 0  # model calls made (prefills and steps), for tests and benchmarks

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        """L: cache slots per row (real positions plus left padding)."""
        return 0 if self.mask is None else int(self.mask.shape[1])

    # ---- adding rows -------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, rows: Sequence[Row]) -> None:
        """Prefill `rows` (prepared `Row`s) and merge them into the batch; they pick their first token at the
        next `step`. A row whose `max_new_tokens` is < 1 is finished at once, as `generate` would."""
        rows = [r for r in rows if not r.done]
        for r in rows:
            if r.max_new < 1:
                r.finish()
        rows = [r for r in rows if not r.done]
        if not rows:
            return
        with self.model._eval_mode():
            part = self._prefill_rows(rows) if self.prefill == "rows" else self._prefill_padded(rows)
        self._merge(part)

    def _device(self) -> torch.device:
        return self.model.device

    def _prefill_padded(self, rows: Sequence[Row]) -> _Part:
        dev = self._device()
        out, mask = padded_forward(self.model, rows, logits_to_keep=1)
        self.forwards += 1
        last = torch.as_tensor([r.start + len(r.head) for r in rows], device=dev)
        return _Part(rows, kv.cache_layers(kv.out_cache(out)), mask, last, out.logits[:, -1])

    def _prefill_rows(self, rows: Sequence[Row]) -> _Part:
        dev = self._device()
        parts = []
        for r in rows:
            ids = torch.as_tensor([r.head], device=dev)
            cache = None if r.layers is None else kv.cache_from_layers(r.layers, packed=self.model.packed_cache)
            pos = (r.start + torch.arange(len(r.head), device=dev))[None]
            out = kv.call(self.model.model, cache=cache, input_ids=ids, position_ids=pos, use_cache=True,
                          logits_to_keep=1)
            self.forwards += 1
            layers = kv.cache_layers(kv.out_cache(out))
            L = int(layers[0][0].shape[2])
            parts.append(_Part([r], layers, torch.ones((1, L), dtype=torch.long, device=dev),
                               torch.as_tensor([r.start + len(r.head)], device=dev), out.logits[:, -1]))
        return _concat(parts)

    def _merge(self, part: _Part) -> None:
        if not self.rows:
            merged = part
        else:
            mine = _Part(self.rows, kv.cache_layers(self.cache), self.mask, self.pos, self.logits)
            merged = _concat([mine, part])
        self.rows = list(merged.rows)
        self.cache = roomy_cache(merged.layers, packed=getattr(self.model, "packed_cache", True))
        self.mask, self.pos, self.logits = merged.mask, merged.pos, merged.logits
        for r in part.rows:
            r.layers = None  # the batch's cache holds it now

    # ---- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Row]:
        """Pick each row's next token, drop the rows that finished (or were cancelled), and run one forward for
        the rest. Returns the rows that finished in this step."""
        if not self.rows:
            return []
        greedy = None
        if any(r.plain_greedy for r in self.rows):
            greedy = self.logits.argmax(-1).tolist()  # same as `_pick` on each row, for all rows at once
        finished, keep, nxt = [], [], []
        for i, r in enumerate(self.rows):
            if r.request.cancelled is not None and r.request.cancelled():
                r.finish(cancelled=True)
            else:
                if r.plain_greedy:
                    tok = greedy[i]
                else:
                    tok = self.model._pick(self.logits[i], r.out_ids + r.head, r.do_sample, r.temperature, r.top_k,
                                           r.top_p, r.repetition_penalty, r.rng)
                if not r.take(tok):
                    keep.append(i)
                    nxt.append(tok)
            if r.done:
                finished.append(r)
        if finished:
            self._keep(keep)
        if self.rows:
            self._forward(nxt)
        return finished

    def _keep(self, keep: list[int]) -> None:
        """Keep rows `keep` (in order) and cut the leading columns no remaining row uses."""
        if not keep:
            self.rows, self.cache, self.mask, self.pos, self.logits = [], None, None, None, None
            return
        idx = torch.as_tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        first = int(mask.any(0).nonzero()[0])
        self.mask = mask[:, first:]
        self.pos = self.pos.index_select(0, idx)
        self.logits = self.logits.index_select(0, idx)
        km = kv.key_mask_of(self.cache)
        if km is not None:
            km = [m.expand(len(self.rows), -1, -1).index_select(0, idx)[:, :, first:] for m in km]
        self.cache = roomy_cache(kv.with_key_mask(
            [(k.index_select(0, idx)[:, :, first:], v.index_select(0, idx)[:, :, first:])
             for k, v in kv.cache_layers(self.cache)], km), packed=getattr(self.model, "packed_cache", True))
        self.rows = [self.rows[i] for i in keep]

    def _forward(self, nxt: list[int]) -> None:
        dev = self.mask.device
        B = len(self.rows)
        self.mask = torch.cat([self.mask, torch.ones((B, 1), dtype=self.mask.dtype, device=dev)], dim=1)
        with self.model._eval_mode():
            out = kv.call(self.model.model, cache=self.cache, input_ids=torch.as_tensor(nxt, device=dev)[:, None],
                          position_ids=self.pos[:, None], attention_mask=self.mask, use_cache=True, logits_to_keep=1)
        self.forwards += 1
        self.cache = kv.out_cache(out)
        self.logits = out.logits[:, -1]
        self.pos = self.pos + 1

    def fail(self, error: BaseException) -> list[Row]:
        """End every row with `error` (a failed forward); returns them. The batch is empty afterwards."""
        rows, self.rows = self.rows, []
        self.cache = self.mask = self.pos = self.logits = None
        for r in rows:
            r.finish(error=error)
        return rows


def roomy_cache(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], spare: int = 64,
                packed: bool = True):  # noqa: ANN201
    """A `DynamicCache` of per-layer (B, H, L, D) K/V whose layers keep spare slots after the last position, so a
    decoding step writes its new K/V in place instead of copying the whole cache (`DynamicLayer.update`
    concatenates: at 16 rows that copy took a quarter of each step on CPU). Where heads keep uneven numbers of
    rows and `packed`, the layers store only the kept rows (`kv.cache_from_layers`; each step then lays a layer
    out padded). Falls back to a plain `DynamicCache` where this transformers has no `DynamicLayer`."""
    if packed and kv.key_mask_of(layers) is not None:
        return kv.cache_from_layers(layers, spare=spare)
    cache = kv.cache_from_layers([])
    if _RoomyLayer is None or not isinstance(getattr(cache, "layers", None), list):
        return kv.cache_from_layers(layers)
    cache.layers = [_RoomyLayer(k, v, spare) for k, v in layers]
    if kv.key_mask_of(layers) is not None:
        cache._gist_key_mask = kv.key_mask_of(layers)
    return cache


def padded_forward(model: Any, rows: Sequence[Any], logits_to_keep: int = 1):  # noqa: ANN201
    """One forward of the base model over several prepared rows: each row's cached K/V (`layers`, one width for
    all layers, or None; `cached` its width) left-padded to one length, its ids (`head`) right-aligned at
    positions `start`, `start` + 1, ...; pads masked. Returns (the model output, with `logits_to_keep` logits a
    row at the end, and the (B, L) mask of real positions)."""
    dev = model.device
    B = len(rows)
    T = [r.cached for r in rows]
    S = [len(r.head) for r in rows]
    Tm, Sm = max(T), max(S)
    ids = torch.full((B, Sm), model._pad_id(), dtype=torch.long)
    pos = torch.zeros((B, Sm), dtype=torch.long)
    mask = torch.zeros((B, Tm + Sm), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, Sm - S[i]:] = torch.as_tensor(r.head)
        pos[i, :Sm - S[i]] = r.start  # pads: any finite position, they are masked
        pos[i, Sm - S[i]:] = r.start + torch.arange(S[i])
        mask[i, Tm - T[i]:Tm] = 1
        mask[i, Tm + Sm - S[i]:] = 1
    cache = None
    if Tm:
        ref = next(r.layers for r in rows if r.layers is not None)
        layers = []
        for li, (k0, v0) in enumerate(ref):
            _, H, _, D = k0.shape
            k = torch.zeros((B, H, Tm, D), dtype=k0.dtype, device=dev)
            v = torch.zeros((B, v0.shape[1], Tm, v0.shape[3]), dtype=v0.dtype, device=dev)
            for i, r in enumerate(rows):
                if r.cached:
                    k[i, :, Tm - T[i]:] = r.layers[li][0][0]
                    v[i, :, Tm - T[i]:] = r.layers[li][1][0]
            layers.append((k, v))
        cache = kv.cache_from_layers(kv.with_key_mask(layers, _prefill_key_mask(rows, Tm, layers, dev)),
                                     packed=getattr(model, "packed_cache", True))
    out = kv.call(model.model, cache=cache, input_ids=ids.to(dev), position_ids=pos.to(dev),
                  attention_mask=mask.to(dev), use_cache=True, logits_to_keep=logits_to_keep)
    return out, mask.to(dev)


def _prefill_key_mask(rows: Sequence[Any], Tm: int, layers, dev) -> Optional[list[torch.Tensor]]:  # noqa: ANN001
    """Per layer (B, H, Tm): the rows' state key masks, right-aligned as `padded_forward` places their caches
    (True elsewhere: padding is masked by the batch mask); None when no row's states have empty slots."""
    masks = [kv.key_mask_of(r.layers) for r in rows]
    if all(m is None for m in masks):
        return None
    out = []
    for li, (k, _) in enumerate(layers):
        km = torch.ones((len(rows), k.shape[1], Tm), dtype=torch.bool, device=dev)
        for i, (r, m) in enumerate(zip(rows, masks)):
            if m is not None:
                M = int(m[li].shape[-1])
                km[i, :, Tm - r.cached:Tm - r.cached + M] = m[li][0].to(dev)
        out.append(km)
    return out


try:
    from transformers.cache_utils import DynamicLayer as _DynamicLayer
except ImportError:  # pragma: no cover - older transformers
    _DynamicLayer = None

if _DynamicLayer is not None:

    class _RoomyLayer(_DynamicLayer):
        """A `DynamicLayer` over buffers (B, H, capacity, D): `keys`/`values` are views of the filled part."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int) -> None:
            super().__init__()
            self.device = keys.device
            self.is_initialized = True
            self.n = 0
            self._k = keys.new_empty((*keys.shape[:2], keys.shape[2] + spare, keys.shape[3]))
            self._v = values.new_empty((*values.shape[:2], values.shape[2] + spare, values.shape[3]))
            self.update(keys, values)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            self._k, self._v, self.n = kv.append_rows(self._k, self._v, self.n, key_states, value_states, 64)
            self.keys, self.values = self._k[:, :, :self.n], self._v[:, :, :self.n]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.n
else:  # pragma: no cover
    _RoomyLayer = None


@dataclass
class _Part:
    """Rows with their cache, mask, next positions and pending logits (a prefill, or the running batch)."""

    rows: Sequence[Row]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (b, H, L, D)
    mask: torch.Tensor  # (b, L)
    pos: torch.Tensor  # (b,)
    logits: torch.Tensor  # (b, V)

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])


def _concat(parts: Sequence[_Part]) -> _Part:
    """Stack parts along the batch, each left-padded (zeros, masked) to the longest."""
    if len(parts) == 1:
        return parts[0]
    L = max(p.length for p in parts)
    layers = []
    for li in range(len(parts[0].layers)):
        ks = [F.pad(p.layers[li][0], (0, 0, L - p.length, 0)) for p in parts]
        vs = [F.pad(p.layers[li][1], (0, 0, L - p.length, 0)) for p in parts]
        layers.append((torch.cat(ks, dim=0), torch.cat(vs, dim=0)))
    mask = torch.cat([F.pad(p.mask, (L - p.length, 0)) for p in parts], dim=0)
    layers = kv.with_key_mask(layers, _concat_key_masks(parts, L))
    return _Part([r for p in parts for r in p.rows], layers, mask, torch.cat([p.pos for p in parts]),
                 torch.cat([p.logits for p in parts]))


def generate_batch(
    model: Any,
    requests: Sequence[Union[BatchRequest, Prompt]],
    *,
    max_batch: Optional[int] = None,
    prefill: str = "padded",
    return_exceptions: bool = False,
) -> list[Union[str, BaseException]]:
    """Answer several requests together; returns their texts in order.

    Args:
        model: A `GistModel`.
        requests: `BatchRequest`s (a bare prompt is a request without states and with default arguments).
        max_batch: Most rows decoded at once (None: all); the others join as rows finish.
        prefill: See `Decoder`.
        return_exceptions: A request that cannot be prepared (empty prompt, foreign states, unknown arguments) or
            whose `on_text` raised gives its exception in place of its text; False: a bad request is raised before
            any decoding, a failed callback once the batch is done.

    Raises:
        TypeError / ValueError: A bad request (unless `return_exceptions`), `max_batch` < 1, an unknown `prefill`,
            or a model with an adapted reader.
    """
    if max_batch is not None and int(max_batch) < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    reqs = [r if isinstance(r, BatchRequest) else BatchRequest(r) for r in requests]
    dec = Decoder(model, prefill=prefill)
    results: list[Union[str, BaseException, None]] = [None] * len(reqs)
    rows: list[tuple[int, Row]] = []
    for i, req in enumerate(reqs):
        try:
            rows.append((i, Row(model, req)))
        except (TypeError, ValueError) as e:
            if not return_exceptions:
                raise
            results[i] = e
    index = {id(r): i for i, r in rows}
    waiting = [r for _, r in rows]
    cap = len(waiting) if max_batch is None else int(max_batch)
    done: list[Row] = []
    while waiting or len(dec):
        if waiting and len(dec) < cap:
            n = cap - len(dec)
            new, waiting = waiting[:n], waiting[n:]
            dec.add(new)
            done.extend(r for r in new if r.done)
        done.extend(dec.step())
    for r in done:
        if r.error is not None and not return_exceptions:
            raise r.error
        results[index[id(r)]] = r.error if r.error is not None else r.answer
    return results  # type: ignore[return-value]


def _concat_key_masks(parts: Sequence[_Part], L: int) -> Optional[list[torch.Tensor]]:
    """The parts' key masks (`kv.Layers.key_mask`), left-padded as `_concat` pads their caches to L slots and
    stacked (True where a part has none); None when no part has one."""
    masks = [kv.key_mask_of(p.layers) for p in parts]
    if all(m is None for m in masks):
        return None
    out = []
    for li in range(len(parts[0].layers)):
        cols = []
        for p, m in zip(parts, masks):
            b, H = int(p.mask.shape[0]), int(p.layers[li][0].shape[1])
            dev = p.mask.device
            own = m[li].to(dev).expand(b, -1, -1) if m is not None else torch.ones((b, H, 0), dtype=torch.bool,
                                                                                      device=dev)
            cols.append(torch.cat([torch.ones((b, H, L - p.length), dtype=torch.bool, device=dev), own], dim=-1))
        W = max(int(c.shape[-1]) for c in cols)
        out.append(torch.cat([F.pad(c, (0, W - int(c.shape[-1])), value=True) for c in cols], dim=0))
    return out
