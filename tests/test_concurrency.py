"""One GistModel shared by many threads: each call gives what it gives alone, with its own usage."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gist_memory.model.usage import Usage

TEXTS = [
    "Maren Voss became the chief curator in 1912. The archive code is QX-4471!",
    "The quick brown fox jumps over the lazy dog. It was a sunny day in Paris.",
    "Python is a programming language. The station sits at an altitude of 2,318 metres.",
    "Question: what is the capital of France? Answer: Paris. Numbers like 3.14 matter.",
]
QUESTIONS = ["What is the code?", "Who was the curator?", "Where was it sunny?", "How high is the station?",
             "Name the language.", "What is the capital?", "Which number matters?", "Say something."]


def _jobs(model, states):  # noqa: ANN001, ANN202
    """(name, call) pairs: generation with and without states, streaming, scoring, compression, chat messages."""
    jobs = []
    for i, q in enumerate(QUESTIONS):
        st = [states[i % len(states)]]
        jobs.append((f"gen-{i}", lambda q=q, st=st: model.generate_with_usage(q, states=st, max_new_tokens=6)))
        jobs.append((f"plain-{i}", lambda q=q: model.generate_with_usage(q, max_new_tokens=4)))
        jobs.append((f"score-{i}", lambda q=q, st=st: _score(model, q, st)))
        jobs.append((f"stream-{i}", lambda q=q, st=st: _stream(model, q, st)))
        jobs.append((f"chat-{i}", lambda q=q, st=st: model.generate_with_usage(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": q}],
            states=st, max_new_tokens=4)))
    for i, t in enumerate(TEXTS):
        jobs.append((f"compress-{i}", lambda t=t, i=i: model.compress([t, TEXTS[(i + 1) % len(TEXTS)]])))
    return jobs


def _score(model, q, st):  # noqa: ANN001, ANN202
    u = Usage()
    return model.score_choices(q, [" QX-4471", " Paris", " 1912"], states=st, usage=u), u


def _stream(model, q, st):  # noqa: ANN001, ANN202
    u = Usage()
    return "".join(model.stream(q, states=st, max_new_tokens=6, usage=u)), u


def _comparable(result):  # noqa: ANN001, ANN202
    """Usage timings differ run to run; everything else must be identical."""
    if isinstance(result, list):  # compressed states
        return [(s.keys, s.values, s.positions.tolist(), s.kinds.tolist(), s.num_tokens) for s in result]
    value, u = result
    d = u.to_dict()
    d.pop("ttft_s"), d.pop("total_s")
    return value, d


def _same(a, b) -> bool:  # noqa: ANN001
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("model_fixture", ["tiny_model"])
def test_eight_threads_give_what_each_call_gives_alone(model_fixture, request):
    model = request.getfixturevalue(model_fixture)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # keep 8 Python threads from oversubscribing a small machine (alone runs the same)
    try:
        _run_together(model)
    finally:
        torch.set_num_threads(threads)


def _run_together(model) -> None:  # noqa: ANN001
    states = model.compress(TEXTS)
    jobs = _jobs(model, states)
    alone = {name: _comparable(call()) for name, call in jobs}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def run(job):  # noqa: ANN001, ANN202
        name, call = job
        try:
            return name, _comparable(call())
        except BaseException as e:  # noqa: BLE001 - every failure is reported below
            errors.append(e)
            raise

    def wave(chunk):  # noqa: ANN001, ANN202
        barrier.wait(timeout=60)  # all 8 threads start together
        return [run(j) for j in chunk]

    order = jobs * 2  # every call twice, interleaved with everything else
    chunks = [order[i::8] for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = [r for rs in pool.map(wave, chunks) for r in rs]
    assert not errors, errors
    assert len(together) == len(order)
    for name, got in together:
        assert _same(got, alone[name]), f"{name}: concurrent result differs from the call made alone"


def test_usage_is_per_call_under_concurrency(tiny_model):
    states = tiny_model.compress(TEXTS)
    want = {}
    for i, st in enumerate(states):
        _, u = tiny_model.generate_with_usage(QUESTIONS[i], states=[st], max_new_tokens=5)
        want[i] = (u.raw_tokens, u.kept_rows, u.positions_read, u.new_tokens)
    got: dict[int, list] = {i: [] for i in range(len(states))}

    def ask(i: int) -> None:
        for _ in range(3):
            _, u = tiny_model.generate_with_usage(QUESTIONS[i], states=[states[i]], max_new_tokens=5)
            got[i].append((u.raw_tokens, u.kept_rows, u.positions_read, u.new_tokens))
            assert tiny_model.last_usage["raw_tokens"] == states[i].num_tokens  # this thread's, not another's

    threads = [threading.Thread(target=ask, args=(i % len(states),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(not t.is_alive() for t in threads)
    for i, runs in got.items():
        assert runs and all(r == want[i] for r in runs), (i, runs, want[i])


def test_prefix_cache_is_bounded_in_bytes(tiny_model):
    old = tiny_model.prefix_cache_bytes
    try:
        tiny_model.invalidate_fingerprint()
        st = tiny_model.compress(TEXTS[:1])
        base = tiny_model.generate("What is the code?", states=st, max_new_tokens=4)
        one = tiny_model.cache_info()
        assert one["prefix_entries"] == 1 and one["prefix_bytes"] > 0
        entry = one["prefix_bytes"]
        tiny_model.prefix_cache_bytes = 2 * entry + entry // 2  # room for two entries of this size
        for sp in ("A.", "B.", "C.", "D."):  # a system prompt changes the prefix: a new entry each
            tiny_model.generate("What is the code?", states=st, system_prompt=sp, max_new_tokens=2)
        info = tiny_model.cache_info()
        assert info["prefix_bytes"] <= tiny_model.prefix_cache_bytes and info["prefix_entries"] <= 2
        tiny_model.prefix_cache_bytes = 0  # off: answers stay the same, nothing is kept
        assert tiny_model.cache_info()["prefix_entries"] == 0
        assert tiny_model.generate("What is the code?", states=st, max_new_tokens=4) == base
        assert tiny_model.cache_info()["prefix_bytes"] == 0
        with pytest.raises(ValueError, match="prefix_cache_bytes"):
            tiny_model.prefix_cache_bytes = -1
    finally:
        tiny_model.prefix_cache_bytes = old


def test_eval_mode_comes_back_after_overlapping_calls(tiny_model):
    tiny_model.model.train()
    try:
        with tiny_model._eval_mode():  # a call in progress (e.g. a stream another thread is reading)
            assert not tiny_model.model.training
            tiny_model.score("Q?", " A")  # another call starts and ends meanwhile
            assert not tiny_model.model.training  # the first call still runs in eval mode
        assert tiny_model.model.training  # the mode the model had comes back after the last call
    finally:
        tiny_model.model.eval()
