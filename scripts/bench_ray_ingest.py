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

Columns: seconds and passages/s of the whole call (Ray itself is up already; the call loads the model in every
actor), seconds to the first commit and passages/s after it (the pipeline's rate once the models are loaded),
MiB of state entries written, peak RSS of the driver process and of the Ray worker processes (sampled every 0.2 s; "workers" is the
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
    """Peak RSS of this process and of its Ray worker processes (descendants titled `ray::...`), every 0.2 s."""

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
            for p in self.me.children(recursive=True):
                try:
                    cmd = " ".join(p.cmdline())
                    if cmd.startswith("ray::") and "IDLE" not in cmd:
                        total += p.memory_info().rss
                except self.psutil.Error:
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
    from gist_memory.eval.bench_store import PARAGRAPHS

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

    first: list[tuple[float, int]] = []

    def seen(summary: Any) -> None:  # the first commit: the model is loaded and rows flow
        if not first and summary.passages_added:
            first.append((time.perf_counter(), summary.passages_added))

    with RssSampler() as rss:
        t0 = time.perf_counter()
        s = ray_ingest(docs, mem, model, embedder=embedder, storage_dtype=dtype, num_actors=actors,
                       max_passage_tokens=max_tokens, progress=False, fsync=fsync, on_progress=seen)
        t1 = time.perf_counter()
        dt = t1 - t0
    t_first, n_first = first[0] if first else (t1, s.passages_added)
    steady = (s.passages_added - n_first) / (t1 - t_first) if t1 > t_first else 0.0
    return {"passages": s.passages_added, "seconds": dt, "per_s": s.passages_added / dt,
            "startup": t_first - t0, "steady_per_s": steady,
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
            "startup": None, "steady_per_s": None,
            "driver_rss": rss.driver, "workers_rss": 0, "batch": 8, "fsync": True}


FAKE = {"name": "fake-smollm2-shape", "num_layers": 30, "num_heads": 3, "head_dim": 64, "tokens_per_row": 4}


def run_row(spec: dict) -> dict:
    """One measurement, in a fresh process (so the driver's peak RSS is this row's): `spec` names the part
    (real/fake), how (single/ray), actors, fsync, the corpus folder, the scratch folder and the storage dtype."""
    from gist_memory.testing import FakeGistModel, HashingEmbedder

    docs, mem, dtype = Path(spec["docs"]), Path(spec["mem"]), spec["dtype"]
    if spec["part"] == "real":
        model: Any = {"device": "cpu"}
        embedder = None
    else:
        model = functools.partial(FakeGistModel, **FAKE)
        embedder = HashingEmbedder()
    if spec["how"] == "single":
        from gist_memory._options import load_model

        gm = load_model(device="cpu")[0] if spec["part"] == "real" else model()
        return run_single(docs, mem, gm, embedder, dtype, 256)
    import ray

    ray_tmp = tempfile.mkdtemp(prefix="gmray", dir="/tmp")
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "HF_HUB_OFFLINE",
                                     "TOKENIZERS_PARALLELISM") if k in os.environ}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmp,
             runtime_env={"env_vars": {**env, "PYTHONPATH": str(ROOT)}})
    try:
        return run_ray(docs, mem, model, embedder, spec["actors"], dtype, 256, fsync=spec["fsync"])
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


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
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.row:
        print(json.dumps(run_row(json.loads(args.row))))
        return 0

    import subprocess

    actor_counts = [int(x) for x in args.actors.split(",") if x.strip()]
    work = Path(args.work or tempfile.mkdtemp(prefix="gm-bench-ray-"))
    plan: list[dict] = []
    if not args.skip_real:
        docs = work / "real-docs"
        write_corpus(docs, args.real_passages, per_file=10, words=60)
        plan.append({"part": "real", "how": "single", "actors": "-", "fsync": True, "docs": str(docs)})
        plan += [{"part": "real", "how": "ray", "actors": n, "fsync": True, "docs": str(docs)} for n in actor_counts]
    if not args.skip_fake:
        for n_passages, fsync in ((args.fake_passages, False), (args.fake_fsync_passages, True)):
            if n_passages:
                docs = work / f"fake-docs-{n_passages}"
                write_corpus(docs, n_passages, per_file=1000, words=args.fake_words)
                plan += [{"part": "fake", "how": "ray", "actors": n, "fsync": fsync, "docs": str(docs)}
                         for n in actor_counts]
    rows: list[dict] = []
    try:
        for i, spec in enumerate(plan):
            spec = {**spec, "mem": str(work / f"mem-{i}"), "dtype": args.storage_dtype}
            r = subprocess.run([sys.executable, __file__, "--row", json.dumps(spec)], capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"row {spec} failed")
            rows.append({**spec, **json.loads(r.stdout.strip().splitlines()[-1])})
            got = rows[-1]
            print(f"{spec['part']}, {spec['how']}, {spec['actors']} actor(s), {got['passages']} passages, fsync "
                  f"{spec['fsync']}: {got['per_s']:.1f} passages/s", file=sys.stderr, flush=True)
            shutil.rmtree(spec["mem"], ignore_errors=True)  # the states of 100k passages take GBs
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print("| model | how | actors | passages | batch | fsync | seconds | to first commit s | passages/s "
          "| after first commit | state MiB written | driver peak RSS MiB | workers peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        model = "SmolLM2-135M (bundled)" if r["part"] == "real" else "fake states, same shapes"
        how = "single process" if r["how"] == "single" else "ray"
        print(f"| {model} | {how} | {r['actors']} | {r['passages']:,} | {r['batch']} | "
              f"{'on' if r['fsync'] else 'off'} | {r['seconds']:.1f} | "
              f"{'-' if r['startup'] is None else format(r['startup'], '.1f')} "
              f"| {r['per_s']:.1f} | {'-' if r['steady_per_s'] is None else format(r['steady_per_s'], '.1f')} "
              f"| {_mib(r['bytes'])} | {_mib(r['driver_rss'])} | "
              f"{_mib(r['workers_rss']) if r['workers_rss'] else '-'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
