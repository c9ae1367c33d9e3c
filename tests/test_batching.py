"""Batched generation (`gist_memory.model.batching`) and the server's micro-batcher (`gist_memory.server.batcher`):
every row answers what `GistModel.generate` answers alone, token for token; finished rows leave the batch; new
rows join a running one; bad requests fail alone; concurrent server clients are decoded together."""

from __future__ import annotations

import json
import threading
import urllib.request
from types import SimpleNamespace

import pytest
import torch

from gist_memory.model.batching import (
    BatchRequest,
    Decoder,
    Row,
    adapted_reader,
    batchable,
    generate_batch,
    roomy_cache,
)
from gist_memory.model.usage import Usage

PASSAGES = [
    "The Velmora lighthouse was built in 1887 by the engineer Ada Lindqvist. Its lamp stands 42 metres above the sea.",
    "The Prythwaite weather station sits at an altitude of 4,301 metres. It was founded in 1931 by Henrik Sollum.",
    "The Zorbluth tram depot opened in 1902. Its trams were painted green and copper.",
]
NEVER = -1  # an eos id no token has: rows run to max_new_tokens


def _sharp(base_dir: str, out) -> str:  # noqa: ANN001
    """The tiny random model with its weight matrices scaled 8x, so its answers depend on the prompt and states."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    lm.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return str(out)


def _model(base_dir, tmp_path_factory, name):  # noqa: ANN001, ANN202
    from gist_memory import GistConfig, GistModel

    path = _sharp(base_dir, tmp_path_factory.mktemp(name))
    return GistModel.from_base(path, GistConfig(compressor="pool+anchors", target_ratio=4), device="cpu")


@pytest.fixture(scope="module")
def llama(tiny_base_dir, tmp_path_factory):
    m = _model(tiny_base_dir, tmp_path_factory, "sharp-llama")
    return m, m.compress(PASSAGES)


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir, tmp_path_factory):
    m = _model(tiny_qwen_dir, tmp_path_factory, "sharp-qwen2")
    return m, m.compress(PASSAGES)


@pytest.fixture(scope="module")
def ragged(tiny_qwen_dir, tmp_path_factory):
    """Per-head anchors spread unevenly over heads: states with empty slots, read through the key mask."""
    return _ragged(tiny_qwen_dir, tmp_path_factory, "layer")


@pytest.fixture(scope="module")
def depth(tiny_qwen_dir, tmp_path_factory):
    """Anchors spread unevenly over layers only (`head_budget="depth"`): each layer as wide as its own rows when
    read alone; a padded batch lays every layer out as wide as the widest."""
    return _ragged(tiny_qwen_dir, tmp_path_factory, "depth")


def _ragged(tiny_qwen_dir, tmp_path_factory, budget):  # noqa: ANN001, ANN202
    from gist_memory import GistConfig, GistModel

    path = _sharp(tiny_qwen_dir, tmp_path_factory.mktemp("sharp-" + budget))
    m = GistModel.from_base(path, GistConfig(compressor="pool+anchors", target_ratio=4, anchors="recall",
                                             head_anchors=True, head_budget=budget, head_budget_cap=3), device="cpu")
    st = m.compress(PASSAGES)
    assert all(s.has_empty_slots for s in st)
    g = torch.Generator().manual_seed(0)
    for s in st:  # garbage in the empty slots: any read that missed the mask would answer differently
        empty = ~s.key_mask()
        s.keys[empty] = 30 * torch.randn(s.keys[empty].shape, generator=g)
        s.values[empty] = 30 * torch.randn(s.values[empty].shape, generator=g)
    return m, st


def _requests(model, st):  # noqa: ANN001, ANN202
    """Mixed requests: with 0-3 states, chat turns, system prompts, lengths, penalties, seeded sampling, stops."""
    chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "What colour were the trams?"}]
    reqs = [
        BatchRequest("Who built the lighthouse?", st[:1], {"max_new_tokens": 12}),
        BatchRequest("Hi", None, {"max_new_tokens": 20}),
        BatchRequest("What is the altitude of the weather station, and who founded it so long ago?", st[1:],
                     {"max_new_tokens": 9, "eos_token_id": NEVER}),
        BatchRequest(chat, st, {"max_new_tokens": 16, "repetition_penalty": 1.3, "system_prompt": "Be brief."}),
        BatchRequest("Tell me", st[2:], {"max_new_tokens": 10, "do_sample": True, "temperature": 0.8, "seed": 3,
                                         "top_k": 20, "top_p": 0.9}),
        BatchRequest("Plain words, no context at all here", [], {"max_new_tokens": 14, "eos_token_id": NEVER,
                                                                 "context_prefix": "Context:\n"}),
        BatchRequest("Nothing to say", st[:2], {"max_new_tokens": 0}),
    ]
    # a stop string taken from the middle of an answer, so that it fires
    probe = BatchRequest("Where is the depot?", st[2:], {"max_new_tokens": 16, "eos_token_id": NEVER})
    text = model.generate(probe.prompt, states=probe.states, **probe.gen)
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    reqs.append(BatchRequest(probe.prompt, probe.states, {**probe.gen, "stop": [stop, "never-seen"]}))
    return reqs, text


def _alone(model, req):  # noqa: ANN001, ANN202
    """(pieces, usage without timings) of the single-request path."""
    u = Usage()
    pieces = list(model.stream(req.prompt, states=req.states, usage=u, **req.gen))
    return pieces, _plain(u)


def _plain(u: Usage) -> dict:
    d = u.to_dict()
    d.pop("ttft_s"), d.pop("total_s")
    return d


@pytest.mark.parametrize("prefill", ["padded", "rows"])
@pytest.mark.parametrize("arch", ["llama", "qwen", "ragged", "depth"])
def test_batch_equals_single_generation(arch, prefill, request):
    model, st = request.getfixturevalue(arch)
    reqs, probe_text = _requests(model, st)
    alone = [_alone(model, r) for r in reqs]
    assert len({"".join(p) for p, _ in alone}) >= 5  # the answers differ: a mix-up of rows would show
    pieces: list[list[str]] = [[] for _ in reqs]
    usages = [Usage() for _ in reqs]
    for i, r in enumerate(reqs):
        r.on_text, r.usage = pieces[i].append, usages[i]
    got = generate_batch(model, reqs, prefill=prefill)
    for i, (p, u) in enumerate(alone):
        assert got[i] == "".join(p), (i, got[i], "".join(p))
        assert pieces[i] == p  # streamed in the same pieces (stop-string prefixes held back alike)
        assert _plain(usages[i]) == u
    assert len(got[-1]) < len(probe_text)  # the stop string cut the answer
    assert got[-2] == "" and usages[-2].new_tokens == 0 and usages[-2].ttft_s is None  # max_new_tokens=0
    assert usages[0].ttft_s is not None and usages[0].positions_read > usages[0].prompt_tokens


def test_finished_rows_leave_the_batch(llama):
    model, st = llama
    reqs = [BatchRequest("Who built it?", st, {"max_new_tokens": 2, "eos_token_id": NEVER}),  # longest cache
            BatchRequest("And the station?", st[1:2], {"max_new_tokens": 5, "eos_token_id": NEVER}),
            BatchRequest("No states", None, {"max_new_tokens": 9, "eos_token_id": NEVER})]
    dec = Decoder(model)
    done: list[Row] = []
    rows = [Row(model, r, on_done=done.append) for r in reqs]
    dec.add(rows)
    sizes, lengths = [], []
    while len(dec):
        dec.step()
        sizes.append(len(dec))
        if len(dec):
            k = dec.cache.layers[0].keys
            assert k.shape[0] == len(dec) == dec.mask.shape[0] and k.shape[2] == dec.length
        lengths.append(dec.length)
    assert sizes == [3, 2, 2, 2, 1, 1, 1, 1, 0]  # rows leave right after their last token
    assert [r.request.gen["max_new_tokens"] for r in done] == [2, 5, 9]
    assert [len(r.out_ids) for r in done] == [2, 5, 9]
    # once the row with the longest cache left, the padding columns nobody needs were cut
    assert lengths[1] < lengths[0] + 1
    assert dec.forwards == 1 + 8  # one prefill, then one forward per step while any row still needs a token
    for r, req in zip(rows, reqs):
        assert r.answer == model.generate(req.prompt, states=req.states, **req.gen)


def test_roomy_cache_grows_in_place_and_equals_concatenation():
    from gist_memory.model import kv

    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)) for _ in range(2)]
    cache = roomy_cache(layers, spare=2)
    ref = [list(x) for x in layers]
    for step in range(7):  # past the 2 spare slots: the buffers grow
        n = 1 if step % 3 else 3
        for li in range(2):
            k, v = torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 4, generator=g)
            got_k, got_v = cache.layers[li].update(k, v)
            ref[li] = [torch.cat([ref[li][0], k], 2), torch.cat([ref[li][1], v], 2)]
            assert torch.equal(got_k, ref[li][0]) and torch.equal(got_v, ref[li][1])
    assert cache.get_seq_length() == ref[0][0].shape[2] == 5 + 3 * 3 + 4 * 1
    assert all(torch.equal(a, b[0]) for (a, _), b in zip(kv.cache_layers(cache), ref))


def test_long_answers_past_the_spare_room(llama):
    model, st = llama
    reqs = [BatchRequest("Go on", st, {"max_new_tokens": 150, "eos_token_id": NEVER}),
            BatchRequest("Hi", None, {"max_new_tokens": 70, "eos_token_id": NEVER})]
    assert generate_batch(model, reqs) == [model.generate(r.prompt, states=r.states, **r.gen) for r in reqs]


@pytest.mark.parametrize("arch", ["llama", "ragged", "depth"])
def test_rows_join_a_running_batch(arch, request):
    model, st = request.getfixturevalue(arch)
    reqs, _ = _requests(model, st)
    first, later = reqs[:3], reqs[3:]
    dec = Decoder(model)
    rows = [Row(model, r) for r in first]
    dec.add(rows)
    for _ in range(3):
        dec.step()
    joined = [Row(model, r) for r in later]
    dec.add(joined)
    while len(dec):
        dec.step()
    for r in rows + joined:
        assert r.done and r.error is None
        assert r.answer == model.generate(r.request.prompt, states=r.request.states, **r.request.gen)


def test_max_batch_and_cancelled_rows(llama):
    model, st = llama
    reqs, _ = _requests(model, st)
    assert generate_batch(model, reqs, max_batch=2) == [model.generate(r.prompt, states=r.states, **r.gen)
                                                        for r in reqs]
    polls = []
    u = Usage()
    full = model.generate("Keep going", states=st, max_new_tokens=12, eos_token_id=NEVER)
    cancel = BatchRequest("Keep going", st, {"max_new_tokens": 12, "eos_token_id": NEVER}, usage=u,
                          cancelled=lambda: polls.append(1) or len(polls) > 3)
    other = BatchRequest("Hi", None, {"max_new_tokens": 8, "eos_token_id": NEVER})
    got = generate_batch(model, [cancel, other])
    assert u.new_tokens == 3 and full.startswith(got[0])  # ended where it was, after 3 tokens
    assert got[1] == model.generate(other.prompt, **other.gen)


def test_bad_requests_fail_alone(llama, qwen):
    model, st = llama
    qmodel, qst = qwen
    good = BatchRequest("Who built the lighthouse?", st[:1], {"max_new_tokens": 6})
    with pytest.raises(TypeError, match="beam_width"):
        generate_batch(model, [good, BatchRequest("x", None, {"beam_width": 2})])
    with pytest.raises(TypeError, match="schema"):  # constrained decoding is served one request at a time
        generate_batch(model, [BatchRequest("x", None, {"schema": {"type": "object"}})])
    with pytest.raises(ValueError, match="written by"):  # states of another model
        generate_batch(model, [good, BatchRequest("x", qst[:1])])
    with pytest.raises(TypeError, match="usage"):
        generate_batch(model, [BatchRequest("x", None, usage="not a usage")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_batch"):
        generate_batch(model, [good], max_batch=0)
    with pytest.raises(ValueError, match="prefill"):
        generate_batch(model, [good], prefill="sideways")
    got = generate_batch(model, [good, BatchRequest("x", qst[:1]), "Hi"], return_exceptions=True)
    assert got[0] == model.generate(good.prompt, states=good.states, **good.gen)
    assert isinstance(got[1], ValueError) and got[2] == model.generate("Hi")

    def boom(piece: str) -> None:
        raise RuntimeError("client callback failed")

    bad_cb = BatchRequest("Hello there", None, {"max_new_tokens": 6, "eos_token_id": NEVER}, on_text=boom)
    got = generate_batch(model, [good, bad_cb], return_exceptions=True)
    assert got[0] == model.generate(good.prompt, states=good.states, **good.gen)
    assert isinstance(got[1], RuntimeError)
    with pytest.raises(RuntimeError, match="callback"):
        generate_batch(model, [good, bad_cb])
    # an adapted reader (its LoRA reads states) is not batched
    adapted = SimpleNamespace(reader_adapted=True, has_lora=True, prepare=None)
    assert adapted_reader(adapted) and not batchable(adapted, {})
    assert batchable(model, {"max_new_tokens": 4}) and not batchable(model, {"tools": []})
    with pytest.raises(ValueError, match="adapted reader"):
        Decoder(adapted)


# ---- the server's micro-batcher ---------------------------------------------------------------------------------
def test_batcher_streams_and_falls_back(llama):
    from gist_memory.server.batcher import Batcher

    model, st = llama
    b = Batcher(model, max_batch=4, window_s=0.2)
    try:
        reqs, _ = _requests(model, st)
        results: dict[int, tuple[str, list[str], dict]] = {}

        def worker(i: int) -> None:
            u = Usage()
            pieces = list(b.stream(reqs[i].prompt, states=reqs[i].states, usage=u, **reqs[i].gen))
            results[i] = ("".join(pieces), pieces, _plain(u))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for i, r in enumerate(reqs):
            pieces, u = _alone(model, r)
            assert results[i] == ("".join(pieces), pieces, u)
        assert 2 <= b.max_rows <= 4  # decoded together, never more than max_batch
        # closing a stream early cancels its row; usage is filled when the row has left
        u = Usage()
        it = b.stream("Go on", states=st, usage=u, max_new_tokens=200, eos_token_id=NEVER)
        next(it)
        it.close()
        assert 1 <= u.new_tokens < 200
        # arguments batching does not take go to the model's own stream
        with pytest.raises(TypeError, match="unsupported generation arguments"):
            b.stream("x", beam_width=2)
        with pytest.raises(ValueError, match="not a GistState"):  # a bad request fails in the caller's thread
            b.generate("x", states=[object()])
    finally:
        b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.generate("Hi")


def test_server_decodes_concurrent_clients_together(llama):
    from gist_memory.server import create_app
    from gist_memory.store import GistMemory
    from gist_memory.store.testing import HashingEmbedder
    from tests.test_web_app import Server

    model, _ = llama
    mem = GistMemory(model, None, embedder=HashingEmbedder())
    mem.add_texts(PASSAGES, show_progress=False)
    s = Server(create_app(model, mem, k=2, max_new_tokens=8))
    svc = s.app.state.gist
    try:
        questions = [f"{q} ({i})" for i, q in enumerate(["Who built the lighthouse?", "How high is the station?",
                                                          "When did the depot open?", "What colour are trams?"] * 2)]

        def ask(q: str, n: int) -> str:
            body = {"model": "gist-memory:default", "messages": [{"role": "user", "content": q}], "max_tokens": n}
            req = urllib.request.Request(s.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())["choices"][0]["message"]["content"]

        svc.batching = False  # one thread per answer, as before batching
        alone = {q: ask(q, 4 + i) for i, q in enumerate(questions)}
        assert len(set(alone.values())) > 2
        svc.batching = True
        svc.batcher.window_s = 0.5  # the first request waits for the others, so they surely share a batch
        got: dict[str, str] = {}
        threads = [threading.Thread(target=lambda q=q, i=i: got.__setitem__(q, ask(q, 4 + i)))
                   for i, q in enumerate(questions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == alone
        assert svc.batcher.max_rows >= 2 and svc.answers_in_flight == 0
    finally:
        s.stop()
        if svc._batcher is not None:
            svc._batcher.close()
        mem.close()


@pytest.mark.parametrize("flag, on", [(None, True), ("--no-batch", False), ("--batch", True)])
def test_serve_batch_option(flag, on, monkeypatch, tiny_base_dir):
    import uvicorn
    from typer.testing import CliRunner

    from gist_memory import cli

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    args = ["serve", "--base", tiny_base_dir, "--port", "8124"] + ([flag] if flag else [])
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    svc = seen["app"].state.gist
    assert svc.batching is on and (svc.batcher is not None) is on


def test_batched_reads_store_only_kept_rows_and_answer_as_the_padded_cache(ragged):
    """A running batch over states whose heads keep uneven numbers of rows stores each head's real rows only
    (fewer bytes than the padded layout); with `packed_cache = False` it keeps the padded layout, and the answers
    are the same token for token, single requests and batches alike (garbage sits in the padded layout's empty
    slots, so a missed mask would show)."""
    from gist_memory.model import kv
    from gist_memory.model.batching import Decoder

    model, st = ragged
    reqs = [BatchRequest("Who built the lighthouse?", st[:2], {"max_new_tokens": 8, "eos_token_id": NEVER}),
            BatchRequest("Where is the depot?", st[1:], {"max_new_tokens": 6, "eos_token_id": NEVER})]
    held = {}
    answers = {}
    try:
        for packed in (True, False):
            model.packed_cache = packed
            dec = Decoder(model)
            dec.add([Row(model, r) for r in reqs])
            masks = kv.key_mask_of(dec.cache)
            k0, v0 = dec.cache.layers[0].keys, dec.cache.layers[0].values
            per_row = k0.shape[-1] * k0.element_size() + v0.shape[-1] * v0.element_size()
            held[packed] = (kv.cache_bytes(dec.cache), type(dec.cache.layers[0]).__name__,
                            sum(int((~m).sum()) for m in masks) * per_row, sum(int(m.sum()) for m in masks))
            kinds = set()
            while len(dec):  # the shorter answer leaves first: the cache is rebuilt for the row that stays
                dec.step()
                if dec.cache is not None:
                    kinds.add(type(dec.cache.layers[0]).__name__)
            assert kinds == {held[packed][1]}
            answers[packed] = (generate_batch(model, reqs),
                               [model.generate(r.prompt, states=r.states, **r.gen) for r in reqs])
    finally:
        model.packed_cache = True
    assert held[True][1] == "PackedLayer" and held[False][1] != "PackedLayer"
    # the packed batch drops every empty slot's key and value and adds a 4-byte index to each kept row
    assert held[False][0] - held[True][0] == held[True][2] - 4 * held[True][3]
    assert answers[True] == answers[False] and answers[True][0] == answers[True][1]


def test_serve_padded_cache_option(monkeypatch, tiny_base_dir):
    import uvicorn
    from typer.testing import CliRunner

    from gist_memory import cli

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    for flag, packed in ((None, True), ("--padded-cache", False)):
        seen.clear()
        args = ["serve", "--base", tiny_base_dir, "--port", "8125"] + ([flag] if flag else [])
        res = CliRunner().invoke(cli.app, args)
        assert res.exit_code == 0, res.output
        assert seen["app"].state.gist.model.packed_cache is packed
