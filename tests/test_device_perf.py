"""The GPU performance job, checked on CPU: a perf bundle planned from a tiny model, and scripts/device_perf.py
measuring it from the bundle and the packed base alone, in a process where spaCy (and gguf, faiss) cannot be
imported, including its test pass (splits replayed, tests needing a missing module or an unrecorded text skipped).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import device_perf_prepare as P  # noqa: E402
import device_splits as S  # noqa: E402

SYNTH_TEXT = "The Harlow archive was founded long ago. Its catalogue code is QX-4471. It holds maps of the coast."
SYNTH = f'''
import os

from gist_memory import GistConfig, GistModel

TEXT = {SYNTH_TEXT!r}


def _model():
    return GistModel.from_base(os.environ["GM_TINY_BASE"], GistConfig(gists_per_sentence=2), device="cpu")


def test_compresses_a_recorded_text():
    st = _model().compress([TEXT])[0]
    assert 0 < st.num_kept < st.num_tokens


def test_needs_faiss():
    import faiss  # noqa: F401


def test_unrecorded_text():
    _model().compress(["A text nobody recorded here."])
'''
N_PASSAGES, DUMP = 8, 3


@pytest.fixture(scope="module")
def perf_dir(tmp_path_factory, tiny_base_dir):
    """A perf bundle (8 passages planned for a tiny surprisal-anchor adapter at 4x), the splits of a synthetic
    test file, and the tiny base packed in 2 parts."""
    from transformers import AutoModelForCausalLM

    from gist_memory import GistConfig, GistModel
    from gist_memory.train import bundle as B

    d = tmp_path_factory.mktemp("perf-device")
    fresh = GistModel.from_base(tiny_base_dir, GistConfig(anchors="surprisal", target_ratio=4.0), device="cpu",
                                lora_r=2)  # fmt: skip
    with torch.no_grad():
        fresh.writer.gist_embeddings.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    fresh.save_pretrained(d / "adapter")
    gm = GistModel.from_pretrained(d / "adapter", device="cpu")
    summary = P.build_perf_bundle(d / "perf", gm, d / "adapter", n=N_PASSAGES, tokens=24, log=lambda m: None)
    with S.recording() as rec:
        GistModel.from_base(tiny_base_dir, GistConfig(gists_per_sentence=2), device="cpu").plan(SYNTH_TEXT)
    S.Recording.load(d / "perf" / "splits.json.gz").merge(rec).save(d / "perf" / "splits.json.gz")
    (d / "synth").mkdir()
    (d / "synth" / "test_synth_device.py").write_text(SYNTH)
    lm = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    ident = {**B.base_identity(lm), "base_ref": tiny_base_dir}
    meta = B.pack_state_dict(tiny_base_dir, d / "parts", d / "side", ident, limit=80_000, n_min=2)
    return d, gm, summary, meta


def test_perf_bundle_holds_passages_splits_and_adapter(perf_dir):
    from gist_memory.train.bundle import DeviceBundle

    d, gm, summary, meta = perf_dir
    assert summary["passages"] == N_PASSAGES and len(meta["parts"]) == 2
    bun = DeviceBundle(d / "perf")
    perf = bun.manifest["perf"]
    assert perf["adapter_copy"] and (d / "perf" / "adapter" / "gist_adapter.safetensors").is_file()
    assert bun.has(gm.config) and len(perf["passages"]) == N_PASSAGES
    rec = S.Recording.load(d / "perf" / "splits.json.gz")
    assert len(rec.splits) >= N_PASSAGES + 1
    # a replayed splitter plans exactly as spaCy did; an unrecorded text is an error, never a guess
    undo = S.install_replay(rec)
    try:
        from gist_memory import GistModel

        twin = GistModel(gm.model, gm.tokenizer, gm.config, gm.base_ref)
        assert twin.splitter.nlp is None
        for t in perf["passages"][:3]:
            a, b = twin._provisional_plan(t), gm._provisional_plan(t)
            assert a.pieces == b.pieces and a.char_spans == b.char_spans
        with pytest.raises(S.ReplayMiss):
            twin.splitter.split("Never recorded.")
    finally:
        undo()


def _number_fields(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_device_perf_runs_without_spacy(perf_dir, tmp_path, tiny_base_dir):
    """The whole job from the bundle and parts alone, spaCy/gguf/faiss made unimportable, fp32 on CPU."""
    from safetensors.torch import load_file

    from gist_memory.train.bundle import DeviceBundle

    d, gm, _, _ = perf_dir
    out = tmp_path / "out"
    args = ["--perf", str(d / "perf"), "--base-side", str(d / "side"), "--parts", str(d / "parts"),
            "--out", str(out), "--device", "cpu", "--threads", "1", "--time-budget", "240", "--test-budget", "90",
            "--batches", "2,4", "--ks", "2,4", "--clients", "1,4", "--answers", "1", "--max-new-tokens", "4",
            "--decode-tokens", "4", "--repeats", "1", "--serve-repeats", "1", "--serve-k", "2",
            "--dump-states", str(DUMP), "--tests", str(d / "synth" / "test_synth_device.py")]  # fmt: skip
    boot = (
        "import sys, runpy\n"
        "for m in ('spacy', 'gguf', 'faiss'): sys.modules[m] = None  # import raises ImportError\n"
        f"sys.argv = ['device_perf.py'] + {args!r}\n"
        f"runpy.run_path({str(SCRIPTS / 'device_perf.py')!r}, run_name='__main__')\n"
        "assert 'spacy' not in [k for k, v in sys.modules.items() if v is not None]\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT),
           "GM_TINY_BASE": tiny_base_dir}  # fmt: skip
    env.pop("OUT", None)
    r = subprocess.run([sys.executable, "-c", boot], env=env, capture_output=True, text=True, timeout=600,
                       cwd=str(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = json.loads((out / "perf.json").read_text())
    assert not res["errors"] and not res["skipped"], (res["errors"], res["skipped"])
    assert res["model"]["base_digest_ok"] and res["model"]["adapter_files_ok"]
    assert res["env"]["blocked"] == ["spacy", "faiss", "gguf"]
    rows = res["rows"]
    whats = {"plain forward", "plain forward, dense 4D float mask", "compress pass 1 (text pass + anchor scores)",
             "compress", "compress, capitalized anchors", "compress pass 2 (writer; compress - pass 1)"}  # fmt: skip
    key = {"compress": ("batch", "what"), "ttft": ("k", None), "decode": ("k", "from"), "serving": ("clients", "mode")}
    got = {(r["section"], r[key[r["section"]][0]], r.get(key[r["section"]][1])) for r in rows}
    want = ({("compress", b, w) for b in (2, 4) for w in whats} | {("ttft", k, None) for k in (2, 4)}
            | {("decode", k, f) for k in (2, 4) for f in ("states", "full text")}
            | {("serving", n, m) for n in (1, 4) for m in ("serialised", "batched")})  # fmt: skip
    assert got == want
    measured = {"compress": ("seconds", "tokens_per_s", "x_plain"), "decode": ("first_token_s", "tokens_per_s"),
                "ttft": ("ttft_states_s", "ttft_full_s", "splice_s", "forward_s", "speedup"),
                "serving": ("answers", "wall_s", "answers_per_s", "x_serialised")}  # fmt: skip
    for row in rows:
        if row.get("what", "").startswith("compress pass 2"):  # derived (a difference of medians)
            assert math.isfinite(row["seconds"]) and 0 <= row["share_of_compress"] < 1.5 or row["seconds"] <= 0
            continue
        nums = _number_fields(row)
        assert all(nums[k] > 0 and math.isfinite(nums[k]) for k in measured[row["section"]]), row
    assert res["plans"] == {"passages": N_PASSAGES, "plans_equal": N_PASSAGES, "anchors_equal": N_PASSAGES}
    # the states the job wrote from the bundle are the ones compressed here (spaCy splitting, same adapter)
    dumped = load_file(str(out / "states.safetensors"))
    texts = DeviceBundle(d / "perf").manifest["perf"]["passages"][:DUMP]
    for i, st in enumerate(gm.compress(texts)):
        assert torch.equal(dumped[f"{i}.positions"], st.positions) and torch.equal(dumped[f"{i}.kinds"], st.kinds)
        torch.testing.assert_close(dumped[f"{i}.keys"], st.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dumped[f"{i}.values"], st.values, rtol=1e-4, atol=1e-5)
    tests = json.loads((out / "tests.json").read_text())
    assert tests["counts"] == {"passed": 1, "skipped": 2}, tests
    msgs = {k.split("::")[-1]: v["message"] for k, v in tests["tests"].items()}
    assert "faiss" in msgs["test_needs_faiss"] and msgs["test_unrecorded_text"].startswith("replay:")
    md = (out / "perf.md").read_text()
    assert "## Compression, batches of 4" in md and "## Serving" in md and "## Test pass" in md
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and {p.name for p in files} == {"perf.json", "perf.md", "tests.json", "tests.log",
                                                           "states.safetensors"}  # fmt: skip


def test_force_device_routes_every_cpu_model(monkeypatch):
    """GIST_TEST_DEVICE=cuda over there: models the tests build "on the CPU" are built on the device, in fp32
    unless a test asked for another dtype."""
    import gist_memory.model.adapter_io as aio
    import gist_memory.model.base as mb
    from gist_memory import GistModel

    seen = []

    def spy(base, *, dtype=None, device=None, **kw):  # noqa: ANN001, ANN202, ARG001
        seen.append((device, dtype))
        raise RuntimeError("stop here")

    monkeypatch.setattr(mb, "load_base", spy)
    monkeypatch.setattr(aio, "load_base", spy)
    S.force_device("cuda")
    for dtype in (None, "bfloat16"):
        with pytest.raises(RuntimeError, match="stop here"):
            GistModel.from_base("somewhere", device="cpu", dtype=dtype)
    assert seen == [("cuda", torch.float32), ("cuda", torch.bfloat16)]
