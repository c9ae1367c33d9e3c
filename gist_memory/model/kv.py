"""All KV-cache handling in one module: RoPE re-rotation, splicing states, `DynamicCache` conversion.

Keys are cached after RoPE. RoPE is a rotation per frequency pair, R(p + d) = R(d) R(p), so a key computed at
position p is moved to p + d by rotating it by d alone; the hidden states that produced it do not change when
a whole segment shifts (attention depends only on relative positions inside the segment).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

# rope types whose frequencies do not depend on the sequence length (re-rotation is exact)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class RopeSpec:
    """What re-rotation needs: the inverse frequencies (rot_dim / 2,) and the rotated width."""

    inv_freq: torch.Tensor
    rot_dim: int


def rope_spec(model) -> RopeSpec:  # noqa: ANN001 - a transformers PreTrainedModel
    """Find the rotary embedding of a causal LM and check it can be re-rotated exactly.

    Raises:
        ValueError: the model has no RoPE, uses per-layer rotary embeddings, or a length-dependent rope type.
    """
    config = model.config.get_text_config(decoder=True)
    rope_params = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope_params, dict) and rope_params and "rope_type" not in rope_params:
        # per-layer-type parameters (e.g. Gemma 3: sliding and full attention use different thetas)
        raise ValueError(
            f"{type(model).__name__} uses several rotary embeddings (per layer type); "
            f"supported: one RoPE with rope_type in {SUPPORTED_ROPE_TYPES}"
        )
    rope_type = rope_params.get("rope_type", "default") if isinstance(rope_params, dict) else "default"
    rotary = None
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(module, "inv_freq"):
            rotary = module
            break
    if rotary is None:
        raise ValueError(
            f"{type(model).__name__} has no rotary position embedding: gist states need RoPE "
            "(Llama-, Qwen2-, Mistral-family models have it)"
        )
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope type {rope_type!r}: its frequencies depend on the sequence length, so cached keys "
            f"cannot be re-rotated exactly; supported: {SUPPORTED_ROPE_TYPES}"
        )
    inv_freq = rotary.inv_freq.detach().float().cpu()
    return RopeSpec(inv_freq=inv_freq, rot_dim=2 * int(inv_freq.numel()))


def rotate(keys: torch.Tensor, delta: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Rotate post-RoPE keys by `delta` positions (computed in fp32, returned in the keys' dtype).

    Args:
        keys: (..., T, D) keys.
        delta: scalar, (T,) or (..., T) position shifts (broadcast against the keys' leading dims).
        spec: From `rope_spec`.
    """
    if not torch.is_tensor(delta):
        delta = torch.tensor(delta)
    if delta.numel() == 1 and int(delta.reshape(-1)[0]) == 0:
        return keys
    D = keys.shape[-1]
    r = spec.rot_dim
    if r > D:
        raise ValueError(f"rotary width {r} exceeds head dim {D}")
    inv = spec.inv_freq.to(keys.device)
    d = delta.to(keys.device, torch.float32)
    ang = (d.reshape(-1) if d.dim() <= 1 else d)[..., None] * inv  # (T or 1, r/2) or (..., T, r/2)
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    k = keys.float()
    k_rot, k_pass = k[..., :r], k[..., r:]
    half = r // 2
    rot_half = torch.cat([-k_rot[..., half:], k_rot[..., :half]], dim=-1)
    out = torch.cat([k_rot * cos + rot_half * sin, k_pass], dim=-1)
    return out.to(keys.dtype)


class Layers(list):
    """Per-layer (keys, values), plus `key_mask` where some heads keep fewer rows than others.

    `key_mask`: None, or per layer a bool (1 or B, H_kv, M) tensor over the first M cached positions, False at a
    head's empty slot (a row that head did not keep; `GistState.key_mask`). Positions after the first M are real
    in every head. The mask travels with the layers into a `DynamicCache` (`cache_from_layers`) and back
    (`cache_layers`), and `call` applies it in every attention of the model (`masked_attention`)."""

    key_mask: Optional[list[torch.Tensor]] = None


def key_mask_of(obj) -> Optional[list[torch.Tensor]]:  # noqa: ANN001 - Layers, a DynamicCache or anything else
    """The per-layer key mask carried by `Layers` or by a cache made from them; None if there is none."""
    return getattr(obj, "key_mask", None) if isinstance(obj, Layers) else getattr(obj, "_gist_key_mask", None)


def with_key_mask(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], mask: Optional[list[torch.Tensor]]) -> Layers:
    """`layers` as `Layers` carrying `mask` (see `Layers.key_mask`)."""
    out = Layers(layers)
    out.key_mask = mask
    return out


def cache_from_layers(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], packed: bool = True,
                      spare: int = 0):  # noqa: ANN201 - DynamicCache
    """A `DynamicCache` holding the given per-layer (keys, values), each (B, H, T, D), and their key mask if any.

    Where the layers carry a key mask (heads keep uneven numbers of rows) and no gradient flows into them, each
    layer is a `packed_layer`: only the rows each head really keeps are stored, so the cache holds the kept rows,
    not every head padded to the widest; a forward lays one layer out padded while it attends. `packed=False` keeps
    the padded layout (what training backpropagates through). `spare`: room a packed layer keeps for new rows."""
    from transformers import DynamicCache

    mask = key_mask_of(layers)
    if (mask is not None and packed and not any(k.requires_grad or v.requires_grad for k, v in layers)
            and not all(bool(m.all()) for m in mask)):  # every slot real (e.g. depth, read alone): nothing to drop
        cls = packed_layer_class()
        cache = DynamicCache([])
        if cls is not None and isinstance(getattr(cache, "layers", None), list):
            scratch: dict = {}  # one layer's padded layout, shared by the cache's layers (they attend in turn)
            cache.layers = [cls(k, v, m, spare, scratch) for (k, v), m in zip(layers, mask)]
            cache._gist_key_mask = mask
            return cache
    cache = DynamicCache(list(layers))
    if mask is not None:
        cache._gist_key_mask = mask
    return cache


def cache_bytes(cache) -> int:  # noqa: ANN001 - a DynamicCache
    """Bytes the cache's layers hold between forwards (packed layers: their kept rows, each row's slot index, and
    the scratch they share for one layer's padded layout).
    The per-head key mask the attention reads (one byte a slot, `Layers.key_mask`) is not counted: both layouts
    carry it."""
    total = 0
    scratches: dict[int, dict] = {}
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "stored_bytes"):
            total += layer.stored_bytes()
            scratches[id(layer._scratch)] = layer._scratch
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    for scratch in scratches.values():  # the one layer's padded layout packed layers share, once per cache
        total += sum(b.numel() * b.element_size() for b in scratch.values())
    return int(total)


def append_rows(k_buf: torch.Tensor, v_buf: torch.Tensor, n: int, keys: torch.Tensor, values: torch.Tensor,
                room: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Write `keys` / `values` (B, H, t, D) at slot `n` of buffers (B, H, capacity, D), growing them by half again
    (at least `room` slots more) when they are full (amortised, rare); returns (keys buffer, values buffer, n + t).
    How cache layers with spare room take new rows without copying the whole cache every step."""
    end = n + int(keys.shape[-2])
    if end > k_buf.shape[2]:
        cap = end + max(room, end // 2)
        k = k_buf.new_empty((*k_buf.shape[:2], cap, k_buf.shape[3]))
        v = v_buf.new_empty((*v_buf.shape[:2], cap, v_buf.shape[3]))
        k[:, :, :n] = k_buf[:, :, :n]
        v[:, :, :n] = v_buf[:, :, :n]
        k_buf, v_buf = k, v
    k_buf[:, :, n:end] = keys
    v_buf[:, :, n:end] = values
    return k_buf, v_buf, end


_PACKED_LAYER: list = []


def packed_layer_class():  # noqa: ANN201 - a DynamicLayer subclass, or None where transformers has none
    """The cache layer that stores a masked prefix packed (defined on first use: transformers loads lazily)."""
    if _PACKED_LAYER:
        return _PACKED_LAYER[0]
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - older transformers
        _PACKED_LAYER.append(None)
        return None

    class PackedLayer(DynamicLayer):
        """A cache layer whose first M positions keep only each head's real rows.

        Stores the real rows of those positions packed head by head (N, D) for keys and values, where each sits
        (one int32 a row), and the positions after M (the question, the answer so far) dense in a buffer with room
        to grow.
        What `update` returns to the attention is the padded (B, H, M + n, D) layout, written into a scratch
        buffer that all packed layers of a cache share (they attend one after the other; the empty slots hold
        stale but finite values, masked), so between forwards the cache holds kept rows plus one layer's layout,
        not every layer's widest head. `keys` / `values` build a fresh layout with zeros in the empty slots."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, spare: int = 0,
                     scratch: Optional[dict] = None) -> None:
            super().__init__()
            self._scratch = {} if scratch is None else scratch
            B, H, T, _ = keys.shape
            M = min(int(keep.shape[-1]), T)
            keep = keep[..., :M].to(keys.device).expand(B, H, M)
            self.device = keys.device
            self.is_initialized = True
            self._shape = (B, H, M)
            self._pk = keys[:, :, :M][keep].contiguous()  # (N, D), head by head
            self._pv = values[:, :, :M][keep].contiguous()
            # where each kept row sits: (b * H + h) * M + slot, in the packed order (int32: 4 bytes a row)
            self._lin = keep.reshape(-1).nonzero().squeeze(1).to(torch.int32)
            self._n = 0
            self._spare = max(0, int(spare))
            self._tk = keys.new_empty((B, H, self._spare, keys.shape[3]))
            self._tv = values.new_empty((B, values.shape[1], self._spare, values.shape[3]))
            if T > M:
                self._append(keys[:, :, M:], values[:, :, M:])

        # `keys` / `values` are views built on demand; the mixin's constructor and `reset` assign None
        @property
        def keys(self) -> torch.Tensor:
            return self._layout(self._pk, self._tk)

        @keys.setter
        def keys(self, value: Optional[torch.Tensor]) -> None:
            if value is not None:
                raise AttributeError("a packed cache layer's keys are written through update()")

        @property
        def values(self) -> torch.Tensor:
            return self._layout(self._pv, self._tv)

        @values.setter
        def values(self, value: Optional[torch.Tensor]) -> None:
            if value is not None:
                raise AttributeError("a packed cache layer's values are written through update()")

        @property
        def prefix_width(self) -> int:
            return int(self._shape[2])

        @property
        def _keep(self) -> torch.Tensor:
            keep = torch.zeros(self._shape[0] * self._shape[1] * self._shape[2], dtype=torch.bool,
                               device=self._lin.device)
            keep[self._lin.long()] = True
            return keep.view(self._shape)

        def _slots(self, W: int) -> torch.Tensor:
            """Where the kept rows go in a (B, H, W, D) layout viewed as (B * H * W, D)."""
            lin = self._lin.long()
            M = self._shape[2]
            return lin // M * W + lin % M

        def _layout(self, rows: torch.Tensor, tail: torch.Tensor, new: Optional[torch.Tensor] = None,
                    name: Optional[str] = None, slots: Optional[torch.Tensor] = None) -> torch.Tensor:
            """The padded layout; `name` ("k" / "v"): written into the cache's shared scratch (valid until the
            next layer's update: for the attention that follows), else a new tensor. `slots`: `_slots` of its
            width, if the caller has them."""
            B, H, M = self._shape
            extra = 0 if new is None else int(new.shape[2])
            W = M + self._n + extra
            shape = (B, H, W, rows.shape[-1])
            if name is None:
                out = rows.new_zeros(shape)
            else:  # empty slots keep whatever finite values an earlier layout left there: they are masked
                need = B * H * W * rows.shape[-1]
                buf = self._scratch.get(name)
                if buf is None or buf.numel() < need or buf.dtype != rows.dtype or buf.device != rows.device:
                    buf = rows.new_zeros(need + need // 4)  # room for the answer to grow
                    self._scratch[name] = buf
                out = buf[:need].view(shape)
            if M:
                out.view(B * H * W, -1).index_copy_(0, self._slots(W) if slots is None else slots, rows)
            out[:, :, M:M + self._n] = tail[:, :, :self._n]
            if new is not None:
                out[:, :, M + self._n:] = new
            return out

        def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self._tk, self._tv, self._n = append_rows(self._tk, self._tv, self._n, key_states, value_states,
                                                      self._spare)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            # the shared scratch only where no autograd graph may keep this layer's layout for a backward pass
            shared = not torch.is_grad_enabled()
            slots = self._slots(self.prefix_width + self._n + int(key_states.shape[2])) if self._shape[2] else None
            k = self._layout(self._pk, self._tk, key_states, "k" if shared else None, slots)
            v = self._layout(self._pv, self._tv, value_states, "v" if shared else None, slots)
            self._append(key_states, value_states)
            return k, v

        def get_seq_length(self) -> int:
            return self.prefix_width + self._n

        def stored_bytes(self) -> int:
            """Kept rows with their slot indices, and the filled part of the tail (its spare room not counted)."""
            t = self._tk[:, :, :self._n]
            tv = self._tv[:, :, :self._n]
            return int(self._pk.numel() * self._pk.element_size() + self._pv.numel() * self._pv.element_size()
                       + self._lin.numel() * self._lin.element_size() + t.numel() * t.element_size() + tv.numel() * tv.element_size())

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative count of positions to remove")
            if -tokens_to_remove > self._n:
                raise ValueError("cannot crop into a packed layer's state rows")
            self._n -= -tokens_to_remove

        def reset(self) -> None:
            self._shape = (*self._shape[:2], 0)
            self._pk, self._pv, self._lin = self._pk[:0], self._pv[:0], self._lin[:0]
            self._n = 0

        def offload(self) -> None:
            self._move("cpu")

        def prefetch(self) -> None:
            self._move(self.device)

        def _move(self, device) -> None:  # noqa: ANN001
            self._lin, self._pk, self._pv = self._lin.to(device), self._pk.to(device), self._pv.to(device)
            self._tk, self._tv = self._tk.to(device), self._tv.to(device)

        def _select(self, index: torch.Tensor) -> None:
            k, v, keep = self.keys[index], self.values[index], self._keep[index]
            self.__init__(k, v, keep, self._spare, self._scratch)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self._select(beam_idx.to(self._lin.device))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._select(indices.to(self._lin.device))

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._select(torch.arange(self._shape[0], device=self._lin.device).repeat_interleave(repeats))

    _PACKED_LAYER.append(PackedLayer)
    return PackedLayer


def cache_layers(cache) -> Layers:  # noqa: ANN001
    """Per-layer (keys, values) of a `DynamicCache` (or a legacy tuple cache), with its key mask if any."""
    if hasattr(cache, "layers"):
        out = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        out = [(k, v) for k, v in cache]
    return with_key_mask(out, getattr(cache, "_gist_key_mask", None))


def empty_like_layers(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], batch: int = 1):  # noqa: ANN201
    """Zero-length per-layer (keys, values) shaped like `layers` (for states=[] with no prefix)."""
    return [(k[:batch, :, :0], v[:batch, :, :0]) for k, v in layers]


def splice(
    prefix: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]],
    prefix_len: int,
    states: Sequence,  # Sequence[GistState]
    spec: RopeSpec,
    position_mode: str = "gapped",
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Concatenate a raw prefix cache and the states (in order), each re-rotated to where it now starts.

    Args:
        prefix: Per-layer (1, H, P, D) K/V of the raw prefix (e.g. the chat template's opening), or None.
        prefix_len: P, the prefix length in positions.
        states: The gist states to place after the prefix.
        spec: RoPE of the model.
        position_mode: `gapped`: state i starts at P + sum of earlier spans (positions as in the raw text with
            gists); `packed`: kept rows get consecutive positions.
        device / dtype: Where the cache lives.

    Returns:
        (per-layer (1, H, P + kept, D) K/V, next free position for the tokens that follow). The layers carry a key
        mask (`Layers.key_mask`) when some state's heads keep fewer rows than its widest head.
    """
    layers_k: list[list[torch.Tensor]] = []
    layers_v: list[list[torch.Tensor]] = []
    n_layers = None
    if prefix is not None:
        n_layers = len(prefix)
        layers_k = [[k] for k, _ in prefix]
        layers_v = [[v] for _, v in prefix]
    ragged = any(st.has_empty_slots for st in states)
    masks: list[list[torch.Tensor]] = []
    if ragged and prefix is not None:
        masks = [[torch.ones(k.shape[1], k.shape[2], dtype=torch.bool, device=device)] for k, _ in prefix]
    offset = prefix_len
    for st in states:
        if n_layers is None:
            n_layers = st.num_layers
            layers_k = [[] for _ in range(n_layers)]
            layers_v = [[] for _ in range(n_layers)]
        if st.num_layers != n_layers:
            raise ValueError(f"state has {st.num_layers} layers, the model has {n_layers}")
        keys = st.keys.to(device=device, dtype=dtype)  # (L, H, T, D)
        values = st.values.to(device=device, dtype=dtype)
        pos = st.positions.to(device if device is not None else keys.device)
        if ragged and not masks:
            masks = [[] for _ in range(n_layers)]
        if position_mode == "packed":  # each row takes its rank among its head's rows (empty slots rank last)
            order = torch.where(pos >= 0, pos, torch.full_like(pos, torch.iinfo(pos.dtype).max))
            new_pos = offset + torch.argsort(torch.argsort(order, dim=-1, stable=True), dim=-1)
            delta = new_pos - pos
            offset += int((pos >= 0).sum(-1).max()) if st.has_empty_slots else st.num_kept
        else:
            delta = torch.full_like(pos, offset)
            offset += st.span
        if st.num_kept:
            keys = rotate(keys, delta, spec)
        real = st.key_mask() if ragged else None
        if real is not None:
            real = real.to(keys.device)
        for li in range(n_layers):
            k, v = keys[li], values[li]
            if real is not None:  # each layer only as wide as its widest head: drop slots empty in all its heads
                cols = real[li].any(dim=0)
                k, v = k[:, cols], v[:, cols]
                masks[li].append(real[li][:, cols])
            elif ragged:
                masks[li].append(torch.ones(k.shape[0], k.shape[1], dtype=torch.bool, device=k.device))
            layers_k[li].append(k[None])
            layers_v[li].append(v[None])
    out = [(torch.cat(ks, dim=2), torch.cat(vs, dim=2)) for ks, vs in zip(layers_k, layers_v)]
    return with_key_mask(out, [torch.cat(m, dim=-1)[None] for m in masks] if ragged else None), offset


def mean_width(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Cached positions per layer, averaged (spliced layers may differ in width: `splice`)."""
    return int(round(sum(int(k.shape[2]) for k, _ in layers) / max(1, len(layers))))


def uniform_widths(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
    """`layers` with every layer as wide as the widest: narrower layers get masked zero slots in front (where
    callers that lay out one width for all layers, e.g. a padded batch, need it). Unchanged when already uniform."""
    if not layers:
        return layers
    W = max(int(k.shape[2]) for k, _ in layers)
    if all(int(k.shape[2]) == W for k, _ in layers):
        return layers
    mask = key_mask_of(layers)
    out, masks = [], []
    for li, (k, v) in enumerate(layers):
        gap = W - int(k.shape[2])
        m = mask[li] if mask is not None else torch.ones(k.shape[0], k.shape[1], k.shape[2], dtype=torch.bool,
                                                         device=k.device)
        out.append((torch.cat([k.new_zeros(*k.shape[:2], gap, k.shape[3]), k], dim=2),
                    torch.cat([v.new_zeros(*v.shape[:2], gap, v.shape[3]), v], dim=2)))
        masks.append(torch.cat([torch.zeros(*m.shape[:2], gap, dtype=torch.bool, device=m.device), m], dim=-1))
    return with_key_mask(out, masks)


_CACHE_ARG: dict[type, str] = {}


def call(module, cache=None, **kwargs):  # noqa: ANN001, ANN201 - a transformers model, its output
    """Call a transformers model/decoder with a KV cache under the argument name its version wants.

    transformers >= 5.24 names it `cache` (`past_key_values` is deprecated there and removed in 5.40); older
    5.x (e.g. the GPU image's 5.17) name it `past_key_values`. Looked up once per class from the signature.
    """
    cls = type(module)
    name = _CACHE_ARG.get(cls)
    if name is None:
        import inspect

        params = inspect.signature(module.forward).parameters
        name = "cache" if "cache" in params else "past_key_values"
        _CACHE_ARG[cls] = name
    if cache is not None:
        kwargs[name] = cache
        mask = key_mask_of(cache)
        if mask is not None:
            masked_attention(module)
            kwargs["gist_key_mask"] = mask
    return module(**kwargs)


def _mask_for_width(am: torch.Tensor, K: int, Q: int) -> torch.Tensor:
    """A mask made for keys of another length (another layer's) redrawn for K keys: every cached key visible and
    the last Q columns (the queries' own, causal among them) as given. Only a mask whose cached part is all
    visible can be redrawn (one unpadded sequence); a padded batch lays out one width for all layers
    (`uniform_widths`)."""
    past = am[..., : am.shape[-1] - Q]
    visible = past.all() if am.dtype == torch.bool else bool((past == 0).all())
    if not visible:
        raise ValueError("a padded attention mask cannot be redrawn for layers of different widths; lay the cache "
                         "out with kv.uniform_widths first")
    fill = torch.ones if am.dtype == torch.bool else torch.zeros
    return torch.cat([fill((*am.shape[:3], K - Q), dtype=am.dtype, device=am.device), am[..., -Q:]], dim=-1)


_MASKED_PREFIX = "gist_masked:"


def masked_attention(module) -> None:  # noqa: ANN001 - a transformers model or decoder
    """Route `module`'s attention through a wrapper of its own implementation (sdpa, eager, ...) that also applies
    a per-layer, per-head key mask passed as the `gist_key_mask` keyword (see `Layers.key_mask`); without that
    keyword the wrapper calls the implementation unchanged. Registers the wrapper with transformers'
    `AttentionInterface` (and the implementation's mask function under the same name) once per implementation."""
    config = module.config
    impl = config._attn_implementation or "eager"
    if impl.startswith(_MASKED_PREFIX):
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if "flash" in impl or "flex" in impl or "paged" in impl:
        raise ValueError(f"states whose heads keep uneven numbers of rows (GistConfig.head_budget) are read with a "
                         f"per-head key mask, which {impl!r} attention cannot take; load the model with "
                         f"attn_implementation='sdpa' or 'eager', or use head_budget='even'")
    name = _MASKED_PREFIX + impl
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _masked_attention_fn(impl))
        if impl in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[impl])
    config._attn_implementation = name


def _masked_attention_fn(impl: str):  # noqa: ANN202
    def attention(module, query, key, value, attention_mask, gist_key_mask=None, **kwargs):  # noqa: ANN001, ANN202
        if impl == "eager":  # the model's own eager function (each modeling file defines one)
            import sys

            base = sys.modules[type(module).__module__].eager_attention_forward
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            base = ALL_ATTENTION_FUNCTIONS[impl]
        if gist_key_mask is not None:
            attention_mask = head_key_mask(attention_mask, gist_key_mask[module.layer_idx], query, key)
        return base(module, query, key, value, attention_mask, **kwargs)

    return attention


def head_key_mask(attention_mask: Optional[torch.Tensor], keep: torch.Tensor, query: torch.Tensor,
                  key: torch.Tensor) -> torch.Tensor:
    """`attention_mask` (None, bool (B, 1, Q, K) with True = attend, or additive float) combined with a per-head
    key mask `keep` (1 or B, H_kv, M) over the first M keys; returns (B, H_q, Q, K) of the same kind (bool when
    `attention_mask` is None or bool). Query head h reads key/value head h // (H_q / H_kv), as `repeat_kv` does."""
    B, Hq, Q, _ = query.shape
    K = key.shape[-2]
    keep = keep.to(query.device)
    M = min(int(keep.shape[-1]), K)
    full = torch.ones((keep.shape[0], keep.shape[1], K), dtype=torch.bool, device=query.device)
    full[..., :M] = keep[..., :M]
    full = full.repeat_interleave(Hq // full.shape[1], dim=1)[:, :, None, :]  # (1 or B, Hq, 1, K)
    if attention_mask is None:  # no mask given: causal over the last Q keys (full attention when Q == 1)
        causal = torch.ones((Q, K), dtype=torch.bool, device=query.device).tril(K - Q)
        return full & causal
    am = attention_mask
    if am.shape[-1] != K:  # made for another layer's width (layers of a spliced cache may differ): rebuild it
        am = _mask_for_width(am, K, Q)
    am = am[:, :, :, :K]
    if am.dtype == torch.bool:
        return am & full
    return am + torch.where(full, 0.0, torch.finfo(am.dtype).min).to(am.dtype)


def out_cache(out):  # noqa: ANN001, ANN201
    """The KV cache of a model output (`cache` in transformers >= 5.24, `past_key_values` before)."""
    c = getattr(out, "cache", None)
    if c is None:
        c = getattr(out, "past_key_values", None)
    return c
