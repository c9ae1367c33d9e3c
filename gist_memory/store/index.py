"""The vector index behind `GistMemory`: FAISS over L2-normalised embeddings (inner product == cosine).

Kinds:
    flat    exact search (`IndexFlatIP` in `IndexIDMap2`); the default.
    hnsw    approximate graph search (`IndexHNSWFlat`, inner product); FAISS cannot remove from HNSW, so deleted
            ids stay as tombstones (filtered out by the docstore) until the index is rebuilt.
    ivfpq   inverted lists + product quantisation (`IndexIVFPQ`), for very large corpora. It needs training, so
            below `ivf_min_points` vectors the index stays exact (flat) and is trained once it has enough.

Ids are the docstore's integer row ids (int64). With `use_gpu` and a faiss build that sees a GPU, searches run
on a GPU replica of the CPU index (rebuilt lazily after changes); mutations always go to the CPU index.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw", "ivfpq")


def _faiss():  # noqa: ANN202 - faiss module
    import faiss

    return faiss


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """float32 copy of `x` (n, d) with unit-norm rows (zero rows stay zero)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (n, dim), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


class VectorIndex:
    """A FAISS index of a given kind with add / remove / search by int64 ids.

    Args:
        kind: `flat`, `hnsw` or `ivfpq`.
        dim: Embedding size.
        hnsw_m: HNSW graph degree.
        ef_search: HNSW search breadth.
        ef_construction: HNSW build breadth (100; faiss's own default 40 found the nearest neighbour for only
            ~0.8 of queries at 1M clustered vectors, 100 for 0.97 at 2.8x the build time: docs/scale.md, "The
            index at scale").
        ivf_min_points: Vectors needed before an `ivfpq` index is trained (exact search until then).
        nprobe: IVF lists visited per query.
        use_gpu: Search on a GPU replica when faiss has GPUs (None: whenever `faiss.get_num_gpus() > 0`).
    """

    def __init__(
        self,
        kind: str,
        dim: int,
        *,
        hnsw_m: int = 32,
        ef_search: int = 128,
        ef_construction: int = 100,
        ivf_min_points: int = 10_000,
        nprobe: int = 16,
        use_gpu: Optional[bool] = None,
    ) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"index must be one of {list(INDEX_KINDS)}, got {kind!r}")
        self.kind = kind
        self.dim = int(dim)
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.ef_construction = ef_construction
        self.ivf_min_points = ivf_min_points
        self.nprobe = nprobe
        faiss = _faiss()
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        self.use_gpu = bool(gpus > 0) if use_gpu is None else bool(use_gpu and gpus > 0)
        self.dead = 0  # tombstones (hnsw only)
        self._gpu = None
        self.index = self._empty()

    # ---- construction ---------------------------------------------------------------------------------
    @property
    def trained(self) -> bool:
        """False while an `ivfpq` index is still the exact stand-in."""
        return self.kind != "ivfpq" or self._is_ivf(self.index)

    def _is_ivf(self, index) -> bool:  # noqa: ANN001
        faiss = _faiss()
        return isinstance(faiss.downcast_index(index), faiss.IndexIVF)

    def _empty(self):  # noqa: ANN202
        faiss = _faiss()
        if self.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = self.ef_search
            inner.hnsw.efConstruction = self.ef_construction
            return faiss.IndexIDMap2(inner)
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _trained_ivfpq(self, sample: np.ndarray):  # noqa: ANN202
        faiss = _faiss()
        n = sample.shape[0]
        nlist = int(min(65536, max(16, 2 * math.sqrt(n))))
        m = next(m for m in (self.dim // 8, self.dim // 4, self.dim // 2, self.dim, 1) if m and self.dim % m == 0)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        take = sample if n <= 256 * nlist else sample[rng.choice(n, 256 * nlist, replace=False)]
        index.train(take)
        index.nprobe = self.nprobe
        return index

    def rebuild(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the contents with exactly (ids, vectors); trains `ivfpq` when there are enough vectors."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = normalize_rows(vectors) if len(ids) else np.zeros((0, self.dim), np.float32)
        if self.kind == "ivfpq" and len(ids) >= self.ivf_min_points:
            self.index = self._trained_ivfpq(vectors)
        else:
            self.index = self._empty()
        if len(ids):
            self.index.add_with_ids(vectors, ids)
        self.dead = 0
        self._gpu = None

    # ---- mutation ---------------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add unit-norm vectors under int64 ids (ids must not be present)."""
        if not len(ids):
            return
        vectors = normalize_rows(vectors)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"embedding size {vectors.shape[1]} does not match the index ({self.dim})")
        self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        self._gpu = None

    def remove(self, ids: np.ndarray) -> None:
        """Remove ids (tombstones for hnsw)."""
        if not len(ids):
            return
        if self.kind == "hnsw":
            self.dead += len(ids)
        else:
            self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
        self._gpu = None

    @property
    def ntotal(self) -> int:
        """Vectors in the index (tombstones included)."""
        return int(self.index.ntotal)

    def needs_rebuild(self) -> bool:
        """True if an untrained `ivfpq` has enough vectors, or hnsw tombstones exceed a quarter of it."""
        if self.kind == "ivfpq" and not self.trained and self.ntotal >= self.ivf_min_points:
            return True
        return self.kind == "hnsw" and self.dead > max(16, self.ntotal // 4)

    @property
    def vectors_are_approximate(self) -> bool:
        """True when the index keeps compressed (PQ) codes rather than the vectors."""
        return self.kind == "ivfpq" and self.trained

    def vectors(self, ids: np.ndarray) -> Optional[np.ndarray]:
        """The stored unit vectors of `ids` (n, dim), or None if the index cannot give them exactly."""
        if self.vectors_are_approximate or not len(ids):
            return None if len(ids) else np.zeros((0, self.dim), np.float32)
        try:
            return self.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
        except RuntimeError:  # an id not (yet) in the index: the caller reads the docstore instead
            return None

    # ---- search -----------------------------------------------------------------------------------------
    def _searcher(self):  # noqa: ANN202
        if not self.use_gpu or self.kind == "hnsw":
            return self.index
        if self._gpu is None:  # pragma: no cover - needs a GPU build of faiss
            faiss = _faiss()
            try:
                self._gpu = faiss.index_cpu_to_all_gpus(self.index)
            except Exception as e:
                logger.warning("faiss GPU replica failed (%s); searching on CPU", e)
                self.use_gpu = False
                return self.index
        return self._gpu  # pragma: no cover

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) for unit-norm queries; ids of -1 mark empty slots."""
        k = int(min(k, self.ntotal))
        if k <= 0:
            n = len(queries)
            return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
        return self._searcher().search(normalize_rows(queries), k)

    # ---- bytes ------------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """faiss.serialize_index of the CPU index."""
        return _faiss().serialize_index(self.index).tobytes()

    def load_bytes(self, data: bytes, dead: int = 0) -> None:
        """Replace the index by a serialised one; raises ValueError if it does not fit this kind/dim."""
        faiss = _faiss()
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if index.d != self.dim:
            raise ValueError(f"saved index has dim {index.d}, expected {self.dim}")
        is_ivf = self._is_ivf(index)
        if self.kind != "ivfpq" and is_ivf:
            raise ValueError("saved index is IVF-PQ, expected " + self.kind)
        if self.kind == "hnsw" and not isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW):
            raise ValueError("saved index is not HNSW")
        if self.kind == "flat" and not isinstance(faiss.downcast_index(index.index), faiss.IndexFlat):
            raise ValueError("saved index is not flat")
        if is_ivf:
            faiss.downcast_index(index).nprobe = self.nprobe
        if self.kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = self.ef_search
            faiss.downcast_index(index.index).hnsw.efConstruction = self.ef_construction  # for later adds
        self.index = index
        self.dead = int(dead)
        self._gpu = None
