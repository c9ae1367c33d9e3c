"""GistStore: keys, round trips per storage dtype, fingerprint refusal, corruption, LRU, failures, concurrency."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

import gist_memory.store.store as store_mod
from gist_memory.state.gist_state import text_hash
from gist_memory.store import GistStore, key_for
from gist_memory.store.testing import FakeGistModel

TEXTS = [f"Passage number {i} mentions Zurich, code X{i * 7} and the year {1900 + i}." for i in range(6)]


@pytest.fixture(scope="module")
def model() -> FakeGistModel:
    return FakeGistModel()


@pytest.fixture(scope="module")
def states(model):
    return model.compress(TEXTS)


def _tmp_files(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.startswith(store_mod.TMP_PREFIX)]


def _entry_files(root: str) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "objects")) for f in fs}


# ---- keys ----------------------------------------------------------------------------------------------------
def test_key_depends_on_text_model_and_dtype():
    th = text_hash("hello world")
    k = key_for(th, "fp-a", "float32")
    assert len(k) == 64 and k == key_for(th, "fp-a", "float32")
    others = {key_for(text_hash("hello  world"), "fp-a", "float32"), key_for(th, "fp-b", "float32")}
    others |= {key_for(th, "fp-a", d) for d in ("bfloat16", "float16", "int8")}
    assert k not in others and len(others) == 5
    with pytest.raises(ValueError, match="storage_dtype"):
        key_for(th, "fp-a", "float64")
    with pytest.raises(ValueError, match="storage_dtype"):
        GistStore(None, storage_dtype="fp8")


# ---- round trips ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path_kind", ["disk", "ram"])
def test_float32_round_trip_is_bit_exact(tmp_path, states, path_kind):
    store = GistStore(tmp_path / "s" if path_kind == "disk" else None, max_bytes_in_ram=0)
    keys = store.batched_put(states)
    assert keys == [store.key_of(s) for s in states]
    got = store.batched_get(keys, model_fingerprint=states[0].model_fingerprint)
    for s, g in zip(states, got, strict=True):
        assert g is not None
        assert torch.equal(g.keys, s.keys) and torch.equal(g.values, s.values)
        assert torch.equal(g.positions, s.positions) and torch.equal(g.kinds, s.kinds)
        assert (g.span, g.num_tokens, g.text_hash, g.text) == (s.span, s.num_tokens, s.text_hash, s.text)
        assert g.sentence_spans == s.sentence_spans and g.model_fingerprint == s.model_fingerprint
    if path_kind == "disk":  # a fresh store object (another process) reads the same
        again = GistStore(tmp_path / "s").get(keys[0])
        assert torch.equal(again.keys, states[0].keys)
        assert _tmp_files(str(tmp_path / "s")) == []


def test_storage_dtypes_precision_and_size(tmp_path):
    big = FakeGistModel(num_layers=4, num_heads=3, head_dim=64)  # realistic rows: scales are a small overhead
    states = big.compress([" ".join(f"word{j}" for j in range(120 + i)) for i in range(3)])
    sizes = {}
    for dt in ("float32", "bfloat16", "float16", "int8"):
        store = GistStore(tmp_path / dt, storage_dtype=dt, max_bytes_in_ram=0)
        keys = store.batched_put(states)
        sizes[dt] = store.disk_bytes()
        for s, k in zip(states, keys, strict=True):
            g = store.get(k)
            assert g.dtype == s.dtype  # read back in the dtype it was put in
            if dt in ("bfloat16", "float16"):
                cast = getattr(torch, dt)
                assert torch.equal(g.keys, s.keys.to(cast).to(s.dtype))
            elif dt == "int8":
                rel = (g.keys - s.keys).norm() / s.keys.norm()
                relv = (g.values - s.values).norm() / s.values.norm()
                assert 0 < rel < 0.02 and 0 < relv < 0.02, (rel, relv)
    assert sizes["bfloat16"] == sizes["float16"]
    assert 1.8 < sizes["float32"] / sizes["bfloat16"] < 2.0 and 1.6 < sizes["bfloat16"] / sizes["int8"] < 2.0, sizes


def test_empty_and_extreme_values_survive_int8(tmp_path, model):
    (s,) = model.compress(["one"])
    s.keys[0, 0, 0, :] = 0.0  # an all-zero channel slice must not divide by zero
    s.values[1] *= 1e4
    store = GistStore(tmp_path, storage_dtype="int8")
    g = store.get(store.put(s))
    assert torch.isfinite(g.keys).all() and torch.isfinite(g.values).all()
    assert torch.allclose(g.values, s.values, rtol=0.02, atol=s.values.abs().max().item() / 100)


def test_put_rejects_non_states(tmp_path):
    with pytest.raises(ValueError, match="GistState"):
        GistStore(tmp_path).put("not a state")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        GistStore(tmp_path).get("abc")


# ---- never served to the wrong model ------------------------------------------------------------------------
def test_fingerprint_mismatch_is_never_served(tmp_path, states):
    store = GistStore(tmp_path)
    k = store.put(states[0])
    assert store.get(k, model_fingerprint="another-model") is None
    assert store.stats["fingerprint_mismatch"] == 1
    assert store.get(k, model_fingerprint=states[0].model_fingerprint) is not None  # from the LRU now
    assert store.get(k, model_fingerprint="another-model") is None  # the LRU does not bypass the check
    # the same text written by another model has another key
    other = FakeGistModel(salt="adapter-2").compress([TEXTS[0]])[0]
    assert store.key_of(other) != k


def test_entry_under_a_foreign_key_is_refused(tmp_path, states):
    """A file copied over another key's file (or a key collision) does not serve the wrong state."""
    store = GistStore(tmp_path, max_bytes_in_ram=0)
    k0, k1 = store.batched_put(states[:2])
    with open(store.path_for(k0), "rb") as f:
        data = f.read()
    with open(store.path_for(k1), "wb") as f:
        f.write(data)
    assert store.get(k1) is None
    assert not store.contains(k1)  # quarantined
    assert store.get(k0) is not None


# ---- corruption ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip_data", "truncate", "garbage"])
def test_corrupted_entry_is_quarantined_and_reported_missing(tmp_path, states, damage):
    store = GistStore(tmp_path, max_bytes_in_ram=0)
    k = store.put(states[0])
    path = store.path_for(k)
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        if damage == "flip_data":
            data[-5] ^= 0xFF  # inside the last tensor
        elif damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data = bytearray(b"\x00" * 64)
        f.seek(0)
        f.truncate()
        f.write(data)
    assert store.get(k) is None
    assert store.stats["corrupt"] == 1
    assert not os.path.exists(path) and not store.contains(k)
    assert len(os.listdir(tmp_path / "quarantine")) == 1
    # the caller recomputes and puts again: served fine
    store.put(states[0])
    assert torch.equal(store.get(k).keys, states[0].keys)


def test_contains_delete_len_and_gc(tmp_path, states):
    store = GistStore(tmp_path)
    keys = store.batched_put(states)
    assert len(store) == len(states) and all(store.contains(k) for k in keys)
    assert store.delete(keys[0]) and not store.delete(keys[0])
    assert store.get(keys[0]) is None  # deleted entries are not served from the LRU either
    leftover = os.path.join(os.path.dirname(store.path_for(keys[1])), store_mod.TMP_PREFIX + "dead.safetensors")
    with open(leftover, "wb") as f:
        f.write(b"half a state")
    assert store.gc(keys[1:3], min_age_s=3600) == {"tmp": 0, "quarantine": 0, "orphans": 0}  # too young
    counts = store.gc(keys[1:3], min_age_s=0)
    assert counts == {"tmp": 1, "quarantine": 0, "orphans": len(states) - 3}
    assert sorted(store.keys()) == sorted(keys[1:3]) and not os.path.exists(leftover)


def test_lru_respects_byte_budget(tmp_path, states):
    one = states[0].nbytes
    store = GistStore(tmp_path, max_bytes_in_ram=int(2.5 * max(s.nbytes for s in states)))
    keys = store.batched_put(states)
    store.batched_get(keys)
    assert store._lru.nbytes <= store._lru.max_bytes and 1 <= len(store._lru) <= 2
    store.get(keys[-1])
    assert store.stats["hits_ram"] == 1 and store.stats["hits_disk"] == len(states)
    assert one > 0


def test_existing_store_marker_is_checked(tmp_path):
    (tmp_path / "store.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a gist-memory store"):
        GistStore(tmp_path)


# ---- failures leave the store as it was ---------------------------------------------------------------------
def test_disk_full_leaves_store_unchanged(tmp_path, states, monkeypatch):
    store = GistStore(tmp_path, max_bytes_in_ram=0)
    before_keys = store.batched_put(states[:2])
    before = _entry_files(str(tmp_path))
    real = store_mod._write_bytes
    calls = {"n": 0}

    def full_disk(fd, data):
        calls["n"] += 1
        if calls["n"] == 3:  # the third file of the batch: half written, then ENOSPC
            real(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(store_mod, "_write_bytes", full_disk)
    with pytest.raises(OSError) as ei:
        store.batched_put(states[2:])
    assert ei.value.errno == errno.ENOSPC
    assert _entry_files(str(tmp_path)) == before  # nothing new, nothing half-written
    assert _tmp_files(str(tmp_path)) == []
    assert all(store.get(k) is not None for k in before_keys)
    assert not any(store.contains(store.key_of(s)) for s in states[2:])
    monkeypatch.setattr(store_mod, "_write_bytes", real)
    store.batched_put(states[2:])  # space is back: works
    assert len(store) == len(states)


@contextlib.contextmanager
def _unprivileged():
    """Drop the effective uid to nobody while root (root ignores chmod); no-op otherwise."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_permission_denied_leaves_store_unchanged(states):
    root = tempfile.mkdtemp(prefix="gist-perm-")
    os.chmod(root, 0o755)  # traversable by the unprivileged user
    try:
        store = GistStore(root, max_bytes_in_ram=0)
        keys = store.batched_put(states[:2])
        before = _entry_files(root)
        for d, dirs, _ in os.walk(root):
            for name in dirs:
                os.chmod(os.path.join(d, name), 0o555)
        os.chmod(root, 0o555)
        with _unprivileged():
            assert store.get(keys[0]) is not None  # reading still works
            with pytest.raises(PermissionError):
                store.batched_put(states[2:])
            with pytest.raises(PermissionError):
                store.delete(keys[0])
        for d, dirs, _ in os.walk(root):
            for name in dirs:
                os.chmod(os.path.join(d, name), 0o755)
        os.chmod(root, 0o755)
        assert _entry_files(root) == before and _tmp_files(root) == []
        assert all(store.get(k) is not None for k in keys)
    finally:
        for d, dirs, _ in os.walk(root):
            for name in dirs:
                os.chmod(os.path.join(d, name), 0o755)
        import shutil

        shutil.rmtree(root, ignore_errors=True)


# ---- two processes ------------------------------------------------------------------------------------------
_WRITER = textwrap.dedent(
    """
    import sys
    from gist_memory.store import GistStore
    from gist_memory.store.testing import FakeGistModel
    root, who = sys.argv[1], sys.argv[2]
    model = FakeGistModel()
    store = GistStore(root, storage_dtype="bfloat16", fsync=False)
    texts = [f"shared passage {i}" for i in range(30)] + [f"{who} passage {i}" for i in range(30)]
    for i in range(0, len(texts), 3):
        store.batched_put(model.compress(texts[i : i + 3]))
    print("done", who)
    """
)


def test_two_writer_processes_lose_nothing(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    root = tmp_path / "store"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(root), who], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for who in ("alice", "bob")
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    model = FakeGistModel()
    store = GistStore(root, storage_dtype="bfloat16")
    texts = [f"shared passage {i}" for i in range(30)] + [
        f"{w} passage {i}" for w in ("alice", "bob") for i in range(30)
    ]
    expected = {store.key_for(text_hash(model.normalize(t)), model.fingerprint) for t in texts}
    assert set(store.keys()) == expected  # 90 distinct entries, none lost, none extra
    assert all(s is not None for s in store.batched_get(sorted(expected), model.fingerprint))  # all checksums ok
    assert store.stats["corrupt"] == 0 and _tmp_files(str(root)) == []


def test_numpy_casts_match_torch_bit_for_bit():
    x = torch.randn(300, 64) * torch.logspace(-42, 38, 64)
    x[0, :6] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 65520.0, 1e-45])
    for dt in (torch.bfloat16, torch.float16):
        ours, ref = store_mod.cast(x, dt), x.to(dt)
        assert ours.dtype == dt and torch.equal(ours.view(torch.int16), ref.view(torch.int16))
        assert torch.equal(store_mod.cast(ref, torch.float32), ref.float())
    x[0, 0] = float("nan")
    assert torch.isnan(store_mod.cast(x, torch.bfloat16)[0, 0].float())
