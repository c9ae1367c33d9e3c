"""The design's invariants on tiny random Llama and Qwen2 models (fp32, CPU)."""

from __future__ import annotations

import json

import numpy as np
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
    m = GistModel.from_base(base, GistConfig(gists_per_sentence=2, anchors="capitalized"), device="cpu", lora_r=4)
    with torch.no_grad():  # a writer LoRA that really changes the gist rows (B starts at zero)
        for mod in m.writer.lora.values():
            mod.lora_B.normal_(0, 0.5)
    m.invalidate_fingerprint()
    return m


def _segments(m, texts):
    return [m.segment(m.plan(t)) for t in texts]


def _full_pass_logits(m, segs, tail):
    lay = build_layout([segs], m._pad_id(), tails=[tail])
    return m.forward_layout(lay)[0, -len(tail):], lay


def _hidden(m, lay):
    """Last hidden states of the reference single pass (writer on gist rows only)."""
    emb = m.model.get_input_embeddings()(lay.input_ids)
    is_gist = lay.kind == 1
    emb = torch.where(is_gist[..., None], m.writer.embed(lay.gist_slot.clamp_min(0), emb.dtype), emb)
    with m.writer.writing(gate=is_gist):
        return m.model.get_decoder()(inputs_embeds=emb, attention_mask=lay.attention_mask(),
                                     position_ids=lay.position_ids).last_hidden_state[0]


@torch.no_grad()
def test_compress_then_continue_equals_one_masked_pass(model):
    segs = _segments(model, TEXTS[:2])
    tail = model.encode("\n\nWhat is the code? Answer:")
    full, _ = _full_pass_logits(model, segs, tail)
    states = model.compress(TEXTS[:2])
    assert any(s.num_anchors for s in states), "anchors must be part of this check"
    layers, pos = kv.splice(None, 0, states, model.rope, "gapped")
    logits, _ = model.forward_ids(torch.as_tensor([tail]), layers, pos)
    assert (logits[0] - full).abs().max() <= 1e-3


@torch.no_grad()
def test_perturbing_raw_tokens_only_reaches_the_tail_through_kept_rows(model):
    # piece 0 keeps nothing (0 gists, no anchors); gists of later pieces read it, the tail only through them
    ids = model.encode("Alpha beta gamma. delta epsilon zeta. eta theta.")
    n = len(ids)
    pieces = [(0, 4), (4, 8), (8, n)]
    o_ids = model.encode("unrelated text here.")
    other = Segment(ids=o_ids, pieces=[(0, len(o_ids))], n_gists=[1])

    def run(first_ids, other_seg, n_gists=(0, 2, 1)):
        s = Segment(ids=first_ids, pieces=pieces, n_gists=list(n_gists), anchors=[False] * n)
        lay = build_layout([[other_seg, s]], model._pad_id(), tails=[[5, 6, 7]])
        return _hidden(model, lay), lay

    h0, lay = run(ids, other)
    changed = list(ids)
    changed[1] = (changed[1] + 7) % 500
    h1, _ = run(changed, other)
    tail = lay.kind[0] == 2
    assert (h0[tail] - h1[tail]).abs().max() > 1e-6  # the gists of pieces 1-2 saw the change
    # with no gist at all, the tail cannot see the change
    h0n, lay_n = run(ids, other, (0, 0, 0))
    h1n, _ = run(changed, other, (0, 0, 0))
    tail_n = lay_n.kind[0] == 2
    assert (h0n[tail_n] - h1n[tail_n]).abs().max() <= 1e-6
    # the other segment never sees this one
    first = lay.segment[0] == 0
    assert (h0[first] - h1[first]).abs().max() <= 1e-6


@torch.no_grad()
@pytest.mark.parametrize("delta", [1, 37, 1000])
def test_rerotation_equals_computing_at_shifted_positions(model, delta):
    ids = torch.as_tensor([model.encode(TEXTS[0])])
    dec = model.model.get_decoder()
    pos = torch.arange(ids.shape[1])[None]
    a = kv.cache_layers(kv.out_cache(dec(input_ids=ids, position_ids=pos, use_cache=True)))
    b = kv.cache_layers(kv.out_cache(dec(input_ids=ids, position_ids=pos + delta, use_cache=True)))
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
    assert st.span == plan.num_tokens  # gists sit at the positions of the text they stand for
    assert torch.all(st.positions[1:] >= st.positions[:-1]) and int(st.positions.max()) < st.span


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
    assert m.writer is None
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
    prefix_len = len(m.encode(m._template("q", True, None)[0]))
    assert nxt == prefix_len + sum(s.num_kept for s in states)
    assert layers[0][0].shape[2] == nxt


def test_gapped_positions_past_the_window_are_packed(tiny_base_dir):
    m = GistModel.from_base(tiny_base_dir, GistConfig(gists_per_sentence=1), device="cpu")
    assert m.config.position_mode == "gapped"
    states = m.compress(TEXTS[:3])
    prefix_len = len(m.encode(m._template("q", True, None)[0]))
    gapped = prefix_len + sum(s.span for s in states)
    packed = prefix_len + sum(s.num_kept for s in states)
    assert packed < gapped
    assert m.prepare("q", states)[1] == gapped  # inside the window: positions as in the raw text
    suffix = len(m.prepare("q", states)[2])
    m.model.config.max_position_embeddings = gapped + suffix + 4  # prompt fits, 4 tokens of answer too
    assert m.prepare("q", states)[1] == gapped and m.prepare("q", states, reserve=4)[1] == gapped
    assert m.prepare("q", states, reserve=5)[1] == packed  # the answer would run past the window
    m.model.config.max_position_embeddings = gapped  # the suffix would run past it
    layers, nxt, _ = m.prepare("q", states)
    assert nxt == packed and layers[0][0].shape[2] == packed
    assert m.generate("q", states=states, max_new_tokens=2) == m.generate("q", states=states, max_new_tokens=2)


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


@torch.no_grad()
def test_without_states_the_reader_is_the_base_model_bit_for_bit(model, tiny_base_dir, tiny_qwen_dir):
    """A trained writer (here a random, non-zero LoRA) changes nothing outside the compression pass."""
    from transformers import AutoModelForCausalLM

    base_dir = tiny_base_dir if model.model.config.model_type == "llama" else tiny_qwen_dir
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base.eval()
    before, _ = model._template("Tell me about the archive.", False, None)
    ids = torch.as_tensor([model.encode(before)])
    model.compress(TEXTS[:1])  # a compression pass in between must leave no trace
    assert torch.equal(model.model(input_ids=ids).logits, base(input_ids=ids).logits)
    ours = model.generate("Tell me about the archive.", max_new_tokens=12)
    ref = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                        eos_token_id=sorted(model._eos_ids(None)), pad_token_id=model._pad_id())
    assert ours == model.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    lp = torch.log_softmax(base(input_ids=torch.as_tensor([model.encode(before + " Paris")])).logits[0].float(), -1)
    cont = model.encode(" Paris")
    ref_score = float(sum(lp[ids.shape[1] - 1 + t, c] for t, c in enumerate(cont)))
    assert model.score("Tell me about the archive.", " Paris") == pytest.approx(ref_score, abs=1e-4)


@torch.no_grad()
def test_the_writer_acts_only_inside_writing(model):
    st_a = model.compress(TEXTS[:1])[0]
    saved = {k: (m.lora_B.clone()) for k, m in model.writer.lora.items()}
    try:
        for m in model.writer.lora.values():
            m.lora_B.zero_()
        st_b = model.compress(TEXTS[:1])[0]
    finally:
        for k, m in model.writer.lora.items():
            m.lora_B.copy_(saved[k])
    gist = st_a.kinds == 0
    anchor = st_a.kinds == 1
    assert (st_a.keys[:, :, gist] - st_b.keys[:, :, gist]).abs().max() > 1e-4  # LoRA moves the gist rows ...
    assert torch.equal(st_a.keys[:, :, anchor], st_b.keys[:, :, anchor])  # ... never the raw anchor rows


def test_stop_strings_never_leak_into_the_stream(tiny_model):
    free = tiny_model.generate("Say something.", max_new_tokens=12)
    if len(free) < 4:
        pytest.skip("the tiny model stopped too early to test a split stop string")
    stop = free[2:5]  # a stop string that appears after the first pieces, possibly split across tokens
    pieces = list(tiny_model.stream("Say something.", max_new_tokens=12, stop=[stop]))
    joined = "".join(pieces)
    assert joined == free[: free.index(stop)]
    assert stop not in joined and all(stop[:1] not in p or stop not in joined for p in pieces)


def test_old_adapter_format_and_foreign_base_are_named(model, tmp_path, tiny_base_dir, tiny_qwen_dir):
    import json

    model.save_pretrained(tmp_path / "gm")
    meta = json.loads((tmp_path / "gm" / "gist_adapter.json").read_text())
    (tmp_path / "gm" / "gist_adapter.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(ValueError, match="format 1"):
        GistModel.from_pretrained(tmp_path / "gm", device="cpu")
    other = tiny_qwen_dir if meta["base"] == tiny_base_dir else tiny_base_dir
    (tmp_path / "gm" / "gist_adapter.json").write_text(json.dumps({**meta, "base": other}))
    with pytest.raises(ValueError, match="fingerprint"):
        GistModel.from_pretrained(tmp_path / "gm", device="cpu")
    (tmp_path / "gm" / "gist_adapter.json").write_text(json.dumps(meta))
    (tmp_path / "gm" / "gist_adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        GistModel.from_pretrained(tmp_path / "gm", device="cpu")


def test_usage_comes_back_with_each_call(tiny_model):
    from gist_memory.model.usage import Usage

    st = tiny_model.compress(TEXTS[1:2])
    u = Usage()
    text = tiny_model.generate("What is the code?", states=st, max_new_tokens=5, usage=u)
    assert u.raw_tokens == st[0].num_tokens and u.kept_rows == st[0].num_kept
    assert 0 <= u.new_tokens <= 5
    assert u.prompt_tokens > 0 and u.positions_read >= u.prompt_tokens + st[0].num_kept
    assert u.ttft_s is not None and 0 < u.ttft_s <= u.total_s
    text2, u2 = tiny_model.generate_with_usage("What is the code?", states=st, max_new_tokens=5)
    assert text2 == text and u2.positions_read == u.positions_read and u2.new_tokens == u.new_tokens
    plain = Usage()
    tiny_model.score("What is the code?", " QX", usage=plain)
    assert plain.raw_tokens == 0 and plain.kept_rows == 0 and plain.new_tokens == 0 and plain.ttft_s is None
    assert plain.positions_read == plain.prompt_tokens > 0 and plain.total_s > 0
    choices = Usage()
    tiny_model.score_choices("What is the code?", [" A", " B"], states=st, usage=choices)
    assert choices.raw_tokens == st[0].num_tokens
    streamed = Usage()
    it = tiny_model.stream("What is the code?", states=st, max_new_tokens=5, usage=streamed)
    assert streamed.total_s == 0  # filled when the stream ends, not before
    assert "".join(it) == text and streamed.new_tokens == u.new_tokens
    assert set(u.to_dict()) == {"raw_tokens", "kept_rows", "positions_read", "state_positions", "positions_held",
                                "prompt_tokens", "new_tokens", "ttft_s", "total_s"}
    assert u.state_positions == st[0].num_kept and u.positions_held == u.positions_read  # even heads: no slots
    with pytest.raises(TypeError, match="usage must be"):
        tiny_model.generate("q", usage={}, max_new_tokens=1)


def test_last_usage_is_per_thread(tiny_model):
    import threading

    st = tiny_model.compress(TEXTS[1:2])
    tiny_model.generate("What is the code?", states=st, max_new_tokens=3)
    mine = tiny_model.last_usage
    assert mine["raw_tokens"] == st[0].num_tokens
    seen = {}

    def other() -> None:
        seen["before"] = tiny_model.last_usage
        tiny_model.score("Hello", " there")
        seen["after"] = tiny_model.last_usage

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["before"] == {} and seen["after"]["raw_tokens"] == 0
    assert tiny_model.last_usage == mine  # the other thread's call did not overwrite this thread's usage


def test_base_fingerprint_ignores_where_and_how_the_weights_were_loaded(tiny_base_dir, tmp_path):
    import shutil

    a = GistModel.from_base(tiny_base_dir, GistConfig(), device="cpu")
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_base_dir, moved)
    b = GistModel.from_base(str(moved), GistConfig(), device="cpu", dtype="bfloat16")
    assert a.base_fingerprint() == b.base_fingerprint()
    with torch.no_grad():
        next(b.model.parameters()).add_(1.0)
    assert a.base_fingerprint() != b.base_fingerprint()


@torch.no_grad()
def test_windows_of_a_long_text_equal_the_reference_pass(tiny_base_dir):
    m = GistModel.from_base(tiny_base_dir, GistConfig(gists_per_sentence=2, anchors="capitalized", window_tokens=64,
                                                     max_sentence_tokens=32), device="cpu", lora_r=2)
    with torch.no_grad():
        for mod in m.writer.lora.values():
            mod.lora_B.normal_(0, 0.5)
    m.invalidate_fingerprint()
    text = " ".join(f"Sentence number {i} talks about Item{i}." for i in range(30))
    m.chunk_tokens = 48
    st = m.compress([text])[0]
    seg = m.segment(m.plan(text))
    tail = m.encode("\n\nWhich item?")
    lay = build_layout([[seg]], m._pad_id(), tails=[tail], window_tokens=64)
    assert int(lay.window.max()) >= 2  # several windows
    ref = m.forward_layout(lay)[0, -len(tail):]
    layers, pos = kv.splice(None, 0, [st], m.rope, "gapped")
    logits, _ = m.forward_ids(torch.as_tensor([tail]), layers, pos)
    assert (logits[0] - ref).abs().max() <= 1e-3


@torch.no_grad()
def test_an_adapted_reader_changes_only_what_reads_states_and_round_trips(model, tmp_path):
    """The comparison variant: `reader_adapted` puts the LoRA on tokens read after states, never elsewhere."""
    st = model.compress(TEXTS[:1])
    q, a = "Who kept the archive?", " Mira"
    base_no, base_with = model.score(q, a), model.score(q, a, states=st)
    model.reader_adapted = True
    try:
        assert model.score(q, a) == base_no  # no states: the base model, adapted or not
        adapted = model.score(q, a, states=st)
        assert abs(adapted - base_with) > 1e-4  # with states the LoRA acts on the reading tokens
        layers, start, head = model.prepare(q, st)
        ids = torch.as_tensor([head])
        frozen, _ = model.forward_ids(ids, layers, start, adapted=False)  # a training teacher forces the base
        assert not torch.allclose(frozen, model.forward_ids(ids, layers, start)[0])
        model.save_pretrained(tmp_path / "adapted")
    finally:
        model.reader_adapted = False
    meta = json.loads((tmp_path / "adapted" / "gist_adapter.json").read_text())
    assert meta["reader"] == "adapted"
    meta["reader"] = "sideways"
    (tmp_path / "adapted" / "gist_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown reader"):
        type(model).from_pretrained(tmp_path / "adapted")


@pytest.mark.parametrize("policy", ["surprisal", "capitalized+surprisal", "recall", "capitalized+recall"])
def test_surprisal_anchors_from_the_first_pass_match_an_explicit_scoring_pass(tiny_base_dir, policy):
    """`compress` ranks words from its own first pass; `plan` reads the text once more: the same anchors."""
    m = GistModel.from_base(tiny_base_dir, GistConfig(target_ratio=4.0, anchors=policy, compressor="pool+anchors",
                                                      max_anchor_fraction=0.75), device="cpu")  # fmt: skip
    long_text = " ".join(TEXTS) * 6
    m.chunk_tokens = 64  # the long text goes the windowed/chunked way
    states = m.compress(TEXTS + [long_text])
    for text, st in zip(TEXTS + [long_text], states):
        plan = m.plan(text)
        assert plan.scored
        kept = st.positions[st.kinds == 1].tolist()
        assert kept == np.flatnonzero(plan.anchors).tolist()
        assert st.num_kept == plan.num_kept
        s = m.token_scores(plan.ids)
        assert s.shape == (plan.num_tokens,) and np.isfinite(s).all() and (s >= 0).all()
        if "recall" in policy:  # attention probabilities: at most 1 each, and the same on a second reading
            assert (s <= 1.0 + 1e-6).all() and np.allclose(s, m.token_recall(plan.ids))


@torch.no_grad()
def test_score_choices_reads_the_prompt_once_and_matches_one_pass_per_choice(model):
    """The prompt is prefilled once and the choices run over its cache: the same sums as one pass per choice."""
    st = model.compress(TEXTS[:2])
    conts = [" Mira", " the archive keeper of the old town", " 1874", "."]
    for states in (None, st):
        got = model.score_choices("Who kept the archive?", conts, states=states)
        layers, start, head = model.prepare("Who kept the archive?", states)
        for c, g in zip(conts, got):
            ids = model.encode(c)
            logits, _ = model.forward_ids(torch.as_tensor([head + ids]), layers, start)
            lp = torch.log_softmax(logits[0].float(), -1)
            ref = float(sum(lp[len(head) - 1 + t, i] for t, i in enumerate(ids)))
            assert g == pytest.approx(ref, abs=2e-3)


def test_recall_scores_are_the_attention_a_copy_pays_each_token(tiny_base_dir):
    """`token_recall` against a direct computation: eager attention probabilities of the teacher-forced copy."""
    m = GistModel.from_base(tiny_base_dir, GistConfig(target_ratio=4.0, anchors="recall", compressor="pool+anchors"),
                            device="cpu", attn_implementation="eager")
    ids = m.encode(TEXTS[0])
    got = m.token_recall(ids)
    from gist_memory.model.compress import RECALL_PROMPT

    pre, _ = m.template_ids("")
    seq = pre + ids + m.encode(RECALL_PROMPT) + ids[:-1]
    q0 = len(seq) - len(ids)
    with torch.no_grad():
        out = m.model.get_decoder()(input_ids=torch.as_tensor([seq]), output_attentions=True)
    ref = torch.stack([a[0, :, q0:, len(pre) : len(pre) + len(ids)].amax(dim=(0, 1)) for a in out.attentions]).mean(0)
    assert np.allclose(got, ref.double().numpy(), atol=1e-4)
    heads = m.token_recall_heads(ids)  # per key/value head: the largest over its group of query heads
    n_kv = m.model.config.num_key_value_heads
    per_q = torch.stack([a[0, :, q0:, len(pre) : len(pre) + len(ids)].amax(dim=1) for a in out.attentions])
    ref_h = per_q.view(per_q.shape[0], n_kv, -1, len(ids)).amax(dim=2)
    assert heads.shape == (len(out.attentions), n_kv, len(ids)) and torch.allclose(heads, ref_h, atol=1e-4)


@pytest.mark.parametrize("budget", ["layer", "global"])
def test_uneven_head_budgets_keep_the_best_rows_and_mask_the_empty_slots(budget, tiny_qwen_dir, tmp_path):
    from dataclasses import replace

    from gist_memory.state import KIND_ANCHOR
    from gist_memory.store import GistStore

    text = TEXTS[0] + " " + TEXTS[1]
    even = GistModel.from_base(tiny_qwen_dir, GistConfig(target_ratio=4.0, anchors="recall", head_anchors=True),
                               device="cpu")
    m = even.with_config(head_budget=budget, head_budget_cap=3.0)
    with pytest.raises(ValueError, match="needs head_anchors=True"):
        GistConfig(anchors="recall", head_budget="layer")
    with pytest.raises(ValueError, match="head_budget must be one of"):
        GistConfig(anchors="recall", head_anchors=True, head_budget="ragged")
    with pytest.raises(ValueError, match="head_budget_cap"):
        GistConfig(anchors="recall", head_anchors=True, head_budget="layer", head_budget_cap=0.5)
    plan = m.plan(text)
    e, u = even.compress([text])[0], m.compress([text])[0]
    A = e.num_anchors
    L, H, _ = u.positions.shape
    W = u.num_anchors  # the widest head's anchor rows
    real = u.positions[:, :, :W] >= 0
    counts = real.sum(-1)  # (L, H) rows each head keeps
    assert u.has_empty_slots and not e.has_empty_slots and W > A and int(counts.max()) == W
    assert int(counts.max()) <= round(3.0 * A)  # the cap
    # the same rows in all, spread by score: per layer (`layer`) or over the whole model (`global`)
    if budget == "layer":
        assert (counts.sum(-1) == A * H).all()
    else:
        assert int(counts.sum()) == A * H * L and len(set(counts.sum(-1).tolist())) > 1
    assert u.num_rows == pytest.approx(e.num_rows) and u.compression_ratio == pytest.approx(e.compression_ratio)
    assert (u.kinds[:W] == KIND_ANCHOR).all() and torch.equal(u.keys[:, :, W:], e.keys[:, :, A:])  # gists as before
    scores = torch.as_tensor(plan.head_scores)
    taken = torch.zeros_like(scores, dtype=torch.bool)
    for li in range(L):
        for h in range(H):
            tok = u.positions[li, h, :W][real[li, h]]
            assert torch.equal(tok, tok.sort().values)  # text order, empty slots last
            taken[li, h, tok] = True
    # every kept token scores at least as high as any token left out of its group (a layer, or the whole model)
    group = (lambda x: x) if budget == "layer" else (lambda x: x.reshape(1, -1))
    for li in range(L) if budget == "layer" else [0]:
        sc = group(scores[li] if budget == "layer" else scores).reshape(-1)
        tk = group(taken[li] if budget == "layer" else taken).reshape(-1)
        capped = (counts[li] if budget == "layer" else counts).reshape(-1) >= round(3.0 * A)
        if not capped.any():
            assert float(sc[tk].min()) >= float(sc[~tk].max())
    assert torch.count_nonzero(u.keys[:, :, :W][~real]) == 0  # empty slots hold zeros
    # read: garbage in the empty slots changes nothing, gapped or packed, next to other states
    g = torch.Generator().manual_seed(0)
    for mode in ("gapped", "packed"):
        mm = m.with_config(position_mode=mode)
        s0 = mm.compress([text])[0]
        junk = replace(s0, keys=s0.keys.clone(), values=s0.values.clone())
        empty = ~junk.key_mask()
        junk.keys[empty] = 30 * torch.randn(junk.keys[empty].shape, generator=g)
        junk.values[empty] = 30 * torch.randn(junk.values[empty].shape, generator=g)
        other = mm.compress([TEXTS[2]])[0]
        q = "What is the code?"
        (l0, p0, h0), (l1, p1, h1) = mm.prepare(q, [s0, other]), mm.prepare(q, [junk, other])
        assert p0 == p1 and h0 == h1 and kv.key_mask_of(l1) is not None
        x = torch.as_tensor([h0])
        y0, c0 = mm.forward_ids(x, l0, p0)
        y1, c1 = mm.forward_ids(x, l1, p1)
        assert torch.allclose(y0, y1, atol=1e-4)
        nxt = torch.as_tensor([[int(y1[0, -1].argmax())]])  # and the step after, from the returned cache
        z0, _ = mm.forward_ids(nxt, kv.cache_layers(c0), p0 + x.shape[1])
        z1, _ = mm.forward_ids(nxt, kv.cache_layers(c1), p1 + x.shape[1])
        assert torch.allclose(z0, z1, atol=1e-4)
        assert mm.generate(q, states=[junk, other], max_new_tokens=6) == mm.generate(q, states=[s0, other],
                                                                                    max_new_tokens=6)
        # each layer is only as wide as its widest head; laid out at one width (masked slots in front) it reads alike
        widths = {int(k.shape[2]) for k, _ in l1}
        assert len(widths) > 1
        flat = kv.uniform_widths(l1)
        assert {int(k.shape[2]) for k, _ in flat} == {max(widths)}
        assert torch.allclose(mm.forward_ids(x, flat, p1)[0], y1, atol=1e-4)
        # without the mask the garbage would show (the test can fail)
        bare = kv.with_key_mask(list(flat), None)
        y2, _ = mm.forward_ids(x, bare, p1)
        assert not torch.allclose(y0, y2, atol=1e-2)
    # at rest only the real rows: a state file and a store entry hold about what the even state holds
    blob = u.to_bytes()
    back = GistState.from_bytes(blob)
    assert torch.equal(back.keys, u.keys) and torch.equal(back.values, u.values)
    assert torch.equal(back.positions, u.positions) and back.num_rows == u.num_rows
    assert len(blob) < len(e.to_bytes()) + 4 * u.positions.numel() + 4096
    for dtype in ("float32", "bfloat16", "int8", "int4"):
        store = GistStore(tmp_path / dtype, storage_dtype=dtype)
        got = store.get(store.put(u))
        assert got.has_empty_slots and torch.equal(got.positions, u.positions)
        assert torch.count_nonzero(got.keys[~u.key_mask()]) == 0 if dtype != "int4" else True
        assert torch.allclose(got.keys.float(), u.keys, atol=0.3 if dtype == "int4" else 2e-2)
    # a compact file whose positions do not match its rows is refused, naming the problem
    from gist_memory.state.gist_state import StateFormatError, expand_rows

    with pytest.raises(StateFormatError, match="stored rows"):
        expand_rows(u.keys[0, 0], u.positions)


def test_head_key_mask_combines_and_redraws_masks():
    q = torch.zeros(1, 4, 2, 8)  # (B, H_q, Q, D): 4 query heads over 2 key/value heads
    k = torch.zeros(1, 2, 6, 8)  # 6 keys: 4 cached + the 2 queries' own
    keep = torch.tensor([[[True, False, True], [False, True, True]]])  # (1, H_kv, 3): first 3 cached keys
    m = kv.head_key_mask(None, keep, q, k)
    assert m.shape == (1, 4, 2, 6) and m.dtype == torch.bool
    assert m[0, 0, 0].tolist() == [True, False, True, True, True, False]  # head 0 -> kv head 0; causal at the end
    assert m[0, 3, 1].tolist() == [False, True, True, True, True, True]  # head 3 -> kv head 1
    causal = torch.ones(2, 5, dtype=torch.bool).tril(3)[None, None]  # made for a layer 1 key narrower
    assert torch.equal(kv.head_key_mask(causal, keep, q, k), m)  # redrawn for this layer's 6 keys
    add = torch.zeros(1, 1, 2, 6).masked_fill(~torch.ones(2, 6, dtype=torch.bool).tril(4), float("-inf"))
    f = kv.head_key_mask(add, keep, q, k)
    assert torch.equal(f > -1e30, m)  # additive masks stay additive
    padded = causal.clone()
    padded[..., 0] = False  # a padded batch row: its mask cannot be redrawn for another width
    with pytest.raises(ValueError, match="uniform_widths"):
        kv.head_key_mask(padded, keep, q, k)


def test_key_mask_reads_alike_under_eager_attention_and_flash_is_refused(tiny_qwen_dir):
    from dataclasses import replace
    from types import SimpleNamespace

    m = GistModel.from_base(tiny_qwen_dir, GistConfig(target_ratio=4.0, anchors="recall", head_anchors=True,
                                                      head_budget="global"), device="cpu",
                            attn_implementation="eager")
    s0 = m.compress([TEXTS[0] + " " + TEXTS[1]])[0]
    junk = replace(s0, keys=s0.keys.clone(), values=s0.values.clone())
    junk.keys[~junk.key_mask()] = 50.0
    q = "What is the code?"
    (l0, p0, h0), (l1, p1, _) = m.prepare(q, [s0]), m.prepare(q, [junk])
    x = torch.as_tensor([h0])
    assert torch.allclose(m.forward_ids(x, l0, p0)[0], m.forward_ids(x, l1, p1)[0], atol=1e-4)
    assert m.model.config._attn_implementation == "gist_masked:eager"  # the model's own eager function, wrapped
    assert m.generate(q, max_new_tokens=4) == m.generate(q, max_new_tokens=4)  # without states: the plain path
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="per-head key mask"):
        kv.masked_attention(flash)


def test_a_cap_stated_at_one_ratio_keeps_the_widest_head_at_the_same_share_of_the_passage(tiny_qwen_dir):
    """`head_budget_cap_ratio`: cap 1 stated at 4x is cap 2 at 8x (and never below 1: cap 1 at 2x); states at 8x
    equal those of a plain cap 2, and differ from the plain cap 1 they would have had without it."""
    text = TEXTS[0] + " " + TEXTS[1]
    with pytest.raises(ValueError, match="head_budget_cap_ratio"):
        GistConfig(anchors="recall", head_anchors=True, head_budget="global", head_budget_cap_ratio=0)
    cfg = GistConfig(target_ratio=8.0, anchors="recall", head_anchors=True, head_budget="global", head_budget_cap=1.0,
                     head_budget_cap_ratio=4.0)
    assert cfg.head_cap() == 2.0
    assert GistConfig.from_dict({**cfg.to_dict(), "target_ratio": 4.0}).head_cap() == 1.0
    assert GistConfig.from_dict({**cfg.to_dict(), "target_ratio": 2.0}).head_cap() == 1.0
    assert GistConfig.from_dict({**cfg.to_dict(), "head_budget_cap_ratio": None}).head_cap() == 1.0
    assert cfg.fingerprint() != GistConfig.from_dict({**cfg.to_dict(), "head_budget_cap_ratio": None}).fingerprint()
    # the fingerprint follows what the states hold: the cap in force at this ratio
    plain2 = GistConfig.from_dict({**cfg.to_dict(), "head_budget_cap": 2.0, "head_budget_cap_ratio": None})
    assert cfg.fingerprint() == plain2.fingerprint()
    scaled = GistModel.from_base(tiny_qwen_dir, cfg, device="cpu")
    s = scaled.compress([text])[0]
    p2 = scaled.with_config(head_budget_cap=2.0, head_budget_cap_ratio=None).compress([text])[0]
    p1 = scaled.with_config(head_budget_cap_ratio=None).compress([text])[0]
    assert torch.equal(s.positions, p2.positions) and torch.equal(s.keys, p2.keys)
    assert s.num_rows == pytest.approx(p1.num_rows)  # the same rows per head on average either way
    A = scaled.with_config(head_budget="even").compress([text])[0].num_anchors  # the even count
    widest = [int((x.positions[:, :, : x.num_anchors] >= 0).sum(-1).max()) for x in (p1, s)]
    assert 0 < A == widest[0] < widest[1] <= 2 * A  # cap 1 is the even count; cap 2 lets the best heads keep more


def test_depth_budget_spreads_rows_over_layers_only_so_the_cache_holds_exactly_the_rows(tiny_qwen_dir):
    """`head_budget="depth"`: the global ranking decides each layer's share, the layer's heads split it evenly; so
    the states take as many cache positions as they keep rows (no head is padded to a wider one), and read alike
    with and without junk in the empty slots."""
    from dataclasses import replace

    from gist_memory.model.compress import _split_evenly

    assert _split_evenly([6, 3, 3], 3, 4, 10) == [2, 1, 1]  # in proportion to the layers' shares
    assert sum(_split_evenly([7, 1, 4], 3, 4, 10)) == 4  # rounded so the shares add up exactly
    assert _split_evenly([12, 0, 0], 3, 3, 2) == [2, 1, 0]  # none above the cap; the rest goes where it is wanted
    text = TEXTS[0] + " " + TEXTS[1]
    even = GistModel.from_base(tiny_qwen_dir, GistConfig(target_ratio=4.0, anchors="recall", head_anchors=True),
                               device="cpu")
    e = even.compress([text])[0]
    m = even.with_config(head_budget="depth", head_budget_cap=3.0)
    u = m.compress([text])[0]
    A, W = e.num_anchors, u.num_anchors
    counts = (u.positions[:, :, :W] >= 0).sum(-1)  # (L, H) rows each head keeps
    assert (counts == counts[:, :1]).all()  # every head of a layer keeps the same number
    assert int(counts[:, 0].sum()) == A * counts.shape[0] and int(counts.max()) <= round(3.0 * A)
    assert u.num_rows == pytest.approx(e.num_rows) and u.num_positions == pytest.approx(u.num_rows)
    g = even.with_config(head_budget="global", head_budget_cap=3.0).compress([text])[0]
    assert g.num_positions > g.num_rows  # what the global budget pays in cache width, and depth does not
    # each head keeps its own best tokens for its layer's count
    scores = torch.as_tensor(m.plan(text).head_scores)
    for li in range(counts.shape[0]):
        for h in range(counts.shape[1]):
            kept = u.positions[li, h, : int(counts[li, h])]
            best = scores[li, h, : scores.shape[-1]].topk(int(counts[li, h])).indices.sort().values
            assert set(kept.tolist()) <= set(range(scores.shape[-1]))
            assert float(scores[li, h, kept].min()) >= float(scores[li, h, best].min()) - 1e-6
    junk = replace(u, keys=u.keys.clone(), values=u.values.clone())
    if junk.key_mask() is not None:
        junk.keys[~junk.key_mask()] = 50.0
    q = "What is the code?"
    (l0, p0, h0), (l1, p1, _) = m.prepare(q, [u]), m.prepare(q, [junk])
    x = torch.as_tensor([h0])
    assert torch.allclose(m.forward_ids(x, l0, p0)[0], m.forward_ids(x, l1, p1)[0], atol=1e-4)


def test_head_anchors_keep_each_heads_own_tokens_at_the_same_budget(tiny_base_dir, tmp_path):
    from gist_memory.state import KIND_ANCHOR
    from gist_memory.store import GistStore

    text = TEXTS[0] + " " + TEXTS[1]
    shared = GistModel.from_base(tiny_base_dir, GistConfig(target_ratio=4.0, anchors="recall"), device="cpu")
    m = shared.with_config(head_anchors=True)
    with pytest.raises(ValueError, match="head_anchors needs anchors='recall'"):
        GistConfig(anchors="surprisal", head_anchors=True)
    plan = m.plan(text)
    assert plan.head_scores is not None and plan.head_scores.shape[-1] == plan.num_tokens
    a, b = shared.compress([text])[0], m.compress([text])[0]
    assert b.per_head and not a.per_head
    assert b.model_fingerprint != a.model_fingerprint
    assert b.num_kept == a.num_kept and b.num_anchors == a.num_anchors and b.nbytes == a.nbytes
    L, H, T = b.positions.shape
    A = b.num_anchors
    assert (b.kinds[:A] == KIND_ANCHOR).all() and (b.kinds[A:] != KIND_ANCHOR).all()
    # every head's anchors are its own top tokens, in text order, with the raw rows of the text pass
    top = torch.as_tensor(plan.head_scores).topk(A, dim=-1).indices.sort(-1).values
    assert torch.equal(b.positions[:, :, :A], top)
    assert len({tuple(b.positions[li, h, :A].tolist()) for li in range(L) for h in range(H)}) > 1
    from dataclasses import replace

    again = m.compress_with_grad([text], plans=[replace(plan, head_scores=None)])[0]  # a plan without head scores
    assert torch.equal(again.positions, b.positions)  # (e.g. from a device bundle) gets them at compression
    full = m.compress_for_training([plan])[1][0]  # the uncompressed twin: every raw row
    idx = top[..., None].expand(-1, -1, -1, full.keys.shape[-1])
    assert torch.allclose(b.keys[:, :, :A], full.keys.gather(2, idx), atol=1e-5)
    assert torch.allclose(b.values[:, :, :A], full.values.gather(2, idx), atol=1e-5)
    assert torch.equal(b.keys[:, :, A:], a.keys[:, :, a.kinds != KIND_ANCHOR])  # the gist rows are unchanged
    # head_anchor_fraction: 0 keeps the shared anchors in every head; 0.5 keeps half of them in every head
    none_own = shared.with_config(head_anchors=True, head_anchor_fraction=0.0).compress([text])[0]
    a_pos = a.positions[a.kinds == KIND_ANCHOR]
    assert all(torch.equal(none_own.positions[li, h, :A], a_pos) for li in range(L) for h in range(H))
    half = shared.with_config(head_anchors=True, head_anchor_fraction=0.5).compress([text])[0]
    common = set(half.positions[0, 0, :A].tolist())
    for li in range(L):
        for h in range(H):
            common &= set(half.positions[li, h, :A].tolist())
    assert len(common) >= A - round(A * 0.5) and common <= set(a_pos.tolist())
    capr = GistModel.from_base(tiny_base_dir, GistConfig(target_ratio=4.0, anchors="capitalized+recall",
                                                         head_anchors=True), device="cpu")
    ctext = (TEXTS[0] + " the lazy dog slept while the quick brown fox ran around the quiet garden, and the old "
             "house stood still by the water all through the long and quiet afternoon.")
    cplan = capr.plan(ctext)
    rule = set(np.flatnonzero(cplan.anchors & cplan.rule_anchors).tolist())
    assert rule and rule != set(np.flatnonzero(cplan.anchors).tolist())
    cs = capr.compress([ctext])[0]
    Ac = cs.num_anchors
    for li in range(L):
        for h in range(H):
            assert rule <= set(cs.positions[li, h, :Ac].tolist())  # names and numbers in every head
    assert len({tuple(cs.positions[li, h, :Ac].tolist()) for li in range(L) for h in range(H)}) > 1
    with pytest.raises(ValueError, match="head_anchor_fraction"):
        GistConfig(anchors="recall", head_anchors=True, head_anchor_fraction=1.5)
    # read gapped and packed (each head's rows renumbered by rank), stored and loaded unchanged
    q = "What is the code?"
    out = m.generate(q, states=[b, b], max_new_tokens=3)
    assert out == m.generate(q, states=[b, b], max_new_tokens=3)
    packed = m.with_config(head_anchors=True, position_mode="packed")
    bp = packed.compress([text])[0]
    assert torch.equal(bp.positions, b.positions)
    layers, nxt, _ = packed.prepare(q, [bp])
    pre = len(m.encode(m._template(q, True, None)[0]))
    assert nxt == pre + T and layers[0][0].shape[2] == pre + T
    store = GistStore(tmp_path / "s")
    back = store.get(store.put(b))
    assert back.per_head and torch.equal(back.positions, b.positions)  # (K/V as the store's storage dtype keeps them)
    assert torch.allclose(back.keys.float(), b.keys, atol=1e-2)


def test_packed_cache_stores_only_kept_rows_and_reads_exactly_like_the_padded_one(tiny_qwen_dir):
    """Where heads keep uneven numbers of rows (the global budget), a read's cache stores each head's real rows
    only (`kv.cache_from_layers` packs them): fewer bytes than the widest-head layout, and the same logits at the
    prefill and at every decoding step as the padded cache, whose empty slots are masked."""
    m = GistModel.from_base(tiny_qwen_dir, GistConfig(target_ratio=4.0, anchors="recall", head_anchors=True,
                                                      head_budget="global", head_budget_cap=3.0), device="cpu")
    states = m.compress([TEXTS[0] + " " + TEXTS[1], TEXTS[2]])
    assert all(s.has_empty_slots for s in states)
    layers, start, head = m.prepare("What is the code?", states)
    mask = kv.key_mask_of(layers)
    packed, padded = kv.cache_from_layers(layers), kv.cache_from_layers(layers, packed=False)
    assert type(packed.layers[0]).__name__ == "PackedLayer" and type(padded.layers[0]).__name__ != "PackedLayer"
    # bytes: the real rows (keys, values and an int32 slot index each), nothing for the empty slots
    per_row = sum(k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size() for k, v in layers[:1])
    real = sum(int(m_.sum()) for m_ in mask)
    assert kv.cache_bytes(packed) == real * (per_row + 4)
    assert kv.cache_bytes(padded) == sum(m_.numel() for m_ in mask) * per_row
    assert kv.cache_bytes(packed) < kv.cache_bytes(padded)
    # what a forward reads back: the padded layout, real rows in place, zeros in the empty slots
    for (k, v), (pk, pv), keep in zip(layers, kv.cache_layers(packed), mask):
        keep = keep.expand(k.shape[0], -1, -1)
        assert torch.equal(pk[:, :, : keep.shape[-1]][keep], k[:, :, : keep.shape[-1]][keep])
        assert float(pk[:, :, : keep.shape[-1]][~keep].abs().sum()) == 0.0 and pv.shape == v.shape
    ids = torch.as_tensor([head])
    outs = []
    for cache in (packed, padded):
        pos = start
        x = ids
        logits = []
        for step in range(4):  # the question, then three answer tokens fed one by one
            p = (pos + torch.arange(x.shape[1]))[None]
            with torch.no_grad():
                out = kv.call(m.model, cache=cache, input_ids=x, position_ids=p, use_cache=True)
            cache = kv.out_cache(out)
            logits.append(out.logits[:, -1])
            pos += x.shape[1]
            x = torch.as_tensor([[7 + step]])
        outs.append(torch.cat(logits))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    # after the forwards the layers share one scratch layout (one layer's padded width, K and V), counted once
    scratch = packed.layers[0]._scratch
    assert all(lay._scratch is scratch for lay in packed.layers) and set(scratch) == {"k", "v"}
    one_layer = packed.layers[0].keys.numel() * packed.layers[0].keys.element_size()
    held = sum(lay.stored_bytes() for lay in packed.layers)
    assert kv.cache_bytes(packed) - held == sum(b.numel() * b.element_size() for b in scratch.values())
    assert 2 * one_layer <= kv.cache_bytes(packed) - held <= 2.5 * one_layer + 64
    assert packed.get_seq_length() == padded.get_seq_length() == int(layers[0][0].shape[2]) + len(head) + 3
    # with autograd on, each layer lays out its own copy (a backward pass may need it): no shared scratch
    fresh = kv.cache_from_layers(layers)
    m.model.get_input_embeddings().weight.requires_grad_(True)  # something to train through the read
    with torch.enable_grad():
        out = kv.call(m.model, cache=fresh, input_ids=ids, position_ids=(start + torch.arange(len(head)))[None],
                      use_cache=True)
        out.logits.float().pow(2).mean().backward()
    assert not fresh.layers[0]._scratch and torch.allclose(out.logits[:, -1], outs[0][:1], atol=1e-5)
    assert m.model.get_input_embeddings().weight.grad is not None
    m.model.get_input_embeddings().weight.requires_grad_(False)
    m.model.zero_grad(set_to_none=True)
    # trimming the answer and picking batch rows keep the packed layout consistent
    lay = packed.layers[0]
    lay.crop(-2)
    assert lay.get_seq_length() == int(layers[0][0].shape[2]) + len(head) + 1
    with pytest.raises(ValueError, match="packed"):
        lay.crop(-(len(head) + 2))
    lay.batch_repeat_interleave(2)
    assert lay.keys.shape[0] == 2 and torch.equal(lay.keys[0], lay.keys[1])
    # usage: the cache holds the kept rows, attention reads the padded width
    from gist_memory.model.usage import Usage

    u = Usage()
    m.generate("What is the code?", states=states, max_new_tokens=2, usage=u)
    assert u.positions_held == u.positions_read - (u.state_positions - u.kept_rows) < u.positions_read
    try:
        m.packed_cache = False
        m.generate("What is the code?", states=states, max_new_tokens=2, usage=u)
        assert u.positions_held == u.positions_read
    finally:
        m.packed_cache = True
    # training backpropagates through the padded layout
    grad = [(k.clone().requires_grad_(), v.clone()) for k, v in layers]
    assert type(kv.cache_from_layers(kv.with_key_mask(grad, mask)).layers[0]).__name__ != "PackedLayer"
