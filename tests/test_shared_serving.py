"""Several serving processes over one shared state store (issue 14, "States in shared storage").

A writer process compresses passages into a memory whose states live in a shared store (a local folder reached
through fsspec, standing in for S3, with Redis in front of it when `redis-server` is installed); then two
`gist-memory serve` processes on their own 127.0.0.1 ports, each with a copy of the memory's docstore and its own
local cache tier, answer a question from those states. Each server's `/api/info` reports, per memory, the states
it computed (`compressed`, `recomputed`) and where its store found them (`hits_shared`, ...): both must have read
every state from the shared tiers and computed none.

The model is the tiny random Llama (`tiny_base_dir`) with the training-free `pool+anchors` compressor, loaded by
every process through the same CLI options, so all three have one model fingerprint.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="gist-memory serve needs fastapi and uvicorn")
pytest.importorskip("uvicorn", reason="gist-memory serve needs fastapi and uvicorn")
pytest.importorskip("fsspec", reason="the shared store is reached through fsspec")

PASSAGES = {
    "velmora": "The Velmora lighthouse was built in 1887 by the engineer Ada Lindqvist. Its lamp stands 42 metres "
               "above the sea.",
    "station": "The Prythwaite weather station sits at an altitude of 4,301 metres. It was founded in 1931 by "
               "Henrik Sollum.",
    "tram": "The Zorbluth tram depot opened in 1902. Its trams were painted green and copper.",
    "bridge": "The Orvik bridge opened in 1911 and crosses the Skarholm strait in three spans.",
}
QUESTION = "Who built the Velmora lighthouse?"

_WRITER = """
import json, sys
from gist_memory._options import load_model
from gist_memory.store import GistMemory

base, path, states, passages = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
gm, _ = load_model(base=base, compressor="pool+anchors")
mem = GistMemory(gm, path, states=states)
ids = mem.add_texts(list(passages.values()), ids=list(passages), show_progress=False)
out = {"ids": ids, "keys": {i: mem.get(i).state_key for i in ids}, "compressed": mem.stats["compressed"],
       "storage_dtype": mem.storage_dtype, "fingerprint": gm.fingerprint}
mem.close()
print(json.dumps(out))
"""

_CLI = "from gist_memory.cli import main; main()"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _get(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture
def redis_url(tmp_path):
    """A throwaway redis-server on a free port, or None where there is none (the test then uses fsspec alone)."""
    binary = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        redis = None
    if binary is None or redis is None:
        yield None
        return
    port = _free_port()
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, f"redis-server exited with {proc.returncode}"
                time.sleep(0.05)
        yield url + "?prefix=shared-serving:"
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_two_servers_answer_from_states_a_third_process_wrote(tmp_path, tiny_base_dir, redis_url):
    env = _env()
    shared = [f"local://{tmp_path / 'shared-states'}"]  # fsspec's local file system: the S3 code path, on disk
    if redis_url:
        shared = [redis_url, *shared]  # Redis in front, as the hot tier replicas share
    writer_mem = tmp_path / "writer"
    w = subprocess.run([sys.executable, "-c", _WRITER, str(tiny_base_dir), str(writer_mem), json.dumps(shared),
                        json.dumps(PASSAGES)], env=env, capture_output=True, text=True, timeout=180)
    assert w.returncode == 0, w.stderr[-3000:]
    wrote = json.loads(w.stdout.strip().splitlines()[-1])
    assert wrote["ids"] == list(PASSAGES) and wrote["compressed"] == len(PASSAGES)
    assert not (writer_mem / "states").exists()  # the states went to the shared store only
    on_disk = list((tmp_path / "shared-states" / "objects").rglob("*.safetensors"))
    assert sorted(p.stem for p in on_disk) == sorted(wrote["keys"].values())

    servers = []
    try:
        for i in range(2):
            mem = tmp_path / f"replica{i}"
            shutil.copytree(writer_mem, mem)  # each replica has its own copy of the docstore and index
            port = _free_port()
            tiers = ",".join([str(tmp_path / f"cache{i}"), *shared])  # own local disk first, then the shared tiers
            cmd = [sys.executable, "-c", _CLI, "serve", "--store", str(mem), "--states", tiers, "--port", str(port),
                   "-k", "2", "--max-new-tokens", "4", "--base", str(tiny_base_dir), "--compressor", "pool+anchors"]
            log = open(tmp_path / f"serve{i}.log", "w")  # noqa: SIM115 - closed below
            servers.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), port, log, i))
        deadline = time.monotonic() + 150
        for proc, port, _, i in servers:
            while True:
                try:
                    info = _get(f"http://127.0.0.1:{port}/api/info", timeout=5)
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    log_text = (tmp_path / f"serve{i}.log").read_text()
                    assert proc.poll() is None, f"serve {i} exited with {proc.returncode}:\n{log_text[-3000:]}"
                    assert time.monotonic() < deadline, f"serve {i} did not start:\n{log_text[-3000:]}"
                    time.sleep(0.5)
            assert info["passages"] == len(PASSAGES)
            assert info["states"]["default"]["compressed"] == 0

        answers = []
        for _proc, port, _, i in servers:
            body = {"model": "gist-memory:default", "max_tokens": 4,
                    "messages": [{"role": "user", "content": QUESTION}]}
            res = _post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
            u = res["usage"]
            ids = [s["id"] for s in res["sources"]]
            assert ids[0] == "velmora" and len(ids) == 2, ids
            assert u["passages"] == 2 and 0 < u["state_positions"] < u["state_raw_tokens"]  # read states, not text
            stats = _get(f"http://127.0.0.1:{port}/api/info")["states"]["default"]
            # nothing recomputed: both states came from the shared tiers (Redis or the fsspec folder)
            assert stats["compressed"] == 0 and stats["recomputed"] == 0, stats
            assert stats["hits_shared"] == 2 and stats["misses"] == 0 and stats["corrupt"] == 0, stats
            # ... and were copied into this replica's own local tier on the way back
            local = {p.stem for p in (tmp_path / f"cache{i}" / "objects").rglob("*.safetensors")}
            assert local == {wrote["keys"][x] for x in ids}
            answers.append((ids, res["choices"][0]["message"]["content"]))
        assert answers[0] == answers[1]  # same model, same states: the same answer from either replica

        # a second question on one replica is served from its RAM / local disk, still computing nothing
        port = servers[0][1]
        _post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
        stats = _get(f"http://127.0.0.1:{port}/api/info")["states"]["default"]
        assert stats["compressed"] == 0 and stats["recomputed"] == 0 and stats["hits_shared"] == 2, stats
    finally:
        for proc, _, log, _ in servers:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def test_serve_refuses_states_without_a_store_and_an_unknown_dtype(tmp_path):
    from typer.testing import CliRunner

    from gist_memory import cli

    runner = CliRunner()
    for args, needle in ((["serve", "--states", str(tmp_path / "s")], "--states needs --store"),
                         (["serve", "--store", str(tmp_path / "m"), "--storage-dtype", "int3"], "--storage-dtype")):
        res = runner.invoke(cli.app, args)
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and needle in errors[0], res.stderr
    assert not (tmp_path / "m").exists()  # refused before any memory was created (or model loaded)
