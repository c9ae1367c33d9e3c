"""`GistMemory(index=...)`: the approximate index kinds return what exact (flat) search returns.

Clustered 32-d vectors (a Gaussian mixture, like `scripts/bench_index.py` at a small scale) are stored through a
memory with each index kind; queries near stored vectors must get (nearly) the flat top-10, through the memory's
own search path (HNSW tombstones filtered, IVF-PQ's shortlist re-ranked with the exact vectors).
"""

from __future__ import annotations

import numpy as np
import pytest

from gist_memory.store import GistMemory
from gist_memory.store.testing import FakeGistModel

N, DIM, K = 3000, 32, 10


class _TableEmbedder:
    """Text `v<i>` -> the i-th stored vector, `q<j>` -> the j-th query vector."""

    name = "table-embedder"

    def __init__(self, vecs: np.ndarray, queries: np.ndarray) -> None:
        self.vecs, self.queries = vecs, queries

    def encode(self, texts: list[str], **_: object) -> np.ndarray:
        return np.stack([(self.vecs if t[0] == "v" else self.queries)[int(t[1:])] for t in texts])


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 40, N)] + 0.6 * rng.standard_normal((N, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, N, 40)] + 0.05 * rng.standard_normal((40, DIM)).astype(np.float32)
    return x, q


def _top(mem: GistMemory, n_queries: int) -> list[list[str]]:
    return [[h.id for h in mem.search(f"q{j}", k=K)] for j in range(n_queries)]


def test_hnsw_and_ivfpq_agree_with_flat(tmp_path, data):
    vecs, queries = data
    emb = _TableEmbedder(vecs, queries)
    texts = [f"v{i}" for i in range(N)]
    got = {}
    for kind in ("flat", "hnsw", "ivfpq"):
        mem = GistMemory(FakeGistModel(), tmp_path / kind, embedder=emb, index=kind, ivf_min_points=1000,
                         ef_construction=64, fsync=False)
        mem.add_texts(texts, ids=texts, batch_size=512, show_progress=False)
        assert mem.index_kind == kind and mem._index.trained  # ivfpq trained once it had 1,000 vectors
        if kind == "hnsw":
            import faiss

            assert faiss.downcast_index(mem._index.index.index).hnsw.efConstruction == 64
        got[kind] = _top(mem, len(queries))
        mem.close()
    # exact reference computed here, independently of the memory's flat index
    exact = [[f"v{i}" for i in np.argsort(-(vecs @ (q / np.linalg.norm(q))))[:K]] for q in queries]
    assert got["flat"] == exact
    for kind in ("hnsw", "ivfpq"):
        recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(got[kind], exact)])
        assert recall >= 0.95, (kind, recall)
        assert [a[0] for a in got[kind]] == [b[0] for b in exact], kind  # the best hit is always found
