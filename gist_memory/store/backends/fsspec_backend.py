"""An fsspec backend: entries as objects under a prefix of any fsspec file system (S3 and compatible through
s3fs, GCS, Azure, `memory://` for tests, ...).

Same layout as the local folder (`<prefix>/store.json`, `<prefix>/objects/ab/cd/<key>.safetensors`,
`<prefix>/quarantine/...`), so a local store can be uploaded as is (`aws s3 sync store/ s3://bucket/prefix/`).

Atomic puts: on object stores (s3, gcs, azure, memory) one PUT of a whole object is atomic: a reader gets the old
object, the new one, or nothing, never a part. On other file systems the object is written under a temporary name
and moved into place.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Optional

from gist_memory.store.backends.base import MARKER, SUFFIX, StorageBackend, key_of_name, object_name

logger = logging.getLogger(__name__)

_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss", "r2"}
TMP_PREFIX = ".tmp-"


def _mtime(info: dict[str, Any]) -> Optional[float]:
    for name in ("LastModified", "mtime", "last_modified", "updated", "created"):
        v = info.get(name)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return None


class FsspecBackend(StorageBackend):
    """Entries as objects of an fsspec file system.

    Args:
        url: `s3://bucket/prefix`, `gs://...`, `memory://name`, ... (any fsspec URL).
        storage_options: Passed to the file system (e.g. `{"client_kwargs": {"endpoint_url": ...}}` for an
            S3-compatible server; s3fs also reads `AWS_ENDPOINT_URL` and the usual AWS credentials).
        fs: An already made fsspec file system (then `url` is the path on it).
    """

    shared = True

    def __init__(self, url: str, storage_options: Optional[dict[str, Any]] = None, fs: Any = None) -> None:
        import fsspec

        if fs is None:
            fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        else:
            root = url
        self.fs = fs
        self.url = url
        self.root = root.rstrip("/")
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self.object_store = any(p in _OBJECT_STORES for p in protocols)

    def _path(self, key: str) -> str:
        return f"{self.root}/objects/{object_name(key)}"

    def _fresh(self, path: Optional[str] = None) -> None:
        """Forget listings fsspec cached, so objects another machine wrote (or removed) are seen."""
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    def _get_marker(self) -> Optional[bytes]:
        try:
            return self.fs.cat_file(f"{self.root}/{MARKER}")
        except FileNotFoundError:
            return None

    def _put_marker(self, data: bytes) -> None:
        self._write(f"{self.root}/{MARKER}", data)

    def _write(self, path: str, data: bytes) -> None:
        if self.object_store:
            self.fs.pipe_file(path, data)
            return
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}{SUFFIX}"
        self.fs.pipe_file(tmp, data)
        try:
            self.fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm_file(tmp)
            raise

    # ---- operations ----------------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        path = self._path(key)
        self._fresh(path)
        return bool(self.fs.exists(path))

    def get(self, key: str) -> Optional[bytes]:
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None

    def get_many(self, keys: Sequence[str]) -> list[Optional[bytes]]:
        if len(keys) <= 1:
            return [self.get(k) for k in keys]
        paths = [self._path(k) for k in keys]
        got = self.fs.cat(paths, on_error="return")  # concurrent on async file systems (s3fs)
        out: list[Optional[bytes]] = []
        for p in paths:
            v = got.get(p) if isinstance(got, dict) else None
            if isinstance(v, FileNotFoundError) or v is None:
                out.append(None)
            elif isinstance(v, BaseException):
                raise v
            else:
                out.append(v)
        return out

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> bool:
        if not overwrite and self.exists(key):
            return False
        self._write(self._path(key), data)
        return True

    def delete(self, key: str) -> bool:
        if not self.exists(key):
            return False
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            return False
        self._fresh(self._path(key))
        return True

    def _find(self, sub: str) -> dict[str, dict]:
        base = f"{self.root}/{sub}"
        self._fresh()
        try:
            return self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}

    def list(self) -> Iterator[str]:
        for path in self._find("objects"):
            name = path.rsplit("/", 1)[-1]
            k = key_of_name(name)
            if k is not None and not name.startswith(TMP_PREFIX):
                yield k

    def total_bytes(self) -> int:
        return sum(int(info.get("size") or 0) for path, info in self._find("objects").items()
                   if key_of_name(path.rsplit("/", 1)[-1]) is not None)

    def quarantine(self, key: str) -> None:
        src = self._path(key)
        dst = f"{self.root}/quarantine/{key}.{time.time_ns()}{SUFFIX}"
        try:
            self.fs.mv(src, dst)
        except FileNotFoundError:
            pass
        except Exception as e:
            logger.warning("gist store: could not quarantine %s (%s); removing it", src, e)
            with contextlib.suppress(Exception):
                self.fs.rm_file(src)
        self._fresh()

    def gc(self, live: Optional[set[str]], min_age_s: float) -> dict[str, int]:
        cutoff = time.time() - min_age_s
        counts = {"tmp": 0, "quarantine": 0, "orphans": 0}
        for sub in ("objects", "quarantine"):
            for path, info in self._find(sub).items():
                m = _mtime(info)
                if min_age_s > 0 and (m is None or m > cutoff):
                    continue
                name = path.rsplit("/", 1)[-1]
                kind = None
                if name.startswith(TMP_PREFIX):
                    kind = "tmp"
                elif sub == "quarantine":
                    kind = "quarantine"
                elif live is not None:
                    k = key_of_name(name)
                    if k is not None and k not in live:
                        kind = "orphans"
                if kind is not None:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(path)
                        counts[kind] += 1
        self._fresh()
        return counts
