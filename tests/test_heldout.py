"""Held-out evaluation (issue 12): generators apart from training's, the FAQ asset, the table end to end (tiny)."""

from __future__ import annotations

import json
import re

import pytest

from gist_memory.eval import qa
from gist_memory.eval.heldout import faq, items, run
from gist_memory.eval.heldout.items import (
    COMMON_TEMPLATES,
    COMMON_WORD_LISTS,
    ENTITY_TEMPLATES,
    KINDS,
    PLANTED_KINDS,
    TEMPLATES,
    HeldoutError,
    build_items,
    build_planted,
    make_planted,
    prompt,
)

PASSAGES = [
    f"Passage {i} tells of a quiet valley where farmers grew barley for many years. The old mill by the river "
    f"was rebuilt after a flood. Visitors came in the summer to walk the hills and see the lakes. Local records "
    f"describe fairs, markets and a small school that opened near the church."
    for i in range(12)
]


def _words(template: str) -> list[str]:
    t = template.replace("{S}", " X ").replace("{V}", " Y ")
    return re.findall(r"[a-z']+|[XY]", t.lower().replace("x ", "X ").replace(" y ", " Y "))


def _ngrams(template: str, n: int = 4) -> set[tuple[str, ...]]:
    w = re.findall(r"[\w']+", template.replace("{S}", "SUBJ").replace("{V}", "VAL").lower())
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def test_no_template_or_question_pattern_shared_with_training():
    train_strings = [t.sentence for t in qa.FACT_TEMPLATES] + [t.question for t in qa.FACT_TEMPLATES]
    ours = [t.sentence for t in TEMPLATES] + [t.question for t in TEMPLATES]
    assert not set(train_strings) & set(ours)
    train_grams = set().union(*(_ngrams(s) for s in train_strings))
    for s in ours:
        shared = _ngrams(s) & train_grams
        assert not shared, f"{s!r} shares {shared} with a training template"
    # the question frame and the cloze frame of the trainer are not used
    item = build_planted(PASSAGES, "entity_single", 1)[0]
    assert not prompt(item).startswith("Question:") and "Answer:" not in prompt(item)
    assert "Fill in the blank" not in prompt(item)
    # nor the trainer's template names or value lists
    assert not {t.name for t in TEMPLATES} & {t.name for t in qa.FACT_TEMPLATES}
    assert not set(items._FIRST) & set(qa._FIRST)
    assert not set(items._PLACE_HEAD) & set(qa._PLACE_A)
    assert not set(items._PLACE_TAIL) & set(qa._PLACE_B)


def test_generators_are_deterministic_and_produce_the_kinds():
    for kind in PLANTED_KINDS:
        a = build_planted(PASSAGES, kind, 6, seed=3)
        b = build_planted(PASSAGES, kind, 6, seed=3)
        c = build_planted(PASSAGES, kind, 6, seed=4)
        assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
        assert [x.to_dict() for x in a] != [x.to_dict() for x in c]
        for it in a:
            assert it.kind == kind
            assert len(it.passages) == (1 if kind.endswith("_single") else 4)
            assert len(it.choices) == 4 == len(set(it.choices)) == len(it.continuations)
            assert it.choices[it.answer_index] == it.answer == it.key_phrase
            assert it.answer in it.passages[it.answer_passage]
            assert it.answer in it.continuations[it.answer_index]
            # wrong choices never occur in a passage unless planted there (distractors: the other passages' values)
            planted = set()
            for p in it.passages:
                planted |= {c for c in it.choices if re.search(r"(?<!\w)" + re.escape(c) + r"(?!\w)", p, re.I)}
            if kind.endswith("_single"):
                assert planted == {it.answer}
            else:
                assert planted == set(it.choices)
            fam = ENTITY_TEMPLATES if kind.startswith("entity") else COMMON_TEMPLATES
            assert it.meta["template"] in {t.name for t in fam}


def test_common_word_values_escape_the_anchor_rule():
    from gist_memory.text.split import anchor_char_spans

    for words in COMMON_WORD_LISTS.values():
        for w in words:
            assert w.islower() and w.isalpha()
    for it in build_planted(PASSAGES, "common_single", 12, seed=1) + build_planted(PASSAGES, "common_distractors", 4):
        for fact, text in zip(it.meta["facts"], it.passages):
            start = text.index(fact)
            spans = anchor_char_spans(text, [], "capitalized")
            for v in it.choices:
                m = re.search(r"(?<!\w)" + re.escape(v) + r"(?!\w)", fact)
                if m is None:
                    continue
                a, b = start + m.start(), start + m.end()
                assert not any(s < b and a < e for s, e, _ in spans), f"{v!r} selected as an anchor in {fact!r}"
    # while the entity values are (at least partly) anchors
    it = build_planted(PASSAGES, "entity_single", 1)[0]
    spans = anchor_char_spans(it.passages[0], [], "capitalized")
    a = it.passages[0].index(it.answer)
    assert any(s < a + len(it.answer) and a < e for s, e, _ in spans)


def test_bad_requests():
    with pytest.raises(HeldoutError):
        build_planted(PASSAGES, "cloze_swap", 2)
    with pytest.raises(HeldoutError):
        build_planted(PASSAGES[:2], "entity_distractors", 2)
    with pytest.raises(HeldoutError):
        make_planted("common_single", PASSAGES[:2], __import__("random").Random(0))
    with pytest.raises(HeldoutError):
        build_items(2, kinds=["nope"])


def test_faq_asset_parses():
    got = faq.load_faq()
    assert len(got) >= 150
    assert len({(x.question, x.meta["file"]) for x in got}) == len(got) == len({x.id for x in got})
    for it in got:
        assert it.kind == "faq" and it.question.endswith("?")
        assert it.answer and it.answer in it.passages[0]
        assert it.key_phrase and it.key_phrase.lower() in it.answer.lower()
        assert it.meta["license"] == "PSF-2.0"
        assert "``" not in it.passages[0] and ":func:`" not in it.passages[0]
    attribution = (items.ASSETS / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "Python Software Foundation" in attribution and "CC BY-SA 4.0" in attribution


def test_shipped_passages_are_heldout():
    from gist_memory.train.data import is_heldout

    recs = items.load_wiki_passages()
    assert len(recs) >= 200
    assert all(is_heldout(r["doc_id"], 0.05, 0) for r in recs)
    built = build_items(3, kinds=KINDS)
    assert set(built) == set(KINDS) and all(len(v) == 3 for v in built.values())
    assert [x.to_dict() for x in build_items(3, kinds=["common_distractors"])["common_distractors"]] == [
        x.to_dict() for x in built["common_distractors"]
    ]


def test_faq_extraction_from_rst(tmp_path):
    (tmp_path / "general.rst.txt").write_text(
        "Title\n=====\n\nSection\n-------\n\nNot a question\n--------------\n\nText.\n\n"
        ".. _label:\n\nHow do I copy a thing?\n----------------------\n\n"
        "Yes.  Use :func:`copy.deepcopy` from the ``copy`` module for the general case::\n\n"
        "   import copy\n   y = copy.deepcopy(x)\n\nSee `the docs <https://example.org>`_ for more.\n\n"
        ".. XXX a comment\n\nWhy?\n----\n\n.. note::\n   Only a note.\n",
        encoding="utf-8",
    )
    got = faq.extract_faq(tmp_path)
    assert [x.question for x in got] == ["How do I copy a thing?"]
    it = got[0]
    assert it.answer == "Yes. Use copy.deepcopy from the copy module for the general case:"
    assert it.key_phrase == "copy.deepcopy"
    assert "y = copy.deepcopy(x)" in it.passages[0] and "See the docs for more." in it.passages[0]
    assert "XXX" not in it.passages[0]
    with pytest.raises(HeldoutError):
        faq.extract_faq(tmp_path / "missing")


def test_render_markdown_and_recovered_fraction():
    def cell(method, ratio, kind, metrics, per_item, raw=100, kept=25):
        return {"method": method, "ratio": ratio, "kind": kind, "n": len(per_item), "metrics": metrics,
                "raw_tokens": raw, "kept_rows": kept, "achieved_ratio": raw / kept if kept else None, "seconds": 1.0,
                "per_item": per_item, "version": 1}  # fmt: skip

    recs = [
        cell("full", None, "faq", {}, [{"id": "a", "ll": -10.0}, {"id": "b", "ll": -20.0}], 100, 100),
        cell("none", None, "faq", {}, [{"id": "a", "ll": -30.0}, {"id": "b", "ll": -40.0}], 0, 0),
        cell("pool+anchors", 4.0, "faq", {"gen_contains": 0.5}, [{"id": "a", "ll": -20.0}, {"id": "b", "ll": -30.0}]),
        cell("pool+anchors", 4.0, "common_single", {"mc_accuracy": 0.75, "gen_contains": 0.5}, [{}] * 4),
    ]
    assert run.recovered_fraction(recs[2], recs[0], recs[1]) == pytest.approx(0.5)
    md = run.render_markdown(recs)
    assert run.LABEL in md
    assert "| pool+anchors @4x | 4.00x | 0.75 / 0.50 | 0.50 / 0.50 |" in md
    assert "| none | - |" in md
    assert "pool+anchors @4x" in run.render_details(recs)


def test_table_end_to_end_on_tiny_model(tiny_base_dir, tmp_path):
    from gist_memory import GistConfig, GistModel

    gist_dir = tmp_path / "gist"
    GistModel.from_base(tiny_base_dir, GistConfig(target_ratio=4, anchors="capitalized", max_sentence_tokens=48),
                        device="cpu").save_pretrained(gist_dir)  # fmt: skip
    its = build_items(2, kinds=KINDS)
    out = tmp_path / "res.jsonl"
    logs: list[str] = []
    recs = run.run_table(its, ratios=[4], out=out, base=tiny_base_dir, model=str(gist_dir), n_requested=2,
                         loader=run.default_loader(tiny_base_dir, str(gist_dir), device="cpu"), log=logs.append)  # fmt: skip
    n_cells = (3 + 5) * len(KINDS)  # full, apart, none + 5 methods at one ratio
    assert len(recs) == n_cells
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == n_cells and all(r["label"] == run.LABEL for r in lines)
    by = {(r["method"], r["kind"]): r for r in lines}
    for (m, k), r in by.items():
        assert r["n"] == 2
        if k == "faq":
            assert "mean_ll" in r["metrics"] and "gen_contains" in r["metrics"]
        else:
            assert 0.0 <= r["metrics"]["mc_accuracy"] <= 1.0
            assert ("gen_contains" in r["metrics"]) == k.endswith("_single")
        if m not in ("none", "full", "apart"):
            assert r["achieved_ratio"] > 1.5
        if m == "apart":  # raw rows, nothing compressed
            assert r["ratio"] is None and r["achieved_ratio"] == pytest.approx(1.0)
    assert by[("gist", "faq")]["model_anchors"] == "none"
    assert by[("gist+anchors", "faq")]["model_anchors"] == "capitalized"
    md = run.render_markdown(recs)
    assert "gist+anchors @4x" in md and "Python FAQ" in md
    # resume: nothing is rerun, no model is loaded
    logs.clear()
    again = run.run_table(its, ratios=[4], out=out, base=tiny_base_dir, model=str(gist_dir), n_requested=2,
                          loader=lambda m, r: pytest.fail("resume loaded a model"), log=logs.append)  # fmt: skip
    assert len(again) == n_cells and not logs
    assert len(out.read_text().splitlines()) == n_cells


def test_unloadable_model_is_skipped_not_fatal(tmp_path):
    its = {"common_single": build_planted(PASSAGES, "common_single", 1)}
    logs: list[str] = []

    def load(method, ratio):
        raise ValueError("adapter format 1")

    recs = run.run_table(its, methods=["gist"], ratios=[4], out=tmp_path / "r.jsonl", loader=load, log=logs.append)
    assert recs == [] and "skipped gist @4x" in logs[0] and not (tmp_path / "r.jsonl").exists()


def test_more_items_keep_the_fewer_items():
    small, large = build_items(5), build_items(12)
    for kind in KINDS:
        ids_small = [x.to_dict() for x in small[kind]]
        ids_large = [x.to_dict() for x in large[kind]]
        if kind == "faq":
            assert all(x in ids_large for x in ids_small)
        else:
            assert ids_large[:5] == ids_small


def test_an_anchor_policy_override_is_recorded_labelled_and_resumed_apart(tiny_base_dir, tmp_path):
    its = {"common_single": build_planted(PASSAGES, "common_single", 1)}
    out = tmp_path / "anchors.jsonl"
    logs: list[str] = []
    plain = run.run_table(its, methods=["pool+anchors"], ratios=[4], out=out, base=tiny_base_dir,
                          loader=run.default_loader(tiny_base_dir, None, device="cpu"), log=logs.append)  # fmt: skip
    sup = run.run_table(its, methods=["pool+anchors"], ratios=[4], out=out, base=tiny_base_dir, anchors="surprisal",
                        loader=run.default_loader(tiny_base_dir, None, device="cpu", anchors="surprisal"),
                        log=logs.append)  # fmt: skip
    assert "anchors" not in plain[0] and sup[0]["anchors"] == "surprisal"
    assert len(out.read_text().splitlines()) == 2  # the override is a new cell, not a resumed one
    md = run.render_markdown(plain + sup)
    assert "| pool+anchors @4x |" in md and "| pool+anchors (surprisal anchors) @4x |" in md
    tagged = [{**sup[0], "method": "gist+anchors", "tag": "adapted reader"}]
    assert "| gist+anchors (surprisal anchors, adapted reader) @4x |" in run.render_markdown(plain + tagged)


def test_kvpress_rows_use_the_tables_items_prompts_and_budgets(tiny_base_dir, tmp_path, monkeypatch):
    """The kvpress runner is faked (it needs its own environment): the job carries the table's prompts and each
    passage's state budget, and its scores become cells that render beside the table's own rows."""
    from gist_memory import GistModel
    from gist_memory.eval import peers
    from gist_memory.eval.heldout import kvpress
    from gist_memory.eval.heldout.items import build_items, prompt
    from gist_memory.eval.heldout.run import pool_config, read_results, render_markdown

    items = build_items(3, seed=0, kinds=["entity_single", "entity_distractors", "faq"])
    seen = []

    def fake(python, job, timeout=0):  # noqa: ANN001, ANN202 - the runner's contract: one score per choice
        seen.append(job)
        out = []
        for it in job["items"]:
            scores = [-float(len(c)) for c in it["choices"]]  # the shortest choice wins
            out.append({"scores": scores, "raw": sum(len(job["passages"][p]) for p in it["passages"]),
                        "kept": sum(job["budgets"][p] for p in it["passages"])})
        return {"versions": {"kvpress": "fake"}, "presses": {p: {"items": out} for p in job["presses"]}}

    monkeypatch.setattr(peers, "run_kvpress", fake)
    out = tmp_path / "r.jsonl"
    recs = kvpress.run(items, ["kvzip"], [4.0], "python", out, 0, 3, base=tiny_base_dir, log=lambda s: None)
    job = seen[0]
    gm = GistModel.from_base(tiny_base_dir, pool_config("pool+anchors", 4.0), device="cpu")
    flat = [it for k in ("entity_single", "entity_distractors", "faq") for it in items[k]]
    assert len(job["items"]) == len(flat) == 9
    for it, j in zip(flat, job["items"]):
        assert (j["prefix"], j["suffix"]) == tuple(gm.template_ids(prompt(it)))
        texts = it.passages
        assert [job["budgets"][p] for p in j["passages"]] == [gm.plan(t).num_kept for t in texts]
        assert len(j["choices"]) == (1 if it.kind == "faq" else 4)
    by = {r["kind"]: r for r in recs}
    assert set(by) == {"entity_single", "entity_distractors", "faq"} and all(r["method"] == "kvpress:kvzip" for r in recs)
    for kind in ("entity_single", "entity_distractors"):
        want = [int(min(range(4), key=lambda i: (len(gm.encode((it.continuations or it.choices)[i])), i))
                    == it.answer_index) for it in items[kind]]
        assert [p["correct"] for p in by[kind]["per_item"]] == want
    assert by["faq"]["metrics"]["mean_ll"] == -sum(len(gm.encode(it.answer)) for it in items["faq"]) / 3
    assert 3.5 < by["entity_single"]["achieved_ratio"] < 4.5
    assert len(read_results(out)) == 3
    assert kvpress.run(items, ["kvzip"], [4.0], "python", out, 0, 3, base=tiny_base_dir, log=lambda s: None) == []
    assert "| kvpress:kvzip @4x |" in render_markdown(read_results(out))


def test_dev_faq_items_leave_out_the_reported_sample(tmp_path, monkeypatch, capsys):
    """`--faq-exclude-seed 0` draws dev FAQ items that the reported seed-0 sample does not hold."""
    from gist_memory.eval.heldout import __main__ as cli
    from gist_memory.eval.heldout.items import build_items

    got = {}

    def fake_run_table(items, **kw):  # noqa: ANN001, ANN202
        got.update(items)
        return []

    monkeypatch.setattr(cli, "run_table", fake_run_table)
    monkeypatch.setattr(cli, "default_loader", lambda *a, **k: None)
    assert cli.main(["--kinds", "faq", "--items", "20", "--seed", "1", "--faq-exclude-seed", "0",
                     "--out", str(tmp_path / "r.jsonl")]) == 0
    reported = {it.id for it in build_items(20, seed=0, kinds=["faq"])["faq"]}
    dev = {it.id for it in got["faq"]}
    assert len(dev) == 20 and not dev & reported
    assert reported & {it.id for it in build_items(20, seed=1, kinds=["faq"])["faq"]}  # without it they overlap


def test_loader_turns_a_head_budget_off_with_the_anchors(tiny_base_dir, tmp_path):
    from gist_memory import GistConfig, GistModel

    gist_dir = tmp_path / "gist"
    GistModel.from_base(tiny_base_dir, GistConfig(target_ratio=4, anchors="recall", head_anchors=True,
                                                  head_budget="global", max_sentence_tokens=48),
                        device="cpu").save_pretrained(gist_dir)  # fmt: skip
    load = run.default_loader(tiny_base_dir, str(gist_dir), device="cpu")
    alone = load("gist", 8.0).config
    assert (alone.anchors, alone.head_anchors, alone.head_budget, alone.target_ratio) == ("none", False, "even", 8.0)
    served = load("gist+anchors", 4.0).config
    assert (served.anchors, served.head_anchors, served.head_budget) == ("recall", True, "global")
    scaled = run.default_loader(tiny_base_dir, str(gist_dir), device="cpu", head_budget_cap=4.0,
                                head_budget_cap_ratio=4.0)  # the cap stated at 4x: twice the even count's multiple at 8x
    assert (scaled("gist+anchors", 4.0).config.head_cap(), scaled("gist+anchors", 8.0).config.head_cap()) == (4.0, 8.0)
    assert load("gist+anchors", 8.0).config.head_cap() == 4.0  # the saved config's own, unscaled


def test_rows_of_equal_label_length_follow_the_results_file():
    def cell(tag):
        return {"method": "gist", "ratio": 4.0, "kind": "common_single", "n": 1, "tag": tag,
                "metrics": {"mc_accuracy": 1.0}, "raw_tokens": 40, "kept_rows": 10, "per_item": [{}], "version": 1}

    tags = ["stage 7 step 200", "stage 5 step 400", "stage 6 step 325"]  # equal lengths: hashing used to decide
    for order in (tags, tags[::-1]):
        md = run.render_markdown([cell(t) for t in order])
        rows = [line.split(" @")[0] for line in md.splitlines() if line.startswith("| gist (")]
        assert rows == [f"| gist ({t})" for t in order]


def test_apart_states_are_the_plain_forward_rows_of_each_passage(tiny_base_dir):
    """`apart` keeps every token's own K/V: what the base model caches reading the passage alone, so the row
    measures writing passages apart and nothing else."""
    import torch

    from gist_memory import GistModel
    from gist_memory.model import kv

    gm = GistModel.from_base(tiny_base_dir, run.apart_config(), device="cpu")
    texts = [PASSAGES[0], "Short one. It has two sentences about Oslo in 1907."]
    states = gm.compress(texts)
    for text, st in zip(texts, states):
        ids = gm.plan(text).ids.tolist()
        assert st.num_rows == st.num_tokens == len(ids)
        assert st.positions.reshape(-1, len(ids))[0].tolist() == list(range(len(ids)))
        with torch.no_grad():
            out = gm.model.get_decoder()(input_ids=torch.tensor([ids]), use_cache=True)
        for li, (k, v) in enumerate(kv.cache_layers(kv.out_cache(out))):
            assert torch.allclose(st.keys[li].float(), k[0].float(), atol=1e-4), li
            assert torch.allclose(st.values[li].float(), v[0].float(), atol=1e-4), li


def test_a_write_head_override_reaches_every_state_method_and_labels_its_rows(tiny_base_dir, tmp_path):
    its = build_items(2, kinds=["entity_single"])
    out = tmp_path / "res.jsonl"
    kw = dict(methods=["apart", "pool+anchors"], ratios=[4], out=out, base=tiny_base_dir, log=lambda s: None)
    plain = run.run_table(its, loader=run.default_loader(tiny_base_dir, None, device="cpu"), **kw)
    loader = run.default_loader(tiny_base_dir, None, device="cpu", write_head="template")
    assert loader("apart", None).config.write_head == "template"
    assert loader("pool+anchors", 4.0).config.write_head == "template"
    headed = run.run_table(its, loader=loader, write_head="template", **kw)
    assert len(plain) == len(headed) == 2 and len(out.read_text().splitlines()) == 4  # kept apart on resume
    assert all(r["write_head"] == "template" for r in headed) and not any("write_head" in r for r in plain)
    md = run.render_markdown(plain + headed)
    assert "| apart (template head) |" in md and "| pool+anchors (template head) @4x |" in md


def test_a_relevance_read_order_reaches_every_method_and_labels_its_rows(tiny_base_dir, tmp_path):
    """`read_order="relevance"` arranges each item's passages with `GistModel.focus` (texts for `full`, states
    for state methods); `read_keep` leaves the reader only the top ones; the rows are new cells, labelled."""
    its = build_items(2, kinds=["entity_distractors"])
    out = tmp_path / "res.jsonl"
    base = run.default_loader(tiny_base_dir, None, device="cpu")
    seen: list[tuple[str, int, int]] = []

    def loader(method, ratio):  # noqa: ANN001, ANN202 - records what each scoring call reads
        gm = base(method, ratio)
        score_choices = gm.score_choices

        def spy(q, conts, states=None, **kw):  # noqa: ANN001, ANN202
            seen.append((method, len(states or []), q.count("\n\n")))
            return score_choices(q, conts, states=states, **kw)

        gm.score_choices = spy
        return gm

    kw = dict(methods=["full", "pool+anchors"], ratios=[4], out=out, base=tiny_base_dir, log=lambda s: None)
    plain = run.run_table(its, loader=loader, **kw)
    n_passages = len(its["entity_distractors"][0].passages)
    assert {(m, k) for m, k, _ in seen} == {("full", 0), ("pool+anchors", n_passages)}
    text_breaks = {b for m, _, b in seen if m == "full"}
    seen.clear()
    top = run.run_table(its, loader=loader, read_order="relevance", read_keep=1, **kw)
    assert {(m, k) for m, k, _ in seen} == {("full", 0), ("pool+anchors", 1)}
    assert max(b for m, _, b in seen if m == "full") < min(text_breaks)  # one passage of text, not all
    assert all(r["read"] == "relevance order, top 1" for r in top) and not any("read" in r for r in plain)
    assert top[0]["raw_tokens"] == plain[0]["raw_tokens"]  # the ratio counts every passage written
    for r in top:  # which passage the ranking read, and whether it held the answer
        its_by_id = {it.id: it for it in its["entity_distractors"]}
        for x in r["per_item"]:
            assert len(x["read_passages"]) == 1
            assert x["answer_read_last"] == int(x["read_passages"][0] == its_by_id[x["id"]].answer_passage)
        assert 0.0 <= r["metrics"]["answer_read_last"] <= 1.0
    assert not any("read_passages" in x for r in plain for x in r["per_item"])
    assert len(out.read_text().splitlines()) == 4
    md = run.render_markdown(plain + top)
    assert "| full (relevance order, top 1) |" in md and "| pool+anchors (relevance order, top 1) @4x |" in md
