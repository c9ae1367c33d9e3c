"""The peer comparison (`python -m gist_memory.eval.peers`): kvpress found or skipped by name, its runner's RoPE
shift exact, its job the same prompt our reader reads, LLMLingua-2 at a reader-token budget, and a whole run on
the tiny model."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from gist_memory.eval import peers as P
from gist_memory.eval.llmlingua_baseline import llmlingua_status

TEXT = ("The northern lighthouse was built in 1874 by Maren Voss, a stonemason from the harbour town. "
        "Its lamp burned whale oil until the keepers switched to paraffin in the winter of 1902. "
        "Visitors reached it by a narrow causeway that flooded at every spring tide.")


def test_no_kvpress_environment_is_skipped_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.delenv("GIST_KVPRESS_PYTHON", raising=False)
    monkeypatch.setattr(P, "REPO_ENV", tmp_path / "none" / "python")
    py, msg = P.find_kvpress_python(str(tmp_path / "missing-python"))
    assert py is None
    assert msg.startswith("kvpress rows skipped") and "missing-python: no such file" in msg and "make kvpress-env" in msg
    py, msg = P.find_kvpress_python(sys.executable)  # our own environment has no kvpress (it pins transformers<5.3)
    if py is None:
        assert "cannot import kvpress" in msg
    else:  # pragma: no cover - someone installed kvpress next to us
        assert msg.startswith("kvpress ")


def test_the_runner_rope_shift_moves_keys_exactly_to_the_new_position():
    """Keys rotated at p, shifted by d, equal keys rotated at p + d (what lets a passage's kept rows sit anywhere)."""
    import torch

    from gist_memory.eval.kvpress_runner import Runner, _rotate_half

    d = 16
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))

    def rot(k, pos):  # noqa: ANN001, ANN202
        ang = pos[:, None].float() * inv[None]
        emb = torch.cat((ang, ang), -1)
        return k * emb.cos() + _rotate_half(k) * emb.sin()

    r = Runner.__new__(Runner)
    r.inv_freq = inv
    k = torch.randn(1, 2, 5, d)
    pos = torch.tensor([0, 3, 4, 9, 11])
    assert torch.allclose(r._shift(rot(k, pos), 40), rot(k, pos + 40), atol=1e-5)
    assert not torch.allclose(r._shift(rot(k, pos), 40), rot(k, pos + 41), atol=1e-3)


def test_the_kvpress_job_is_the_prompt_our_reader_reads(tiny_model):
    from gist_memory.data.qa import QAItem

    item = QAItem(id="x", kind="planted_single", passages=[TEXT, TEXT[:90]], question="Who built it?",
                  choices=["Maren Voss", "Ewald", "Tarn", "Quill"], answer_index=0, answer="Maren Voss", meta={})
    job = P.kvpress_job(tiny_model, tiny_model, [item], [TEXT], "What?", ["knorm"], "/m", 1, 2)
    it = job["items"][0]
    states = tiny_model.compress(item.passages)
    layers, start, head = tiny_model.prepare("Question: Who built it?\nAnswer:", states)
    assert it["suffix"] == head and layers[0][0].shape[2] == len(it["prefix"]) + sum(s.num_kept for s in states)
    assert [job["budgets"][p] for p in it["passages"]] == [s.num_kept for s in states]
    assert [job["passages"][p] for p in it["passages"]] == [tiny_model.encode(t) for t in item.passages]
    assert it["choices"][0] == tiny_model.encode(" Maren Voss")
    assert job["speed"][0]["passages"] == [it["passages"][0]]  # the same passage text is sent once


def _tiny_llmlingua2(root: Path) -> str:
    from transformers import BertConfig, BertForTokenClassification, BertTokenizerFast

    words = sorted({w for w in re.findall(r"[A-Za-z]+|\d|[^\sA-Za-z\d]", TEXT)} | {f"##{d}" for d in "0123456789"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=False)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=2,
                     architectures=["BertForTokenClassification"])
    model = BertForTokenClassification(cfg)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return str(root)


@pytest.mark.skipif(not llmlingua_status()[0], reason="llmlingua is not installed")
def test_llmlingua2_keeps_a_subsequence_of_words_at_about_the_reader_budget(tiny_model, tmp_path):
    from gist_memory.eval.llmlingua_baseline import LLMLingua2Compressor, LLMLinguaUnavailable

    with pytest.raises(LLMLinguaUnavailable, match="does not exist"):
        LLMLingua2Compressor(str(tmp_path / "nowhere"))
    (tmp_path / "tiny").mkdir()
    with pytest.raises(LLMLinguaUnavailable, match="must contain one of bert-base-multilingual-cased"):
        LLMLingua2Compressor(str(tmp_path / "tiny"))
    root = tmp_path / "tiny-bert-base-multilingual-cased"
    root.mkdir()
    comp = LLMLingua2Compressor(_tiny_llmlingua2(root), count_tokenizer=tiny_model.tokenizer)
    n = len(tiny_model.encode(TEXT))
    res = comp.compress(TEXT, n // 3, max_tries=6)
    assert res.tokens_in == n and 0 < res.tokens_out < n * 0.6
    assert res.tokens_out == len(tiny_model.encode(res.text))
    src = re.findall(r"\w+", TEXT.lower())
    out = re.findall(r"\w+", res.text.lower())
    it = iter(src)
    assert out and all(w in it for w in out)  # kept words, in order: a filter, not a rewrite


def test_a_peers_run_on_the_tiny_model_reports_every_row(tiny_base_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("GIST_KVPRESS_PYTHON", raising=False)
    monkeypatch.setattr(P, "REPO_ENV", tmp_path / "none" / "python")
    args = P.build_parser().parse_args(["--items", "3", "--k", "2", "--passage-tokens", "30", "--repeats", "1",
                                        "--threads", "1", "--model", "none", "--base", tiny_base_dir,
                                        "--no-llmlingua", "--out", ""])
    res = P.run_peers(args, log=lambda s: None)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"full", "none", "trunc@4", "pool@4", "pool+anchors@4", "gist-untrained@4"}
    assert rows["full"]["ratio"] == pytest.approx(1.0) and rows["none"]["ratio"] is None
    assert rows["trunc@4"]["ratio"] > 2 and rows["gist-untrained@4"]["ratio"] > 2
    assert rows["trunc@4"]["positions_per_passage"] < rows["full"]["positions_per_passage"]
    assert rows["gist-untrained@4"]["compress_s_per_passage"] > 0 and rows["trunc@4"]["compress_s_per_passage"] == 0
    assert all(r["n"] == 3 for r in rows.values())
    assert any(n.startswith("kvpress rows skipped") for n in res["notes"])
    assert any(n.startswith("LLMLingua-2 rows skipped") for n in res["notes"])
    md = P.render(res)
    assert "| KV pool+anchors 4x |" in md and "kvpress rows skipped" in md
    from types import SimpleNamespace

    from gist_memory import GistConfig

    assert res["trained_anchors"] is None and "anchors)." not in md.split("\n")[0]  # no trained model here
    fake = SimpleNamespace(trained={4.0: SimpleNamespace(config=GistConfig(anchors="recall", head_anchors=True))})
    assert P._anchors_of(fake, 4.0) == "recall per head"
    assert "Trained model: the shipped adapter (recall per head anchors)." in P.render({**res, "trained_anchors":
                                                                                          "recall per head"})
