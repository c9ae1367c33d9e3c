"""A gist state: per-layer K/V of the rows a passage keeps (gists, anchors or pooled rows).

Layout of the tensors (nanoGPT-style shape comments):
    keys    (L, H, T, D)   post-RoPE keys, rotated at `positions`
    values  (L, H, T, Dv)
    positions (T,) int64   position of each kept row inside its segment (segment starts at 0); (L, H, T) when each
                           layer's head keeps its own raw tokens (`GistConfig.head_anchors`); there -1 marks an
                           empty slot of a head that keeps fewer rows than the widest (`head_budget`), masked
                           where the state is read
    kinds     (T,) uint8   KIND_GIST / KIND_ANCHOR / KIND_POOL

A state is valid only for the model that wrote it: `model_fingerprint` names base model, adapter, gist config
and dtype, and `GistModel` refuses a state whose fingerprint is not its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

KIND_GIST = 0
KIND_ANCHOR = 1
KIND_POOL = 2

FORMAT = "gist-memory/state"
FORMAT_VERSION = 1

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StateFormatError(ValueError):
    """A file or buffer is not a valid gist state (foreign, truncated or corrupted)."""


def text_hash(text: str) -> str:
    """sha256 of the text as compressed (the caller normalises first)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class GistState:
    """The compact memory of one passage.

    Attributes:
        keys: (L, H, T, D) post-RoPE keys of the kept rows.
        values: (L, H, T, Dv) values of the kept rows.
        positions: (T,) position of each kept row within the segment; (L, H, T) when each layer's head keeps
            its own raw tokens (row t of head h in layer l sits at positions[l, h, t]).
        kinds: (T,) row kinds (0 gist, 1 anchor, 2 pooled), the same in every head.
        span: Length of the segment in position space (interleaved tokens incl. gists); a gapped splice
            places the next segment `span` positions later.
        num_tokens: Raw tokens of the passage (no gists): the text this state stands for.
        sentence_spans: Character spans of the sentence pieces that were compressed.
        text_hash: sha256 of the normalised text.
        model_fingerprint: Identity of the model + adapter + config + dtype that wrote the state.
        text: The normalised text (kept for attribution; may be empty).
        meta: Free json-safe extras.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    kinds: torch.Tensor
    span: int
    num_tokens: int
    sentence_spans: list[tuple[int, int]]
    text_hash: str
    model_fingerprint: str
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.keys.dim() != 4 or self.values.dim() != 4:
            raise StateFormatError(f"keys/values must be (L, H, T, D); got {tuple(self.keys.shape)}")
        L, H, T, _ = self.keys.shape
        if self.values.shape[:3] != (L, H, T):
            raise StateFormatError(f"values {tuple(self.values.shape)} do not match keys {tuple(self.keys.shape)}")
        if self.positions.shape not in ((T,), (L, H, T)) or self.kinds.shape != (T,):
            raise StateFormatError(f"positions must have shape ({T},) or ({L}, {H}, {T}) and kinds ({T},); got "
                                   f"{tuple(self.positions.shape)} and {tuple(self.kinds.shape)}")
        if self.positions.numel() and int(self.positions.min()) < (-1 if self.positions.dim() == 3 else 0):
            raise StateFormatError("positions must be >= 0 (-1 marks an empty slot, only in per-head positions)")

    # ---- sizes ---------------------------------------------------------------------------------------
    @property
    def per_head(self) -> bool:
        """Whether each layer's head keeps rows at its own positions (positions (L, H, T))."""
        return self.positions.dim() == 3

    @property
    def num_kept(self) -> int:
        """Kept rows of every kind: the positions a reader attends to for this passage."""
        return int(self.keys.shape[2])

    @property
    def num_rows(self) -> float:
        """Rows each head really keeps, on average over layers and heads: `num_kept` less the empty slots of heads
        that keep fewer than the widest (`GistConfig.head_budget`). What `compression_ratio` divides by."""
        if not self.has_empty_slots:
            return float(self.num_kept)
        return float((self.positions >= 0).sum()) / float(self.positions.shape[0] * self.positions.shape[1])

    @property
    def num_positions(self) -> float:
        """Positions the state takes in a reader's cache, on average over layers: `num_kept`, or where heads keep
        uneven numbers of rows each layer's widest head's (a spliced layer drops the slots empty in all its
        heads)."""
        if not self.has_empty_slots:
            return float(self.num_kept)
        return float((self.positions >= 0).any(dim=1).sum(-1).float().mean())

    @property
    def has_empty_slots(self) -> bool:
        """Whether some heads keep fewer rows than the widest (their empty slots have position -1)."""
        return self.per_head and bool((self.positions < 0).any())

    def key_mask(self) -> Optional[torch.Tensor]:
        """(L, H, T) bool, True where a head's row is real; None when every slot is (nothing to mask)."""
        return (self.positions >= 0) if self.has_empty_slots else None

    @property
    def num_gists(self) -> int:
        """Kept rows (gists, anchors and pooled rows): what `compression_ratio` divides by."""
        return self.num_kept

    @property
    def num_anchors(self) -> int:
        """Kept rows that are raw anchor tokens."""
        return int((self.kinds == KIND_ANCHOR).sum())

    @property
    def compression_ratio(self) -> float:
        """Raw tokens / rows kept per head (`num_rows`)."""
        return self.num_tokens / max(1.0, self.num_rows)

    @property
    def num_layers(self) -> int:
        """Layers of the model that wrote it."""
        return int(self.keys.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the K/V tensors."""
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the K/V tensors."""
        return self.keys.dtype

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> GistState:
        """A copy with K/V moved/cast (positions and kinds stay int tensors)."""
        return GistState(
            keys=self.keys.to(device=device, dtype=dtype),
            values=self.values.to(device=device, dtype=dtype),
            positions=self.positions.to(device=device),
            kinds=self.kinds.to(device=device),
            span=self.span,
            num_tokens=self.num_tokens,
            sentence_spans=list(self.sentence_spans),
            text_hash=self.text_hash,
            model_fingerprint=self.model_fingerprint,
            text=self.text,
            meta=dict(self.meta),
        )

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (
            f"GistState(num_tokens={self.num_tokens}, kept={self.num_kept} (anchors {self.num_anchors}), "
            f"ratio={self.compression_ratio:.2f}, layers={self.num_layers}, dtype={self.dtype}, "
            f"model={self.model_fingerprint[:12]})"
        )

    # ---- serialisation -------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        keys, values = self.keys.detach().cpu(), self.values.detach().cpu()
        if self.has_empty_slots:  # only the rows heads really keep: (R, D), head by head (`compact_rows`)
            keys, values = compact_rows(keys, self.positions), compact_rows(values, self.positions)
        return {
            "keys": keys.contiguous(),
            "values": values.contiguous(),
            "positions": self.positions.detach().to(torch.int64).contiguous().cpu(),
            "kinds": self.kinds.detach().to(torch.uint8).contiguous().cpu(),
        }

    @staticmethod
    def _checksum(tensors: dict[str, torch.Tensor]) -> str:
        h = hashlib.sha256()
        for name in sorted(tensors):
            t = tensors[name]
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def _metadata(self, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
        header = {
            "span": self.span,
            "num_tokens": self.num_tokens,
            "sentence_spans": [list(s) for s in self.sentence_spans],
            "text_hash": self.text_hash,
            "model_fingerprint": self.model_fingerprint,
            "text": self.text,
            "meta": self.meta,
        }
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "header": json.dumps(header, ensure_ascii=False),
            "checksum": self._checksum(tensors),
        }

    def to_bytes(self) -> bytes:
        """The state as a safetensors buffer (tensors + json header + sha256 checksum)."""
        from safetensors.torch import save

        tensors = self._tensors()
        return save(tensors, metadata=self._metadata(tensors))

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write atomically: a temporary file in the same folder, fsync, then rename."""
        atomic_write_bytes(os.fspath(path), self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, *, verify: bool = True) -> GistState:
        """Parse a safetensors buffer written by `to_bytes`; raises `StateFormatError` on anything else."""
        from safetensors.torch import load

        try:
            tensors = load(data)
            meta = _read_metadata(data)
        except StateFormatError:
            raise
        except Exception as e:  # safetensors raises several types for garbage
            raise StateFormatError(f"not a safetensors gist state: {e}") from e
        return cls._build(tensors, meta, verify=verify, where="buffer")

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, verify: bool = True, device: str = "cpu") -> GistState:
        """Read a state file (memory-mapped); raises `StateFormatError` if foreign, truncated or corrupted."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no gist state file at {path}")
        try:
            with safe_open(path, framework="pt", device=device) as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise StateFormatError(f"{path} is not a readable safetensors file: {e}") from e
        return cls._build(tensors, meta, verify=verify, where=path)

    @classmethod
    def _build(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str], *, verify: bool, where: str) -> GistState:
        if meta.get("format") != FORMAT:
            raise StateFormatError(f"{where} is not a gist-memory state (format={meta.get('format')!r})")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise StateFormatError(f"{where}: unsupported state format version {meta.get('format_version')!r}")
        missing = {"keys", "values", "positions", "kinds"} - set(tensors)
        if missing:
            raise StateFormatError(f"{where}: missing tensors {sorted(missing)}")
        if verify and cls._checksum(tensors) != meta.get("checksum"):
            raise StateFormatError(f"{where}: checksum mismatch (corrupted state)")
        try:
            h = json.loads(meta["header"])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise StateFormatError(f"{where}: bad state header: {e}") from e
        keys, values = tensors["keys"], tensors["values"]
        if keys.dim() == 2:  # stored compact (a state whose heads keep uneven numbers of rows)
            keys = expand_rows(keys, tensors["positions"], where)
            values = expand_rows(values, tensors["positions"], where)
        return cls.from_header(keys, values, tensors["positions"], tensors["kinds"], h, where=where)

    @classmethod
    def from_header(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor,
                    h: dict[str, Any], where: str = "state") -> GistState:
        """Build from tensors and a parsed json header (as written by `to_bytes`); `StateFormatError` if bad."""
        try:
            return cls(
                keys=keys,
                values=values,
                positions=positions,
                kinds=kinds,
                span=int(h["span"]),
                num_tokens=int(h["num_tokens"]),
                sentence_spans=[(int(a), int(b)) for a, b in h["sentence_spans"]],
                text_hash=str(h["text_hash"]),
                model_fingerprint=str(h["model_fingerprint"]),
                text=str(h.get("text", "")),
                meta=dict(h.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise StateFormatError(f"{where}: bad state header: {e}") from e


def compact_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(L, H, T, D) rows -> (R, D): the rows whose per-head position is >= 0 (real rows, not empty slots), layer by
    layer, head by head, in slot order. What a state whose heads keep uneven numbers of rows stores at rest."""
    return x[positions.to(x.device) >= 0]


def expand_rows(flat: torch.Tensor, positions: torch.Tensor, where: str = "state") -> torch.Tensor:
    """Inverse of `compact_rows`: (R, D) -> (L, H, T, D) with zeros in the empty slots (positions -1).

    Raises:
        StateFormatError: the positions are not per head, or the row count does not match them.
    """
    if positions.dim() != 3 or flat.dim() != 2:
        raise StateFormatError(f"{where}: compact rows {tuple(flat.shape)} need per-head positions (L, H, T); got "
                               f"{tuple(positions.shape)}")
    real = positions >= 0
    if int(real.sum()) != int(flat.shape[0]):
        raise StateFormatError(f"{where}: {int(flat.shape[0])} stored rows, but the positions name {int(real.sum())}")
    out = flat.new_zeros((*positions.shape, flat.shape[-1]))
    out[real] = flat
    return out


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_temp(
    folder: str,
    data: bytes,
    *,
    prefix: str = ".tmp-",
    suffix: str = "",
    mode: Optional[int] = None,
    fsync: bool = True,
    write: Optional[Callable[[int, bytes], None]] = None,
) -> str:
    """Write `data` to a new temporary file in `folder` (made if missing) and return its path; on any error the
    temporary file is removed and the error raised. `mode` chmods it (mkstemp makes 0600); `write(fd, data)`
    replaces the plain write loop."""
    makedirs_durable(folder, fsync=fsync)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            (write or _write_all)(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write_bytes(path: str, data: bytes, **temp_options: Any) -> None:
    """Write `data` to `path` via a temporary file in the same folder, fsync, rename, then fsync the folder (all
    or nothing; with `fsync=False` a killed process is still safe, a power cut may lose the write).

    `temp_options` go to `write_temp` (prefix, suffix, mode, fsync, write).
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = write_temp(folder, data, **temp_options)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if temp_options.get("fsync", True):
        fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    """fsync a folder, so that a rename, new file or unlink in it survives a power cut.

    The rename of an fsynced file is only durable once its folder's entry is: POSIX keeps the two apart. A no-op
    where folders cannot be opened (Windows) or fsynced (some network file systems answer EINVAL).
    """
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def makedirs_durable(folder: str, *, fsync: bool = True) -> None:
    """`os.makedirs(folder, exist_ok=True)`, then (with `fsync`) fsync the parent of every folder it created."""
    folder = os.path.abspath(folder)
    created: list[str] = []
    p = folder
    while not os.path.isdir(p):
        created.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    if not created:
        return
    os.makedirs(folder, exist_ok=True)
    if fsync:
        for d in reversed(created):
            fsync_dir(os.path.dirname(d))


def _read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors buffer (8-byte little-endian header length, then json)."""
    if len(data) < 8:
        raise StateFormatError("buffer too short for safetensors")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise StateFormatError("bad safetensors header length")
    try:
        header = json.loads(data[8 : 8 + n])
    except json.JSONDecodeError as e:
        raise StateFormatError(f"bad safetensors header: {e}") from e
    return dict(header.get("__metadata__", {}) or {})


def dtype_from_name(name: str) -> torch.dtype:
    """`float32` / `bfloat16` / `float16` -> torch dtype, with a clear error for anything else."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(_DTYPES)}") from None
