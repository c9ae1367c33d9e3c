"""`GistModel.with_config`: one trained writer served at other ratios / anchor rules keeps its gist rows and LoRA
(a new `GistModel` on the same weights gets a fresh, untrained writer: the bench's trained rows once did)."""

from __future__ import annotations

import pytest
import torch

from gist_memory import GistConfig, GistModel

TEXT = ("The northern lighthouse was built in 1874 by Maren Voss, a stonemason from the harbour town. Its lamp "
        "burned whale oil until the keepers switched to paraffin in the winter of 1902.")


@pytest.fixture(scope="module")
def trained(tiny_base_dir):
    gm = GistModel.from_base(tiny_base_dir, GistConfig(target_ratio=4, anchors="capitalized", max_sentence_tokens=48),
                             device="cpu", lora_r=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: every writer parameter moves
        for p in gm.writer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    gm.invalidate_fingerprint()
    return gm


def test_same_config_twin_writes_the_same_states(trained):
    twin = trained.with_config(target_ratio=4.0)
    assert twin.writer is trained.writer and twin.has_lora and twin.fingerprint == trained.fingerprint
    a, b = trained.compress(TEXT)[0], twin.compress(TEXT)[0]
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    fresh = GistModel(trained.model, trained.tokenizer, trained.config, trained.base_ref)
    c = fresh.compress(TEXT)[0]
    assert not fresh.has_lora and fresh.fingerprint != trained.fingerprint
    assert not torch.allclose(a.keys, c.keys)  # what with_config exists to avoid


def test_other_ratio_and_anchors_keep_the_writer(trained):
    for twin in (trained.with_config(target_ratio=2.0), trained.with_config(target_ratio=8.0),
                 trained.with_config(anchors="none")):
        assert twin.writer is trained.writer and twin.config.num_gist_tokens == trained.config.num_gist_tokens
        assert twin.fingerprint != trained.fingerprint
    s2, s8 = trained.with_config(target_ratio=2.0).compress(TEXT)[0], trained.with_config(target_ratio=8.0).compress(TEXT)[0]
    assert s2.num_kept > s8.num_kept
    assert trained.config.target_ratio == 4.0 and trained.config.anchors == "capitalized"  # the original is untouched


def test_with_config_refuses_what_cannot_share_a_writer(trained):
    with pytest.raises(ValueError, match="compressor cannot change"):
        trained.with_config(compressor="pool")
    with pytest.raises(ValueError, match="gist tokens"):
        trained.with_config(num_gist_tokens=trained.config.num_gist_tokens + 1)
    with pytest.raises(ValueError, match="unknown GistConfig fields"):
        trained.with_config(ratio=3)


def test_the_bench_trained_rows_use_the_trained_writer(trained, tiny_base_dir, tmp_path):
    from gist_memory.eval import bench as B

    trained.save_pretrained(tmp_path / "m")
    b = B.Bench(B.BenchConfig(**{**B.QUICK, "base": tiny_base_dir, "model": str(tmp_path / "m")}), log=lambda s: None)
    try:
        for r, gm in b.trained.items():
            assert gm.writer is b.trained_base.writer and gm.has_lora and gm.config.target_ratio == r
        st = b.trained[4.0].compress(TEXT)[0]
        ref = GistModel.from_pretrained(tmp_path / "m", device="cpu").compress(TEXT)[0]
        assert torch.allclose(st.keys, ref.keys, atol=1e-5)
    finally:
        b.close()
