"""The two Ray Data stages of `ray_ingest`, as they run on the workers.

    files --chunk_files (tasks)--> units --CompressUnits (actor pool)--> passage rows --> the driver

- `chunk_files`: one call per file. The file is read and chunked exactly as the single-process ingest does it
  (`gist_memory.store.ingest`: same sentences, budgets, ids, metadata; Parquet rows like jsonl records), and its
  passages are cut into *units* (`units`): the batches of `batch_size` texts the single-process ingest compresses
  a fresh file in. A unit whose passages are all in the memory already is dropped here. After the
  units, one `file` row says what the file held (passages, skipped records, passages already present).
- `CompressUnits`: loads the model and the embedder once per actor. Per unit it looks the states up in the store
  (content-addressed keys) and compresses the unit in one `model.compress` call only if one is missing, so a
  state is always computed in the same batch (the single-process ingest's states, and any rerun's);
  it writes new states to the store itself (atomic puts), or hands their encoded bytes to the driver when it
  cannot see the store folder, and embeds the passages the memory lacks. Out come passage rows (id, text,
  metadata, normalised text, state key, raw embedding) and the `file` rows, passed through.

Rows are Arrow tables with fixed schemas (`UNIT_SCHEMA`, `PASSAGE_SCHEMA`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np
import pyarrow as pa

logger = logging.getLogger(__name__)

PARQUET_SUFFIX = ".parquet"
ID_DIGEST_BYTES = 16  # ids already in the memory travel to the workers as sorted blake2b-128 digests
TOKEN_PREFIX = ".ray-ingest-"
BLOCK_BYTES = 64 * 1024  # Ray Data's target block size during a run: blocks of a few units

UNIT_SCHEMA = pa.schema([
    ("kind", pa.string()),  # "unit" or "file"
    ("file", pa.string()),
    ("unit", pa.int64()),  # index of the unit within its file
    ("ids", pa.list_(pa.string())),
    ("texts", pa.list_(pa.string())),
    ("metas", pa.list_(pa.string())),  # json objects
    ("ntoks", pa.list_(pa.int64())),
    ("present", pa.list_(pa.bool_())),  # already in the memory (compressed with its unit, not emitted again)
    ("ride", pa.list_(pa.bool_())),  # a text seen earlier in the file: its state is that copy's, not computed here
    ("info", pa.string()),  # json, on "file" rows
])

PASSAGE_SCHEMA = pa.schema([
    ("kind", pa.string()),  # "passage" or "file"
    ("file", pa.string()),
    ("id", pa.string()),
    ("text", pa.string()),
    ("meta", pa.string()),
    ("norm", pa.string()),  # model.normalize(text)
    ("key", pa.string()),  # state key in the store
    ("emb", pa.binary()),  # raw embedder output, float32 (the memory normalises it, as for its own embedder)
    ("ntok", pa.int64()),
    ("blob", pa.binary()),  # the encoded state entry, when the driver writes it; else null
    ("compressed", pa.bool_()),  # computed by this run (False: found in the store)
    ("written", pa.int64()),  # bytes this row's worker wrote to the store for its state
    ("info", pa.string()),
])

_CACHE: dict[Any, Any] = {}  # per worker process: tokenizer, chunker and present-id digests, by object ref
_CACHE_MAX = 8  # entries of earlier runs are dropped past this


# ---- ids already in the memory --------------------------------------------------------------------------------
def _digests(ids: Sequence[str]) -> np.ndarray:
    return np.array([hashlib.blake2b(i.encode("utf-8"), digest_size=ID_DIGEST_BYTES).digest() for i in ids],
                    dtype=f"S{ID_DIGEST_BYTES}")


def id_digests(ids: Sequence[str]) -> np.ndarray:
    """Sorted unique blake2b-128 digests of `ids` (dtype S16): a compact set the workers search."""
    return np.unique(_digests(ids))


def in_digests(ids: Sequence[str], digests: np.ndarray) -> list[bool]:
    """For each id: is its digest in the sorted `digests`."""
    if not len(ids) or not len(digests):
        return [False] * len(ids)
    mine = _digests(ids)
    pos = np.minimum(np.searchsorted(digests, mine), len(digests) - 1)
    return (digests[pos] == mine).tolist()


class Shared:
    """Object refs handed to the workers inside a plain object (so Ray passes them through, unresolved)."""

    def __init__(self, tokenizer: Any, present: Any) -> None:
        self.tokenizer, self.present = tokenizer, present


def _get(ref: Any) -> Any:
    import ray

    key = ("ref", ref.hex())
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


# ---- stage 1: files -> units ---------------------------------------------------------------------------------
def chunk_files(batch: pa.Table, *, shared: Shared, max_passage_tokens: int, batch_size: int) -> Iterator[pa.Table]:
    """Read and chunk each file of `batch` (a `path` column); yield its units, then its `file` row."""
    from gist_memory.store.ingest import Chunker, IngestSummary, _passages_of_file, _read_text

    tokenizer, present = _get(shared.tokenizer), _get(shared.present)
    key = ("chunker", shared.tokenizer.hex(), max_passage_tokens)
    if key not in _CACHE:
        _CACHE[key] = Chunker(max_passage_tokens, tokenizer)
    chunker = _CACHE[key]
    for path in batch.column("path").to_pylist():
        summary = IngestSummary()
        if path.lower().endswith(PARQUET_SUFFIX):
            passages = parquet_passages(path, chunker, summary)
        else:
            text, why = _read_text(path)
            if text is None:
                summary.files_skipped.append((path, why))
                passages = []
            else:
                summary.files_read += 1
                passages = _passages_of_file(path, text, chunker, summary)
        flags = in_digests([p.id for p in passages], present)
        rows: list[dict[str, Any]] = []
        for u, span in enumerate(units(passages, batch_size)):
            part = [passages[j] for j, _ in span]
            pres = [flags[j] for j, _ in span]
            if all(pres):
                continue
            rows.append({"kind": "unit", "file": path, "unit": u, "ids": [p.id for p in part],
                         "texts": [p.text for p in part],
                         "metas": [json.dumps(p.metadata, ensure_ascii=False) for p in part],
                         "ntoks": [p.num_tokens for p in part], "present": pres,
                         "ride": [ride for _, ride in span], "info": None})
            if len(rows) >= 8:
                yield pa.Table.from_pylist(rows, schema=UNIT_SCHEMA)
                rows = []
        info = {"files_read": summary.files_read, "files_skipped": summary.files_skipped,
                "records_skipped": summary.records_skipped, "passages": len(passages),
                "passages_present": int(sum(flags))}
        rows.append({"kind": "file", "file": path, "unit": -1, "ids": [], "texts": [], "metas": [], "ntoks": [],
                     "present": [], "ride": [], "info": json.dumps(info)})
        yield pa.Table.from_pylist(rows, schema=UNIT_SCHEMA)


def units(passages: Sequence[Any], batch_size: int) -> list[list[tuple[int, bool]]]:
    """A file's passages as units: consecutive runs holding up to `batch_size` passages to compress.

    The single-process ingest (`gist-memory ingest`) adds a fresh file in groups of `4 * batch_size` passages and
    compresses each group's new texts (a text seen earlier is not compressed again) in runs of `batch_size`. Units
    are those runs, so every state is computed in the batch that ingest computes it in. A repeated text rides
    along in the unit where it occurs (`(index, True)`): its state is its first copy's.

    Returns:
        Per unit, its passages as (index in `passages`, rides) pairs, in order.
    """
    out: list[list[tuple[int, bool]]] = []
    seen: set[str] = set()
    group = 4 * batch_size
    for g0 in range(0, len(passages), group):
        cur: list[tuple[int, bool]] = []
        n_new = 0
        for j in range(g0, min(g0 + group, len(passages))):
            ride = passages[j].text in seen
            seen.add(passages[j].text)
            if not ride and n_new == batch_size:
                out.append(cur)
                cur, n_new = [], 0
            cur.append((j, ride))
            n_new += not ride
        if cur:
            out.append(cur)
    return out


def parquet_passages(path: str, chunker: Any, summary: Any) -> list[Any]:
    """Passages of a Parquet file, read like jsonl records: a `text` column (required), `id` and `metadata`
    (a struct/map or a json object string) optional; other scalar columns join the metadata.

    Ids: `<id>` (`<id>#<chunk>` when a record makes several passages), else `<file>:<row>#<chunk>:<hash>` with
    `row` counted from 1 like jsonl lines; metadata `{"source", "row", "chunk", ...}`. A repeated id: the last
    row wins. Rows without a non-empty string text, or with bad metadata or ids, are listed in
    `summary.records_skipped`; an unreadable file in `summary.files_skipped`.
    """
    from gist_memory.state.gist_state import text_hash
    from gist_memory.store.ingest import Passage

    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as e:  # noqa: BLE001 - any reader error: report the file as skipped
        summary.files_skipped.append((path, f"not a readable Parquet file ({type(e).__name__}: {e})"))
        return []
    if "text" not in names:
        summary.files_skipped.append((path, f"Parquet file without a 'text' column (columns: {names})"))
        return []
    summary.files_read += 1
    out: list[Passage] = []
    row = 0
    for rb in pf.iter_batches(batch_size=4096):
        for rec in rb.to_pylist():
            row += 1
            where = f"{path}:{row}"
            text = rec.get("text")
            if not isinstance(text, str) or not text.strip():
                summary.records_skipped.append((where, 'no non-empty string "text"'))
                continue
            md = rec.get("metadata")
            if isinstance(md, str):
                try:
                    md = json.loads(md)
                except json.JSONDecodeError:
                    md = None
            elif isinstance(md, list) and all(isinstance(x, tuple) and len(x) == 2 for x in md):
                md = dict(md)  # an Arrow map column
            if md is None and rec.get("metadata") is None:
                md = {}
            if not isinstance(md, dict):
                summary.records_skipped.append((where, '"metadata" is not an object'))
                continue
            rid = rec.get("id")
            if rid is not None and not isinstance(rid, (str, int)):
                summary.records_skipped.append((where, '"id" is not a string or number'))
                continue
            extra = {k: v for k, v in rec.items() if k not in ("text", "id", "metadata")
                     and isinstance(v, (str, int, float, bool)) and not (isinstance(v, float) and not np.isfinite(v))}
            chunks = chunker.chunk(text)
            for i, (t, n) in enumerate(chunks):
                if rid is not None:
                    pid = str(rid) if len(chunks) == 1 else f"{rid}#{i}"
                else:
                    pid = f"{path}:{row}#{i}:{text_hash(t)[:12]}"
                out.append(Passage(pid, t, {"source": path, "row": row, "chunk": i, **extra, **md}, n))
    last = {p.id: j for j, p in enumerate(out)}
    if len(last) != len(out):
        summary.records_skipped.append((path, f"{len(out) - len(last)} passage(s) with a repeated id; last kept"))
        out = [p for j, p in enumerate(out) if last[p.id] == j]
    return out


# ---- stage 2: units -> states, vectors, passage rows ------------------------------------------------------------
def build_model(spec: Any, device: Optional[str]) -> Any:
    """The model a spec names: a callable (a factory, called with no arguments), None (the default model), a
    saved gist model folder, or a dict of `gist_memory._options.load_model` options (`model`, `base`,
    `compressor`, `ratio`, `anchors`, `device`, `dtype`)."""
    if callable(spec):
        return spec()
    from gist_memory._options import load_model

    if spec is None:
        kw: dict[str, Any] = {}
    elif isinstance(spec, (str, os.PathLike)):
        kw = {"model": os.fspath(spec)}
    elif isinstance(spec, dict):
        kw = dict(spec)
    else:
        raise ValueError(f"model must be None, a folder, a dict of load_model options or a factory; got "
                         f"{type(spec).__name__}")
    if device is not None and kw.get("device") is None:
        kw["device"] = device
    return load_model(**kw)[0]


def auto_batch_size(model: Any, max_passage_tokens: int) -> int:
    """Passages per compression batch for the model's device: 8 on CPU (the single-process default); on a GPU as
    many as half its free memory holds (KV cache and activations of a full passage, estimated from the model
    config), between 8 and 256, a multiple of 8."""
    dev = getattr(model, "device", None)
    if dev is None or getattr(dev, "type", str(dev)) != "cuda":
        return 8
    import torch

    free, _total = torch.cuda.mem_get_info(dev)
    cfg = getattr(getattr(model, "model", None), "config", None)
    layers = int(getattr(cfg, "num_hidden_layers", 32) or 32)
    heads = int(getattr(cfg, "num_attention_heads", 32) or 32)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    hidden = int(getattr(cfg, "hidden_size", 4096) or 4096)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    inter = int(getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden)
    elem = torch.finfo(getattr(model, "dtype", torch.float32)).bits // 8
    t = int(max_passage_tokens) * 2  # gists and anchors ride along in the writer pass
    per_passage = t * (2 * layers * kv_heads * head_dim + 4 * hidden + 2 * inter) * elem + heads * t * t * 4
    n = int(0.5 * free // max(1, per_passage))
    return int(max(8, min(256, n - n % 8)))


def raw_embed(embedder: Any, texts: Sequence[str]) -> np.ndarray:
    """(n, dim) float32: what `GistMemory`'s embedder computes for `texts`, before its row normalisation (the
    driver's memory normalises these rows itself, so its vectors are bit-for-bit its own embedder's)."""
    m = embedder.model
    if type(m).__name__ == "SentenceTransformer":
        fn = getattr(m, "encode_document", None) or m.encode
        out = fn(list(texts), batch_size=64, convert_to_numpy=True, show_progress_bar=False)
    else:
        out = m.encode(list(texts))
    out = np.ascontiguousarray(np.asarray(out, dtype=np.float32))
    if out.ndim != 2 or out.shape[0] != len(texts):
        raise ValueError(f"embedder {embedder.name} returned shape {out.shape} for {len(texts)} texts")
    return out


class CompressUnits:
    """The compression actor: one model and one embedder per actor, units in, passage rows out.

    Args:
        model: A model spec (`build_model`).
        device: Where the model runs (None: the spec's choice).
        fingerprint: The fingerprint the driver's probe saw; a model that loads with another one is refused.
        store: The memory's authoritative state tier (a folder or URL), or None when only the driver can write.
        storage_options: fsspec options for a URL store.
        storage_dtype: The memory's storage dtype.
        token: (file name, content) of the driver's token in a local store folder; the actor writes states itself
            only if it sees it (`write` "auto"), else hands their bytes to the driver.
        write: "auto", "workers" (must see the store) or "driver".
        fsync: fsync the state files of a local store folder.
        embedder: The memory's embedder (a `gist_memory.store.memory._Embedder`).
        batch_size: Passages per `model.compress` call (a unit never holds more).
    """

    def __init__(self, *, model: Any, device: Optional[str], fingerprint: str, store: Optional[str],
                 storage_options: Optional[dict], storage_dtype: str, token: Optional[tuple[str, str]], write: str,
                 embedder: Any, batch_size: int, fsync: bool = True) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.model = build_model(model, device)
        fp = str(self.model.fingerprint)
        if fp != fingerprint:
            raise ValueError(f"the model loaded on {socket.gethostname()} has fingerprint {fp[:12]}, the driver's "
                             f"probe saw {fingerprint[:12]}: every worker must load the same model files, dtype and "
                             f"settings")
        self.fingerprint = fp
        self.storage_dtype = storage_dtype
        self.embedder = embedder
        self.batch_size = int(batch_size)
        self.backend = None
        self.unseen: Optional[str] = None
        if write != "driver" and store is not None:
            visible = token is None or _token_visible(store, token)
            if visible:
                from gist_memory.store.backends import open_backend

                self.backend = open_backend(store, storage_options=storage_options, fsync=fsync)
                self.backend.check_or_write_marker()
            elif write == "workers":
                raise ValueError(f"the store folder {store} is not visible from the Ray worker on "
                                 f"{socket.gethostname()}: put the memory on a file system every node mounts at the "
                                 f"same path, keep its states in a shared store (s3://...), or let the driver write "
                                 f"the states (write_states='driver')")
            else:
                self.unseen = store  # said once, when this actor hands its first states to the driver

    def __call__(self, batch: pa.Table) -> pa.Table:
        from gist_memory.state.gist_state import text_hash
        from gist_memory.store.store import encode_entry, key_for

        out: list[dict[str, Any]] = []
        for unit in batch.to_pylist():
            if unit["kind"] == "file":
                out.append(_row(kind="file", file=unit["file"], info=unit["info"]))
                continue
            texts = unit["texts"]
            norms = [self.model.normalize(t) for t in texts]
            keys = [key_for(text_hash(n), self.fingerprint, self.storage_dtype) for n in norms]
            first: dict[str, str] = {}  # key -> normalised text: the unit's batch, first occurrences, in order
            for k, n, ride in zip(keys, norms, unit["ride"]):
                if not ride:
                    first.setdefault(k, n)
            stored = set()
            if self.backend is not None:
                stored = {k for k, h in zip(first, self.backend.exists_many(list(first))) if h}
            blobs: dict[str, bytes] = {}
            written: dict[str, int] = {}
            computed: set[str] = set()
            if self.unseen is not None and first:
                logger.warning("ray_ingest: %s does not see the store folder %s; the driver writes its states",
                               socket.gethostname(), self.unseen)
                self.unseen = None
            if len(stored) < len(first):  # one state is missing: the unit is compressed as one batch
                states = self.model.compress(list(first.values()), batch_size=self.batch_size)
                if len(states) != len(first):
                    raise ValueError(f"model.compress returned {len(states)} states for {len(first)} texts")
                for k, s in zip(first, states):
                    got = key_for(s.text_hash, s.model_fingerprint, self.storage_dtype)
                    if got != k:
                        raise ValueError("model.compress returned a state whose text hash / fingerprint does not "
                                         "match its text (model.normalize must be the normalisation compress applies)")
                    computed.add(k)
                    if k not in stored:
                        blobs[k] = encode_entry(s, self.storage_dtype, k)
                if self.backend is not None and blobs:
                    for k in self.backend.put_many(blobs, overwrite=False):
                        written[k] = len(blobs[k])
            todo = [j for j, p in enumerate(unit["present"]) if not p]
            vecs = raw_embed(self.embedder, [texts[j] for j in todo]) if todo else None
            handed: set[str] = set()
            for r, j in enumerate(todo):
                k = keys[j]
                blob = None
                if self.backend is None and k in blobs and k not in handed:
                    blob = blobs[k]
                    handed.add(k)
                out.append(_row(kind="passage", file=unit["file"], id=unit["ids"][j], text=texts[j],
                                meta=unit["metas"][j], norm=norms[j], key=k, emb=vecs[r].tobytes(),
                                ntok=unit["ntoks"][j], blob=blob,
                                compressed=k in computed and not unit["ride"][j],
                                written=written.pop(k, 0)))
        return pa.Table.from_pylist(out, schema=PASSAGE_SCHEMA)


def _row(**kw: Any) -> dict[str, Any]:
    row = dict.fromkeys(PASSAGE_SCHEMA.names)
    row.update(compressed=False, written=0)
    row.update(kw)
    return row


def _token_visible(store: str, token: tuple[str, str]) -> bool:
    try:
        with open(os.path.join(store, token[0]), encoding="utf-8") as f:
            return f.read() == token[1]
    except OSError:
        return False


class Probe:
    """Loads the model once, the way the actors will, and reports what the driver needs before they start:
    fingerprint, name, tokenizer (for chunking), device, an automatic batch size and a settings record."""

    def __init__(self, model: Any, device: Optional[str]) -> None:
        self.model = build_model(model, device)

    def info(self, max_passage_tokens: int, record: Any = None) -> dict[str, Any]:
        m = self.model
        return {"fingerprint": str(m.fingerprint), "name": str(m.name), "tokenizer": getattr(m, "tokenizer", None),
                "device": str(getattr(m, "device", "cpu")), "batch_size": auto_batch_size(m, max_passage_tokens),
                "record": record(m) if record is not None else None, "host": socket.gethostname()}
