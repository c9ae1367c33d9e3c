"""`GistStore`: a content-addressed cache of gist states, on disk (one safetensors file each) with an in-RAM LRU.

Layout of a store folder (see docs/store.md):

    <root>/store.json                    format marker {"format": "gist-memory/store", "version": 1}
    <root>/.lock                         inter-process file lock (filelock)
    <root>/objects/ab/cd/<key>.safetensors   one entry per state, `key` = 64 hex chars, fanout by its first 4
    <root>/quarantine/<key>.<time>.safetensors   entries that failed their checksum, kept for inspection

An entry holds the state's tensors in the store's storage dtype (float32 / bfloat16 / float16, or int8 with
float32 symmetric scales beside it: per channel for keys (L, H, 1, D), per row for values (L, H, T, 1)), the
state's json header, the key it was written under and a sha256 over every tensor. Reads are memory-mapped
(`safetensors.safe_open`), the checksum is verified on every read from disk, and an entry that fails it is moved to
`quarantine/` and reported as missing so the caller recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional, Union

import numpy as np
import torch

from gist_memory.state.gist_state import GistState, StateFormatError, _write_all, compact_rows, expand_rows
from gist_memory.store.backends import BackendSpec, LocalFolderBackend, StorageBackend, open_backend
from gist_memory.store.backends.base import is_key, unique
from gist_memory.store.backends.local import FILE_MODE, TMP_PREFIX  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

STORAGE_DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")
DEFAULT_STORAGE_DTYPE = "int8"
"""The storage dtype of a new store or memory (docs/scale.md, "Smaller states", has the measurement behind it)."""
ENTRY_FORMAT = "gist-memory/store-entry"
ENTRY_VERSION = 1
SUFFIX = ".safetensors"

_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _FLOAT_DTYPES.items()}
DEFAULT_MAX_BYTES_IN_RAM = 256 * 2**20


def _check_storage_dtype(storage_dtype: str) -> str:
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"unsupported storage_dtype {storage_dtype!r}; choose one of {list(STORAGE_DTYPES)}")
    return storage_dtype


def key_for(text_hash: str, model_fingerprint: str, storage_dtype: str = DEFAULT_STORAGE_DTYPE) -> str:
    """The cache key of a state: sha256 of (normalised text hash, model fingerprint, storage dtype).

    The model fingerprint already names the base model, the adapter, the gist config and the model dtype, so two
    models (or two configs of one model) never share a key.

    Args:
        text_hash: `gist_state.text_hash(model.normalize(text))`.
        model_fingerprint: `model.fingerprint` (== `state.model_fingerprint`).
        storage_dtype: One of `STORAGE_DTYPES`.

    Returns:
        64 lowercase hex characters.
    """
    if not text_hash or not model_fingerprint:
        raise ValueError("key_for needs a non-empty text_hash and model_fingerprint")
    _check_storage_dtype(storage_dtype)
    h = hashlib.sha256(b"gist-memory/key/v1\0")
    for part in (text_hash, model_fingerprint, storage_dtype):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


# ---- int8: symmetric scales ---------------------------------------------------------------------------------
def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` on CPU, bit-identical to torch (round to nearest even), computed in numpy.

    torch runs element-wise casts on its intra-op thread pool; on a machine whose cores are busy those threads
    spin and a 100 KB cast can take 20 ms instead of 20 us. numpy casts on the calling thread.
    """
    t = t.detach().cpu()
    if t.dtype == dtype:
        return t
    src, a = t.dtype, t.contiguous()
    if src == torch.bfloat16:
        f32 = (a.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return torch.from_numpy(f32) if dtype == torch.float32 else cast(torch.from_numpy(f32), dtype)
    if src == torch.float16:
        f32 = a.numpy().astype(np.float32)
        return torch.from_numpy(f32) if dtype == torch.float32 else cast(torch.from_numpy(f32), dtype)
    if src == torch.float32:
        x = a.numpy()
        if dtype == torch.float16:
            with np.errstate(over="ignore"):  # out of range -> inf, as torch does
                return torch.from_numpy(x.astype(np.float16))
        if dtype == torch.bfloat16:
            u = x.view(np.uint32)
            r = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)  # round to nearest even
            r[np.isnan(x)] = 0x7FC0
            return torch.from_numpy(r.view(np.int16)).view(torch.bfloat16)
    return t.to(dtype)


def quantize_int8(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation with one float32 scale per slice, reducing over `dim`.

    Args:
        x: A float tensor, e.g. keys (L, H, T, D).
        dim: The dimension the scale is shared along (2 for keys: one scale per channel (L, H, 1, D);
            3 for values: one scale per row (L, H, T, 1)).

    Returns:
        (q int8 of x's shape, scale float32 with `dim` kept as size 1); x ~= q * scale.
    """
    xf = cast(x, torch.float32).numpy()
    if xf.shape[dim] == 0:
        amax = np.zeros(xf.shape[:dim] + (1,) + xf.shape[dim + 1 :], np.float32)
    else:
        amax = np.abs(xf).max(axis=dim, keepdims=True)
    scale = np.maximum(amax / np.float32(127.0), np.finfo(np.float32).tiny).astype(np.float32)
    q = np.clip(np.rint(xf / scale), -127, 127).astype(np.int8)
    return torch.from_numpy(q), torch.from_numpy(scale)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_int8`, cast to `dtype`."""
    x = q.contiguous().numpy().astype(np.float32) * scale.contiguous().numpy()
    return cast(torch.from_numpy(x), dtype)


# ---- int4: asymmetric groups (KIVI) ------------------------------------------------------------------------------
INT4_KEY_GROUP = 64  # keys: one (scale, min) per channel for every 64 rows (tokens)
INT4_VALUE_GROUP = 64  # values: one (scale, min) per row (token) for every 64 channels
_FP16_MAX = 60000.0
_FP16_MIN_SCALE = 2.0**-14  # smallest normal float16: a scale below it would lose precision


def _group_view(x: np.ndarray, dim: int, group: int) -> tuple[np.ndarray, int]:
    """Move `dim` last, pad it (edge values) to a multiple of `group`, split it: (..., n_groups, group)."""
    a = np.moveaxis(x, dim, -1)
    n = a.shape[-1]
    pad = (-n) % group
    if pad:
        a = np.concatenate([a, np.repeat(a[..., -1:], pad, axis=-1)], axis=-1)
    return a.reshape(a.shape[:-1] + (a.shape[-1] // group, group)), n


def quantize_int4(x: torch.Tensor, dim: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit quantisation with one (scale, min) per group of `group` elements along `dim` (KIVI:
    keys per channel, grouped over tokens, `dim=2`; values per token, grouped over channels, `dim=3`).

    Args:
        x: A float tensor (L, H, T, D).
        dim: The dimension the groups run along.
        group: Elements per group.

    Returns:
        (packed uint8 (L, H, T, ceil(D/2)): two 4-bit codes per byte along the last dim, low nibble first;
         scale and min, float16 where every value fits it (else float32), of x's shape with `dim` replaced
         by the number of groups). x ~= code * scale + min, |error| <= scale / 2 (plus float16 rounding of min).
    """
    xf = cast(x, torch.float32).numpy()
    if x.numel() == 0:
        shape = list(xf.shape)
        shape[dim] = 0 if xf.shape[dim] == 0 else -(-xf.shape[dim] // group)
        z = np.zeros(shape, np.float16)
        packed = np.zeros(xf.shape[:-1] + ((xf.shape[-1] + 1) // 2,), np.uint8)
        return torch.from_numpy(packed), torch.from_numpy(z), torch.from_numpy(z.copy())
    g, n = _group_view(xf, dim, group)
    lo = g.min(axis=-1, keepdims=True)
    hi = g.max(axis=-1, keepdims=True)
    scale = (hi - lo) / np.float32(15.0)
    fits16 = (
        np.isfinite(lo).all() and np.isfinite(hi).all() and np.abs(lo).max() < _FP16_MAX
        and np.abs(hi).max() < _FP16_MAX and bool(((scale == 0) | (scale >= _FP16_MIN_SCALE)).all())
    )
    sdt = np.float16 if fits16 else np.float32
    lo_s = lo.astype(sdt)
    # round the scale up so the top code still reaches the group's max from the rounded min
    scale_s = ((hi - lo_s.astype(np.float32)) / np.float32(15.0)).astype(sdt)
    short = scale_s.astype(np.float32) * 15 + lo_s.astype(np.float32) < hi
    scale_s = np.where(short, np.nextafter(scale_s, np.array(np.inf, sdt)), scale_s).astype(sdt)
    sf, lf = scale_s.astype(np.float32), lo_s.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(sf > 0, np.rint((g - lf) / sf), 0.0)
    q = np.clip(q, 0, 15).astype(np.uint8)
    q = q.reshape(q.shape[:-2] + (-1,))[..., :n]
    q = np.moveaxis(q, -1, dim)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    scale_out = np.moveaxis(scale_s[..., 0], -1, dim)
    min_out = np.moveaxis(lo_s[..., 0], -1, dim)
    return (torch.from_numpy(np.ascontiguousarray(packed)), torch.from_numpy(np.ascontiguousarray(scale_out)),
            torch.from_numpy(np.ascontiguousarray(min_out)))


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, shape: Sequence[int],
                    dim: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_int4` for a tensor of `shape`, cast to `dtype`; ValueError if the parts do not fit."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 4 or min(shape) < 0 or not 0 <= dim < 4 or group < 1:
        raise ValueError(f"bad int4 shape {shape} / dim {dim} / group {group}")
    n_groups = -(-shape[dim] // group)
    gshape = shape[:dim] + (n_groups,) + shape[dim + 1 :]
    want = shape[:-1] + ((shape[-1] + 1) // 2,)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != want:
        raise ValueError(f"int4 codes {packed.dtype} {tuple(packed.shape)}, expected uint8 {want}")
    for name, t in (("scale", scale), ("min", minimum)):
        if t.dtype not in (torch.float16, torch.float32) or tuple(t.shape) != gshape:
            raise ValueError(f"int4 {name} {t.dtype} {tuple(t.shape)}, expected float16/32 {gshape}")
    p = packed.contiguous().numpy()
    q = np.empty(shape[:-1] + (2 * p.shape[-1],), np.uint8)
    q[..., 0::2] = p & 0x0F
    q[..., 1::2] = p >> 4
    q = q[..., : shape[-1]].astype(np.float32)
    sf = np.repeat(scale.contiguous().numpy().astype(np.float32), group, axis=dim)
    lf = np.repeat(minimum.contiguous().numpy().astype(np.float32), group, axis=dim)
    idx = [slice(None)] * 4
    idx[dim] = slice(0, shape[dim])
    x = q * sf[tuple(idx)] + lf[tuple(idx)]
    return cast(torch.from_numpy(np.ascontiguousarray(x)), dtype)


# ---- entry (de)serialisation --------------------------------------------------------------------------------
def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def encode_entry(state: GistState, storage_dtype: str, key: str) -> bytes:
    """Serialise `state` as a store entry (safetensors bytes) in `storage_dtype`."""
    from safetensors.torch import save

    _check_storage_dtype(storage_dtype)
    if state.dtype not in _DTYPE_NAMES:
        raise ValueError(f"cannot store a state of dtype {state.dtype}; expected one of {list(_FLOAT_DTYPES)}")
    keys = state.keys.detach().cpu()
    values = state.values.detach().cpu()
    tensors: dict[str, torch.Tensor] = {
        "positions": state.positions.detach().cpu().to(torch.int64).contiguous(),
        "kinds": state.kinds.detach().cpu().to(torch.uint8).contiguous(),
    }
    if storage_dtype == "int8":
        kq, ks = quantize_int8(keys, dim=2)  # (L, H, T, D), scale (L, H, 1, D)
        vq, vs = quantize_int8(values, dim=3)  # (L, H, T, Dv), scale (L, H, T, 1)
        tensors.update(
            keys=kq.contiguous(), keys_scale=ks.contiguous(), values=vq.contiguous(), values_scale=vs.contiguous()
        )
    elif storage_dtype == "int4":
        kq, ks, km = quantize_int4(keys, dim=2, group=INT4_KEY_GROUP)  # per channel, groups of rows
        vq, vs, vm = quantize_int4(values, dim=3, group=INT4_VALUE_GROUP)  # per row, groups of channels
        # shapes and group sizes in a tensor, so the checksum covers them
        layout = [INT4_KEY_GROUP, INT4_VALUE_GROUP, *keys.shape, values.shape[-1]]
        tensors.update(keys=kq, keys_scale=ks, keys_min=km, values=vq, values_scale=vs, values_min=vm,
                       int4_layout=torch.tensor(layout, dtype=torch.int64))
    else:
        dt = _FLOAT_DTYPES[storage_dtype]
        tensors.update(keys=cast(keys, dt).contiguous(), values=cast(values, dt).contiguous())
    if state.has_empty_slots and storage_dtype != "int4":  # only the rows heads really keep (int4 packs by group)
        tensors["keys"] = compact_rows(tensors["keys"], state.positions.cpu()).contiguous()
        tensors["values"] = compact_rows(tensors["values"], state.positions.cpu()).contiguous()
    header = {
        "span": state.span,
        "num_tokens": state.num_tokens,
        "sentence_spans": [list(s) for s in state.sentence_spans],
        "text_hash": state.text_hash,
        "model_fingerprint": state.model_fingerprint,
        "text": state.text,
        "meta": state.meta,
    }
    metadata = {
        "format": ENTRY_FORMAT,
        "format_version": str(ENTRY_VERSION),
        "key": key,
        "storage_dtype": storage_dtype,
        "state_dtype": _DTYPE_NAMES[state.dtype],
        "header": json.dumps(header, ensure_ascii=False),
        "checksum": _checksum(tensors),
    }
    return canonical_safetensors(save(tensors, metadata=metadata))


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted.

    safetensors writes the header from a hash map, so the same tensors and metadata come out in another key order in
    every process: a content-addressed entry would differ byte for byte between the writers that share a store. The
    data section and its offsets are untouched; the header is padded with spaces to a multiple of 8, as safetensors
    does."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]


def _decode(tensors: dict[str, torch.Tensor], meta: dict[str, str], key: Optional[str], where: str) -> GistState:
    if meta.get("format") != ENTRY_FORMAT or meta.get("format_version") != str(ENTRY_VERSION):
        raise StateFormatError(f"{where}: not a gist-memory store entry (format={meta.get('format')!r})")
    if _checksum(tensors) != meta.get("checksum"):
        raise StateFormatError(f"{where}: checksum mismatch (corrupted entry)")
    try:
        h = json.loads(meta["header"])
        storage_dtype = meta["storage_dtype"]
        state_dtype = _FLOAT_DTYPES[meta["state_dtype"]]
        if key is not None and (
            meta.get("key") != key or key_for(h["text_hash"], h["model_fingerprint"], storage_dtype) != key
        ):
            raise StateFormatError(f"{where}: entry does not belong under key {key[:16]}...")
        if tensors["keys"].dim() == 2:  # compact rows of a state whose heads keep uneven numbers of rows
            tensors = {**tensors, "keys": expand_rows(tensors["keys"], tensors["positions"], where),
                       "values": expand_rows(tensors["values"], tensors["positions"], where)}
        if storage_dtype == "int8":
            keys = dequantize_int8(tensors["keys"], tensors["keys_scale"], state_dtype)
            values = dequantize_int8(tensors["values"], tensors["values_scale"], state_dtype)
        elif storage_dtype == "int4":
            lay = tensors["int4_layout"]
            if lay.dtype != torch.int64 or tuple(lay.shape) != (7,):
                raise StateFormatError(f"{where}: bad int4 layout {lay.dtype} {tuple(lay.shape)}")
            gk, gv, L, H, T, D, Dv = (int(v) for v in lay.tolist())
            keys = dequantize_int4(tensors["keys"], tensors["keys_scale"], tensors["keys_min"], (L, H, T, D),
                                   2, gk, state_dtype)
            values = dequantize_int4(tensors["values"], tensors["values_scale"], tensors["values_min"],
                                     (L, H, T, Dv), 3, gv, state_dtype)
        elif storage_dtype in _FLOAT_DTYPES:
            keys = cast(tensors["keys"], state_dtype)
            values = cast(tensors["values"], state_dtype)
        else:
            raise StateFormatError(f"{where}: unknown storage dtype {storage_dtype!r}")
        return GistState.from_header(keys, values, tensors["positions"], tensors["kinds"], h, where=where)
    except StateFormatError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise StateFormatError(f"{where}: bad entry: {e}") from e


def decode_entry(data: bytes, key: Optional[str] = None) -> GistState:
    """Parse store-entry bytes; raises `StateFormatError` if foreign, corrupted or filed under the wrong key."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        meta = dict(json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {})
    except Exception as e:  # safetensors raises several types on garbage
        raise StateFormatError(f"not a safetensors store entry: {e}") from e
    return _decode(tensors, meta, key, "buffer")


def read_entry(path: Union[str, os.PathLike], key: Optional[str] = None) -> GistState:
    """Read one entry file, memory-mapped; raises `StateFormatError` if foreign, truncated or corrupted."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:
        raise StateFormatError(f"{path} is not a readable safetensors file: {e}") from e
    return _decode(tensors, meta, key, path)


def _write_bytes(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (tests monkeypatch this to simulate a full disk)."""
    _write_all(fd, data)


# ---- LRU -----------------------------------------------------------------------------------------------------
class _ByteLRU:
    """Decoded states by key, evicting least-recently-used ones beyond `max_bytes` of K/V."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._d: OrderedDict[str, GistState] = OrderedDict()

    def get(self, key: str) -> Optional[GistState]:
        s = self._d.get(key)
        if s is not None:
            self._d.move_to_end(key)
        return s

    def put(self, key: str, state: GistState) -> None:
        self.pop(key)
        size = state.nbytes
        if size > self.max_bytes:
            return
        self._d[key] = state
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._d.popitem(last=False)
            self.nbytes -= old.nbytes

    def pop(self, key: str) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes

    def clear(self) -> None:
        self._d.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._d)


class GistStore:
    """Content-addressed gist-state cache: an LRU of decoded states in front of one or more storage tiers.

    By default one tier, a local folder: one safetensors file per state under a fanout folder. Writes go to a
    temporary file in the target folder and are renamed into place (then the folder is fsynced), so a reader (or
    a process killed mid-write) never sees half a file; two processes writing the same store lose nothing
    (distinct keys are distinct files, a shared key gets identical bytes, and renames, deletes and `gc` hold a
    file lock).

    With several tiers (fastest first, e.g. `["/var/cache/gist", "redis://10.0.0.5:6379/0", "s3://bucket/gist"]`)
    a read checks the LRU, then each tier in turn, and copies what it found into the faster tiers on the way
    back. The last tier is the authoritative one: `put` writes it first (its errors propagate, all or nothing)
    and then the faster tiers (their errors are logged and counted in `stats["tier_errors"]`, as are read
    errors, which count as a miss). Every object read from any tier is checksummed and checked against its key
    before it is served; a bad one is quarantined in that tier and the next tier is tried.

    Args:
        path: Where entries live: a folder (created if missing), a URL (`s3://bucket/prefix` and any other fsspec
            URL, `redis://host:port/db`, `file:///folder`), a `StorageBackend`, a list of these (tiers, fastest
            first), or None for a store held in RAM only (encoded entries in a dict, never evicted).
        max_bytes_in_ram: Byte budget of the LRU of decoded states (K/V bytes); 0 disables it.
        storage_dtype: `float32`, `bfloat16`, `float16`, `int8` (symmetric, float32 scales: per channel for keys,
            per row for values) or `int4` (asymmetric, KIVI-style: keys per channel in groups of 64 rows, values
            per row in groups of 64 channels; float16 scale and min). States read back are cast to the dtype they
            were put in.
        fsync: For local folders: fsync every file before its rename and the folder after (durable across a
            power cut; a killed process is safe either way).
        lock_timeout: Seconds to wait for a local folder's inter-process lock before raising `filelock.Timeout`.
        storage_options: For fsspec URLs, e.g. `{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}`.

    Example:
        >>> store = GistStore("cache/", storage_dtype="bfloat16")
        >>> key = store.put(state)
        >>> store.get(key, model_fingerprint=model.fingerprint)
        >>> shared = GistStore(["cache/", "s3://my-bucket/gist-states"])   # local disk in front of S3
    """

    def __init__(
        self,
        path: Union[BackendSpec, Sequence[BackendSpec]] = None,
        max_bytes_in_ram: int = DEFAULT_MAX_BYTES_IN_RAM,
        storage_dtype: str = DEFAULT_STORAGE_DTYPE,
        *,
        fsync: bool = True,
        lock_timeout: float = 60.0,
        storage_options: Optional[dict] = None,
    ) -> None:
        self.storage_dtype = _check_storage_dtype(storage_dtype)
        if max_bytes_in_ram < 0:
            raise ValueError(f"max_bytes_in_ram must be >= 0, got {max_bytes_in_ram}")
        self.fsync = bool(fsync)
        specs = list(path) if isinstance(path, (list, tuple)) else [path]
        if not specs or (len(specs) > 1 and any(x is None for x in specs)):
            raise ValueError("GistStore tiers must be folders, URLs or backends (None only alone: a RAM store)")
        local = {"fsync": self.fsync, "lock_timeout": lock_timeout,
                 # looked up per call so tests can simulate a full disk
                 "write": lambda fd, data: _write_bytes(fd, data)}
        self.tiers: list[StorageBackend] = []
        try:
            for spec in specs:
                self.tiers.append(open_backend(spec, storage_options=storage_options, **local))
            for t in self.tiers:
                t.check_or_write_marker()
        except BaseException:
            for t in self.tiers:
                t.close()
            raise
        first = self.tiers[0]
        self.path: Optional[str] = first.path if isinstance(first, LocalFolderBackend) else None
        self._lru = _ByteLRU(max_bytes_in_ram)
        self._guard = threading.RLock()
        self._closed = False
        self.stats = {"hits_ram": 0, "hits_disk": 0, "hits_shared": 0, "misses": 0, "corrupt": 0,
                      "fingerprint_mismatch": 0, "puts": 0, "fills": 0, "tier_errors": 0}

    @property
    def backend(self) -> StorageBackend:
        """The authoritative (last) tier."""
        return self.tiers[-1]

    # ---- layout ---------------------------------------------------------------------------------------
    def path_for(self, key: str) -> str:
        """The file an entry with `key` lives in (whether or not it exists), for a store whose first tier is a
        local folder."""
        first = self.tiers[0]
        if not isinstance(first, LocalFolderBackend):
            raise ValueError(f"this GistStore's first tier ({first.url}) is not a local folder; it has no files")
        self._check_key(key)
        return first.path_for(key)

    @staticmethod
    def _check_key(key: str) -> None:
        if not is_key(key):
            raise ValueError(f"not a gist store key (64 lowercase hex chars): {key!r}")

    def key_for(self, text_hash: str, model_fingerprint: str, storage_dtype: Optional[str] = None) -> str:
        """`key_for(text_hash, model_fingerprint, storage_dtype or self.storage_dtype)`."""
        return key_for(text_hash, model_fingerprint, storage_dtype or self.storage_dtype)

    def key_of(self, state: GistState) -> str:
        """The key `put(state)` files the state under."""
        return self.key_for(state.text_hash, state.model_fingerprint)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this GistStore is closed")

    def _tier_error(self, tier: StorageBackend, what: str, e: BaseException) -> None:
        self.stats["tier_errors"] += 1
        logger.warning("gist store: %s on %s failed (%s: %s)", what, tier.url, type(e).__name__, e)

    # ---- writing --------------------------------------------------------------------------------------
    def put(self, state: GistState, *, overwrite: bool = False) -> str:
        """Store one state; returns its key. An existing entry is kept unless `overwrite`."""
        return self.batched_put([state], overwrite=overwrite)[0]

    def batched_put(self, states: Sequence[GistState], *, overwrite: bool = False) -> list[str]:
        """Store several states; returns their keys in order.

        All-or-nothing per call on the authoritative tier: if a write fails (disk full, permission denied,
        connection lost, ...), the entries this call created there are removed again and the error propagates,
        leaving the store as it was. The faster tiers are then filled as a cache (failures logged).
        """
        self._check_open()
        for s in states:
            if not isinstance(s, GistState):
                raise ValueError(f"GistStore.put takes GistState objects, got {type(s).__name__}")
        keys = [self.key_of(s) for s in states]
        with self._guard:
            todo: dict[str, GistState] = {}
            for k, s in zip(keys, states, strict=True):
                todo.setdefault(k, s)
            if not overwrite:
                have = self.backend.exists_many(list(todo))
                todo = {k: s for (k, s), h in zip(todo.items(), have, strict=True) if not h}
            if not todo:
                return keys
            blobs = {k: encode_entry(s, self.storage_dtype, k) for k, s in todo.items()}
            self.backend.put_many(blobs, overwrite=overwrite)
            for tier in self.tiers[:-1]:
                try:
                    tier.put_many(blobs, overwrite=True)
                except Exception as e:
                    self._tier_error(tier, "put", e)
            for k in todo:
                self._lru.pop(k)
            self.stats["puts"] += len(todo)
        return keys

    # ---- reading --------------------------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        """True if an entry exists under `key` in any tier (existence only; `get` verifies the checksum)."""
        self._check_open()
        self._check_key(key)
        for tier in self.tiers:
            try:
                if tier.exists(key):
                    return True
            except Exception as e:
                if tier is self.backend:
                    raise
                self._tier_error(tier, "exists", e)
        return False

    def __contains__(self, key: str) -> bool:
        return self.contains(key)

    def get(self, key: str, model_fingerprint: Optional[str] = None) -> Optional[GistState]:
        """The state under `key`, or None if absent, corrupted (quarantined) or of another model.

        Args:
            key: A key from `put` / `key_for`.
            model_fingerprint: If given, a state whose fingerprint differs is never returned.
        """
        return self.batched_get([key], model_fingerprint)[0]

    def batched_get(self, keys: Sequence[str], model_fingerprint: Optional[str] = None) -> list[Optional[GistState]]:
        """`get` for several keys, in order (one batched request per tier where the backend has one)."""
        self._check_open()
        for key in keys:
            self._check_key(key)
        with self._guard:
            found: dict[str, GistState] = {}
            for key in unique(keys):
                state = self._lru.get(key)
                if state is not None:
                    found[key] = state
            self.stats["hits_ram"] += sum(1 for k in keys if k in found)
            missing = [k for k in unique(keys) if k not in found]
            for i, tier in enumerate(self.tiers):
                if not missing:
                    break
                got = self._read_tier(tier, missing)
                fills: dict[str, bytes] = {}
                for key, (state, data) in got.items():
                    found[key] = state
                    self._lru.put(key, state)
                    self.stats["hits_disk" if i == 0 else "hits_shared"] += 1
                    if i > 0:
                        fills[key] = data if data is not None else tier.get(key)
                for faster in self.tiers[:i]:
                    try:
                        self.stats["fills"] += len(faster.put_many({k: d for k, d in fills.items() if d}))
                    except Exception as e:
                        self._tier_error(faster, "fill", e)
                missing = [k for k in missing if k not in got]
            self.stats["misses"] += len(missing)
            out: list[Optional[GistState]] = []
            for key in keys:
                state = found.get(key)
                if state is not None and model_fingerprint is not None and state.model_fingerprint != model_fingerprint:
                    self.stats["fingerprint_mismatch"] += 1
                    logger.warning(
                        "gist store: entry %s belongs to model %s, not %s; not served",
                        key[:16],
                        state.model_fingerprint[:16],
                        model_fingerprint[:16],
                    )
                    state = None
                out.append(state)
        return out

    def _read_tier(self, tier: StorageBackend, keys: list[str]) -> dict[str, tuple[GistState, Optional[bytes]]]:
        """Valid states of `keys` in `tier` (with their bytes when read as bytes); bad ones are quarantined."""
        out: dict[str, tuple[GistState, Optional[bytes]]] = {}
        if tier.local_path(keys[0]) is not None:  # a local folder: memory-mapped, one file at a time
            for key in keys:
                path = tier.local_path(key)
                try:
                    out[key] = (read_entry(path, key), None)
                except FileNotFoundError:
                    continue
                except StateFormatError as e:
                    self._corrupt(tier, key, e)
            return out
        try:
            blobs = tier.get_many(keys)
        except Exception as e:
            self._tier_error(tier, "get", e)
            return out
        for key, data in zip(keys, blobs, strict=True):
            if data is None:
                continue
            try:
                out[key] = (decode_entry(bytes(data), key), bytes(data))
            except StateFormatError as e:
                self._corrupt(tier, key, e)
        return out

    def _corrupt(self, tier: StorageBackend, key: str, e: StateFormatError) -> None:
        self.stats["corrupt"] += 1
        logger.warning("gist store: %s (%s, key %s); quarantined, it will be refetched or recomputed",
                       e, tier.url, key[:16])
        try:
            tier.quarantine(key)
        except Exception as qe:
            self._tier_error(tier, "quarantine", qe)

    # ---- deleting / housekeeping ----------------------------------------------------------------------
    def delete(self, key: str) -> bool:
        """Remove the entry under `key` from every tier; returns True if any had it."""
        self._check_open()
        self._check_key(key)
        with self._guard:
            self._lru.pop(key)
            had = False
            for tier in self.tiers:
                try:
                    had = tier.delete(key) or had
                except Exception as e:
                    if tier is self.backend:
                        raise
                    self._tier_error(tier, "delete", e)
            return had

    def keys(self) -> Iterator[str]:
        """Every stored key (unordered; with several tiers, the keys of any tier, once each)."""
        self._check_open()
        if len(self.tiers) == 1:
            yield from self.tiers[0].list()
            return
        seen: set[str] = set()
        for tier in reversed(self.tiers):
            for k in tier.list():
                if k not in seen:
                    seen.add(k)
                    yield k

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def disk_bytes(self) -> int:
        """Bytes of every entry in the authoritative tier (files on disk, objects, or encoded bytes in RAM)."""
        return self.backend.total_bytes()

    def gc(self, live_keys: Optional[Iterable[str]] = None, *, min_age_s: float = 3600.0) -> dict[str, int]:
        """Remove leftovers in every tier: temporary files of killed writers, quarantined entries and, if
        `live_keys` is given, every entry not in it (orphans).

        Only objects older than `min_age_s` are touched (for Redis: idle that long), so a writer running at the
        same time (whose entry is not yet in `live_keys`) loses nothing.

        Returns:
            Counts summed over the tiers: `{"tmp": ..., "quarantine": ..., "orphans": ...}`.
        """
        self._check_open()
        live = set(live_keys) if live_keys is not None else None
        counts = {"tmp": 0, "quarantine": 0, "orphans": 0}
        with self._guard:
            for tier in self.tiers:
                for k, v in tier.gc(live, min_age_s).items():
                    counts[k] = counts.get(k, 0) + v
            if live is not None:
                for k in [k for k in self._lru._d if k not in live]:
                    self._lru.pop(k)
        return counts

    def clear_ram(self) -> None:
        """Drop the LRU of decoded states (entries in the tiers stay)."""
        with self._guard:
            self._lru.clear()

    def close(self) -> None:
        """Release RAM and connections; further calls raise. Idempotent."""
        with self._guard:
            self._lru.clear()
            if not self._closed:
                for t in self.tiers:
                    t.close()
            self._closed = True

    def __enter__(self) -> GistStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = " -> ".join(t.url for t in self.tiers)
        return f"GistStore({where!r}, storage_dtype={self.storage_dtype!r}, lru={len(self._lru)} states)"
