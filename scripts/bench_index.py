"""FAISS at scale: flat, HNSW and IVF-PQ over 1M synthetic 384-d vectors, as `GistMemory` builds them.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python scripts/bench_index.py            # 1M vectors, ~25 min
    python scripts/bench_index.py --n 100000 --queries 300                              # a quick run

Each index is a `gist_memory.store.index.VectorIndex` with the memory's defaults (`GistMemory(index=...)`):
flat = `IndexFlatIP`; hnsw = `IndexHNSWFlat` M=32, efConstruction 40 (faiss's default; `--ef-construction`),
efSearch 128;
ivfpq = `IndexIVFPQ` with 2*sqrt(n) lists, 48 sub-quantisers of 8 bits (dim/8), nprobe 16, trained on up to
256 vectors per list. Rows with other efSearch / nprobe values change only the search setting of the same index.
`ivfpq + re-rank` is what `GistMemory.search` does with a trained IVF-PQ index: a shortlist of max(8k, 32) from
the PQ codes, re-scored exactly with the stored vectors (SQLite in the memory; an in-RAM array here, so its
bytes are not counted as index bytes).

Data: a Gaussian mixture, L2-normalised (inner product == cosine): 1,000 centres ~ N(0, I), each point a centre
plus N(0, 0.6^2 I) (the generator of `bench_store`'s search table). Queries: a random stored vector plus
N(0, 0.025^2 I) noise, renormalised (cosine ~0.9 to it). Ground truth: exact top-10 by inner product
(`IndexFlatIP`, batched). Latency: one query per `search` call (p50 / p95 over `--queries`, 200 for flat);
batched: all queries in one call, ms per query. Memory: bytes of `faiss.write_index` (what the index holds).

Prints a markdown table (and the machine line above it).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from gist_memory.store.index import VectorIndex  # noqa: E402


def clustered(n: int, dim: int, seed: int = 0, centres: int = 1000, spread: float = 0.6, subspace: int = 0,
              chunk: int = 100_000) -> np.ndarray:
    """`n` unit vectors (n, dim) float32 from a Gaussian mixture (generated in chunks to bound memory).

    `subspace` = 0: each point is its centre plus isotropic N(0, spread^2 I) noise (every direction varies: the
    hardest case for approximate search). `subspace` = r > 0: the noise lies in a random r-dimensional subspace
    of each cluster (same total energy) plus a little isotropic noise (spread / 6 per dimension), a lower
    intrinsic dimension, as real sentence embeddings have.
    """
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim), dtype=np.float32)
    out = np.empty((n, dim), np.float32)
    if subspace:
        labels = rng.integers(0, centres, n)
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(centres + 1))
        scale = spread * np.sqrt(dim / subspace)
        for j in range(centres):
            idx = order[bounds[j] : bounds[j + 1]]
            basis = np.linalg.qr(rng.standard_normal((dim, subspace)))[0].astype(np.float32)  # (dim, r) orthonormal
            z = scale * rng.standard_normal((len(idx), subspace), dtype=np.float32)
            iso = (spread / 6) * rng.standard_normal((len(idx), dim), dtype=np.float32)
            x = c[j] + z @ basis.T + iso
            out[idx] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        x = c[rng.integers(0, centres, m)] + spread * rng.standard_normal((m, dim), dtype=np.float32)
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def near_queries(data: np.ndarray, nq: int, noise: float = 0.025, seed: int = 1) -> np.ndarray:
    """`nq` unit queries, each a random row of `data` plus isotropic noise."""
    rng = np.random.default_rng(seed)
    q = data[rng.integers(0, len(data), nq)] + noise * rng.standard_normal((nq, data.shape[1]), dtype=np.float32)
    return np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True), dtype=np.float32)


def exact_topk(data: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (scores, ids), each (nq, k), by inner product."""
    import faiss

    flat = faiss.IndexFlatIP(data.shape[1])
    flat.add(data)
    return flat.search(queries, k)


def index_bytes(index) -> int:  # noqa: ANN001 - a faiss index
    """Size of the serialised index (written to a temporary file, not copied in RAM)."""
    import faiss

    fd, path = tempfile.mkstemp(suffix=".faiss")
    os.close(fd)
    try:
        faiss.write_index(index, path)
        return os.path.getsize(path)
    finally:
        os.remove(path)


def recall_at_1(got: np.ndarray, truth: np.ndarray) -> float:
    """Share of queries whose first hit is the exact nearest neighbour."""
    return float(np.mean(got[:, 0] == truth[:, 0]))


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    """Mean |got ∩ truth| / k over queries."""
    k = truth.shape[1]
    return float(np.mean([len(set(g[g >= 0].tolist()) & set(t.tolist())) / k for g, t in zip(got, truth)]))


def timed_search(search, queries: np.ndarray, n_single: int) -> tuple[list[float], float, np.ndarray]:  # noqa: ANN001
    """(single-query latencies s, batched s per query, batched ids) of `search(queries) -> ids`."""
    lat = []
    for q in queries[:n_single]:
        t0 = time.perf_counter()
        search(q[None, :])
        lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ids = search(queries)
    return lat, (time.perf_counter() - t0) / len(queries), ids


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="stored vectors")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--flat-single", type=int, default=200, help="single-query timings for flat (slow at 1M)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kinds", default="flat,hnsw,ivfpq")
    p.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    p.add_argument("--ef-construction", type=int, default=40, help="HNSW build breadth (GistMemory's default 40)")
    p.add_argument("--subspace", type=int, default=0,
                   help="within-cluster noise in a random subspace of this many dimensions (0: isotropic)")
    args = p.parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    k = args.k
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "?"
    shape = f"noise in a {args.subspace}-d subspace per cluster" if args.subspace else "isotropic noise"
    print(f"# FAISS at {args.n:,} x {args.dim}-d vectors ({shape}), k={k}, {args.queries} queries\n")
    print(f"machine: {os.cpu_count()} vCPU {cpu}, faiss {faiss.__version__} ({faiss.get_compile_options()}), "
          f"{args.threads} faiss thread(s), load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}\n",
          flush=True)
    t0 = time.perf_counter()
    data = clustered(args.n, args.dim, subspace=args.subspace)
    queries = near_queries(data, args.queries)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, truth_100 = exact_topk(data, queries, max(100, k + 1))
    truth = truth_100[:, :k]
    t_truth = time.perf_counter() - t0
    gaps = ", ".join(f"{r}: {scores[:, r - 1].mean():.3f}" for r in (1, 2, k, k + 1, 100))
    print(f"exact neighbours' cosine to the query, mean over queries, by rank: {gaps}\n", flush=True)
    print(f"data {t_data:.0f} s, exact ground truth {t_truth:.0f} s", file=sys.stderr, flush=True)
    ids = np.arange(args.n, dtype=np.int64)
    rows: list[list[str]] = []

    def row(name: str, build_s: float, nbytes: int, lat: list[float], per_q: float, got: np.ndarray) -> None:
        rows.append([name, f"{build_s:.0f}", f"{1000 * np.percentile(lat, 50):.2f}",
                     f"{1000 * np.percentile(lat, 95):.2f}", f"{1000 * per_q:.3f}", f"{recall_at_1(got, truth):.3f}",
                     f"{recall(got, truth):.3f}",
                     f"{nbytes / 2**20:,.0f}", f"{nbytes / args.n:.0f}"])
        print(f"  {name} done", file=sys.stderr, flush=True)

    for kind in [x for x in args.kinds.split(",") if x]:
        vi = VectorIndex(kind, args.dim, ivf_min_points=10_000, ef_construction=args.ef_construction, use_gpu=False)
        t0 = time.perf_counter()
        vi.rebuild(ids, data)
        build = time.perf_counter() - t0
        nbytes = index_bytes(vi.index)
        inner = faiss.downcast_index(vi.index.index) if kind != "ivfpq" else faiss.downcast_index(vi.index)

        def search(q: np.ndarray, vi: VectorIndex = vi, k: int = k) -> np.ndarray:
            return vi.search(q, k)[1]

        if kind == "flat":
            lat, per_q, got = timed_search(search, queries, args.flat_single)
            row("flat (exact)", build, nbytes, lat, per_q, got)
        elif kind == "hnsw":
            for ef in (64, 128, 256):
                inner.hnsw.efSearch = ef
                lat, per_q, got = timed_search(search, queries, args.queries)
                row(f"hnsw M=32, efConstruction {vi.ef_construction}, efSearch {ef}"
                    + (" (default)" if ef == vi.ef_search and vi.ef_construction == 40 else ""), build, nbytes,
                    lat, per_q, got)
        elif kind == "ivfpq":
            nlist, m = inner.nlist, inner.pq.M
            for nprobe in (16, 64):
                inner.nprobe = nprobe
                lat, per_q, got = timed_search(search, queries, args.queries)
                row(f"ivfpq {nlist} lists, PQ{m}x8, nprobe {nprobe}" + (" (default)" if nprobe == vi.nprobe else ""),
                    build, nbytes, lat, per_q, got)
            inner.nprobe = vi.nprobe
            fetch = max(8 * k, 32)

            def rerank(q: np.ndarray, vi: VectorIndex = vi, k: int = k, fetch: int = fetch) -> np.ndarray:
                short = vi.search(q, fetch)[1]  # (nq, fetch) from the PQ codes
                out = np.empty((len(q), k), np.int64)
                for i, s in enumerate(short):
                    s = s[s >= 0]
                    exact = data[s] @ q[i]
                    out[i] = s[np.argsort(-exact)[:k]]
                return out

            lat, per_q, got = timed_search(rerank, queries, args.queries)
            row(f"ivfpq nprobe {vi.nprobe} + exact re-rank of {fetch} (GistMemory.search)", build, nbytes, lat,
                per_q, got)
        del vi, inner
    print(f"| index | build s | single query p50 ms | p95 ms | batched ms/query | recall@1 | recall@{k} | index MiB | "
          "bytes/vector |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\nraw vectors: {args.n * args.dim * 4 / 2**20:,.0f} MiB; nlist = 2*sqrt(n) = "
          f"{int(min(65536, max(16, 2 * math.sqrt(args.n))))}")


if __name__ == "__main__":
    main()
