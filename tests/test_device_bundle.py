"""The GPU path, checked on CPU: a device bundle built from the tiny model, and scripts/device_train.py training
from the bundle and the packed base alone in a process where spaCy (and gguf, faiss) cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from gist_memory.train import bundle as B
from gist_memory.train.trainer import QAItem, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
P1 = "The Harlow archive was founded long ago. Its catalogue code is QX-4471. It holds maps of the coast."
P2 = "Maren Voss became the chief curator in 1912. She catalogued many shells. The museum is by the sea."
CONT = [
    "The lighthouse at Brannock Point was built in 1874 by Maren Voss. It stands on a granite ledge above the "
    "harbour. Its lamp was first lit with oil and later converted to electricity. Ships still use it today.",
    "Python is a programming language that lets you work quickly. It has a large standard library. Many people "
    "use it for data analysis and for teaching. The language was first released in 1991 by Guido van Rossum.",
]


def _items():
    return [
        QAItem(id="a", kind="planted_single", passages=[P1], question="What is the archive's catalogue code?",
               answer="QX-4471", choices=["QX-4471", "QX-7714", "ZK-1002", "AB-9981"], answer_index=0),
        QAItem(id="b", kind="planted_distractors", passages=[P2, P1], question="When did Maren Voss become curator?",
               answer="1912", choices=["1912", "1921", "1894", "1955"], answer_index=0),
    ]  # fmt: skip


def _cfg(tmp_path, base):
    return TrainConfig(
        out_dir=str(tmp_path / "unused"), base=base, steps=100, batch_items=2, lr_lora=3e-3, lr_gist=1e-2,
        warmup=1, ratios=(4.0, 8.0), curriculum=False, w_qa=0.5, w_recon=1.0, w_distill=1.0, w_cont=1.0,
        cont_items=2, device="cpu", recon_on="both",
        gist={"target_ratio": 4.0, "anchors": "capitalized", "max_sentence_tokens": 48, "max_anchor_fraction": 0.75},
    )  # fmt: skip


@pytest.fixture(scope="module")
def device_dir(tmp_path_factory, tiny_base_dir):
    """.device-like folder: bundle + packed tiny base in >= 2 parts."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("device")
    summary = B.build_bundle(d / "bundle", _cfg(d, tiny_base_dir), items=_items(), cont_texts=CONT,
                             dev_items=_items(), heldout_per_kind=2, log=lambda m: None)  # fmt: skip
    lm = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    ident = {**B.base_identity(lm), "base_ref": tiny_base_dir}
    meta = B.pack_state_dict(tiny_base_dir, d / "parts", d / "side", ident, limit=80_000, n_min=2)
    return d, summary, meta


def test_bundle_holds_the_same_plans(device_dir, tiny_model):
    d, summary, _ = device_dir
    assert summary["items"] == 2 and summary["cont_pairs"] == 2 and summary["texts"] >= 4
    bun = B.DeviceBundle(d / "bundle")
    from gist_memory.config import GistConfig

    gbase = bun.train_config["gist"]
    for r in (4.0, 8.0):
        cfg = GistConfig(**{**gbase, "target_ratio": r})
        keep = tiny_model.config
        tiny_model.config = cfg
        try:
            for text in (P1, P2, bun.cont_pairs()[0][0]):
                want, got = tiny_model.plan(text), bun.plan(cfg, text)
                assert got.text == want.text and np.array_equal(got.ids, want.ids)
                assert got.pieces == want.pieces and got.n_other == want.n_other
                assert got.char_spans == want.char_spans and np.array_equal(got.anchors, want.anchors)
        finally:
            tiny_model.config = keep
    with pytest.raises(B.BundleError, match="not planned"):
        bun.plan(GistConfig(**{**gbase, "target_ratio": 4.0}), "A text nobody planned.")
    with pytest.raises(B.BundleError, match="no plans for config"):
        bun.plan(GistConfig(**{**gbase, "target_ratio": 3.0}), P1)
    bun.check_tokenizer(tiny_model.tokenizer)
    assert [it.id for it in bun.qa_items()] == ["a", "b"]
    assert set(bun.heldout_items()) >= {"entity_single", "common_single", "faq"}


def test_packed_base_rebuilds_bit_for_bit(device_dir, tiny_base_dir):
    import torch
    from transformers import AutoModelForCausalLM

    d, _, meta = device_dir
    assert len(meta["parts"]) >= 2 and all(p["bytes"] <= 80_000 for p in meta["parts"])
    # the parts may sit in different folders (uploaded in separate device calls)
    other = d / "elsewhere"
    other.mkdir(exist_ok=True)
    first = meta["parts"][0]["file"]
    (other / first).write_bytes((d / "parts" / first).read_bytes())
    (d / "parts" / first).rename(d / "parts" / (first + ".moved"))
    try:
        with pytest.raises(B.BundleError, match="upload it first"):
            B.find_parts(meta, [d / "parts"])
        lm, tok, m2 = B.load_packed_base(d / "side", [d / "parts", other])
    finally:
        (d / "parts" / (first + ".moved")).rename(d / "parts" / first)
    ref = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, lm.state_dict()[k]), k
    assert m2["weights_digest_here"] == meta["weights_digest"]


def test_device_train_runs_without_spacy(device_dir, tmp_path):
    """The whole device script from the bundle and parts alone, spaCy made unimportable, on CPU."""
    from gist_memory import GistModel

    d, _, _ = device_dir
    out = tmp_path / "out"
    args = ["--bundle", str(d / "bundle"), "--base-side", str(d / "side"), "--parts", str(d / "parts"),
            "--out", str(out), "--device", "cpu", "--time-budget", "300", "--eval-reserve", "30",
            "--max-steps", "4", "--probe-steps", "2", "--snapshot-every", "2", "--dev-items", "2",
            "--heldout-items", "1", "--generate", "single"]  # fmt: skip
    boot = (
        "import sys, runpy\n"
        "for m in ('spacy', 'gguf', 'faiss'): sys.modules[m] = None  # import raises ImportError\n"
        f"sys.argv = ['device_train.py'] + {args!r}\n"
        f"runpy.run_path({str(ROOT / 'scripts' / 'device_train.py')!r}, run_name='__main__')\n"
        "assert 'spacy' not in [k for k, v in sys.modules.items() if v is not None]\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    r = subprocess.run([sys.executable, "-c", boot], env=env, capture_output=True, text=True, timeout=600,
                       cwd=str(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = (out / "report.md").read_text()
    summary = json.loads(report.split("```json", 1)[1].split("```", 1)[0])
    assert summary["train"]["final_step"] == 4 and summary["base_digest_ok"]
    assert summary["dev"]["4.0"]["n"] == 2
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    names = {p.relative_to(out).as_posix() for p in files}
    assert {"adapter/gist_adapter.safetensors", "adapter/gist_adapter.json", "adapter/gist_config.json",
            "snapshots.tar", "log.jsonl", "report.md", "train_config.json", "heldout.jsonl"} <= names  # fmt: skip
    with tarfile.open(out / "snapshots.tar") as tf:
        assert any(n.endswith("step-00004/gist_adapter.safetensors") for n in tf.getnames())
    steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "cont" in s] == [1, 2, 3, 4]
    gm = GistModel.from_pretrained(out / "adapter", device="cpu")
    assert gm.has_lora and gm.config.target_ratio == 4.0
    st = gm.compress([P1])[0]
    assert st.num_kept < st.num_tokens
    meta = json.loads((out / "adapter" / "gist_adapter.json").read_text())
    assert meta["trained_on"]["steps"] == 4 and meta["format_version"] == 2
    from gist_memory.train.ship import ship, stages

    chain = stages(out / "adapter")
    assert len(chain) == 1 and chain[0].step == 4 and chain[0].config["w_cont"] == 1.0
    shipped = ship(out / "adapter", tmp_path / "shipped")
    assert (shipped / "MODEL_CARD.md").is_file() and GistModel.from_pretrained(shipped, device="cpu").has_lora


def test_split_groups_respects_the_limit():
    sizes = [(f"t{i}", s) for i, s in enumerate([30, 10, 25, 5, 40, 20, 15])]
    for limit, n_min in ((60, 1), (45, 1), (100, 3)):
        groups = B._split_groups(sizes, limit, n_min)
        assert [x for g in groups for x in g] == [n for n, _ in sizes]
        assert all(sum(dict(sizes)[x] for x in g) <= limit for g in groups) and len(groups) >= n_min
    groups = B._split_groups(sizes, 60, last_limit=20)  # the last part travels beside the bundle
    assert [x for g in groups for x in g] == [n for n, _ in sizes]
    assert sum(dict(sizes)[x] for x in groups[-1]) <= 20 and all(sum(dict(sizes)[x] for x in g) <= 60 for g in groups)


def test_dequantize_matches_gguf():
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    rng = np.random.default_rng(0)
    for kind, bs in (("Q4_1", 20), ("Q8_0", 34)):
        raw = rng.integers(0, 256, size=(6, bs * 4), dtype=np.uint8)
        # finite f16 scales
        blocks = raw.reshape(-1, bs)
        blocks[:, :2] = np.array([0.01 if kind == "Q8_0" else 0.02], dtype=np.float16).view(np.uint8)
        if kind == "Q4_1":
            blocks[:, 2:4] = np.array([-0.1], dtype=np.float16).view(np.uint8)
        want = dequantize(raw, getattr(Q, kind))
        got = B.dequantize(raw.reshape(-1), kind, want.shape)
        assert np.array_equal(got, want), kind
    assert gguf is not None
