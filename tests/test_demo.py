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
