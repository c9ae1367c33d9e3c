"""Where a `GistStore` keeps its entries: a local folder (the default), RAM, any fsspec file system (S3 and
compatible) or Redis; `open_backend` turns a path or URL into one.

| spec                                   | backend                              |
|----------------------------------------|--------------------------------------|
| `None`                                 | `MemoryBackend` (this process only)  |
| a folder path, `file:///path`          | `LocalFolderBackend`                 |
| `redis://host:port/db`, `rediss://...` | `RedisBackend` (needs `redis`)       |
| `s3://bucket/prefix`, `memory://x`, ...| `FsspecBackend` (s3 needs `s3fs`)    |
| a `StorageBackend`                     | itself                               |
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from gist_memory.store.backends.base import MemoryBackend, StorageBackend
from gist_memory.store.backends.local import LocalFolderBackend

BackendSpec = Union[str, "os.PathLike[str]", StorageBackend, None]

__all__ = ["StorageBackend", "MemoryBackend", "LocalFolderBackend", "FsspecBackend", "RedisBackend",
           "open_backend", "BackendSpec"]


def __getattr__(name: str) -> Any:  # the optional backends import their client libraries only when used
    if name == "FsspecBackend":
        from gist_memory.store.backends.fsspec_backend import FsspecBackend

        return FsspecBackend
    if name == "RedisBackend":
        from gist_memory.store.backends.redis_backend import RedisBackend

        return RedisBackend
    raise AttributeError(name)


def open_backend(spec: BackendSpec, *, storage_options: Optional[dict[str, Any]] = None,
                 **local_options: Any) -> StorageBackend:
    """A backend for `spec` (see the module table).

    Args:
        spec: None, a folder, a URL or a backend.
        storage_options: For fsspec URLs (e.g. `{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}`).
        **local_options: `fsync`, `lock_timeout`, `write` for a local folder.
    """
    if spec is None:
        return MemoryBackend()
    if isinstance(spec, StorageBackend):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"a gist store is a folder, a URL or a StorageBackend, not {type(spec).__name__}")
    s = os.fspath(spec)
    if "://" not in s:
        return LocalFolderBackend(s, **local_options)
    scheme = s.split("://", 1)[0].lower()
    if scheme == "file":
        return LocalFolderBackend(s.split("://", 1)[1], **local_options)
    if scheme in ("redis", "rediss", "unix"):
        try:
            import redis  # noqa: F401

            from gist_memory.store.backends.redis_backend import RedisBackend
        except ImportError as e:
            raise ImportError(f"{s}: the Redis backend needs the `redis` package (pip install redis)") from e
        return RedisBackend(s)
    try:
        from gist_memory.store.backends.fsspec_backend import FsspecBackend

        return FsspecBackend(s, storage_options=storage_options)
    except ImportError as e:
        raise ImportError(f"{s}: this URL needs fsspec and its file system package (s3://: pip install s3fs): "
                          f"{e}") from e
