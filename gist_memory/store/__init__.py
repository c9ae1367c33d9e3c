"""Storage and retrieval of gist states.

`GistStore` is the content-addressed cache of states (disk + LRU); `GistMemory` adds a docstore (SQLite) and
FAISS retrieval on top; `ingest` fills a memory from files (txt, md, jsonl, folders), resumably.
"""

from gist_memory.store.ingest import IngestSummary, ingest
from gist_memory.store.memory import Answer, GistMemory, Hit
from gist_memory.store.store import STORAGE_DTYPES, GistStore, key_for

__all__ = ["GistStore", "GistMemory", "Hit", "Answer", "key_for", "STORAGE_DTYPES", "ingest", "IngestSummary"]
