"""The public contract on the bundled SmolLM2-135M-Instruct (slow: loads the real model)."""

from __future__ import annotations

import pytest
import torch

from gist_memory import GistConfig, GistModel, GistState

pytestmark = pytest.mark.slow

PASSAGES = [
    "The Harlow archive was founded in 1871. Its catalogue code is QX-4471. It holds maps of the northern coast.",
    "Maren Voss became the chief curator of the Ostend museum in 1912. She catalogued over 3,000 shells.",
]


def test_contract_on_bundled_model(smol_model, tmp_path):
    m = smol_model
    states = m.compress(PASSAGES)
    assert len(states) == 2 and all(isinstance(s, GistState) for s in states)
    assert all(s.num_layers == 30 and s.compression_ratio > 1.0 for s in states)
    assert states[0].num_anchors > 0
    text = m.generate("What is the capital of France?", max_new_tokens=12)
    assert "Paris" in text
    out = m.generate("Which archive is described?", states=states, max_new_tokens=8)
    assert isinstance(out, str) and m.last_usage["positions_read"] < sum(s.num_tokens for s in states) + 40
    # the anchor rows carry the exact code: with states the right code beats a confusable one
    q = "Question: What is the Harlow archive's catalogue code?\nAnswer:"
    good, bad = m.score_choices(q, [" QX-4471", " QX-7714"], states=states[:1])
    assert good > bad
    # cached states equal fresh ones
    states[0].save(tmp_path / "a.safetensors")
    again = GistState.load(tmp_path / "a.safetensors")
    assert m.score(q, " QX-4471", states=[again]) == pytest.approx(good, abs=1e-4)


def test_training_free_pool_anchors_on_bundled_model():
    m = GistModel.from_base(None, GistConfig(compressor="pool+anchors", target_ratio=4.0), device="cpu")
    st = m.compress(PASSAGES[1:])[0]
    assert 3.2 <= st.compression_ratio <= 4.8
    q = "Question: In which year did Maren Voss become chief curator?\nAnswer:"
    s = m.score_choices(q, [" 1912", " 1921", " 1894", " 1955"], states=[st])
    assert max(range(4), key=lambda i: s[i]) == 0


@torch.no_grad()
def test_bundled_compress_then_continue_matches_masked_pass(smol_model):
    from gist_memory.layout import build_layout
    from gist_memory.model import kv

    m = smol_model
    segs = [m.segment(m.plan(p)) for p in PASSAGES]
    tail = m.encode("\n\nQuestion: who?")
    lay = build_layout([segs], m._pad_id(), tails=[tail])
    full = m.forward_layout(lay)[0, -len(tail):]
    layers, pos = kv.splice(None, 0, m.compress(PASSAGES), m.rope, "gapped")
    logits, _ = m.forward_ids(torch.as_tensor([tail]), layers, pos)
    assert (logits[0] - full).abs().max() <= 1e-3


def test_shipped_default_adapter_loads_offline_and_reads_states():
    from gist_memory.model import default_model_dir

    assert (default_model_dir() / "MODEL_CARD.md").is_file()
    size = sum(f.stat().st_size for f in default_model_dir().iterdir())
    assert size < 25 * 2**20
    m = GistModel.from_pretrained(device="cpu")
    assert m.config.compressor == "gist" and m.writer is not None
    # the memory layer never makes the model worse: with no states it answers as the base model does
    assert "Paris" in m.generate("What is the capital of France?", max_new_tokens=12)
    base = GistModel.from_base(None, GistConfig(compressor="pool"), device="cpu")
    assert m.generate("What is 12 plus 7?", max_new_tokens=16) == base.generate("What is 12 plus 7?", max_new_tokens=16)
    st = m.compress(PASSAGES[:1])[0]
    assert 3.2 <= st.compression_ratio <= 4.8
    q = "Question: What is the Harlow archive's catalogue code?\nAnswer:"
    with_states = m.score(q, " QX-4471", states=[st])
    without = m.score(q, " QX-4471")
    assert abs(with_states - without) > 0.1  # the answer reads the states (quality: see the model card's table)
    eight = GistModel.from_pretrained(device="cpu", config_overrides={"target_ratio": 8})
    assert eight.compress(PASSAGES[:1])[0].compression_ratio > st.compression_ratio
