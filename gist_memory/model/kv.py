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


def cache_from_layers(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]):  # noqa: ANN201 - DynamicCache
    """A `DynamicCache` holding the given per-layer (keys, values), each (B, H, T, D)."""
    from transformers import DynamicCache

    return DynamicCache(list(layers))


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:  # noqa: ANN001
    """Per-layer (keys, values) of a `DynamicCache` (or a legacy tuple cache)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]


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
        (per-layer (1, H, P + kept, D) K/V, next free position for the tokens that follow).
    """
    layers_k: list[list[torch.Tensor]] = []
    layers_v: list[list[torch.Tensor]] = []
    n_layers = None
    if prefix is not None:
        n_layers = len(prefix)
        layers_k = [[k] for k, _ in prefix]
        layers_v = [[v] for _, v in prefix]
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
        if position_mode == "packed":  # each row takes its rank among its head's rows
            new_pos = offset + torch.argsort(torch.argsort(pos, dim=-1, stable=True), dim=-1)
            delta = new_pos - pos
            offset += st.num_kept
        else:
            delta = torch.full_like(pos, offset)
            offset += st.span
        if st.num_kept:
            keys = rotate(keys, delta, spec)
        for li in range(n_layers):
            layers_k[li].append(keys[li][None])
            layers_v[li].append(values[li][None])
    out = [(torch.cat(ks, dim=2), torch.cat(vs, dim=2)) for ks, vs in zip(layers_k, layers_v)]
    return out, offset


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
    return module(**kwargs)


def out_cache(out):  # noqa: ANN001, ANN201
    """The KV cache of a model output (`cache` in transformers >= 5.24, `past_key_values` before)."""
    c = getattr(out, "cache", None)
    if c is None:
        c = getattr(out, "past_key_values", None)
    return c
