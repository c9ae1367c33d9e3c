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
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional, Union

import numpy as np
import torch
from filelock import FileLock

from gist_memory.state.gist_state import GistState, StateFormatError, _write_all, atomic_write_bytes, write_temp

logger = logging.getLogger(__name__)

STORAGE_DTYPES = ("float32", "bfloat16", "float16", "int8")
STORE_FORMAT = "gist-memory/store"
STORE_VERSION = 1
ENTRY_FORMAT = "gist-memory/store-entry"
ENTRY_VERSION = 1
SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"
FILE_MODE = 0o644  # mkstemp makes 0600; entries are as readable as any other cache file

_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _FLOAT_DTYPES.items()}
DEFAULT_MAX_BYTES_IN_RAM = 256 * 2**20


def _check_storage_dtype(storage_dtype: str) -> str:
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"unsupported storage_dtype {storage_dtype!r}; choose one of {list(STORAGE_DTYPES)}")
    return storage_dtype


def key_for(text_hash: str, model_fingerprint: str, storage_dtype: str = "float32") -> str:
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
    else:
        dt = _FLOAT_DTYPES[storage_dtype]
        tensors.update(keys=cast(keys, dt).contiguous(), values=cast(values, dt).contiguous())
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
    return save(tensors, metadata=metadata)


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
        if storage_dtype == "int8":
            keys = dequantize_int8(tensors["keys"], tensors["keys_scale"], state_dtype)
            values = dequantize_int8(tensors["values"], tensors["values_scale"], state_dtype)
        else:
            keys = cast(tensors["keys"], state_dtype)
            values = cast(tensors["values"], state_dtype)
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
    """Content-addressed gist-state cache: one safetensors file per state under a fanout folder, plus an LRU.

    Writes go to a temporary file in the target folder and are renamed into place, so a reader (or a process
    killed mid-write) never sees half a file; two processes writing the same store lose nothing (distinct keys
    are distinct files, a shared key gets identical bytes, and renames, deletes and `gc` hold a file lock).

    Args:
        path: Folder of the store (created if missing), or None for a store held in RAM only (encoded entries
            in a dict, never evicted).
        max_bytes_in_ram: Byte budget of the LRU of decoded states (K/V bytes); 0 disables it.
        storage_dtype: `float32`, `bfloat16`, `float16` or `int8` (symmetric, float32 scales stored beside:
            per channel for keys, per row for values). States read back are cast to the dtype they were put in.
        fsync: fsync every file before renaming it (durable across power loss; a killed process is safe
            either way).
        lock_timeout: Seconds to wait for the inter-process lock before raising `filelock.Timeout`.

    Example:
        >>> store = GistStore("cache/", storage_dtype="bfloat16")
        >>> key = store.put(state)
        >>> store.get(key, model_fingerprint=model.fingerprint)
    """

    def __init__(
        self,
        path: Union[str, os.PathLike, None] = None,
        max_bytes_in_ram: int = DEFAULT_MAX_BYTES_IN_RAM,
        storage_dtype: str = "float32",
        *,
        fsync: bool = True,
        lock_timeout: float = 60.0,
    ) -> None:
        self.storage_dtype = _check_storage_dtype(storage_dtype)
        if max_bytes_in_ram < 0:
            raise ValueError(f"max_bytes_in_ram must be >= 0, got {max_bytes_in_ram}")
        self.fsync = bool(fsync)
        self.path: Optional[str] = os.path.abspath(os.fspath(path)) if path is not None else None
        self._lru = _ByteLRU(max_bytes_in_ram)
        self._mem: Optional[dict[str, bytes]] = None
        self._guard = threading.RLock()
        self._closed = False
        self.stats = {"hits_ram": 0, "hits_disk": 0, "misses": 0, "corrupt": 0, "fingerprint_mismatch": 0, "puts": 0}
        if self.path is None:
            self._mem = {}
            self._lock = None
            return
        self._objects = os.path.join(self.path, "objects")
        self._quarantine = os.path.join(self.path, "quarantine")
        os.makedirs(self._objects, exist_ok=True)
        self._lock = FileLock(os.path.join(self.path, ".lock"), timeout=lock_timeout)
        self._check_or_write_marker()

    # ---- layout ---------------------------------------------------------------------------------------
    def _check_or_write_marker(self) -> None:
        assert self.path is not None
        marker = os.path.join(self.path, "store.json")
        if os.path.isfile(marker):
            try:
                with open(marker, encoding="utf-8") as f:
                    info = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{marker} is not a readable gist store marker: {e}") from e
            if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
                raise ValueError(f"{self.path} is not a gist-memory store (store.json format={info!r})")
            if int(info.get("version", -1)) != STORE_VERSION:
                raise ValueError(f"{self.path}: unsupported gist store version {info.get('version')!r}")
            return
        with self._lock:
            if not os.path.isfile(marker):
                data = json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION}).encode()
                self._atomic_write(marker, data)

    def path_for(self, key: str) -> str:
        """The file an entry with `key` lives in (whether or not it exists)."""
        if self.path is None:
            raise ValueError("an in-RAM GistStore (path=None) has no files")
        self._check_key(key)
        return os.path.join(self._objects, key[:2], key[2:4], key + SUFFIX)

    @staticmethod
    def _check_key(key: str) -> None:
        if not isinstance(key, str) or len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
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

    # ---- writing --------------------------------------------------------------------------------------
    def _temp_options(self) -> dict:
        # `_write_bytes` is looked up per call so tests can simulate a full disk
        return {"prefix": TMP_PREFIX, "suffix": SUFFIX, "mode": FILE_MODE, "fsync": self.fsync,
                "write": lambda fd, data: _write_bytes(fd, data)}

    def _atomic_write(self, path: str, data: bytes) -> None:
        atomic_write_bytes(path, data, **self._temp_options())

    def put(self, state: GistState, *, overwrite: bool = False) -> str:
        """Store one state; returns its key. An existing entry is kept unless `overwrite`."""
        return self.batched_put([state], overwrite=overwrite)[0]

    def batched_put(self, states: Sequence[GistState], *, overwrite: bool = False) -> list[str]:
        """Store several states; returns their keys in order.

        All-or-nothing per call: if a write fails (disk full, permission denied, ...), the entries this call
        created are removed again and the error propagates, leaving the store as it was.
        """
        self._check_open()
        for s in states:
            if not isinstance(s, GistState):
                raise ValueError(f"GistStore.put takes GistState objects, got {type(s).__name__}")
        keys = [self.key_of(s) for s in states]
        todo: dict[str, GistState] = {}
        with self._guard:
            for k, s in zip(keys, states, strict=True):
                if k not in todo and (overwrite or not self.contains(k)):
                    todo[k] = s
            if not todo:
                return keys
            blobs = {k: encode_entry(s, self.storage_dtype, k) for k, s in todo.items()}
            if self._mem is not None:
                self._mem.update(blobs)
            else:
                self._write_entries(blobs, overwrite)
            for k in todo:
                self._lru.pop(k)
            self.stats["puts"] += len(todo)
        return keys

    def _write_entries(self, blobs: dict[str, bytes], overwrite: bool) -> None:
        """Temp files first, then renames under the lock; on any error undo this call's new files."""
        staged: list[tuple[str, str]] = []  # (tmp, final)
        created: list[str] = []
        try:
            for k, data in blobs.items():
                final = self.path_for(k)
                staged.append((write_temp(os.path.dirname(final), data, **self._temp_options()), final))
            assert self._lock is not None
            with self._lock:
                for tmp, final in staged:
                    existed = os.path.exists(final)
                    if existed and not overwrite:
                        os.unlink(tmp)  # another process stored the same content meanwhile
                        continue
                    os.replace(tmp, final)
                    if not existed:
                        created.append(final)
            staged = []
        except BaseException:
            for tmp, _ in staged:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            for final in created:
                try:
                    os.unlink(final)
                except OSError:
                    pass
            raise

    # ---- reading --------------------------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        """True if an entry exists under `key` (existence only; the checksum is verified by `get`)."""
        self._check_open()
        if self._mem is not None:
            return key in self._mem
        return os.path.exists(self.path_for(key))

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
        """`get` for several keys, in order."""
        self._check_open()
        out: list[Optional[GistState]] = []
        with self._guard:
            for key in keys:
                self._check_key(key)
                state = self._lru.get(key)
                if state is not None:
                    self.stats["hits_ram"] += 1
                else:
                    state = self._load(key)
                    if state is None:
                        self.stats["misses"] += 1
                    else:
                        self.stats["hits_disk"] += 1
                        self._lru.put(key, state)
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

    def _load(self, key: str) -> Optional[GistState]:
        if self._mem is not None:
            data = self._mem.get(key)
            if data is None:
                return None
            try:
                return decode_entry(data, key)
            except StateFormatError as e:
                self.stats["corrupt"] += 1
                logger.warning("gist store: dropping corrupted in-RAM entry %s: %s", key[:16], e)
                del self._mem[key]
                return None
        path = self.path_for(key)
        try:
            return read_entry(path, key)
        except FileNotFoundError:
            return None
        except StateFormatError as e:
            self.stats["corrupt"] += 1
            logger.warning("gist store: %s; moved to quarantine, it will be recomputed", e)
            self._quarantine_file(key, path)
            return None

    def _quarantine_file(self, key: str, path: str) -> None:
        assert self._lock is not None
        try:
            with self._lock:
                os.makedirs(self._quarantine, exist_ok=True)
                os.replace(path, os.path.join(self._quarantine, f"{key}.{time.time_ns()}{SUFFIX}"))
        except FileNotFoundError:
            pass  # another process quarantined or replaced it first
        except OSError as e:
            logger.warning("gist store: could not quarantine %s (%s); removing it", path, e)
            try:
                os.unlink(path)
            except OSError:
                pass

    # ---- deleting / housekeeping ----------------------------------------------------------------------
    def delete(self, key: str) -> bool:
        """Remove the entry under `key`; returns True if there was one."""
        self._check_open()
        self._check_key(key)
        with self._guard:
            self._lru.pop(key)
            if self._mem is not None:
                return self._mem.pop(key, None) is not None
            assert self._lock is not None
            with self._lock:
                try:
                    os.unlink(self.path_for(key))
                    return True
                except FileNotFoundError:
                    return False

    def keys(self) -> Iterator[str]:
        """Every stored key (unordered)."""
        self._check_open()
        if self._mem is not None:
            yield from list(self._mem)
            return
        for _dirpath, _, files in os.walk(self._objects):
            for name in files:
                if name.endswith(SUFFIX) and not name.startswith(TMP_PREFIX):
                    yield name[: -len(SUFFIX)]

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def disk_bytes(self) -> int:
        """Bytes of every entry (files on disk, or encoded bytes for an in-RAM store)."""
        if self._mem is not None:
            return sum(len(b) for b in self._mem.values())
        return sum(os.path.getsize(self.path_for(k)) for k in self.keys())

    def gc(self, live_keys: Optional[Iterable[str]] = None, *, min_age_s: float = 3600.0) -> dict[str, int]:
        """Remove leftovers: temporary files of killed writers, quarantined entries and, if `live_keys` is
        given, every entry not in it (orphans).

        Only files older than `min_age_s` are touched, so a writer running at the same time (whose entry is not
        yet in `live_keys`) loses nothing.

        Returns:
            Counts: `{"tmp": ..., "quarantine": ..., "orphans": ...}`.
        """
        self._check_open()
        live = set(live_keys) if live_keys is not None else None
        counts = {"tmp": 0, "quarantine": 0, "orphans": 0}
        if self._mem is not None:
            if live is not None:
                for k in [k for k in self._mem if k not in live]:
                    self.delete(k)
                    counts["orphans"] += 1
            return counts
        cutoff = time.time() - min_age_s
        assert self._lock is not None
        with self._guard, self._lock:
            for dirpath, _, files in os.walk(self.path):
                for name in files:
                    full = os.path.join(dirpath, name)
                    try:
                        if os.path.getmtime(full) > cutoff:
                            continue
                        if name.startswith(TMP_PREFIX):
                            os.unlink(full)
                            counts["tmp"] += 1
                        elif dirpath == self._quarantine:
                            os.unlink(full)
                            counts["quarantine"] += 1
                        elif live is not None and name.endswith(SUFFIX) and dirpath.startswith(self._objects):
                            key = name[: -len(SUFFIX)]
                            if key not in live:
                                os.unlink(full)
                                self._lru.pop(key)
                                counts["orphans"] += 1
                    except FileNotFoundError:
                        continue
        return counts

    def clear_ram(self) -> None:
        """Drop the LRU of decoded states (entries on disk stay)."""
        with self._guard:
            self._lru.clear()

    def close(self) -> None:
        """Release RAM; further calls raise. Idempotent."""
        with self._guard:
            self._lru.clear()
            self._closed = True

    def __enter__(self) -> GistStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.path or "RAM"
        return f"GistStore({where!r}, storage_dtype={self.storage_dtype!r}, lru={len(self._lru)} states)"
