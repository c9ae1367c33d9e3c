"""The local folder backend: one safetensors file per entry under a fanout folder (the store's default).

    <root>/store.json                          format marker
    <root>/.lock                               inter-process file lock (filelock)
    <root>/objects/ab/cd/<key>.safetensors     one file per entry
    <root>/quarantine/<key>.<ns>.safetensors   entries that failed their checksum

Writes go to a temporary file in the target folder (fsynced), are renamed into place under the lock, and the
folder is fsynced after the rename, so an entry survives a power cut once `put` returns (with `fsync=True`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Optional

from filelock import FileLock

from gist_memory.state.gist_state import _write_all, atomic_write_bytes, fsync_dir, write_temp
from gist_memory.store.backends.base import MARKER, SUFFIX, StorageBackend, key_of_name, object_name

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
FILE_MODE = 0o644  # mkstemp makes 0600; entries are as readable as any other cache file


class LocalFolderBackend(StorageBackend):
    """Entries as files in a folder on this machine.

    Args:
        path: The store folder (created if missing).
        fsync: fsync each file before its rename and its folder after (durable across a power cut).
        lock_timeout: Seconds to wait for the inter-process lock before raising `filelock.Timeout`.
        write: `write(fd, data)` used to write files (tests simulate a full disk through it).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        fsync: bool = True,
        lock_timeout: float = 60.0,
        write: Optional[Callable[[int, bytes], None]] = None,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.url = self.path
        self.fsync = bool(fsync)
        self._write = write or _write_all
        self._objects = os.path.join(self.path, "objects")
        self._quarantine = os.path.join(self.path, "quarantine")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"gist store path {self.path} exists and is not a folder")
        os.makedirs(self._objects, exist_ok=True)
        self._lock = FileLock(os.path.join(self.path, ".lock"), timeout=lock_timeout)

    # ---- layout --------------------------------------------------------------------------------------------
    def path_for(self, key: str) -> str:
        """The file an entry with `key` lives in (whether or not it exists)."""
        return os.path.join(self._objects, *object_name(key).split("/"))

    def local_path(self, key: str) -> Optional[str]:
        return self.path_for(key)

    def _temp_options(self) -> dict:
        return {"prefix": TMP_PREFIX, "suffix": SUFFIX, "mode": FILE_MODE, "fsync": self.fsync,
                "write": lambda fd, data: self._write(fd, data)}

    def _get_marker(self) -> Optional[bytes]:
        try:
            with open(os.path.join(self.path, MARKER), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ValueError(f"{self.path}/{MARKER} is not a readable gist store marker: {e}") from e

    def _put_marker(self, data: bytes) -> None:
        marker = os.path.join(self.path, MARKER)
        with self._lock:
            if not os.path.isfile(marker):
                atomic_write_bytes(marker, data, **self._temp_options())

    # ---- operations ----------------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return os.path.exists(self.path_for(key))

    def get(self, key: str) -> Optional[bytes]:
        try:
            with open(self.path_for(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> bool:
        return bool(self.put_many({key: data}, overwrite=overwrite)) or overwrite

    def put_many(self, blobs: dict[str, bytes], *, overwrite: bool = False) -> list[str]:
        """Temp files first, then renames under the lock, then one fsync per folder; on any error this call's
        temp files and new entries are removed and the error propagates."""
        staged: list[tuple[str, str]] = []  # (tmp, final)
        created: list[str] = []
        keys_created: list[str] = []
        try:
            for k, data in blobs.items():
                final = self.path_for(k)
                staged.append((write_temp(os.path.dirname(final), data, **self._temp_options()), final))
            with self._lock:
                touched: set[str] = set()
                for (tmp, final), k in zip(staged, blobs, strict=True):
                    existed = os.path.exists(final)
                    if existed and not overwrite:
                        os.unlink(tmp)  # another process stored the same content meanwhile
                        continue
                    os.replace(tmp, final)
                    touched.add(os.path.dirname(final))
                    if not existed:
                        created.append(final)
                        keys_created.append(k)
                staged = []
                if self.fsync:
                    for d in sorted(touched):
                        fsync_dir(d)
        except BaseException:
            for tmp, _ in staged:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            for final in created:
                with contextlib.suppress(OSError):
                    os.unlink(final)
            raise
        return keys_created

    def delete(self, key: str) -> bool:
        path = self.path_for(key)
        with self._lock:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False
            if self.fsync:
                fsync_dir(os.path.dirname(path))
            return True

    def list(self) -> Iterator[str]:
        for _dirpath, _, files in os.walk(self._objects):
            for name in files:
                if not name.startswith(TMP_PREFIX):
                    k = key_of_name(name)
                    if k is not None:
                        yield k

    def total_bytes(self) -> int:
        total = 0
        for k in self.list():
            with contextlib.suppress(FileNotFoundError):
                total += os.path.getsize(self.path_for(k))
        return total

    def quarantine(self, key: str) -> None:
        path = self.path_for(key)
        try:
            with self._lock:
                os.makedirs(self._quarantine, exist_ok=True)
                os.replace(path, os.path.join(self._quarantine, f"{key}.{time.time_ns()}{SUFFIX}"))
                if self.fsync:
                    fsync_dir(os.path.dirname(path))
                    fsync_dir(self._quarantine)
        except FileNotFoundError:
            pass  # another process quarantined or replaced it first
        except OSError as e:
            logger.warning("gist store: could not quarantine %s (%s); removing it", path, e)
            with contextlib.suppress(OSError):
                os.unlink(path)

    def gc(self, live: Optional[set[str]], min_age_s: float) -> dict[str, int]:
        cutoff = time.time() - min_age_s
        counts = {"tmp": 0, "quarantine": 0, "orphans": 0}
        with self._lock:
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
                        elif live is not None and dirpath.startswith(self._objects):
                            key = key_of_name(name)
                            if key is not None and key not in live:
                                os.unlink(full)
                                counts["orphans"] += 1
                    except FileNotFoundError:
                        continue
        return counts
