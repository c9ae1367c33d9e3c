"""`python -m gist_memory.eval.bench_ingest`: every row measured on the same passages, ratios that follow from the
timings, and an ingest that really stored what it timed (no timing asserted: speed claims live in the script)."""

from __future__ import annotations

import pytest

from gist_memory.eval import bench_ingest as BI


class _Embedder:
    name = "tiny-embedder"
    calls = 0

    def encode(self, texts, **_):  # noqa: ANN001, ANN201
        import numpy as np

        _Embedder.calls += 1
        return np.stack([np.full(8, float(len(t) % 7) + 1.0, dtype="float32") for t in texts])


def test_ingest_bench_rows_and_ratios(tiny_model):
    texts = BI.passages(tiny_model.tokenizer, 6, 40)
    assert len(set(texts)) == 6 and all(20 <= len(tiny_model.encode(t)) <= 42 for t in texts)
    res = BI.measure(tiny_model, texts, batch=4, repeats=2, embedder=_Embedder())
    rows = res["rows"]
    assert set(rows) == {"plain forward", "compress", "embed", "ingest"}
    assert res["raw_tokens"] == sum(len(tiny_model.encode(t)) for t in texts)
    for r in rows.values():
        assert len(r["all"]) == 2 and r["seconds"] > 0
        assert r["tokens_per_s"] == pytest.approx(res["raw_tokens"] / r["seconds"])
    assert rows["compress"]["x_plain"] == pytest.approx(rows["plain forward"]["seconds"] / rows["compress"]["seconds"])
    assert rows["ingest"]["x_compress"] == pytest.approx(rows["compress"]["seconds"] / rows["ingest"]["seconds"])
    assert _Embedder.calls >= 2 * 3  # embed row + ingest row, warm-up and both rounds
    md = BI.render(res)
    assert "| compress |" in md and "Goals: compress >= 0.95x plain forward" in md


def test_plain_forward_reads_every_passage(tiny_model, monkeypatch):
    seen = []
    dec = tiny_model.model.get_decoder()
    orig = dec.forward

    def spy(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        seen.append(int(kw["attention_mask"].sum()))
        return orig(*a, **kw)

    monkeypatch.setattr(dec, "forward", spy)
    texts = BI.passages(tiny_model.tokenizer, 5, 30)
    BI.plain_forward(tiny_model, texts, batch=2)
    assert len(seen) == 3 and sum(seen) == sum(len(tiny_model.encode(t)) for t in texts)


def test_ttft_breakdown_accounts_for_every_position(tiny_model):
    from gist_memory.eval import engine_speed as ES

    texts = BI.passages(tiny_model.tokenizer, 4, 40)
    r = ES.ttft_breakdown(tiny_model, texts, repeats=1)
    assert r["k"] == 4 and r["positions_states"] == r["prefix_tokens"] + r["kept_rows"] + r["suffix_tokens"]
    assert r["positions_full"] > r["positions_states"] and r["bound"] == r["positions_full"] / r["suffix_tokens"]
    assert r["raw_tokens"] == sum(len(tiny_model.encode(t)) for t in texts)
    for key in ("ttft_states_s", "ttft_full_s", "splice_s", "forward_s"):
        assert r[key] > 0
    assert "| 4 |" in ES.render_breakdown([r])


def test_policy_twins_show_where_a_scored_policy_spends_its_time(tiny_base_dir):
    from gist_memory import GistConfig, GistModel

    rec = GistModel.from_base(tiny_base_dir, GistConfig(target_ratio=4.0, anchors="recall"), device="cpu")
    twins = BI.policy_twins(rec)
    assert set(twins) == {BI.SURPRISAL, BI.CAPITALIZED}
    assert twins[BI.SURPRISAL].config.anchors == "surprisal" and twins[BI.SURPRISAL].writer is rec.writer
    assert set(BI.policy_twins(twins[BI.SURPRISAL])) == {BI.CAPITALIZED}
    assert BI.policy_twins(twins[BI.CAPITALIZED]) == {}
