"""Storage and retrieval of gist states.

`GistStore` is the content-addressed cache of states (disk + LRU); `GistMemory` adds a docstore and FAISS
retrieval on top; `ingest` fills a memory from files.
"""

from gist_memory.store.store import STORAGE_DTYPES, GistStore, key_for

__all__ = ["GistStore", "key_for", "STORAGE_DTYPES"]
