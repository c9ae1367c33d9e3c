"""The per-turn chat benchmark of `examples/langchain_chat_memory.py --bench` (full text vs compressed with a raw
token budget) on the tiny random model: what it measures and reports, not how fast."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[4] / "examples" / "langchain_chat_memory.py"


def _load_example():  # noqa: ANN202 - the example module
    spec = importlib.util.spec_from_file_location("gist_example_langchain_chat_memory", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(result: dict) -> dict:
    return {(r["turn"], r["mode"]): r for r in result["rows"]}


def test_bench_compares_full_text_and_the_raw_budget_and_stops_full_text_past_the_context(gist_tiny):
    ex = _load_example()
    res = ex.run_bench(gist_tiny, [9, 2], keep_recent=2, raw_token_budget=64, max_tokens=2, repeats=1)
    assert res["config"]["context_window"] == gist_tiny.base_model.config.max_position_embeddings  # from the config
    assert res["config"]["turns"] == [2, 9]
    rows = _rows(res)
    assert len(rows) == 4
    for t in (2, 9):
        full = rows[(t, "full text")]
        assert full["available"] and full["positions"] == full["raw_tokens"]  # raw tokens = what full text reads
        assert full["half_ok"] is None
    c2, c9, f9 = rows[(2, "compressed")], rows[(9, "compressed")], rows[(9, "full text")]
    assert c2["positions"] == c2["raw_tokens"] and c2["half_ok"] is None  # nothing old yet; the rule is from turn 8
    assert c9["raw_tokens"] == f9["raw_tokens"]
    assert c9["positions"] < f9["positions"]
    assert c9["raw_turns"] == 2 and c9["compressed_turns"] == 7  # the last exchange stays verbatim
    assert c9["new_compressions"] == 1  # turns 1-7 were compressed once; the timed call compresses only turn 7
    assert c9["half_ok"] is True and c9["positions"] <= 0.5 * c9["raw_tokens"]
    table = ex.bench_table(res)
    assert "| 9 | compressed |" in table and f"turn 9: positions {c9['positions']} <= 0.5 x raw" in table

    # a context window between turn 2's and turn 9's history: full text stops, compressed goes on; no budget and
    # every turn kept as text fails the half-of-raw rule, and the report says so
    n_ctx = f9["raw_tokens"]
    res = ex.run_bench(gist_tiny, [2, 9], keep_recent=100, raw_token_budget=None, max_tokens=2, repeats=1,
                       n_ctx=n_ctx)
    rows = _rows(res)
    assert rows[(2, "full text")]["available"]
    gone = rows[(9, "full text")]
    assert not gone["available"] and gone["positions"] is None and str(n_ctx) in gone["reason"]
    kept = rows[(9, "compressed")]
    assert kept["available"] and kept["positions"] > 0.5 * kept["raw_tokens"] and kept["half_ok"] is False
    table = ex.bench_table(res)
    assert f"| 9 | full text | - | - | - | {n_ctx} |" in table
    assert "context window" in table and f"turn 9: positions {kept['positions']}" in table
    assert table.rstrip().endswith("NO")
