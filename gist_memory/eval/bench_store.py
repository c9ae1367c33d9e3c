"""Benchmark of the gist store and memory: run `python -m gist_memory.eval.bench_store`.

Prints markdown tables:
  1. states of a real model (default: the bundled SmolLM2-135M, training-free `pool+anchors` compressor) at each
     compression ratio of `--ratios` (default 4 and 8): bytes on disk per raw token for each storage dtype, put /
     cold get / warm get throughput, K/V error and the change in answer log-likelihood (`model.score`) when
     states are read back from bf16 / fp16 / int8 / int4 storage;
  2. ingest throughput (files -> passages -> states + MiniLM embeddings -> SQLite + FAISS), passages/s, tokens/s;
  3. search latency of `GistMemory.search` at 10k and 100k passages for each index kind. The vectors are
     synthetic (384-d, clustered Gaussian: 1,000 centres + noise; queries are perturbed stored vectors) and the
     docstore rows are written straight into SQLite, so this part measures the index + docstore, not the
     embedder; recall@k is measured against the exact (flat) result.

With `--retention`, first: held-out retention (4-way multiple choice, answer log-likelihood, free generation) of
the shipped gist model's states read back from each storage dtype against float32, at each of `--ratios`
(`--retention-items`, `--retention-kinds`, `--retention-dtypes`, `--gist-model`, `--no-generate`).

Options: `--model fake` (no LLM) or a model path, `--ratios 4,8`, `--sizes 10000,100000`,
`--kinds flat,hnsw,ivfpq`, `--passages 32`, `--skip-search`, `--skip-model`, `--skip-ingest`.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

PARAGRAPHS = [
    "Maren Voss became the chief curator of the Bergen map archive in 1912. She catalogued it box by box for "
    "eleven years. The archive code QX-{n} marks the oldest sea charts, drawn around 1590 by Dutch pilots.",
    "The Aletsch Glacier is the largest glacier in the Alps, about {n} metres thick at Konkordiaplatz. It lost "
    "roughly a kilometre of length between 1980 and 2020. Meltwater feeds the Massa river and a hydro plant.",
    "Python 3.{n} added structural pattern matching with the match statement. A case clause can bind names, "
    "test classes and check guards. Guido van Rossum first released Python in February 1991 at CWI.",
    "The Treaty of Westphalia was signed in {n} cities? No: in Osnabrueck and Muenster, in 1648. It ended the "
    "Thirty Years War and the Eighty Years War. Delegates from 109 parties negotiated for about five years.",
    "Photosynthesis in C4 plants such as maize concentrates CO2 around RuBisCO. Bundle-sheath cells do the "
    "Calvin cycle. On a hot day a maize leaf can fix {n} micromoles of carbon per square metre per second.",
    "PostgreSQL 16 added logical replication from standby servers. The setting max_wal_senders defaults to "
    "{n}. VACUUM reclaims dead tuples; autovacuum runs it when a table changes by more than 20 percent.",
    "The ISS orbits Earth at about 400 kilometres and circles the planet every 92 minutes. Expedition {n} "
    "carried out three spacewalks. Its solar arrays span 73 metres, wider than a Boeing 777.",
    "Jane Austen published Pride and Prejudice in January 1813 through Thomas Egerton. The first edition ran "
    "to about 1,500 copies at 18 shillings. Elizabeth Bennet refuses Mr Darcy's first proposal in chapter {n}.",
]


def passages(n: int) -> list[str]:
    """`n` distinct passages of about 60-80 tokens, with numbers and names (anchor material)."""
    return [PARAGRAPHS[i % len(PARAGRAPHS)].format(n=100 + 37 * i) for i in range(n)]


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def load_model(spec: str, ratio: float = 4.0) -> Any:
    """`bundled` (SmolLM2-135M + pool+anchors), `fake`, or a path/hub id of a base model, compressing at `ratio`."""
    if spec == "fake":
        from gist_memory.store.testing import FakeGistModel

        return FakeGistModel(num_layers=30, num_heads=3, head_dim=64, tokens_per_row=max(1, round(ratio)))
    from gist_memory import GistConfig, GistModel

    cfg = GistConfig(compressor="pool+anchors", target_ratio=float(ratio))
    return GistModel.from_base(None if spec == "bundled" else spec, cfg, device="cpu")


# ---- 1. states ---------------------------------------------------------------------------------------------------
def bench_states(model: Any, n: int, n_quality: int) -> str:
    import torch

    from gist_memory.store import GistStore

    texts = passages(n)
    t0 = time.perf_counter()
    states = model.compress(texts, batch_size=8)
    t_compress = time.perf_counter() - t0
    raw = sum(s.num_tokens for s in states)
    kept = sum(s.num_kept for s in states)
    out = [
        f"model: {model.name}, {n} passages, {raw} raw tokens, {kept} kept rows "
        f"(ratio {raw / kept:.2f}), K/V {tuple(states[0].keys.shape[:2])} x D={states[0].keys.shape[-1]}, "
        f"compress {n / t_compress:.1f} passages/s ({raw / t_compress:.0f} tokens/s)",
        "",
    ]
    has_score = hasattr(model, "score")
    q_texts = texts[:n_quality]
    prompt = "Repeat the passage word for word."
    base_lp: list[float] = []
    rows = []
    for dt in ("float32", "bfloat16", "float16", "int8", "int4"):
        with tempfile.TemporaryDirectory() as d:
            store = GistStore(d, storage_dtype=dt, max_bytes_in_ram=0)
            t0 = time.perf_counter()
            keys = store.batched_put(states)
            t_put = time.perf_counter() - t0
            disk = store.disk_bytes()
            cold = GistStore(d, storage_dtype=dt, max_bytes_in_ram=0)
            t0 = time.perf_counter()
            got = cold.batched_get(keys)
            t_get = time.perf_counter() - t0
            warm = GistStore(d, storage_dtype=dt, max_bytes_in_ram=2**31)
            warm.batched_get(keys)
            t0 = time.perf_counter()
            for _ in range(5):
                warm.batched_get(keys)
            t_warm = (time.perf_counter() - t0) / 5
            err = max(float((g.keys - s.keys).norm() / s.keys.norm()) for g, s in zip(got, states, strict=True))
            verr = max(float((g.values - s.values).norm() / s.values.norm()) for g, s in zip(got, states, strict=True))
            lp_delta = ""
            if has_score and q_texts:
                lps = []
                for t, g in zip(q_texts, got, strict=False):
                    with torch.no_grad():
                        lps.append(model.score(prompt, " " + t, states=[g]) / max(1, len(t.split())))
                if dt == "float32":
                    base_lp = lps
                    lp_delta = f"{statistics.mean(lps):.4f} (base, per word)"
                else:
                    d_ = [a - b for a, b in zip(lps, base_lp, strict=True)]
                    lp_delta = f"{statistics.mean(d_):+.5f} (max abs {max(abs(x) for x in d_):.5f})"
            rows.append(
                [
                    dt,
                    disk / raw,
                    disk / len(states) / 1024,
                    len(states) / t_put,
                    disk / t_put / 2**20,
                    len(states) / t_get,
                    len(states) / t_warm,
                    f"{err:.2e} / {verr:.2e}",
                    lp_delta,
                ]
            )
    out.append(
        _table(
            [
                "storage",
                "bytes/raw token",
                "KiB/state",
                "put states/s (fsync)",
                "put MiB/s",
                "cold get states/s",
                "warm get states/s",
                "max rel err K / V",
                "answer log-lik change",
            ],
            rows,
        )
    )
    return "\n".join(out)


# ---- 1b. backends ------------------------------------------------------------------------------------------------
def bench_backends(urls: list[str], n: int, storage_dtype: str = "int4") -> str:
    """put / cold get / tiered get throughput of `n` states (bundled-model shapes, 4x, fake values) on each URL."""
    import shutil
    import uuid

    from gist_memory.store import GistStore
    from gist_memory.store.testing import FakeGistModel

    model = FakeGistModel(num_layers=30, num_heads=3, head_dim=64, tokens_per_row=4)
    states = model.compress([" ".join(f"w{i}x{j}" for j in range(256)) for i in range(n)])  # 256-token passages
    rows = []
    for url in urls:
        run = uuid.uuid4().hex[:8]
        target = url if "://" not in url else (f"{url}?prefix=bench-{run}:" if url.startswith("redis")
                                                 else f"{url.rstrip('/')}/bench-{run}")
        if "://" not in url:
            target = os.path.join(url, f"bench-{run}")
        cache = tempfile.mkdtemp(prefix="gist-bench-cache-")
        try:
            store = GistStore(target, storage_dtype=storage_dtype, max_bytes_in_ram=0)
            t0 = time.perf_counter()
            keys = store.batched_put(states)
            t_put = time.perf_counter() - t0
            nbytes = store.disk_bytes()
            cold = GistStore(target, storage_dtype=storage_dtype, max_bytes_in_ram=0)
            t0 = time.perf_counter()
            got = cold.batched_get(keys)
            t_get = time.perf_counter() - t0
            assert all(g is not None for g in got)
            tiered = GistStore([cache, target], storage_dtype=storage_dtype, max_bytes_in_ram=0)
            tiered.batched_get(keys)  # fills the local tier
            t0 = time.perf_counter()
            tiered.batched_get(keys)
            t_local = time.perf_counter() - t0
            one = []
            for k in keys[:16]:
                t0 = time.perf_counter()
                cold.get(k)
                one.append(time.perf_counter() - t0)
            store.gc([], min_age_s=0)
            rows.append([url.split("?")[0], n, nbytes / n / 1024, n / t_put, n / t_get, 1000 * statistics.median(one),
                         n / t_local])
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    return _table(["backend", "states", "KiB/state", "put states/s (batched)", "cold get states/s (batched)",
                   "single get p50 ms", "get via local tier states/s"], rows)


# ---- 1c. retention by storage dtype --------------------------------------------------------------------------------
RETENTION_DTYPES = ("float32", "float16", "int8", "int4")


def bench_retention(model_path: str | None, ratios: list[float], items: int, kinds: list[str],
                    dtypes: tuple[str, ...] = RETENTION_DTYPES, generate: bool = True, seed: int = 0) -> str:
    """Held-out retention of states read back from each storage dtype, against the same states in float32.

    For each ratio the gist model (`model_path`, None: the shipped adapter) compresses each held-out item's
    passages once; the states go through the store's codec (`encode_entry` / `decode_entry`) in each dtype and
    the item is scored from what came back: 4-way multiple choice (`score_choices`, the held-out table's
    metric), the answer's log-likelihood change against float32 (nats), items whose choice differs from float32,
    and (with `generate`) whether a 24-token answer contains the planted value.
    """
    import torch

    from gist_memory import GistModel
    from gist_memory.eval.heldout.items import build_items, contains, prompt
    from gist_memory.store.store import decode_entry, encode_entry, key_for

    by_kind = build_items(items, seed=seed, kinds=kinds)
    rows = []
    for ratio in ratios:
        t0 = time.perf_counter()
        gm = GistModel.from_pretrained(model_path, device="cpu", config_overrides={"target_ratio": float(ratio)})
        for kind in kinds:
            res: dict[str, dict[str, list]] = {dt: {"correct": [], "ll": [], "pick": [], "gen": []} for dt in dtypes}
            raw = kept = 0
            nbytes = dict.fromkeys(dtypes, 0)
            for item in by_kind[kind]:
                states = gm.compress(item.passages)
                raw += sum(s.num_tokens for s in states)
                kept += sum(s.num_kept for s in states)
                q = prompt(item)
                conts = list(item.continuations or item.choices)
                for dt in dtypes:
                    got = []
                    for s in states:
                        data = encode_entry(s, dt, key_for(s.text_hash, s.model_fingerprint, dt))
                        nbytes[dt] += len(data)
                        got.append(decode_entry(data))
                    with torch.no_grad():
                        scores = gm.score_choices(q, conts, states=got)
                    pick = max(range(len(scores)), key=lambda i: (scores[i], -i))
                    r = res[dt]
                    r["pick"].append(pick)
                    r["correct"].append(int(pick == item.answer_index))
                    r["ll"].append(scores[item.answer_index])
                    if generate:
                        with torch.no_grad():
                            out = gm.generate(q, states=got, max_new_tokens=24)
                        r["gen"].append(int(contains(out, item.key_phrase)))
            base = res[dtypes[0]]
            for dt in dtypes:
                r = res[dt]
                d_ll = [a - b for a, b in zip(r["ll"], base["ll"], strict=True)]
                lost = sum(a < b for a, b in zip(r["correct"], base["correct"], strict=True))
                gained = sum(a > b for a, b in zip(r["correct"], base["correct"], strict=True))
                flips = sum(a != b for a, b in zip(r["pick"], base["pick"], strict=True))
                se = statistics.stdev(d_ll) / len(d_ll) ** 0.5 if len(d_ll) > 1 else 0.0
                gen_flips = sum(a != b for a, b in zip(r["gen"], base["gen"], strict=True))
                rows.append([
                    f"{ratio:g}x ({raw / kept:.2f})", kind, dt, nbytes[dt] / raw,
                    statistics.mean(r["correct"]), f"{flips}/{len(r['pick'])} (-{lost} / +{gained})",
                    f"{statistics.mean(r['gen']):.2f} ({gen_flips} differ)" if generate else "-",
                    "base" if dt == dtypes[0]
                    else f"{statistics.mean(d_ll):+.4f} ± {se:.4f} / {max(abs(x) for x in d_ll):.4f}",
                ])
            print(f"  retention {ratio:g}x {kind} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        del gm
    return _table(["ratio (achieved)", "kind", "storage", "bytes/raw token", "MC accuracy", "choices differing from "
                   f"{dtypes[0]} (correct lost / gained)", "generation contains",
                   "answer log-lik change, nats (mean ± s.e. / max abs)"], rows)


# ---- 2. ingest ---------------------------------------------------------------------------------------------------
def bench_ingest(model: Any, n: int) -> str:
    from gist_memory.store import GistMemory, ingest

    with tempfile.TemporaryDirectory() as d:
        docs = os.path.join(d, "docs")
        os.makedirs(docs)
        for i, t in enumerate(passages(n)):
            with open(os.path.join(docs, f"p{i:04d}.txt"), "w", encoding="utf-8") as f:
                f.write(t)
        mem = GistMemory(model, os.path.join(d, "mem"))  # default MiniLM embedder
        mem.add_texts(["warm-up passage so the embedder is loaded."], show_progress=False)
        s = ingest(docs, mem, max_passage_tokens=256, show_progress=False)
        again = ingest(docs, mem, max_passage_tokens=256, show_progress=False)
        mem.close()
    rows = [
        ["first run", s.passages_added, s.tokens_added, s.seconds, s.passages_per_second, s.tokens_per_second],
        ["rerun (all present)", again.passages_added, again.tokens_added, again.seconds, "-", "-"],
    ]
    return _table(["ingest", "passages", "tokens", "seconds", "passages/s", "tokens/s"], rows)


# ---- 3. search ---------------------------------------------------------------------------------------------------
class _VecEmbedder:
    """Returns pre-made query vectors in call order (the benchmark's stand-in embedder)."""

    name = "bench-vectors"

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.queue: list[np.ndarray] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.queue:
            return np.stack([self.queue.pop(0) for _ in texts])
        return np.ones((len(texts), self.dim), np.float32)


def _clustered(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    x = centres[rng.integers(0, 1000, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _populate(path: str, vecs: np.ndarray) -> None:
    """Docstore rows written straight into SQLite (bench only), as `add_texts` would leave them."""
    from gist_memory.store import GistMemory
    from gist_memory.store.testing import FakeGistModel

    model = FakeGistModel()
    mem = GistMemory(model, path, embedder=_VecEmbedder(vecs.shape[1]), fsync=False)
    mem.add_texts(["seed passage"], ids=["seed"], show_progress=False)  # schema, meta, dim
    mem.delete("seed")
    mem.close()
    db = sqlite3.connect(os.path.join(path, "memory.sqlite"))
    db.execute("BEGIN")
    fake_key = "0" * 64
    for i in range(0, len(vecs), 10_000):
        chunk = range(i, min(len(vecs), i + 10_000))
        db.executemany(
            "INSERT INTO docs(id, text, metadata, text_hash, state_key, embedding) VALUES (?,?,?,?,?,?)",
            ((f"p{j}", f"passage {j}", json.dumps({"shard": j % 10}), "h", fake_key, vecs[j].tobytes()) for j in chunk),
        )
    db.execute("COMMIT")
    db.close()


def bench_search(sizes: list[int], kinds: list[str], dim: int = 384, n_queries: int = 200, k: int = 4) -> str:
    from gist_memory.store import GistMemory
    from gist_memory.store.testing import FakeGistModel

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        vecs = _clustered(n, dim, rng)
        qi = rng.integers(0, n, n_queries)
        queries = vecs[qi] + 0.05 * rng.standard_normal((n_queries, dim)).astype(np.float32)
        exact: list[list[str]] = []
        with tempfile.TemporaryDirectory() as d:
            _populate(d, vecs)
            for kind in kinds:
                emb = _VecEmbedder(dim)
                t0 = time.perf_counter()
                mem = GistMemory(FakeGistModel(), d, embedder=emb, index=kind)
                t_open = time.perf_counter() - t0
                lat, filt, got = [], [], []
                for q in queries:
                    emb.queue.append(q)
                    t0 = time.perf_counter()
                    hits = mem.search("q", k=k)
                    lat.append(time.perf_counter() - t0)
                    got.append([h.id for h in hits])
                for q in queries[:50]:
                    emb.queue.append(q)
                    t0 = time.perf_counter()
                    mem.search("q", k=k, filter={"shard": 3})
                    filt.append(time.perf_counter() - t0)
                if kind == "flat":
                    exact = got
                recall = (
                    statistics.mean(len(set(a) & set(b)) / k for a, b in zip(got, exact, strict=True))
                    if exact
                    else float("nan")
                )
                t0 = time.perf_counter()
                mem.save()
                t_save = time.perf_counter() - t0
                mem.close()
                t0 = time.perf_counter()
                GistMemory(FakeGistModel(), d, embedder=_VecEmbedder(dim), index=kind).close()
                t_reopen = time.perf_counter() - t0
                rows.append(
                    [
                        f"{n:,}",
                        kind,
                        1000 * statistics.median(lat),
                        1000 * float(np.percentile(lat, 95)),
                        1000 * statistics.median(filt),
                        recall,
                        t_open,
                        t_save,
                        t_reopen,
                    ]
                )
                print(f"  search {n} {kind} done", file=sys.stderr, flush=True)
    return _table(
        [
            "passages",
            "index",
            "search p50 ms",
            "p95 ms",
            "filtered (10%) p50 ms",
            f"recall@{k} vs flat",
            "build from docstore s",
            "save s",
            "reopen s",
        ],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print its tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled", help="bundled | fake | path or hub id of a base model")
    p.add_argument("--passages", type=int, default=32)
    p.add_argument("--ratios", default="4,8", help="compression ratios of the states part")
    p.add_argument("--skip-ingest", action="store_true")
    p.add_argument("--backends", default="", help="comma-separated folders/URLs to time (e.g. /tmp,redis://...,s3://b/p)")
    p.add_argument("--backend-states", type=int, default=64)
    p.add_argument("--quality-passages", type=int, default=12)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--kinds", default="flat,hnsw,ivfpq")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--retention", action="store_true",
                   help="held-out retention per storage dtype with the gist model (--gist-model) at --ratios")
    p.add_argument("--gist-model", default=None, help="saved gist model folder for --retention (default: shipped)")
    p.add_argument("--retention-items", type=int, default=20, help="items per kind for --retention")
    p.add_argument("--retention-kinds", default="entity_single,common_single")
    p.add_argument("--no-generate", action="store_true", help="--retention without free generation")
    p.add_argument("--retention-dtypes", default=",".join(RETENTION_DTYPES),
                   help="storage dtypes for --retention; the first is the reference")
    p.add_argument(
        "--threads", type=int, default=0, help="torch and faiss threads (0: their defaults); 1 helps on a busy CPU"
    )
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import faiss
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"# gist-memory store benchmark ({os.cpu_count()} CPU cores, load average {load}; torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, faiss {faiss.__version__} with "
        f"{faiss.omp_get_max_threads()} threads)\n"
    )
    if args.retention:
        ratios = [float(r) for r in args.ratios.split(",") if r]
        print(f"## Held-out retention by storage dtype ({args.retention_items} items per kind)\n")
        print(bench_retention(args.gist_model, ratios, args.retention_items,
                              [k for k in args.retention_kinds.split(",") if k],
                              tuple(d for d in args.retention_dtypes.split(",") if d), generate=not args.no_generate),
              "\n", flush=True)
    if not args.skip_model:
        model = None
        for ratio in [float(r) for r in args.ratios.split(",") if r]:
            model = load_model(args.model, ratio)
            print(f"## States on disk, target ratio {ratio:g}x\n")
            n_q = args.quality_passages if args.model != "fake" else 0
            print(bench_states(model, args.passages, n_q), "\n", flush=True)
        if not args.skip_ingest and model is not None:
            print("## Ingest\n")
            print(bench_ingest(model, args.passages), "\n")
    if args.backends:
        print(f"## Backends ({args.backend_states} states of 256-token passages at 4x, int4)\n")
        print(bench_backends([u for u in args.backends.split(",") if u], args.backend_states), "\n", flush=True)
    if not args.skip_search:
        print("## Search (synthetic clustered 384-d vectors, docstore rows written directly; k=4)\n")
        sizes = [int(x) for x in args.sizes.split(",") if x]
        print(bench_search(sizes, [k for k in args.kinds.split(",") if k]))


if __name__ == "__main__":
    main()
