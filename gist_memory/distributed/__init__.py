"""Bulk compression on a Ray cluster (Ray Data): `ray_ingest` fills a `GistMemory` from files with one model per
actor, GPU actors where the cluster has GPUs; `gist-memory ingest ... --ray [ADDRESS]` is its command.

Importing this package imports neither Ray nor torch; `ray_ingest` does when called (install `ray[data]`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["ray_ingest", "RayIngestSummary", "check_address"]

_LAZY = {
    "ray_ingest": "gist_memory.distributed.ray_ingest",
    "RayIngestSummary": "gist_memory.distributed.ray_ingest",
    "check_address": "gist_memory.distributed.connect",
}

if TYPE_CHECKING:
    from gist_memory.distributed.connect import check_address
    from gist_memory.distributed.ray_ingest import RayIngestSummary, ray_ingest


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gist_memory.distributed' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
