"""`gist-memory bench` quick mode: every method in every table, sane values, files written, LLMLingua optional."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gist_memory.eval import bench as B
from gist_memory.eval import llmlingua_baseline as LL

HAVE_LINGUA = LL.llmlingua_status()[0]


@pytest.fixture(scope="module")
def quick(tiny_base_dir, tmp_path_factory):
    """One quick run on the tiny model, with a saved (untrained) tiny gist model standing in for a trained one."""
    from gist_memory import GistConfig, GistModel

    root = tmp_path_factory.mktemp("bench")
    gm = GistModel.from_base(
        tiny_base_dir, GistConfig(target_ratio=8, anchors="capitalized", max_sentence_tokens=48), device="cpu"
    )
    gm.save_pretrained(root / "tiny-gist")
    cfg = B.BenchConfig(**{**B.QUICK, "base": tiny_base_dir, "model": str(root / "tiny-gist"),
                           "out_dir": str(root / "out")})
    logs: list[str] = []
    res = B.run_bench(cfg, log=logs.append)
    return res, root / "out", logs


def _expected_keys(res) -> list[str]:
    keys = ["full", "none", "full/trained", "none/trained"]
    for r in ("2", "4", "8"):
        keys += [f"trunc@{r}", f"pool@{r}", f"pool+anchors@{r}", f"gist-untrained@{r}", f"gist-trained@{r}"]
        if HAVE_LINGUA:
            keys.append(f"llmlingua@{r}")
    return keys


def test_every_method_in_quality_tables(quick):
    res, _, _ = quick
    keys = [m["key"] for m in res["methods"]]
    assert sorted(keys) == sorted(_expected_keys(res))
    for k in keys:
        q = res["qa"][k]
        assert q["n"] == 6 and 0.0 <= q["accuracy"] <= 1.0
        assert set(q["by_kind"]) == set(B.KINDS)
        assert q["n_em"] == 3 and 0.0 <= q["em"] <= 1.0 and 0.0 <= q["contains"] <= 1.0
        p = res["ppl"][k]
        assert p["n"] == 3 and p["tokens"] > 0 and math.isfinite(p["ppl"]) and p["ppl"] > 1.0


def test_achieved_ratios_are_reported_and_matched(quick):
    res, _, _ = quick
    qa = res["qa"]
    assert qa["full"]["ratio"] == pytest.approx(1.0)
    assert qa["none"]["ratio"] is None
    for m in res["methods"]:
        if m["ratio"] is None:
            continue
        got = qa[m["key"]]["ratio"]
        # every matched method lands near the requested ratio (LLMLingua is searched to the same budget)
        assert got == pytest.approx(m["ratio"], rel=0.3), (m["key"], got)
        assert res["ppl"][m["key"]]["ratio"] > 1.0


def test_speed_tables_have_every_speed_method_and_sane_values(quick):
    res, _, _ = quick
    sp = res["speed"]
    speed_keys = {m["key"] for m in res["methods"] if m["speed"]}
    assert {"full", "none", "trunc@4", "pool+anchors@4", "gist-untrained@2", "gist-untrained@4",
            "gist-untrained@8"} <= speed_keys
    for axis, rows, values in (("k", sp["by_k"], (2, 4)), ("passage_tokens", sp["by_length"], (24, 48))):
        for v in values:
            pts = {r["method"]: r for r in rows if r[axis] == v}
            assert set(pts) == speed_keys
            for r in pts.values():
                assert r["ttft_s"] > 0 and r["total_s"] >= r["ttft_s"] and r["decode_tps"] > 0
                assert r["kv_bytes"] > 0 and r["ttft_x"] > 0 and r["kv_x"] > 0
                # KV bytes come from the cache tensors: positions x 2 (K, V) x layers x kv heads x head dim x 4 B
                assert r["kv_bytes"] == r["positions"] * 2 * 2 * 2 * 8 * 4
            full = pts["full"]
            assert full["kv_x"] == 1.0 and full["ttft_x"] == 1.0
            assert pts["gist-untrained@8"]["positions"] < pts["gist-untrained@2"]["positions"] < full["positions"]
            assert pts["gist-untrained@8"]["kv_x"] > 1.5
            if HAVE_LINGUA:
                assert pts["llmlingua@4"]["compress_s"] > 0
    ingest = {r["method"]: r for r in sp["ingest"]}
    for m in res["methods"]:
        if m["kind"] == "state" or m["family"] == "llmlingua":
            assert ingest[m["key"]]["tokens_per_s"] > 0


def test_files_table_and_machine(quick):
    res, out, logs = quick
    md = (out / "results.md").read_text(encoding="utf-8")
    assert md == B.render_markdown(res)
    for m in res["methods"]:
        assert f"| {m['label']} |" in md
    mi = res["machine"]
    assert mi["cores"] >= 1 and mi["torch_threads"] == 1 and mi["dtype"] == "float32"
    assert f"{mi['cores']} cores, torch threads 1, float32" in md
    assert not (out / "results.partial.json").exists()  # the checkpoint goes once the run is complete
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert data["qa"].keys() == res["qa"].keys()
    try:
        import matplotlib  # noqa: F401

        assert sorted(Path(p).name for p in res["plots"]) == ["latency_memory_vs_k.png", "latency_memory_vs_length.png"]
        for p in res["plots"]:
            assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert res["plots"] == []
    assert any("qa 6/6" in s for s in logs)
    if not HAVE_LINGUA:
        assert "not installed" in res["models"]["llmlingua"]


@pytest.mark.skipif(not HAVE_LINGUA, reason="llmlingua not installed")
def test_llmlingua_hits_budget_in_reader_tokens(tiny_base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    c = LL.LLMLinguaCompressor(tiny_base_dir, count_tokenizer=tok)
    text = ("The Kesterholm archive's catalogue code is QX-4471. It was a sunny day in Paris. Maren Voss became the "
            "chief curator in 1912. The station sits at an altitude of 2,318 metres.")
    n = c.count(text)
    for ratio in (2, 4):
        r = c.compress(text, n // ratio)
        assert r.tokens_in == n and r.tokens_out == c.count(r.text)
        assert r.ratio == pytest.approx(ratio, rel=0.35) and r.tries >= 1 and r.seconds > 0
    assert c.compress(text, n + 5).text == text  # a budget above the length leaves the text alone


def test_llmlingua_missing_is_a_clear_skip(monkeypatch):
    monkeypatch.setattr(LL.importlib.util, "find_spec", lambda name, *a: None)
    ok, msg = LL.llmlingua_status()
    assert not ok and "pip install" in msg and "skipped" in msg
    with pytest.raises(LL.LLMLinguaUnavailable, match="not installed"):
        LL.LLMLinguaCompressor("unused")


def test_config_validation_and_cli_args():
    with pytest.raises(ValueError, match="speed_ratio"):
        B.BenchConfig(ratios=(2, 8), speed_ratio=4)
    with pytest.raises(ValueError):
        B.BenchConfig(ratios=(0.5,), speed_ratio=0.5)
    args = B.build_parser().parse_args(["--quick", "--ratios", "2,4", "--ks", "1,3", "--no-llmlingua", "--out", "x"])
    cfg = B.config_from_args(args)
    assert cfg.quick and cfg.ratios == (2.0, 4.0) and cfg.ks == (1, 3) and not cfg.llmlingua and cfg.out_dir == "x"
    full = B.config_from_args(B.build_parser().parse_args([]))
    assert not full.quick and full.model == "auto" and full.out_dir == str(B.DEFAULT_OUT) and full.ks == (2, 4, 8, 16, 32)


def test_untrained_gist_config_is_the_training_recipe():
    """bench keeps its own copy of the trainer's default gist settings (eval sits below train): they agree."""
    from gist_memory.train.trainer import TrainConfig

    assert TrainConfig(out_dir="x").gist == B.TRAIN_GIST
    cfg = B._gist_base_config((2.0, 8.0))
    assert cfg.target_ratio == 8.0 and cfg.compressor == "gist" and cfg.anchors == B.TRAIN_GIST["anchors"]


def test_select_items_balances_kinds():
    from gist_memory.data.qa import load_qa

    items = load_qa()
    sel = B.select_items(items, 7)
    kinds = [it.kind for it in sel]
    assert len(sel) == 7 and kinds[:3] == list(B.KINDS) and {kinds.count(k) for k in B.KINDS} <= {2, 3}
    assert B.select_items(items, 0) == items


def test_main_prints_table_without_llmlingua(tiny_base_dir, capsys):
    rc = B.main(["--quick", "--base", tiny_base_dir, "--no-llmlingua", "--no-plots", "--qa-items", "3",
                 "--em-items", "0", "--ppl-items", "1", "--ratios", "4", "--speed-ratio", "4", "--ks", "2",
                 "--lengths", "24"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| full text |" in out and "| gist (untrained) 4x |" in out and "LLMLingua 4x" not in out
    assert "not requested" in out and "torch threads" in out


def test_shared_prefill_scoring_equals_score_choices(tiny_model):
    text = "Maren Voss became the chief curator in 1912. The archive code is QX-4471!"
    states = tiny_model.compress([text])
    conts = [" QX-4471", " 1912", " Paris is a programming language"]
    for prompt, st in (("Question: what is the code?\nAnswer:", states), (text + "\n\nQuestion: code?\nAnswer:", None)):
        want = tiny_model.score_choices(prompt, conts, states=st)
        got = B.score_choices_shared(tiny_model, prompt, conts, st)
        assert got == pytest.approx(want, abs=1e-4)


def test_resume_reuses_finished_sections_of_the_same_run_and_refuses_another(quick, tiny_base_dir):
    """A stopped full run goes on with --resume: the sections in results.partial.json are not measured again,
    and a partial file from other options is refused by name rather than mixed in."""
    res, out, _ = quick
    import copy as _copy

    old = json.loads((out / "results.json").read_text(encoding="utf-8"))
    marked = _copy.deepcopy(old)
    first = next(iter(marked["qa"]))
    marked["qa"][first]["accuracy"] = -1.0  # a value no real run produces: proves the section was reused
    del marked["speed"]
    (out / "results.partial.json").write_text(json.dumps(marked), encoding="utf-8")
    cfg = B.BenchConfig(**{**old["config"], "ratios": tuple(old["config"]["ratios"]), "resume": True,
                           "ks": (2,), "lengths": (24,)})
    with pytest.raises(ValueError, match="different run.*ks"):
        B.run_bench(cfg, log=lambda s: None)
    cfg = B.BenchConfig(**{**old["config"], "resume": True})
    logs: list[str] = []
    again = B.run_bench(cfg, log=logs.append)
    assert again["qa"][first]["accuracy"] == -1.0 and again["ppl"] == old["ppl"]
    assert any("reusing qa, ppl" in s for s in logs)
    assert {r["method"] for r in again["speed"]["by_k"]} == {r["method"] for r in old["speed"]["by_k"]}
    assert not (out / "results.partial.json").exists()


def test_a_run_stopped_inside_the_retention_qa_goes_on_from_the_last_item(quick):
    res, out, _ = quick
    old = json.loads((out / "results.json").read_text(encoding="utf-8"))
    cfg = B.BenchConfig(**{**old["config"], "resume": False})

    class Stop(Exception):
        pass

    def stop_at_third(msg: str) -> None:
        if msg.startswith("[bench] qa 3/"):
            raise Stop

    with pytest.raises(Stop):
        B.run_bench(cfg, log=stop_at_third)
    part = json.loads((out / "results.partial.json").read_text(encoding="utf-8"))
    assert part["qa_progress"]["done"] == 2 and "qa" not in part
    logs: list[str] = []
    again = B.run_bench(B.BenchConfig(**{**old["config"], "resume": True}), log=logs.append)
    assert any("going on after item 2" in s for s in logs)
    assert not any(s.startswith("[bench] qa 1/") or s.startswith("[bench] qa 2/") for s in logs)
    for key, q in res["qa"].items():  # the tiny model is deterministic: same numbers as the uninterrupted run
        assert again["qa"][key]["n"] == q["n"] and again["qa"][key]["accuracy"] == pytest.approx(q["accuracy"])


def test_summary_has_a_row_per_method_with_quality_and_speed_at_k(quick):
    res, _, _ = quick
    k = max(res["config"]["ks"])
    md = B.render_summary(res, k=k)
    for m in res["methods"]:
        assert f"| {m['label']} |" in md
    full = next(ln for ln in md.splitlines() if ln.startswith("| full text |"))
    assert full.split("|")[-4].strip() == "1.0x"  # TTFT x of full text against itself
    assert f"Speed at k = {k} passages" in md and res["command"] in md
