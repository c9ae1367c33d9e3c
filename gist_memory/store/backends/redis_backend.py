"""A Redis backend: entries as Redis strings, a hot tier that several serving replicas share.

Keys: `<prefix>obj:<key>` (the entry bytes), `<prefix>store.json` (the marker). A SET is atomic, so a reader
never sees part of an entry. Give the server a memory cap and an eviction policy (`maxmemory 8gb`,
`maxmemory-policy allkeys-lru`) when it is a cache in front of an object store, or pass `ttl_s`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from gist_memory.store.backends.base import StorageBackend, is_key

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "gist-memory:"


def _split_prefix(url: str) -> tuple[str, Optional[str]]:
    """`redis://h:p/0?prefix=x` -> (`redis://h:p/0`, `x`): the prefix is ours, not redis-py's."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "prefix"), None)
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


class RedisBackend(StorageBackend):
    """Entries in a Redis server.

    Args:
        url: `redis://[:password@]host:port/db` (`rediss://` for TLS; `?prefix=...` sets the key prefix).
        prefix: Prefix of every Redis key (default `gist-memory:`); several stores can share one server.
        ttl_s: If set, entries expire this many seconds after they were written (a cache tier).
        client: An existing `redis.Redis` client (then `url` is only a label).
    """

    shared = True

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: Optional[str] = None,
                 ttl_s: Optional[float] = None, client: Any = None) -> None:
        url, url_prefix = _split_prefix(url)
        self.url = url
        self.prefix = prefix if prefix is not None else (url_prefix if url_prefix is not None else DEFAULT_PREFIX)
        self.ttl_s = ttl_s
        if client is None:
            import redis

            client = redis.Redis.from_url(url)
        self.r = client
        self._obj = self.prefix + "obj:"

    def _name(self, key: str) -> str:
        return self._obj + key

    def _ex(self) -> Optional[int]:
        return max(1, int(self.ttl_s)) if self.ttl_s else None

    def _get_marker(self) -> Optional[bytes]:
        return self.r.get(self.prefix + "store.json")

    def _put_marker(self, data: bytes) -> None:
        self.r.set(self.prefix + "store.json", data, nx=True)

    # ---- operations ----------------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return bool(self.r.exists(self._name(key)))

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.exists(self._name(k))
        return [bool(x) for x in pipe.execute()]

    def get(self, key: str) -> Optional[bytes]:
        return self.r.get(self._name(key))

    def get_many(self, keys: Sequence[str]) -> list[Optional[bytes]]:
        if not keys:
            return []
        return list(self.r.mget([self._name(k) for k in keys]))

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> bool:
        return bool(self.r.set(self._name(key), data, nx=not overwrite, ex=self._ex()))

    def put_many(self, blobs: dict[str, bytes], *, overwrite: bool = False) -> list[str]:
        """One MULTI/EXEC: Redis applies all of it or, if the connection fails first, none of it."""
        if not blobs:
            return []
        pipe = self.r.pipeline(transaction=True)
        for k, data in blobs.items():
            pipe.set(self._name(k), data, nx=True, ex=self._ex())
            if overwrite:
                pipe.set(self._name(k), data, ex=self._ex())
        res = pipe.execute()
        step = 2 if overwrite else 1
        return [k for k, ok in zip(blobs, res[::step], strict=True) if ok]

    def delete(self, key: str) -> bool:
        return bool(self.r.delete(self._name(key)))

    def list(self) -> Iterator[str]:
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self._obj) + "*"
        for name in self.r.scan_iter(match=pattern, count=1000):
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            k = name[len(self._obj):]
            if is_key(k):
                yield k

    def total_bytes(self) -> int:
        keys = list(self.list())
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.strlen(self._name(k))
        return int(sum(pipe.execute())) if keys else 0

    def quarantine(self, key: str) -> None:
        """Renamed to `<prefix>quarantine:<key>:<ns>` for a day (for inspection), then Redis drops it."""
        import redis

        dst = f"{self.prefix}quarantine:{key}:{time.time_ns()}"
        try:
            pipe = self.r.pipeline(transaction=True)
            pipe.rename(self._name(key), dst)
            pipe.expire(dst, 86400)
            pipe.execute()
        except redis.ResponseError:  # gone meanwhile
            pass

    def gc(self, live: Optional[set[str]], min_age_s: float) -> dict[str, int]:
        """Orphans (not in `live`) idle for at least `min_age_s` (Redis's OBJECT IDLETIME, a lower bound of the
        age). Quarantined objects expire by themselves."""
        counts = {"tmp": 0, "quarantine": 0, "orphans": 0}
        if live is None:
            return counts
        for k in list(self.list()):
            if k in live:
                continue
            if min_age_s > 0:
                idle = self.r.object("idletime", self._name(k))
                if idle is None or idle < min_age_s:
                    continue
            if self.r.delete(self._name(k)):
                counts["orphans"] += 1
        return counts

    def close(self) -> None:
        try:
            self.r.close()
        except Exception:  # pragma: no cover
            pass
