"""The seam between `GistStore` and where its entries live: opaque bytes under 64-hex keys.

A backend knows nothing of gist states: `GistStore` encodes, checksums and key-checks every entry itself, so a
corrupt or foreign object is refused the same way whichever backend it came from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional

logger = logging.getLogger(__name__)

STORE_FORMAT = "gist-memory/store"
STORE_VERSION = 1
SUFFIX = ".safetensors"
MARKER = "store.json"


class StorageBackend:
    """Bytes by key, with atomic puts. Subclasses implement `exists`, `get`, `put`, `delete`, `list`.

    Attributes:
        url: Where the entries live (a folder, `s3://bucket/prefix`, `redis://host:port/db`, ...).
        shared: True if several machines can use the same backend at once.
    """

    url: str = ""
    shared: bool = False

    # ---- the five operations -------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        """True if an object is stored under `key`."""
        raise NotImplementedError

    def get(self, key: str) -> Optional[bytes]:
        """The bytes under `key`, or None if there are none."""
        raise NotImplementedError

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> bool:
        """Store `data` under `key` atomically (a reader sees all of it or nothing); returns True if written
        (False: an object was there and `overwrite` is False)."""
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        """Remove the object under `key`; returns True if there was one."""
        raise NotImplementedError

    def list(self) -> Iterator[str]:
        """Every stored key (unordered)."""
        raise NotImplementedError

    # ---- batched forms (override where one round trip can do many) -----------------------------------------
    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """`exists` for several keys, in order."""
        return [self.exists(k) for k in keys]

    def get_many(self, keys: Sequence[str]) -> list[Optional[bytes]]:
        """`get` for several keys, in order."""
        return [self.get(k) for k in keys]

    def put_many(self, blobs: dict[str, bytes], *, overwrite: bool = False) -> list[str]:
        """`put` for several objects, all or nothing: on an error the objects this call created are removed
        again and the error propagates. Returns the keys it created."""
        created: list[str] = []
        try:
            for k, data in blobs.items():
                existed = self.exists(k)
                if self.put(k, data, overwrite=overwrite) and not existed:
                    created.append(k)
        except BaseException:
            for k in created:
                try:
                    self.delete(k)
                except Exception as e:  # pragma: no cover - best effort undo
                    logger.warning("gist store: could not undo %s on %s: %s", k[:16], self.url, e)
            raise
        return created

    # ---- housekeeping (defaults suit a cache) ----------------------------------------------------------------
    def quarantine(self, key: str) -> None:
        """Take a corrupt object out of service (the default deletes it)."""
        self.delete(key)

    def total_bytes(self) -> int:
        """Bytes of every stored object."""
        return sum(len(b) for b in self.get_many(list(self.list())) if b is not None)

    def gc(self, live: Optional[set[str]], min_age_s: float) -> dict[str, int]:
        """Remove leftovers older than `min_age_s`: objects not in `live` (when given), plus backend-specific
        litter (temporary files, quarantined objects). Returns counts by kind."""
        return {"tmp": 0, "quarantine": 0, "orphans": 0}

    def local_path(self, key: str) -> Optional[str]:
        """A file holding the object, if the backend is a local folder (read memory-mapped); else None."""
        return None

    def check_or_write_marker(self) -> None:
        """Check the store marker (`store.json`) if there is one, else write it. Raises ValueError if the place
        holds something else."""
        import json

        raw = self._get_marker()
        if raw is None:
            self._put_marker(json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION}).encode())
            return
        try:
            info = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.url}/{MARKER} is not a readable gist store marker: {e}") from e
        if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
            raise ValueError(f"{self.url} is not a gist-memory store ({MARKER} format={info!r})")
        try:
            version = int(info.get("version", -1))
        except (TypeError, ValueError):
            version = -1
        if version != STORE_VERSION:
            raise ValueError(f"{self.url}: unsupported gist store version {info.get('version')!r}")

    def _get_marker(self) -> Optional[bytes]:
        return b'{"format": "gist-memory/store", "version": 1}'

    def _put_marker(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        """Release connections. Idempotent."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class MemoryBackend(StorageBackend):
    """Objects in a dict of this process (what `GistStore(None)` uses)."""

    def __init__(self) -> None:
        self.url = "ram"
        self._d: dict[str, bytes] = {}
        self._t: dict[str, float] = {}  # when each object was written (for gc's min_age_s)

    def exists(self, key: str) -> bool:
        return key in self._d

    def get(self, key: str) -> Optional[bytes]:
        return self._d.get(key)

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> bool:
        if not overwrite and key in self._d:
            return False
        self._d[key] = bytes(data)
        self._t[key] = time.time()
        return True

    def put_many(self, blobs: dict[str, bytes], *, overwrite: bool = False) -> list[str]:
        created = [k for k in blobs if k not in self._d]
        for k, data in blobs.items():
            if overwrite or k not in self._d:
                self._d[k] = bytes(data)
                self._t[k] = time.time()
        return created

    def delete(self, key: str) -> bool:
        self._t.pop(key, None)
        return self._d.pop(key, None) is not None

    def list(self) -> Iterator[str]:
        yield from list(self._d)

    def total_bytes(self) -> int:
        return sum(len(b) for b in self._d.values())

    def gc(self, live: Optional[set[str]], min_age_s: float) -> dict[str, int]:
        n = 0
        cutoff = time.time() - min_age_s
        if live is not None:
            for k in [k for k in self._d if k not in live and self._t.get(k, 0.0) <= cutoff]:
                self.delete(k)
                n += 1
        return {"tmp": 0, "quarantine": 0, "orphans": n}


def object_name(key: str) -> str:
    """`ab/cd/<key>.safetensors`: the fanout every folder-like backend uses (so a store folder can be copied to
    an object store as is, e.g. `aws s3 sync store/ s3://bucket/prefix/`)."""
    return f"{key[:2]}/{key[2:4]}/{key}{SUFFIX}"


def key_of_name(name: str) -> Optional[str]:
    """The key of an object file name (`<key>.safetensors`), or None for anything else."""
    if not name.endswith(SUFFIX):
        return None
    k = name[: -len(SUFFIX)]
    return k if is_key(k) else None


def is_key(k: object) -> bool:
    """True for a store key: 64 lowercase hex characters."""
    return isinstance(k, str) and len(k) == 64 and all(c in "0123456789abcdef" for c in k)


def unique(keys: Iterable[str]) -> list[str]:
    """Keys in first-seen order, without repeats."""
    return list(dict.fromkeys(keys))
