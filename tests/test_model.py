"""The design's invariants on tiny random Llama and Qwen2 models (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from gist_memory import GistConfig, GistModel, GistState
from gist_memory.layout import Segment, build_layout
from gist_memory.model import kv

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Maren Voss became the chief curator in 1912. It was sunny.",
    "Python is a programming language. The archive code is QX-4471!",
    "Numbers like 2,318 metres matter.",
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tiny_base_dir, tiny_qwen_dir):
    base = tiny_base_dir if request.param == "llama" else tiny_qwen_dir
    return GistModel.from_base(base, GistConfig(gists_per_sentence=2, anchors="capitalized"), device="cpu")


def _segments(m, texts):
    return [m._segment(m.plan(t)) for t in texts]


def _full_pass_logits(m, segs, tail):
    lay = build_layout([segs], m.gist_token_ids, m._pad_id(), tails=[tail])
    out = m._base_lm()(input_ids=lay.input_ids, attention_mask=lay.attention_mask(), position_ids=lay.position_ids)
    return out.logits[0, -len(tail):], lay


@torch.no_grad()
def test_compress_then_continue_equals_one_masked_pass(model):
    segs = _segments(model, TEXTS[:2])
    tail = model._ids("\n\nWhat is the code? Answer:")
    full, _ = _full_pass_logits(model, segs, tail)
    states = model.compress(TEXTS[:2])
    assert any(s.num_anchors for s in states), "anchors must be part of this check"
    layers, pos = kv.splice(None, 0, states, model.rope, "gapped")
    logits, _ = model._forward(torch.as_tensor([tail]), layers, pos)
    assert (logits[0] - full).abs().max() <= 1e-3


@torch.no_grad()
def test_perturbing_raw_tokens_only_reaches_later_text_through_kept_rows(model):
    # piece 0 keeps nothing (0 gists, no anchors): later pieces and the tail cannot depend on its raw tokens
    ids = model._ids("Alpha beta gamma. delta epsilon zeta. eta theta.")
    n = len(ids)
    pieces = [(0, 4), (4, 8), (8, n)]
    other = Segment(ids=model._ids("unrelated text here."), pieces=[(0, len(model._ids("unrelated text here.")))], n_gists=[1])

    def run(first_ids, other_seg):
        s = Segment(ids=first_ids, pieces=pieces, n_gists=[0, 2, 1], anchors=[False] * n)
        lay = build_layout([[other_seg, s]], model.gist_token_ids, model._pad_id(), tails=[[5, 6, 7]])
        h = model._decoder()(input_ids=lay.input_ids, attention_mask=lay.attention_mask(), position_ids=lay.position_ids)
        return h.last_hidden_state[0], lay

    h0, lay = run(ids, other)
    changed = list(ids)
    changed[1] = (changed[1] + 7) % 500
    h1, _ = run(changed, other)
    later = (lay.segment[0] == 1) & (lay.piece[0] >= 2)  # pieces 1, 2 of segment 1 (piece ids are row-global)
    tail = lay.kind[0] == 2
    assert (h0[later] - h1[later]).abs().max() == 0
    assert (h0[tail] - h1[tail]).abs().max() == 0
    # changing the other segment changes nothing in this one
    o2 = Segment(ids=model._ids("different words there."), pieces=[(0, len(model._ids("different words there.")))], n_gists=[1])
    h2, lay2 = run(ids, o2)
    mine = lay2.segment[0] == 1
    if lay2.input_ids.shape == lay.input_ids.shape:
        assert (h0[mine] - h2[mine]).abs().max() <= 1e-5
    # but a kept row does carry information: with a gist on piece 0 the tail moves
    s_g = lambda first: Segment(ids=first, pieces=pieces, n_gists=[1, 2, 1])  # noqa: E731
    a = build_layout([[s_g(ids)]], model.gist_token_ids, model._pad_id(), tails=[[5, 6]])
    b = build_layout([[s_g(changed)]], model.gist_token_ids, model._pad_id(), tails=[[5, 6]])
    ha = model._decoder()(input_ids=a.input_ids, attention_mask=a.attention_mask(), position_ids=a.position_ids)
    hb = model._decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask(), position_ids=b.position_ids)
    assert (ha.last_hidden_state[0, -2:] - hb.last_hidden_state[0, -2:]).abs().max() > 1e-6


@torch.no_grad()
@pytest.mark.parametrize("delta", [1, 37, 1000])
def test_rerotation_equals_computing_at_shifted_positions(model, delta):
    lay = build_layout([_segments(model, TEXTS[:1])], model.gist_token_ids, model._pad_id())
    dec = model._decoder()
    a = kv.cache_layers(dec(input_ids=lay.input_ids, attention_mask=lay.attention_mask(), position_ids=lay.position_ids, use_cache=True).past_key_values)
    b = kv.cache_layers(dec(input_ids=lay.input_ids, attention_mask=lay.attention_mask(), position_ids=lay.position_ids + delta, use_cache=True).past_key_values)
    for (ka, va), (kb, vb) in zip(a, b):
        assert (kv.rotate(ka, torch.tensor(delta), model.rope) - kb).abs().max() <= 1e-5
        assert (va - vb).abs().max() <= 1e-5


@torch.no_grad()
def test_batch_equals_each_alone(model):
    batch = model.compress(TEXTS, batch_size=3)
    for text, st in zip(TEXTS, batch):
        alone = model.compress([text])[0]
        assert st.keys.shape == alone.keys.shape
        assert (st.keys - alone.keys).abs().max() <= 1e-4
        assert (st.values - alone.values).abs().max() <= 1e-4
        assert torch.equal(st.positions, alone.positions)


@torch.no_grad()
def test_long_text_chunked_equals_single_pass(model):
    text = " ".join(f"Sentence number {i} talks about Item{i}." for i in range(40))
    one = model.compress([text])[0]
    old = model.chunk_tokens
    model.chunk_tokens = 64
    try:
        assert len(model._chunks(model.plan(text))) > 3
        chunked = model.compress([text])[0]
    finally:
        model.chunk_tokens = old
    assert torch.equal(one.positions, chunked.positions)
    assert (one.keys - chunked.keys).abs().max() <= 1e-4


def test_state_roundtrip_bit_exact_and_checksum(model, tmp_path):
    st = model.compress(TEXTS[:1])[0]
    back = GistState.from_bytes(st.to_bytes())
    assert torch.equal(back.keys, st.keys) and torch.equal(back.values, st.values)
    assert back.model_fingerprint == st.model_fingerprint and back.sentence_spans == st.sentence_spans
    p = tmp_path / "s.safetensors"
    st.save(p)
    assert torch.equal(GistState.load(p).keys, st.keys)
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        GistState.load(p)


@torch.no_grad()
def test_generation_from_stored_states_equals_fresh(model, tmp_path):
    states = model.compress(TEXTS[:2])
    for i, s in enumerate(states):
        s.save(tmp_path / f"{i}.safetensors")
    loaded = [GistState.load(tmp_path / f"{i}.safetensors") for i in range(2)]
    a = model.generate("What is the code?", states=states, max_new_tokens=8)
    b = model.generate("What is the code?", states=loaded, max_new_tokens=8)
    assert a == b
    sa = model.score("What is the code?", " QX-4471", states=states)
    sb = model.score("What is the code?", " QX-4471", states=loaded)
    assert sa == pytest.approx(sb, abs=1e-5)


def test_state_of_another_model_is_refused(tiny_base_dir, model):
    other = GistModel.from_base(tiny_base_dir, GistConfig(gists_per_sentence=3), device="cpu")
    st = other.compress(TEXTS[:1])
    with pytest.raises(ValueError, match="recompress"):
        model.generate("q", states=st, max_new_tokens=2)
    with pytest.raises(ValueError, match="not a GistState"):
        model.score("q", " a", states=["text"])


def test_states_none_and_empty_are_plain_model(model):
    a = model.score("Tell me about it.", " Paris")
    b = model.score("Tell me about it.", " Paris", states=[])
    assert a == b
    full = model.score(TEXTS[1] + "\n\nWhat is the code?", " QX-4471")
    assert isinstance(full, float) and full < 0


def test_positions_and_compression_ratio(model):
    st = model.compress(TEXTS[:1])[0]
    plan = model.plan(TEXTS[0])
    assert st.num_tokens == plan.num_tokens
    assert st.num_kept == plan.num_kept == st.num_gists
    assert st.compression_ratio == pytest.approx(plan.num_tokens / plan.num_kept)
    assert st.span == plan.num_tokens + sum(plan.n_other)
    assert torch.all(st.positions[1:] > st.positions[:-1])


@pytest.mark.parametrize("ratio", [2.0, 4.0, 8.0])
def test_target_ratio_lands_within_10_percent(tiny_base_dir, ratio):
    m = GistModel.from_base(tiny_base_dir, GistConfig(target_ratio=ratio, anchors="capitalized"), device="cpu")
    text = " ".join(
        f"In {1900 + i} the committee of Town{i} met {i % 5 + 2} times and approved plan number {i * 37}." for i in range(12)
    )
    st = m.compress([text])[0]
    assert abs(st.compression_ratio - ratio) / ratio <= 0.10, st.compression_ratio


@pytest.mark.parametrize("compressor", ["pool", "pool+anchors"])
def test_training_free_compressors(tiny_base_dir, compressor):
    m = GistModel.from_base(tiny_base_dir, GistConfig(compressor=compressor, target_ratio=4.0), device="cpu")
    assert m.gist_token_ids == []
    states = m.compress(TEXTS[:2])
    for st in states:
        assert 3.0 <= st.compression_ratio <= 5.0 or st.num_tokens < 16
        assert st.span == st.num_tokens
        assert torch.all(st.positions[1:] >= st.positions[:-1])
    if compressor == "pool+anchors":
        assert sum(s.num_anchors for s in states) > 0
    out = m.generate("What is the code?", states=states, max_new_tokens=4)
    assert isinstance(out, str)


def test_packed_positions_mode(tiny_base_dir):
    m = GistModel.from_base(tiny_base_dir, GistConfig(gists_per_sentence=1, position_mode="packed"), device="cpu")
    states = m.compress(TEXTS[:2])
    layers, nxt = m.prepare("q", states)[:2]
    prefix_len = len(m._ids(m._template("q", True, None)[0]))
    assert nxt == prefix_len + sum(s.num_kept for s in states)
    assert layers[0][0].shape[2] == nxt


def test_save_and_load_roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path / "gm")
    back = GistModel.from_pretrained(tmp_path / "gm", device="cpu")
    assert back.fingerprint == model.fingerprint
    a = model.compress(TEXTS[:1])[0]
    b = back.compress(TEXTS[:1])[0]
    assert torch.equal(a.keys, b.keys)
    with pytest.raises(FileNotFoundError):
        GistModel.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a saved gist model"):
        GistModel.from_pretrained(tmp_path)


def test_streaming_matches_generate(model):
    st = model.compress(TEXTS[1:2])
    pieces = list(model.stream("What is the code?", states=st, max_new_tokens=6))
    assert "".join(pieces) == model.generate("What is the code?", states=st, max_new_tokens=6)
    assert model.last_usage["raw_tokens"] == st[0].num_tokens
    assert model.last_usage["positions_read"] < st[0].num_tokens + 40
    with pytest.raises(TypeError, match="unsupported generation"):
        model.generate("q", bogus=1)


def test_context_prefix_sits_before_the_states(tiny_model):
    st = tiny_model.compress(TEXTS[1:2])
    before, after = tiny_model._template("Q?", True, None, "Context is below.\n")
    assert before.endswith("Context is below.\n") and after.startswith("\n\nQ?")
    a = tiny_model.score("Q?", " A", states=st, context_prefix="Context is below.\n")
    b = tiny_model.score("Q?", " A", states=st)
    assert a != b
    plain = tiny_model._template("Q?", False, None, "Context: ")[0]
    assert "Context: Q?" in plain


def test_chat_messages_place_states_in_the_first_user_turn(model):
    st = model.compress([TEXTS[1]])
    q = "What is the archive code?"
    # one user message == the plain prompt; a system message == system_prompt
    assert model.generate([{"role": "user", "content": q}], states=st, max_new_tokens=4) == model.generate(
        q, states=st, max_new_tokens=4)
    a = model.score(q, " QX-4471", states=st, system_prompt="Be brief.")
    b = model.score([{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}], " QX-4471", states=st)
    assert a == pytest.approx(b, abs=1e-5)
    # a conversation: states before the first user turn, later turns after them
    conv = [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hi! Ask away."},
            {"role": "user", "content": q}]
    before, after = model._template(conv, True, None)
    assert "Hello there." not in before and after.index("Hello there.") < after.index("Hi! Ask away.") < after.index(q)
    assert model.score(conv, " QX-4471", states=st) != pytest.approx(model.score(q, " QX-4471", states=st), abs=1e-6)
    assert isinstance(model.generate(conv, states=st, max_new_tokens=3), str)


@pytest.mark.parametrize("bad, match", [
    ([], "empty"),
    ([{"role": "bot", "content": "x"}], "role"),
    ([{"role": "user"}], "content"),
    (["just a string"], "mapping"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "last message"),
])
def test_bad_messages_are_named(tiny_model, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.generate(bad, max_new_tokens=2)


def test_system_prompt_given_twice_and_plain_models(tiny_model, tiny_base_dir):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    with pytest.raises(ValueError, match="system"):
        tiny_model.score(msgs, " a", system_prompt="S")
    with pytest.raises(TypeError, match="prompt"):
        tiny_model.generate(42, max_new_tokens=2)  # type: ignore[arg-type]
    plain = GistModel.from_base(tiny_base_dir, GistConfig(), device="cpu")
    plain.tokenizer.chat_template = None
    st = plain.compress([TEXTS[1]])
    conv = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "The code?"}]
    before, after = plain._template(conv, True, None)
    assert after.endswith("User: The code?\n\nAssistant:") and "Assistant: Hello." in after
    assert isinstance(plain.generate(conv, states=st, max_new_tokens=2), str)
    # a single message renders exactly as a plain prompt string
    assert plain._template([{"role": "user", "content": "Q"}], True, "S") == plain._template("Q", True, "S")
