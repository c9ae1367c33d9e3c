"""Sentence splitting, span mapping, anchors, and bad input to the engine."""

from __future__ import annotations

import numpy as np
import pytest

from gist_memory import GistConfig, GistModel
from gist_memory.text import SentenceSplitter, anchor_char_spans, normalize_text, token_pieces


def test_split_handles_lists_code_no_punctuation_and_scripts():
    sp = SentenceSplitter()
    text = "First one. Second one!\n- item a\n- item b\ndef f(x):\n    return x\nno punctuation at all"
    spans = sp.split(text)
    got = [text[s:e] for s, e in spans]
    assert got[:2] == ["First one.", "Second one!"]
    assert "- item a" in got and "return x" in got and got[-1] == "no punctuation at all"
    mixed = "Привет, мир. 日本語のテキスト。 Emoji 🙂 here. Ünïcödé ok."
    assert all(e > s for s, e in sp.split(mixed))
    assert sp.split("   \n\t ") == []


def test_token_pieces_cover_all_tokens_and_follow_sentences(tiny_model):
    tok = tiny_model.tokenizer
    text = "The fox ran. Maren Voss came in 1912. Short."
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces = token_pieces(np.asarray(enc["offset_mapping"]), SentenceSplitter().split(text), max_tokens=64)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(enc["input_ids"])
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    decoded = [tok.decode(enc["input_ids"][s:e]).strip() for s, e in pieces]
    assert decoded == ["The fox ran.", "Maren Voss came in 1912.", "Short."]


def test_long_sentence_is_cut_and_short_pieces_merge():
    offsets = np.stack([np.arange(100), np.arange(1, 101)], 1)
    assert [e - s for s, e in token_pieces(offsets, [(0, 100)], max_tokens=30)] == [30, 30, 30, 10]
    spans = [(0, 2), (2, 4), (4, 50), (50, 100)]
    merged = token_pieces(offsets, spans, max_tokens=64, min_tokens=8)
    assert all(e - s >= 8 for s, e in merged) and merged[-1][1] == 100


def test_anchor_policies():
    text = "The archive code is QX-4471. Maren Voss arrived in 1912."
    spans = anchor_char_spans(text, [], "capitalized")
    words = {text[s:e] for s, e, _ in spans}
    assert {"QX-4471", "Maren", "Voss", "1912"} <= words and "The" not in words
    assert anchor_char_spans(text, [], "none") == []
    custom = anchor_char_spans(text, [], lambda t: [(0, 3)])
    assert custom == [(0, 3, 0)]
    with pytest.raises(ValueError, match="outside"):
        anchor_char_spans(text, [], lambda t: [(0, 999)])


def test_normalize():
    assert normalize_text("  a\r\nb \u0065\u0301 ") == "a\nb \u00e9"
    with pytest.raises(TypeError):
        normalize_text(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "   ", "\n\t  \n"])
def test_empty_text_is_a_clear_error(tiny_model, bad):
    with pytest.raises(ValueError, match="empty"):
        tiny_model.compress([bad])


def test_one_sentence_of_5000_tokens_and_mixed_scripts(tiny_model):
    text = " ".join(["word"] * 5000)
    st = tiny_model.compress([text])[0]
    assert st.num_tokens >= 5000
    assert len(st.sentence_spans) >= 5000 // tiny_model.config.max_sentence_tokens
    mixed = tiny_model.compress(["Привет, мир. 日本語のテキスト。 Emoji 🙂🙂 here. Ünïcödé ok."])[0]
    assert mixed.num_tokens > 0 and mixed.num_kept > 0
    assert isinstance(tiny_model.generate("?", states=[mixed], max_new_tokens=3), str)


def test_100k_token_text(tiny_model):
    text = " ".join(f"Line {i} of the log says ok." for i in range(12_500))
    st = tiny_model.compress([text])[0]
    assert st.num_tokens >= 100_000
    assert 2.0 < st.compression_ratio < 10.0


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="target_ratio"):
        GistConfig(target_ratio=0.5)
    with pytest.raises(ValueError, match="compressor"):
        GistConfig(compressor="magic")
    with pytest.raises(ValueError, match="position_mode"):
        GistConfig(position_mode="x")
    with pytest.raises(ValueError, match="unknown GistConfig keys"):
        GistConfig.from_dict({"nope": 1})
    cfg = GistConfig(target_ratio=4, anchors="entities")
    cfg.save_pretrained(tmp_path)
    assert GistConfig.from_pretrained(tmp_path) == cfg
    (tmp_path / "gist_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid json"):
        GistConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="callable"):
        GistConfig(anchors=lambda t: []).to_dict()


def _save_tiny(path, cfg_cls, **extra):
    from transformers import AutoModelForCausalLM

    from tests.tiny import build_tokenizer

    tok = build_tokenizer(path)
    cfg = cfg_cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, **extra)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return str(path)


def test_model_without_rope_is_refused(tmp_path):
    from transformers import GPT2Config

    path = tmp_path / "gpt2"
    from transformers import AutoModelForCausalLM

    from tests.tiny import build_tokenizer

    tok = build_tokenizer(path)
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4)).save_pretrained(path)
    with pytest.raises(ValueError, match="no rotary position embedding"):
        GistModel.from_base(str(path), device="cpu")


def test_unsupported_rope_type_is_refused(tmp_path):
    from transformers import LlamaConfig

    path = _save_tiny(tmp_path / "dyn", LlamaConfig, num_key_value_heads=2,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="unsupported rope type 'dynamic'"):
        GistModel.from_base(path, device="cpu")


def test_wrong_base_path_is_clear():
    with pytest.raises((FileNotFoundError, ValueError), match="does not exist|could not load"):
        GistModel.from_base("./no/such/model", device="cpu")
