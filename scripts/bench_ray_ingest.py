"""Ray ingest throughput: prints a markdown table (docs/scale.md, "Bulk compression on Ray").

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python scripts/bench_ray_ingest.py

Two parts, each with 1 and 2 compression actors (`--actors`) on a local Ray with every CPU of this machine:

1. **real**: the default model (`gist-memory ingest` without model options: the bundled SmolLM2-135M-Instruct)
   and the default embedder on `--real-passages` passages (~70 tokens each), against the single-process ingest of
   the same passages.
2. **fake**: the same pipeline with the model replaced by `FakeGistModel` (random states of the bundled model's
   shape: 30 layers x 3 KV heads x 64, one row per 4 words, so ~9 rows for these ~35-word passages) and a hashing
   embedder, on `--fake-passages` passages (jsonl, 1,000 per file) with fsync off: the pipeline's own cost
   (reading, chunking, moving rows, encoding and writing states, SQLite + FAISS on the driver); and on
   `--fake-fsync-passages` with fsync on (every state file and folder flushed, as ingest does by default).

Columns: passages/s (wall time of the whole call, Ray start excluded: the cluster is up), MiB of state entries
written, peak RSS of the driver process and of the Ray worker processes (sampled every 0.2 s; "workers" is the
peak of their sum, chunking tasks and actors together). States are stored as `--storage-dtype` (int8).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class RssSampler:
    """Peak RSS of this process and of the Ray worker processes (by process title `ray::...`), every 0.2 s."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.driver = self.workers = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.driver = max(self.driver, self.me.memory_info().rss)
            total = 0
            for p in self.psutil.process_iter(["name", "cmdline", "memory_info"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    if cmd.startswith("ray::") and "IDLE" not in cmd and p.info["memory_info"] is not None:
                        total += p.info["memory_info"].rss
                except (self.psutil.Error, TypeError):
                    continue
            self.workers = max(self.workers, total)
            self._stop.wait(0.2)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def write_corpus(root: Path, n: int, per_file: int, words: int) -> None:
    """`n` distinct passages as jsonl records (`per_file` a file), about `words` words each."""
    from gist_memory.store.bench_store import PARAGRAPHS

    root.mkdir(parents=True, exist_ok=True)
    for f0 in range(0, n, per_file):
        lines = []
        for i in range(f0, min(n, f0 + per_file)):
            text = " ".join(PARAGRAPHS[i % len(PARAGRAPHS)].format(n=100 + 37 * i).split()[:words])
            lines.append(json.dumps({"text": f"Passage {i}: {text}", "id": f"p{i}"}))
        (root / f"part-{f0 // per_file:05d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_ray(docs: Path, mem: Path, model: Any, embedder: Any, actors: int, dtype: str, max_tokens: int,
            fsync: bool = True) -> dict:
    from gist_memory.distributed import ray_ingest

    with RssSampler() as rss:
        t0 = time.perf_counter()
        s = ray_ingest(docs, mem, model, embedder=embedder, storage_dtype=dtype, num_actors=actors,
                       max_passage_tokens=max_tokens, progress=False, fsync=fsync)
        dt = time.perf_counter() - t0
    return {"passages": s.passages_added, "seconds": dt, "per_s": s.passages_added / dt,
            "bytes": s.state_bytes_written, "driver_rss": rss.driver, "workers_rss": rss.workers,
            "batch": s.batch_size, "fsync": fsync}


def run_single(docs: Path, mem: Path, model: Any, embedder: Any, dtype: str, max_tokens: int) -> dict:
    from gist_memory.store import GistMemory, ingest

    with RssSampler() as rss:
        t0 = time.perf_counter()
        m = GistMemory(model, mem, embedder=embedder, storage_dtype=dtype)
        s = ingest(docs, m, max_passage_tokens=max_tokens, batch_size=8, commit_every=32, show_progress=False)
        m.close()
        dt = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in (mem / "states").rglob("*.safetensors"))
    return {"passages": s.passages_added, "seconds": dt, "per_s": s.passages_added / dt, "bytes": size,
            "driver_rss": rss.driver, "workers_rss": 0, "batch": 8, "fsync": True}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actors", default="1,2", help="Actor counts to measure (default 1,2).")
    ap.add_argument("--real-passages", type=int, default=50)
    ap.add_argument("--fake-passages", type=int, default=100_000, help="Fake passages, fsync off (default 100k).")
    ap.add_argument("--fake-fsync-passages", type=int, default=10_000,
                    help="Fake passages with fsync on, as ingest writes by default (default 10k; 0: skip).")
    ap.add_argument("--fake-words", type=int, default=35, help="Words per fake passage (default 35).")
    ap.add_argument("--storage-dtype", default="int8")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-fake", action="store_true")
    ap.add_argument("--work", default=None, help="Scratch folder (default: a temp folder, removed at the end).")
    ap.add_argument("--json", default=None, help="Also write the rows as JSON to this file.")
    args = ap.parse_args(argv)
    actor_counts = [int(x) for x in args.actors.split(",") if x.strip()]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    from gist_memory.testing import FakeGistModel, HashingEmbedder

    work = Path(args.work or tempfile.mkdtemp(prefix="gm-bench-ray-"))
    ray_tmp = tempfile.mkdtemp(prefix="gmray", dir="/tmp")
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "HF_HUB_OFFLINE",
                                     "TOKENIZERS_PARALLELISM") if k in os.environ}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmp,
             runtime_env={"env_vars": {**env, "PYTHONPATH": str(ROOT)}})
    rows: list[dict] = []
    try:
        if not args.skip_real:
            docs = work / "real-docs"
            write_corpus(docs, args.real_passages, per_file=10, words=60)
            from gist_memory._options import load_model

            gm, desc = load_model(device="cpu")
            r = run_single(docs, work / "real-single", gm, None, args.storage_dtype, 256)
            rows.append({"part": "real", "how": "single process", "actors": "-", **r})
            print(f"real, single process: {r['per_s']:.2f} passages/s ({desc})", file=sys.stderr, flush=True)
            del gm
            for n in actor_counts:
                r = run_ray(docs, work / f"real-ray-{n}", {"device": "cpu"}, None, n, args.storage_dtype, 256)
                rows.append({"part": "real", "how": "ray", "actors": n, **r})
                print(f"real, {n} actor(s): {r['per_s']:.2f} passages/s", file=sys.stderr, flush=True)
        if not args.skip_fake:
            fake = functools.partial(FakeGistModel, name="fake-smollm2-shape", num_layers=30, num_heads=3,
                                     head_dim=64, tokens_per_row=4)
            for n_passages, fsync in ((args.fake_passages, False), (args.fake_fsync_passages, True)):
                if not n_passages:
                    continue
                docs = work / f"fake-docs-{n_passages}"
                write_corpus(docs, n_passages, per_file=1000, words=args.fake_words)
                for n in actor_counts:
                    mem = work / f"fake-ray-{n}"
                    r = run_ray(docs, mem, fake, HashingEmbedder(), n, args.storage_dtype, 256, fsync=fsync)
                    rows.append({"part": "fake", "how": "ray", "actors": n, **r})
                    print(f"fake, {n_passages} passages, fsync {fsync}, {n} actor(s): {r['per_s']:.1f} passages/s",
                          file=sys.stderr, flush=True)
                    shutil.rmtree(mem, ignore_errors=True)  # the states of 100k passages take GBs
                shutil.rmtree(docs, ignore_errors=True)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print("| model | how | actors | passages | batch | fsync | seconds | passages/s | state MiB written "
          "| driver peak RSS MiB | workers peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        model = "SmolLM2-135M (bundled)" if r["part"] == "real" else "fake states, same shapes"
        print(f"| {model} | {r['how']} | {r['actors']} | {r['passages']:,} | {r['batch']} | "
              f"{'on' if r['fsync'] else 'off'} | {r['seconds']:.1f} "
              f"| {r['per_s']:.1f} | {_mib(r['bytes'])} | {_mib(r['driver_rss'])} | "
              f"{_mib(r['workers_rss']) if r['workers_rss'] else '-'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
