"""Storage backends of GistStore: the contract on every backend (local folder, RAM, fsspec memory://, S3 through
s3fs against a local moto server, Redis against a local redis-server), checksums and fingerprints on each,
tiering (RAM -> local disk -> shared), URLs, and a second process reading what another wrote.

The S3 tests start moto's server on 127.0.0.1 (as s3fs tests itself) and skip when moto/s3fs are not installed;
the Redis tests start Debian's `redis-server` on a free 127.0.0.1 port and skip when the binary or the `redis`
package is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import torch

from gist_memory.store import GistStore
from gist_memory.store.backends import LocalFolderBackend, MemoryBackend, StorageBackend, open_backend
from gist_memory.store.testing import FakeGistModel

TEXTS = [f"Shared passage {i}: Zurich, code Q{i * 11}, year {1950 + i}." for i in range(5)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- servers -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("s3fs", reason="S3 backend tests need s3fs (pip install s3fs)")
    server_mod = pytest.importorskip("moto.server", reason="S3 backend tests need moto[server] (a local S3)")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    endpoint = f"http://127.0.0.1:{port}"
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.mkdir("gist-test")
    try:
        yield {"endpoint": endpoint, "env": env, "options": {"client_kwargs": {"endpoint_url": endpoint}}}
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    pytest.importorskip("redis", reason="Redis backend tests need the redis package (pip install redis)")
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("Redis backend tests need Debian's redis-server (apt-get install redis-server)")
    import redis

    port = _free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(d), "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    pytest.skip(f"redis-server exited with {proc.returncode}")
                time.sleep(0.05)
        else:
            pytest.skip("redis-server did not answer within 5 s")
        yield url
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


BACKENDS = ["local", "ram", "fsspec-memory", "s3", "redis"]


@pytest.fixture(params=BACKENDS)
def spec(request, tmp_path):
    """A fresh, empty backend spec (URL or object) of each kind, and its kind."""
    kind = request.param
    run = uuid.uuid4().hex[:12]
    if kind == "local":
        return kind, str(tmp_path / "store"), None
    if kind == "ram":
        return kind, MemoryBackend(), None
    if kind == "fsspec-memory":
        return kind, f"memory://gist-{run}", None
    if kind == "s3":
        srv = request.getfixturevalue("s3_server")
        return kind, f"s3://gist-test/{run}", srv["options"]
    srv = request.getfixturevalue("redis_server")
    return kind, f"{srv}?prefix=gist-{run}:", None


@pytest.fixture(scope="module")
def model() -> FakeGistModel:
    return FakeGistModel(num_layers=2, num_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def states(model):
    return model.compress(TEXTS)


def _backend(spec_) -> StorageBackend:
    _, s, opts = spec_
    return open_backend(s, storage_options=opts)


# ---- the contract ------------------------------------------------------------------------------------------------
def test_backend_contract(spec):
    b = _backend(spec)
    k1, k2, k3 = ("a" * 64), ("b" * 63 + "c"), ("0123" * 16)
    assert not b.exists(k1) and b.get(k1) is None and list(b.list()) == []
    assert b.put(k1, b"one") is True
    assert b.put(k1, b"other") is False and b.get(k1) == b"one"  # kept unless overwrite
    assert b.put(k1, b"uno", overwrite=True) is True and b.get(k1) == b"uno"
    assert sorted(b.put_many({k2: b"two", k3: b"three", k1: b"x"})) == sorted([k2, k3])
    assert b.get(k1) == b"uno"
    assert b.get_many([k3, "f" * 64, k1]) == [b"three", None, b"uno"]
    assert b.exists_many([k1, "f" * 64]) == [True, False]
    assert sorted(b.list()) == sorted([k1, k2, k3]) and b.total_bytes() == len(b"unotwothree")
    assert b.delete(k2) is True and b.delete(k2) is False and not b.exists(k2)
    big = os.urandom(3 * 2**20)  # a large object is written whole
    assert b.put(k2, big) and b.get(k2) == big
    b.close()


def test_backend_gc_removes_orphans(spec):
    b = _backend(spec)
    keep, drop = "1" * 64, "2" * 64
    b.put_many({keep: b"k", drop: b"d"})
    assert b.gc({keep}, min_age_s=3600)["orphans"] == 0  # too young (redis: not idle long enough)
    assert b.gc({keep}, min_age_s=0)["orphans"] == 1
    assert list(b.list()) == [keep]


# ---- GistStore on every backend ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_store_round_trip_on_backend(spec, states, dtype):
    kind, s, opts = spec
    store = GistStore(s, storage_dtype=dtype, max_bytes_in_ram=0, storage_options=opts)
    keys = store.batched_put(states)
    assert store.batched_put(states) == keys and store.stats["puts"] == len(states)  # stored once
    fresh = GistStore(s, storage_dtype=dtype, max_bytes_in_ram=0, storage_options=opts)  # another client
    got = fresh.batched_get(keys + keys[:1], model_fingerprint=states[0].model_fingerprint)
    for st, g in zip(states + states[:1], got, strict=True):
        assert g is not None and g.text_hash == st.text_hash and torch.equal(g.positions, st.positions)
        if dtype == "float32":
            assert torch.equal(g.keys, st.keys) and torch.equal(g.values, st.values)
        else:
            assert float((g.keys - st.keys).norm() / st.keys.norm()) < 0.15
    assert sorted(fresh.keys()) == sorted(keys) and len(fresh) == len(states) and fresh.disk_bytes() > 0
    assert fresh.delete(keys[0]) and fresh.get(keys[0]) is None and not fresh.contains(keys[0])
    assert fresh.stats["hits_disk"] == len(states)  # a key asked twice in one batch is read once


def test_corrupt_or_foreign_object_is_never_served(spec, states):
    kind, s, opts = spec
    store = GistStore(s, max_bytes_in_ram=0, storage_options=opts)
    b = store.backend
    k0, k1, k2 = store.batched_put(states[:3])
    good = b.get(k0)
    damaged = bytearray(good)
    damaged[-3] ^= 0xFF
    b.put(k0, bytes(damaged), overwrite=True)  # bit rot inside a tensor
    b.put(k1, b.get(k2), overwrite=True)  # another key's valid entry filed under k1
    b.put(k2, good[: len(good) // 2], overwrite=True)  # truncated upload
    assert store.batched_get([k0, k1, k2]) == [None, None, None]
    assert store.stats["corrupt"] == 3 and store.stats["misses"] == 3
    assert not any(b.exists(k) for k in (k0, k1, k2))  # quarantined: out of service
    store.batched_put(states[:3])  # the caller recomputes: served again
    assert all(x is not None for x in store.batched_get([k0, k1, k2]))
    # a state of another model is not served to this one
    assert store.get(k0, model_fingerprint="another-model") is None and store.stats["fingerprint_mismatch"] == 1


def test_foreign_marker_is_refused(spec):
    kind, s, opts = spec
    if kind == "ram":
        pytest.skip("a RAM store has no marker")
    b = _backend(spec)
    b._put_marker(b'{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a gist-memory store"):
        GistStore(s, storage_options=opts)


# ---- tiers --------------------------------------------------------------------------------------------------------
def test_tiers_fill_faster_ones_on_the_way_back(spec, states, tmp_path):
    kind, s, opts = spec
    if kind in ("local", "ram"):
        s = str(tmp_path / "shared-folder")  # a second folder plays the shared tier
    f32 = {"storage_dtype": "float32"}  # the states are compared exactly below
    writer = GistStore([str(tmp_path / "cache-w"), s], storage_options=opts, **f32)
    keys = writer.batched_put(states)
    assert all(writer.tiers[0].exists(k) and writer.backend.exists(k) for k in keys)  # write-through
    reader = GistStore([str(tmp_path / "cache-r"), s], storage_options=opts, **f32)
    assert not any(reader.tiers[0].exists(k) for k in keys)
    got = reader.batched_get(keys, model_fingerprint=states[0].model_fingerprint)
    assert all(torch.equal(g.keys, st.keys) for g, st in zip(got, states, strict=True))
    assert reader.stats["hits_shared"] == len(keys) and reader.stats["fills"] == len(keys)
    assert all(reader.tiers[0].exists(k) for k in keys)  # local disk filled
    reader.get(keys[0])
    assert reader.stats["hits_ram"] == 1  # then RAM
    reader.clear_ram()
    reader.get(keys[1])
    assert reader.stats["hits_disk"] == 1  # then local disk, no shared read
    # a corrupt local copy is refused; the shared copy is served and the local one rewritten
    path = reader.path_for(keys[2])
    with open(path, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    reader.clear_ram()
    g = reader.get(keys[2])
    assert g is not None and torch.equal(g.keys, states[2].keys)
    assert reader.stats["corrupt"] == 1 and reader.stats["hits_shared"] == len(keys) + 1
    assert reader.tiers[0].get(keys[2]) == reader.backend.get(keys[2])
    assert reader.delete(keys[3]) and not reader.backend.exists(keys[3]) and not reader.tiers[0].exists(keys[3])


class _Down(StorageBackend):
    """A shared tier whose server is unreachable."""

    url = "redis://10.255.255.1:6379/0"

    def _fail(self, *a, **k):
        raise ConnectionError("connection refused")

    exists = get = put = delete = list = get_many = put_many = exists_many = _fail

    def check_or_write_marker(self) -> None:
        pass


def test_unreachable_cache_tier_degrades_to_a_miss(tmp_path, states):
    store = GistStore([_Down(), str(tmp_path / "authoritative")])
    keys = store.batched_put(states)  # the cache tier's failure is logged, the write lands
    assert store.stats["tier_errors"] == 1 and store.backend.exists(keys[0])
    assert store.get(keys[0]) is not None
    store.clear_ram()
    assert store.get(keys[1]) is not None and store.stats["tier_errors"] >= 2
    broken = GistStore([str(tmp_path / "cache"), _Down()])
    with pytest.raises(ConnectionError):  # the authoritative tier's failure propagates
        broken.put(states[0])
    assert broken.get(keys[0]) is None and broken.stats["misses"] == 1  # a failed read is a miss


def test_open_backend_specs(tmp_path):
    assert isinstance(open_backend(str(tmp_path / "a")), LocalFolderBackend)
    assert isinstance(open_backend(f"file://{tmp_path / 'b'}"), LocalFolderBackend)
    assert isinstance(open_backend(None), MemoryBackend)
    pytest.importorskip("fsspec")
    from gist_memory.store.backends import FsspecBackend

    assert isinstance(open_backend("memory://x"), FsspecBackend)
    with pytest.raises(ValueError, match="folder, a URL or a StorageBackend"):
        open_backend(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="None only alone"):
        GistStore([None, str(tmp_path / "c")])
    store = GistStore(str(tmp_path / "d"))
    assert store.path == str(tmp_path / "d") and "->" not in repr(store)


# ---- another process wrote it: served here, nothing recomputed ---------------------------------------------------
_WRITER = textwrap.dedent(
    """
    import json, sys
    from gist_memory.store import GistStore
    from gist_memory.store.testing import FakeGistModel
    url, opts = sys.argv[1], json.loads(sys.argv[2])
    model = FakeGistModel(num_layers=2, num_heads=2, head_dim=16)
    store = GistStore(url, storage_dtype="int4", storage_options=opts or None)
    print(json.dumps(store.batched_put(model.compress([f"written elsewhere {i}" for i in range(8)]))))
    """
)


@pytest.mark.parametrize("kind", ["s3", "redis"])
def test_states_written_by_another_process_are_served(kind, request, tmp_path, model):
    import json

    run = uuid.uuid4().hex[:12]
    if kind == "s3":
        srv = request.getfixturevalue("s3_server")
        url, opts, env = f"s3://gist-test/{run}", srv["options"], dict(os.environ, **srv["env"])
    else:
        url, opts, env = f"{request.getfixturevalue('redis_server')}?prefix=p-{run}:", None, dict(os.environ)
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    out = subprocess.run([sys.executable, str(script), url, json.dumps(opts)], capture_output=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    keys = json.loads(out.stdout.decode().strip().splitlines()[-1])
    store = GistStore([str(tmp_path / "local"), url], storage_dtype="int4", storage_options=opts)
    texts = [f"written elsewhere {i}" for i in range(8)]
    from gist_memory.state.gist_state import text_hash

    assert keys == [store.key_for(text_hash(model.normalize(t)), model.fingerprint) for t in texts]
    got = store.batched_get(keys, model_fingerprint=model.fingerprint)
    assert all(g is not None for g in got) and store.stats["hits_shared"] == len(keys)
    calls = model.compress_calls
    assert [g.text_hash for g in got] == [text_hash(model.normalize(t)) for t in texts]
    assert model.compress_calls == calls  # nothing recomputed
