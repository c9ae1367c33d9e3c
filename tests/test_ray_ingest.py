"""Ray ingest (gist_memory.distributed): on a local Ray (2 CPUs, no GPU) it gives what the single-process ingest
gives (same ids and docstore rows in the same order, the same state tensors and metadata, the same search
results), survives a worker that dies mid-run and a driver that stops mid-run (the rerun loses and duplicates
nothing), and refuses bad addresses in seconds.

State entries are compared by their safetensors header (parsed: every tensor's dtype, shape and offsets, the
checksum over all tensor bytes, the key and the state header) and their data bytes: safetensors writes the
metadata keys in an order that changes from process to process, so two single-process runs differ there too.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sqlite3
import struct
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gist_memory.testing import HashingEmbedder, tiny_gist_model

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 24
BATCH = 4


# ---- a local Ray for the module --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray: 2 CPUs, no GPU, no dashboard, its session files under a short /tmp folder (Unix socket paths
    must stay short); shut down at the end. Skipped, with the reason, where Ray is missing or does not start."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        pytest.skip(f"ray[data] is not installed ({e})")
    if ray.is_initialized():
        pytest.skip("this process is already connected to another Ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
    tmp = tempfile.mkdtemp(prefix="gmray", dir="/tmp")
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, _temp_dir=tmp,
                 runtime_env={"env_vars": env})
    except Exception as e:  # noqa: BLE001 - any reason Ray cannot start here is a skip, with the reason
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"a local Ray did not start: {type(e).__name__}: {e}")
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


# ---- the corpus and the reference ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    """A few dozen passages: text files (one repeats a sentence), markdown, jsonl records with ids, metadata and
    bad lines, a binary file. No passage text occurs in two files (see `ray_ingest`'s docstring)."""
    root = tmp_path_factory.mktemp("ray-docs")
    for i in range(4):
        sents = [f"File{i} sentence {j} of file {i} names Topic{j}x{i} and the number {i * 100 + j}."
                 for j in range(8)]
        sents.insert(4, f"File{i} says this twice.")
        sents.append(f"File{i} says this twice.")
        (root / f"f{i}.txt").write_text(" ".join(sents), encoding="utf-8")
    (root / "notes.md").write_text("# Notes\n\nThe Prythwaite station sits at 4,301 metres. It was built in 1931.\n")
    recs = [json.dumps({"text": f"Record {k} says Bergen has {k + 3} bridges.", "id": f"rec-{k}",
                        "metadata": {"k": k, "tags": ["a", "b"]}}) for k in range(5)]
    recs += ['{"text": ""}', "not json", json.dumps({"text": "A record without an id about Oslo."})]
    (root / "records.jsonl").write_text("\n".join(recs), encoding="utf-8")
    (root / "blob.txt").write_bytes(b"\x89PNG\x00\x00binary")
    return root


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The actors run with one torch thread (OMP_NUM_THREADS=1 above); the driver's own compression (the
    single-process reference, states the driver writes) must too: float sums depend on the thread count, and
    the tests compare bytes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _factory(base: str):
    return functools.partial(tiny_gist_model, base, anchors="capitalized")


@pytest.fixture(scope="module")
def reference(docs, tiny_base_dir, tmp_path_factory):
    """The single-process ingest of `docs` (as `gist-memory ingest` batches it: groups of 4 batches)."""
    from gist_memory.store import GistMemory, ingest

    path = tmp_path_factory.mktemp("ref") / "mem"
    mem = GistMemory(_factory(tiny_base_dir)(), path, embedder=HashingEmbedder())
    summary = ingest([docs, docs / "missing.txt"], mem, max_passage_tokens=MAX_TOKENS, batch_size=BATCH,
                     commit_every=4 * BATCH, show_progress=False)
    mem.close()
    assert summary.passages_added > 30
    return path, summary


def _rows(path: Path) -> list[tuple]:
    con = sqlite3.connect(f"file:{path / 'memory.sqlite'}?mode=ro", uri=True)
    try:
        return con.execute("SELECT row, id, text, metadata, text_hash, state_key, embedding FROM docs "
                           "ORDER BY row").fetchall()
    finally:
        con.close()


def _entry(states: Path, key: str) -> tuple[dict, bytes]:
    """(parsed safetensors header, data bytes) of the state entry under `key` in the store folder `states`."""
    from gist_memory.store.backends.local import LocalFolderBackend

    data = Path(LocalFolderBackend(states).path_for(key)).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _assert_same_memory(got: Path, ref: Path, exact_vectors: bool = True, states: Path | None = None) -> None:
    """Same docstore rows in the same order (row numbers, ids, texts, metadata, text hashes, state keys and, with
    `exact_vectors`, embedding bytes), the same state entries, and nothing else in the store.

    `exact_vectors=False` for a sentence-transformers embedder: it pads each batch to its longest text, and the
    two ingests embed in different batches, so vectors agree to float rounding only. `states`: where `got` keeps
    its states (default `got/states`)."""
    import numpy as np

    rows, want = _rows(got), _rows(ref)
    assert [r[1] for r in rows] == [r[1] for r in want]  # same ids, same order
    if exact_vectors:
        assert rows == want
    else:
        assert [r[:6] for r in rows] == [r[:6] for r in want]
        for r, w in zip(rows, want):
            np.testing.assert_allclose(np.frombuffer(r[6], np.float32), np.frombuffer(w[6], np.float32), atol=2e-6)
    states = states or got / "states"
    for r in want:
        assert _entry(states, r[5]) == _entry(ref / "states", r[5]), r[1]
    # nothing else in the store: every state once, no leftovers of a killed run
    from gist_memory.store.backends.local import LocalFolderBackend

    assert sorted(LocalFolderBackend(states).list()) == sorted({r[5] for r in want})


def _same_search(got: Path, ref: Path, model) -> None:
    from gist_memory.store import GistMemory

    a = GistMemory.load(got, model=model, embedder=HashingEmbedder())
    b = GistMemory.load(ref, model=model, embedder=HashingEmbedder())
    try:
        for q in ("Topic3x2 number", "bridges in Bergen", "Prythwaite altitude", "says this twice", "Oslo"):
            ha, hb = a.search(q, k=5), b.search(q, k=5)
            assert [(h.id, h.score) for h in ha] == [(h.id, h.score) for h in hb]
        top = a.search("File2 sentence 5 of file 2", k=1)[0]
        assert torch_equal(a.states_for([top])[0], b.states_for([top])[0])
    finally:
        a.close()
        b.close()


def torch_equal(x, y) -> bool:
    import torch

    return torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) and torch.equal(x.positions, y.positions)


# ---- the tests ---------------------------------------------------------------------------------------------------
def test_ray_ingest_equals_single_process(ray_cluster, docs, reference, tiny_base_dir, tmp_path):
    from gist_memory.distributed import ray_ingest

    ref_path, ref_summary = reference
    path, states = tmp_path / "mem", tmp_path / "shared-states"  # states kept outside the memory folder
    s = ray_ingest([docs, docs / "missing.txt"], path, _factory(tiny_base_dir), embedder=HashingEmbedder(),
                   states=str(states), max_passage_tokens=MAX_TOKENS, batch_size=BATCH, num_actors=2,
                   progress=False)
    _assert_same_memory(path, ref_path, states=states)
    assert not (path / "states").exists()
    _same_search(path, ref_path, _factory(tiny_base_dir)())
    assert s.passages_added == ref_summary.passages_added and s.passages_present == 0
    assert s.tokens_added == ref_summary.tokens_added and s.files_read == ref_summary.files_read
    assert sorted(s.files_skipped) == sorted(ref_summary.files_skipped)  # blob.txt (binary), missing.txt
    assert sorted(s.records_skipped) == sorted(ref_summary.records_skipped)
    # a text repeated in a file (each text file repeats a sentence) is compressed once, with its first copy
    keys = [r[5] for r in _rows(ref_path)]
    assert s.states_compressed == len(set(keys)) < len(keys)
    assert s.states_found == s.passages_added - s.states_compressed
    assert s.state_bytes_written == sum(f.stat().st_size for f in (states / "objects").rglob("*.safetensors"))
    assert s.actors == 2 and s.device == "cpu" and s.batch_size == BATCH


class _Stop(Exception):
    """Raised from `on_progress`: the driver stops between two commits, as a killed job would."""


class CrashOnce:
    """The tiny model, whose compression process dies (os._exit) on its third batch the first time round."""

    def __init__(self, base: str, marker: str) -> None:
        self.inner = tiny_gist_model(base, anchors="capitalized")
        self.marker, self.calls = marker, 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def compress(self, texts, **kw):
        self.calls += 1
        if self.calls == 3 and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return self.inner.compress(texts, **kw)


def test_dead_worker_and_stopped_driver_then_rerun_lose_and_duplicate_nothing(ray_cluster, docs, reference,
                                                                              tiny_base_dir, tmp_path):
    from gist_memory.distributed import ray_ingest

    ref_path, ref_summary = reference
    total = ref_summary.passages_added
    path, marker = tmp_path / "mem", tmp_path / "crashed"
    crashing = functools.partial(CrashOnce, tiny_base_dir, str(marker))
    seen: list[int] = []

    def stop_half_way(summary) -> None:
        seen.append(summary.passages_added)
        if summary.passages_added >= total // 2:
            raise _Stop

    with pytest.raises(_Stop):  # a worker dies on its third batch (Ray restarts it); the driver stops half-way
        ray_ingest(docs, path, crashing, embedder=HashingEmbedder(), max_passage_tokens=MAX_TOKENS,
                   batch_size=BATCH, num_actors=1, progress=False, on_progress=stop_half_way)
    assert marker.exists(), "no worker died"
    assert int(marker.read_text()) != os.getpid()  # it was a worker process, not this one
    done = len(_rows(path))
    assert 0 < total // 2 <= done < total
    assert not list(path.glob("states/.ray-ingest-*"))  # the run's token is gone

    # the rerun, with the driver writing the states this time (as when the workers cannot see the store)
    again = ray_ingest(docs, path, _factory(tiny_base_dir), embedder=HashingEmbedder(),
                       max_passage_tokens=MAX_TOKENS, batch_size=BATCH, num_actors=1, progress=False,
                       write_states="driver")
    assert again.passages_present == done and again.passages_added == total - done
    assert again.states_compressed < total - 4  # what the first run committed is not compressed again
    _assert_same_memory(path, ref_path)  # every passage once, in order, with the same state bytes


def test_cli_ingest_ray_equals_cli_ingest(ray_cluster, docs, tiny_base_dir, tmp_path):
    """`gist-memory ingest --ray ADDRESS --actors 1` (this test's cluster) gives what `gist-memory ingest` gives;
    the `--ray` alone means a local Ray (here: the connected one)."""
    from gist_memory import cli

    base = ["--base", tiny_base_dir, "--max-passage-tokens", str(MAX_TOKENS), "--json"]
    out_ref = _run_cli(cli, ["ingest", str(docs), "--store", str(tmp_path / "a"), *base])
    out_ray = _run_cli(cli, ["ingest", str(docs), "--store", str(tmp_path / "b"), *base, "--actors", "1", "--ray"])
    for k in ("passages_added", "tokens_added", "files_read", "records_skipped"):
        assert out_ray[k] == out_ref[k], k
    assert out_ray["actors"] == 1 and out_ray["states_compressed"] > 0 and out_ray["state_bytes_written"] > 0
    _assert_same_memory(tmp_path / "b", tmp_path / "a", exact_vectors=False)
    assert json.loads((tmp_path / "b" / "model.json").read_text()) == json.loads(
        (tmp_path / "a" / "model.json").read_text())


def _run_cli(cli, argv: list[str]) -> dict:
    """`gist-memory ARGV` through `cli.main` (which gives `--ray` its optional address); its JSON output."""
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit) as ex:
        cli.main(argv)
    assert ex.value.code in (0, None), buf.getvalue()
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def test_parquet_rows_are_read_like_jsonl_records(ray_cluster, tmp_path):
    """Parquet (Ray ingest only): rows become passages as jsonl records do (ids, chunks, skipped rows), with
    `row` for `line` and other scalar columns in the metadata; the chunk stage flags passages already present."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gist_memory.distributed import stages
    from gist_memory.store.ingest import Chunker, IngestSummary, _passages_of_file

    recs = [
        {"text": "Alpha record about Oslo and its harbour.", "id": "a", "metadata": json.dumps({"lang": "en"}),
         "title": "T1"},
        {"text": " ".join(f"Beta sentence {i} is here." for i in range(6)), "id": None, "metadata": None,
         "title": "T2"},
        {"text": "", "id": "c", "metadata": None, "title": "T3"},
        {"text": "Gamma has bad metadata.", "id": "g", "metadata": "[1]", "title": "T4"},
    ]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "r.parquet")
    twin = [{k: (json.loads(v) if k == "metadata" and v else v) for k, v in r.items() if k != "title" and v is not None}
            for r in recs]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in twin), encoding="utf-8")
    chunker = Chunker(12)  # whitespace words
    s_pq, s_js = IngestSummary(), IngestSummary()
    got = stages.parquet_passages(str(tmp_path / "r.parquet"), chunker, s_pq)
    want = _passages_of_file(str(tmp_path / "r.jsonl"), (tmp_path / "r.jsonl").read_text(), chunker, s_js)
    assert [p.text for p in got] == [p.text for p in want] and len(got) > 3
    assert [p.id for p in got if not p.id.startswith(str(tmp_path))] == ["a"]
    assert [p.id.split(":", 1)[1] for p in got[1:]] == [p.id.split(":", 1)[1] for p in want[1:]]  # row = line
    assert got[0].metadata == {"source": str(tmp_path / "r.parquet"), "row": 1, "chunk": 0, "title": "T1", "lang": "en"}
    assert len(s_pq.records_skipped) == len(s_js.records_skipped) == 2 and s_pq.files_read == 1
    # the chunk stage: units of `batch_size`, passages already in the memory flagged, then the file's row
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    shared = stages.Shared(ray_cluster.put(None), ray_cluster.put(stages.id_digests(["a", "zzz"])))
    batch = pa.table({"path": [str(tmp_path / "r.parquet"), str(tmp_path / "bad.parquet")]})
    out = pa.concat_tables(stages.chunk_files(batch, shared=shared, max_passage_tokens=12, batch_size=2)).to_pylist()
    units = [r for r in out if r["kind"] == "unit"]
    assert [len(u["ids"]) for u in units] == [2, 2] and units[0]["present"] == [True, False]
    files = [json.loads(r["info"]) for r in out if r["kind"] == "file"]
    assert [f["passages"] for f in files] == [4, 0] and files[0]["passages_present"] == 1
    assert "not a readable Parquet file" in files[1]["files_skipped"][0][1]


# ---- bad input, no cluster needed -----------------------------------------------------------------------------------
def test_addresses_are_checked_in_seconds():
    from gist_memory.distributed import check_address

    assert check_address(None) is None and check_address("local") is None and check_address("auto") == "auto"
    with pytest.raises(ValueError, match="not a Ray address"):
        check_address("docs/")
    with pytest.raises(ValueError, match="not a Ray address"):
        check_address("ray://")
    t0 = time.perf_counter()
    for addr in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        with pytest.raises(ConnectionError, match="no Ray cluster answers at"):
            check_address(addr)
    assert time.perf_counter() - t0 < 15


def test_cli_refuses_a_bad_address_and_actors_without_ray(docs, tmp_path):
    from typer.testing import CliRunner

    from gist_memory import cli

    runner = CliRunner()
    for args, needle in [
        (["--ray", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1"),
        (["--ray", str(docs)], "is not a Ray address"),
        (["--actors", "2"], "--actors needs --ray"),
    ]:
        res = runner.invoke(cli.app, ["ingest", str(docs), "--store", str(tmp_path / "m"), *args])
        assert res.exit_code == 1, res.output
        assert "Traceback" not in res.output and needle in res.stderr, res.stderr
    assert not (tmp_path / "m").exists()  # refused before anything was created or loaded


def test_ray_ingest_refuses_bad_input_before_starting_ray(tmp_path):
    from gist_memory.distributed import ray_ingest

    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        ray_ingest(tmp_path / "nope", tmp_path / "mem")
    with pytest.raises(ValueError, match="nothing to ingest"):
        ray_ingest(tmp_path, tmp_path / "mem")
    with pytest.raises(ValueError, match="write_states"):
        ray_ingest(tmp_path, tmp_path / "mem", write_states="somewhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        ray_ingest(tmp_path, tmp_path / "file")
    from gist_memory.testing import FakeGistModel

    with pytest.raises(ValueError, match="not a loaded model"):  # each actor loads its own
        ray_ingest(tmp_path, tmp_path / "mem", FakeGistModel())


def test_importing_the_package_loads_neither_ray_nor_torch():
    import subprocess

    code = ("import sys, gist_memory.distributed as d; d.check_address('local'); "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
