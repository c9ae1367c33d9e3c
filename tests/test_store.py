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
    others |= {key_for(th, "fp-a", d) for d in ("bfloat16", "float16", "int8", "int4")}
    assert k not in others and len(others) == 6
    with pytest.raises(ValueError, match="storage_dtype"):
        key_for(th, "fp-a", "float64")
    with pytest.raises(ValueError, match="storage_dtype"):
        GistStore(None, storage_dtype="fp8")


# ---- round trips ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path_kind", ["disk", "ram"])
def test_float32_round_trip_is_bit_exact(tmp_path, states, path_kind):
    store = GistStore(tmp_path / "s" if path_kind == "disk" else None, max_bytes_in_ram=0, storage_dtype="float32")
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
    store = GistStore(tmp_path, max_bytes_in_ram=0, storage_dtype="float32")  # compares the tensors exactly
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


# ---- durability: a rename is followed by an fsync of its folder --------------------------------------------
def _record_fsyncs(monkeypatch) -> list[tuple[int, int, bool]]:
    """Patch os.fsync to record (st_dev, st_ino, is_folder) of what is fsynced, in order."""
    import stat

    seen: list[tuple[int, int, bool]] = []
    real = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        seen.append((st.st_dev, st.st_ino, stat.S_ISDIR(st.st_mode)))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def _ident(path) -> tuple[int, int, bool]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, os.path.isdir(path))


def test_put_fsyncs_file_then_its_folder_and_new_folders(tmp_path, states, monkeypatch):
    store = GistStore(tmp_path / "s", max_bytes_in_ram=0)
    seen = _record_fsyncs(monkeypatch)
    k = store.put(states[0])
    path = store.path_for(k)
    file_i, dir_i = seen.index(_ident(path)), seen.index(_ident(os.path.dirname(path)))
    assert file_i < dir_i  # the data, then the folder entry that the rename made
    # the fanout folders this put created are durable too: objects/ab and objects/ab/cd's parents were fsynced
    assert _ident(tmp_path / "s" / "objects") in seen and _ident(os.path.dirname(os.path.dirname(path))) in seen
    seen.clear()
    assert store.delete(k) and seen == [_ident(os.path.dirname(path))]  # an unlink is made durable the same way


def test_atomic_write_bytes_fsyncs_the_folder(tmp_path, monkeypatch):
    from gist_memory.state.gist_state import atomic_write_bytes

    seen = _record_fsyncs(monkeypatch)
    atomic_write_bytes(str(tmp_path / "a.bin"), b"payload")
    assert seen[-1] == _ident(tmp_path) and _ident(tmp_path / "a.bin") in seen
    seen.clear()
    atomic_write_bytes(str(tmp_path / "b.bin"), b"payload", fsync=False)
    assert seen == []  # fsync=False: no fsync at all (a killed process is still safe)


def test_fsync_false_store_does_not_fsync(tmp_path, states, monkeypatch):
    store = GistStore(tmp_path, fsync=False)
    seen = _record_fsyncs(monkeypatch)
    store.batched_put(states)
    assert seen == []


def _same_safetensors(a: bytes, b: bytes) -> bool:
    """Equal safetensors buffers up to the order of keys in the json header (safetensors writes its metadata
    from a hash map, so two saves of the same tensors may order them differently)."""
    import json as json_

    na, nb = int.from_bytes(a[:8], "little"), int.from_bytes(b[:8], "little")
    return json_.loads(a[8 : 8 + na]) == json_.loads(b[8 : 8 + nb]) and a[8 + na :] == b[8 + nb :]


def test_local_files_are_the_encoded_entries(tmp_path, states):
    """The folder backend writes exactly `encode_entry`'s bytes at objects/ab/cd/<key>.safetensors."""
    for dt in store_mod.STORAGE_DTYPES:
        store = GistStore(tmp_path / dt, storage_dtype=dt)
        k = store.put(states[0])
        path = tmp_path / dt / "objects" / k[:2] / k[2:4] / f"{k}.safetensors"
        assert store.path_for(k) == str(path)
        assert _same_safetensors(path.read_bytes(), store_mod.encode_entry(states[0], dt, k))
        assert sorted(os.listdir(tmp_path / dt)) == [".lock", "objects", "store.json"]


# ---- int4 -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 7, 64), (1, 2, 130, 64), (2, 1, 1, 5), (1, 1, 65, 33), (1, 2, 0, 8)])
def test_int4_round_trip_error_bound(shape):
    """Every element is within half a step of its group (plus float16 rounding of the group's min)."""
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * torch.linspace(0.1, 8, shape[-1])  # channels of different size
    for dim, group in ((2, store_mod.INT4_KEY_GROUP), (3, store_mod.INT4_VALUE_GROUP), (2, 4), (3, 3)):
        q, scale, mn = store_mod.quantize_int4(x, dim, group)
        assert q.dtype == torch.uint8 and q.shape[-1] == (shape[-1] + 1) // 2
        y = store_mod.dequantize_int4(q, scale, mn, shape, dim, group, torch.float32)
        assert y.shape == x.shape
        if not x.numel():
            continue
        step = torch.repeat_interleave(scale.float(), group, dim=dim).narrow(dim, 0, shape[dim])
        low = torch.repeat_interleave(mn.float(), group, dim=dim).narrow(dim, 0, shape[dim])
        bound = step / 2 * (1 + 2e-3) + low.abs() * 2**-10 + 1e-6
        assert bool(((y - x).abs() <= bound).all()), float(((y - x).abs() - bound).max())
        if shape[dim] > 1:
            assert float((y - x).norm() / x.norm()) < 0.15


def test_int4_extreme_values_fall_back_to_float32_scales():
    x = torch.randn(1, 2, 9, 16)
    x[0, 0] *= 1e6  # beyond float16
    x[0, 1, :, 0] = 0.0  # a constant group
    x[0, 1, 0, 1] = 1e-9
    q, scale, mn = store_mod.quantize_int4(x, 2, 64)
    assert scale.dtype == torch.float32
    y = store_mod.dequantize_int4(q, scale, mn, x.shape, 2, 64, torch.float32)
    assert torch.isfinite(y).all() and float((y - x).norm() / x.norm()) < 0.1
    assert torch.equal(y[0, 1, :, 0], x[0, 1, :, 0])
    q, scale, mn = store_mod.quantize_int4(torch.randn(1, 1, 4, 8), 2, 64)
    assert scale.dtype == torch.float16  # ordinary K/V: float16 scales


def test_int4_store_round_trip_and_size(tmp_path):
    big = FakeGistModel(num_layers=4, num_heads=3, head_dim=64)
    states = big.compress([" ".join(f"word{j}" for j in range(120 + 40 * i)) for i in range(3)])
    sizes = {}
    for dt in ("int8", "int4"):
        store = GistStore(tmp_path / dt, storage_dtype=dt, max_bytes_in_ram=0)
        keys = store.batched_put(states)
        sizes[dt] = store.disk_bytes()
        for s, k in zip(states, keys, strict=True):
            g = GistStore(tmp_path / dt).get(k, model_fingerprint=s.model_fingerprint)
            assert g.dtype == s.dtype and g.keys.shape == s.keys.shape and g.values.shape == s.values.shape
            assert torch.equal(g.positions, s.positions) and torch.equal(g.kinds, s.kinds)
            rel = float((g.keys - s.keys).norm() / s.keys.norm())
            relv = float((g.values - s.values).norm() / s.values.norm())
            assert (0 < rel < 0.02) if dt == "int8" else (0.02 < rel < 0.15), (dt, rel)
            assert (0 < relv < 0.02) if dt == "int8" else (0.02 < relv < 0.15), (dt, relv)
    assert 1.5 < sizes["int8"] / sizes["int4"] < 2.0, sizes


def test_int4_bf16_state_reads_back_as_bf16(tmp_path):
    (s,) = FakeGistModel(dtype=torch.bfloat16).compress(["a bf16 state of a few words"])
    store = GistStore(tmp_path, storage_dtype="int4")
    g = store.get(store.put(s))
    assert g.dtype == torch.bfloat16 and float((g.keys.float() - s.keys.float()).norm() / s.keys.float().norm()) < 0.15


def _int4_entry(states) -> tuple[str, bytes]:
    k = key_for(states[0].text_hash, states[0].model_fingerprint, "int4")
    return k, store_mod.encode_entry(states[0], "int4", k)


@pytest.mark.parametrize("cut", [0, 1, 7, 8, 20, 100, -200, -1])
def test_truncated_int4_entries_are_a_clear_error(states, cut):
    from gist_memory.state import StateFormatError

    k, data = _int4_entry(states)
    with pytest.raises(StateFormatError):
        store_mod.decode_entry(data[:cut], k)


def test_corrupted_and_foreign_int4_entries_are_a_clear_error(states, tmp_path):
    import json as json_

    from safetensors.torch import load, save

    from gist_memory.state import StateFormatError

    k, data = _int4_entry(states)
    assert store_mod.decode_entry(data, k).num_tokens == states[0].num_tokens
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):  # a random byte flipped anywhere: refused (or, in unused header bytes, still exact)
        b = bytearray(data)
        i = int(torch.randint(0, len(b), (1,), generator=rng))
        b[i] ^= 1 + int(torch.randint(0, 255, (1,), generator=rng))
        try:
            g = store_mod.decode_entry(bytes(b), k)
        except StateFormatError:
            continue
        ref = store_mod.decode_entry(data, k)
        assert torch.equal(g.keys, ref.keys) and torch.equal(g.values, ref.values)
    with pytest.raises(StateFormatError):
        store_mod.decode_entry(os.urandom(len(data)), k)
    with pytest.raises(StateFormatError, match="key"):  # a valid entry filed under another key
        store_mod.decode_entry(data, key_for(states[1].text_hash, states[1].model_fingerprint, "int4"))
    # a consistent entry (checksum recomputed) whose layout lies about the shapes: refused, no crash
    n = int.from_bytes(data[:8], "little")
    meta = json_.loads(data[8 : 8 + n])["__metadata__"]
    tensors = load(data)
    for bad in ([64, 64, 2, 2, 99, 8, 8], [0, 64, 2, 2, 4, 8, 8], [64, 64, -1, 2, 4, 8, 8], [1, 2, 3]):
        t = dict(tensors, int4_layout=torch.tensor(bad, dtype=torch.int64))
        m = dict(meta, checksum=store_mod._checksum(t))
        with pytest.raises(StateFormatError):
            store_mod.decode_entry(save(t, metadata=m), k)
    t = dict(tensors, keys_scale=tensors["keys_scale"].to(torch.int32))  # wrong scale dtype
    with pytest.raises(StateFormatError):
        store_mod.decode_entry(save(t, metadata=dict(meta, checksum=store_mod._checksum(t))), k)
    t = {n_: v for n_, v in tensors.items() if n_ != "values_min"}  # a missing part
    with pytest.raises(StateFormatError):
        store_mod.decode_entry(save(t, metadata=dict(meta, checksum=store_mod._checksum(t))), k)
    # through the store: a damaged int4 file is quarantined and reported missing
    store = GistStore(tmp_path, storage_dtype="int4", max_bytes_in_ram=0)
    kk = store.put(states[0])
    with open(store.path_for(kk), "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\xff\xff\xff")
    assert store.get(kk) is None and store.stats["corrupt"] == 1


def test_entries_are_byte_identical_across_processes(tmp_path):
    """safetensors writes its header from a hash map (another key order per process); entries are canonicalised so
    writers sharing a content-addressed store write the same bytes for the same state."""
    script = textwrap.dedent(
        """
        import hashlib, sys
        from gist_memory.store.store import encode_entry, key_for
        from gist_memory.store.testing import FakeGistModel
        m = FakeGistModel()
        st = m.compress(["The lighthouse was built in 1874 by Maren Voss. Ölmühle — ☃ café."])[0]
        for dt in ("float32", "int8", "int4"):
            print(dt, hashlib.sha256(encode_entry(st, dt, key_for(st.text_hash, st.model_fingerprint, dt))).hexdigest())
        """
    )
    outs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
            for _ in range(3)}
    assert len(outs) == 1 and outs.pop().count("\n") == 3
    from safetensors.torch import load

    m = FakeGistModel()
    st = m.compress(["The lighthouse was built in 1874."])[0]
    blob = store_mod.encode_entry(st, "int8", "k")
    assert blob == store_mod.canonical_safetensors(blob)  # idempotent
    assert (len(blob) - 8 - int.from_bytes(blob[:8], "little")) == sum(
        t.numel() * t.element_size() for t in load(blob).values())
