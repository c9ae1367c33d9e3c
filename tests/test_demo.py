"""`make demo` (python -m gist_memory.demo) in quick mode on the tiny model: it runs, prints every number it
promises, and a second run over the same store reuses the compressed passages."""

from __future__ import annotations

import pytest

from gist_memory import demo


@pytest.fixture(scope="module", autouse=True)
def _threads_for_a_busy_machine():
    """torch threads `auto` (fewer on a busy CPU, where waiting OpenMP threads stall), restored afterwards."""
    import torch

    from gist_memory.cli import set_threads

    before = torch.get_num_threads()
    set_threads("auto")
    yield
    torch.set_num_threads(before)


def test_quick_demo_prints_answers_and_costs(tiny_base_dir, tmp_path, capsys):
    store = tmp_path / "demo-store"
    rc = demo.main(["--quick", "--base", tiny_base_dir, "--store", str(store)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    text = out.out
    for needle in ("Q1.", "Q2.", "answer (gist states)", "answer (full text)", "sources:", "compression ratio",
                   "positions read", "time to first token", "KV memory", "mean over 2 questions", "CC BY-SA"):
        assert needle in text, needle
    assert "Q3." not in text  # quick: two questions
    assert "compressed 8 passages" in text
    rc = demo.main(["--quick", "--base", tiny_base_dir, "--store", str(store)])
    assert rc == 0 and "all 8 passages already compressed" in capsys.readouterr().out


def test_demo_bad_model_is_one_line(tmp_path, capsys):
    assert demo.main(["--quick", "--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no gist model" in err[0]


def test_helpers(tiny_base_dir):
    from gist_memory.cli import load_model

    gm, _ = load_model(base=tiny_base_dir)
    cfg = gm.model.config
    assert demo.kv_bytes_per_position(gm) == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (
        cfg.hidden_size // cfg.num_attention_heads) * 4
    assert demo.full_text_prompt("q?", ["a", "b"]) == "a\n\nb\n\nq?"
    assert demo.human_bytes(1536) == "1.5 KiB" and demo.saved(25, 100) == "-75%" and demo.saved(1, 0) == ""
    records = demo.load_sample()
    assert len(records) >= 40 and {qid for _, qid in demo.QUESTIONS} <= {r["id"] for r in records}
    for q, qid in demo.QUESTIONS:  # every demo question is answerable from its passage (a key word is in it)
        text = next(r["text"] for r in records if r["id"] == qid)
        assert any(w in text for w in ("1991", "5,642", "1807", "13 missions")), q


@pytest.mark.parametrize("env", ["1"])
def test_quick_from_env(monkeypatch, env):
    monkeypatch.setenv("GIST_DEMO_QUICK", env)
    assert demo._parser().parse_args([]).quick


def test_both_twins_read_the_passages_in_one_order(monkeypatch):
    from types import SimpleNamespace

    import torch

    hits = [SimpleNamespace(id=f"p{i}", text=f"passage {i}", state=SimpleNamespace(num_tokens=8, num_kept=2, tag=i))
            for i in range(3)]  # search order: best first

    class Memory:
        def search(self, question, k=4, filter=None):
            return hits[:k]

        def states_for(self, hs):
            return [h.state for h in hs]

        def reading(self, question, hs, order):  # GistMemory's own, over this fake's model
            from gist_memory.store.memory import GistMemory

            return GistMemory.reading(self, question, hs, order)

    class Model:
        dtype = torch.float32
        model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=2, num_attention_heads=2,
                                                       num_key_value_heads=1, head_dim=4, hidden_size=8))

        def __init__(self):
            self.calls = []

        def stream(self, question, states=None, max_new_tokens=8, usage=None):
            self.calls.append(("states", [s.tag for s in states]))
            yield "ok"

        def generate_with_usage(self, prompt, states=None, max_new_tokens=8):
            self.calls.append(("text", prompt))
            return "ok", demo.call_usage()

    for order, tags in (("best_last", [2, 1, 0]), ("best_first", [0, 1, 2]), ("relevance", [2, 0, 1])):
        m = Model()
        mem = Memory()
        mem.model = SimpleNamespace(relevance=lambda q, states: [{0: 0.5, 1: 0.9, 2: 0.1}[s.tag] for s in states])
        out = demo.compare(m, mem, "q?", k=3, context_order=order)
        assert m.calls[0] == ("states", tags)
        assert m.calls[1] == ("text", demo.full_text_prompt("q?", [f"passage {t}" for t in tags]))
        assert [h.id for h in out.sources] == ["p0", "p1", "p2"]  # what was found, in search order
        assert ("rank_s" in out.extra) == (order == "relevance")  # the ranking's time is reported
    with pytest.raises(ValueError, match="context_order"):
        demo.compare(Model(), Memory(), "q?", context_order="shuffled")
