"""Training on a tiny model: the loss falls, checkpoints reload identically, bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch

from gist_memory import GistModel
from gist_memory.eval.qa import QAItem
from gist_memory.train.trainer import TrainConfig, Trainer, train_texts

P1 = "The Harlow archive was founded long ago. Its catalogue code is QX-4471. It holds maps of the coast."
P2 = "Maren Voss became the chief curator in 1912. She catalogued many shells. The museum is by the sea."


def _items():
    return [
        QAItem(id="a", kind="planted_single", passages=[P1], question="What is the archive's catalogue code?",
               answer="QX-4471", choices=["QX-4471", "QX-7714", "ZK-1002", "AB-9981"], answer_index=0),
        QAItem(id="b", kind="planted_single", passages=[P2], question="When did Maren Voss become curator?",
               answer="1912", choices=["1912", "1921", "1894", "1955"], answer_index=0),
    ]


def _cfg(tmp_path, tiny_base_dir, **kw):
    base = dict(out_dir=str(tmp_path / "run"), base=tiny_base_dir, steps=12, batch_items=2, lr_lora=3e-3,
                lr_gist=1e-2, warmup=1, save_every=6, eval_every=10**9, ratios=(4.0,), curriculum=False,
                w_qa=1.0, w_recon=0.5, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base_dir):
    tmp = tmp_path_factory.mktemp("train")
    tr = Trainer(_cfg(tmp, tiny_base_dir), items=_items(), eval_items=[])
    hist = tr.train(progress=False)
    return tmp, tr, hist


def test_loss_falls(trained):
    _, _, hist = trained
    steps = [h for h in hist if "qa" in h]
    assert len(steps) == 12
    first = sum(h["qa"] + h["recon"] for h in steps[:3]) / 3
    last = sum(h["qa"] + h["recon"] for h in steps[-3:]) / 3
    assert last < first - 0.05, (first, last)


def test_checkpoint_reloads_identically(trained):
    tmp, tr, _ = trained
    ck = tmp / "run" / "checkpoint"
    assert (ck / "gist_adapter.safetensors").is_file() and (ck / "recipe.json").is_file()
    tr.model.model.eval()
    tr.model.invalidate_fingerprint()
    tr.model.config.target_ratio = 4.0
    with torch.no_grad():
        a = tr.model.compress([P1])[0]
        sa = tr.model.score("Question: What is the archive's catalogue code?\nAnswer:", " QX-4471", states=[a])
    back = GistModel.from_pretrained(ck, device="cpu", config_overrides={"target_ratio": 4.0})
    b = back.compress([P1])[0]
    assert (a.keys - b.keys).abs().max() <= 1e-4
    sb = back.score("Question: What is the archive's catalogue code?\nAnswer:", " QX-4471", states=[b])
    assert sb == pytest.approx(sa, abs=1e-3)


def test_resume_continues_and_refuses_another_recipe(trained, tiny_base_dir):
    tmp, _, _ = trained
    more = Trainer(_cfg(tmp, tiny_base_dir, steps=14), items=_items(), eval_items=[])
    assert more.step == 12
    more.train(progress=False)
    assert more.step == 14
    with pytest.raises(ValueError, match="different recipe"):
        Trainer(_cfg(tmp, tiny_base_dir, lr_lora=1e-4), items=_items(), eval_items=[])
    # a failed/refused run leaves the checkpoint as it was
    assert json.loads((tmp / "run" / "checkpoint" / "recipe.json").read_text())["lr_lora"] == 3e-3


def test_stop_at_ends_early_on_the_full_schedule_and_resume_goes_on(tmp_path, tiny_base_dir):
    full = Trainer(_cfg(tmp_path / "a", tiny_base_dir, steps=4, save_every=10), items=_items(), eval_items=[])
    ref = [h["lr_scale"] for h in full.train(progress=False) if "lr_scale" in h]
    part = Trainer(_cfg(tmp_path / "b", tiny_base_dir, steps=4, stop_at=2, save_every=10, snapshot_every=10),
                   items=_items(), eval_items=[])
    got = [h["lr_scale"] for h in part.train(progress=False) if "lr_scale" in h]
    assert part.step == 2 and got == ref[:2]  # same schedule, cut short; checkpoint and snapshot at the stop
    run = tmp_path / "b" / "run"
    assert (run / "checkpoint" / "recipe.json").is_file() and (run / "snapshots" / "step-00002").is_dir()
    rest = Trainer(_cfg(tmp_path / "b", tiny_base_dir, steps=4), items=_items(), eval_items=[])
    assert rest.step == 2  # stop_at is not part of the recipe
    before = part.history[-1]
    assert rest.tokens_done == before["tokens"] and rest.elapsed_done == pytest.approx(before["elapsed_s"], abs=0.1)
    hist = [h for h in rest.train(progress=False) if "lr_scale" in h]
    assert [h["lr_scale"] for h in hist] == ref[2:]
    # the resumed session counts on: tokens and seconds from the run's start, as the full run logged them
    full_tokens = [h["tokens"] for h in full.history if "lr_scale" in h]
    assert [h["tokens"] for h in hist] == full_tokens[2:] and hist[0]["elapsed_s"] >= before["elapsed_s"]
    with pytest.raises(ValueError, match="stop_at"):
        _cfg(tmp_path, tiny_base_dir, steps=4, stop_at=5)


def test_ship_counts_tokens_across_resumed_sessions():
    from gist_memory.train.ship import _cumulative

    # trainers before 0.3 restarted their counters on resume: session 1 ran to step 3, resumed from step 2
    old = [{"step": 1, "tokens": 10, "elapsed_s": 1.0}, {"step": 2, "tokens": 20, "elapsed_s": 2.0},
           {"step": 3, "tokens": 30, "elapsed_s": 3.0},
           {"step": 3, "tokens": 12, "elapsed_s": 1.5}, {"step": 4, "tokens": 22, "elapsed_s": 2.5},
           {"step": 5, "tokens": 5, "elapsed_s": 0.5}]  # a third session, resumed at step 4 with no overlap
    got = _cumulative(old)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert [r["tokens"] for r in got] == [10, 20, 32, 42, 47]
    assert got[-1]["elapsed_s"] == pytest.approx(5.0)  # 2.0 + 2.5 of session 2 + 0.5
    # counters that already go on (this trainer): the redone records are dropped, nothing is added
    new = [{"step": 1, "tokens": 10}, {"step": 2, "tokens": 20}, {"step": 3, "tokens": 30},
           {"step": 3, "tokens": 31}, {"step": 4, "tokens": 41}]
    assert [r["tokens"] for r in _cumulative(new)] == [10, 20, 31, 41]


def test_init_from_warm_starts(trained, tiny_base_dir, tmp_path):
    tmp, _, _ = trained
    tr = Trainer(_cfg(tmp_path, tiny_base_dir, init_from=str(tmp / "run" / "checkpoint")), items=_items(), eval_items=[])
    trained_rows = GistModel.from_pretrained(tmp / "run" / "checkpoint", device="cpu")
    assert torch.allclose(tr.model.writer.gist_embeddings, trained_rows.writer.gist_embeddings)
    for k, mod in tr.model.writer.lora.items():
        assert torch.allclose(mod.lora_B, trained_rows.writer.lora[k].lora_B)
    assert tr.step == 0


def test_bad_configs_and_corpora(tmp_path, tiny_base_dir):
    with pytest.raises(ValueError, match="stage"):
        TrainConfig(out_dir=str(tmp_path), stage="magic")
    with pytest.raises(ValueError, match="weights"):
        TrainConfig(out_dir=str(tmp_path), w_qa=0, w_recon=0)
    with pytest.raises(ValueError, match="no full-weight stage"):
        TrainConfig(out_dir=str(tmp_path), stage="full")
    with pytest.raises(ValueError, match="cont_items"):
        TrainConfig(out_dir=str(tmp_path), w_cont=1.0, cont_items=0)
    empty = tmp_path / "corpus"
    empty.mkdir()
    (empty / "train.jsonl").write_text("")
    with pytest.raises(ValueError):
        train_texts(str(empty))


def test_base_without_chat_template_trains(tmp_path, tiny_base_dir):
    import shutil

    from transformers import AutoTokenizer

    plain = tmp_path / "plain"
    shutil.copytree(tiny_base_dir, plain)
    tok = AutoTokenizer.from_pretrained(plain)
    tok.chat_template = None
    tok.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg = _cfg(tmp_path, str(plain), steps=2)
    tr = Trainer(cfg, items=_items(), eval_items=[])
    assert not tr.model.tokenizer.chat_template
    hist = tr.train(progress=False)
    assert len([h for h in hist if "qa" in h]) == 2


def test_continuation_distillation_trains_the_writer_and_leaves_the_reader(tmp_path, tiny_base_dir):
    from transformers import AutoModelForCausalLM

    texts = [P1 + " " + P2, P2 + " " + P1]
    cfg = _cfg(tmp_path, tiny_base_dir, steps=6, w_qa=0.0, w_recon=0.0, w_cont=1.0, cont_items=2, cont_tokens=16)
    tr = Trainer(cfg, items=_items(), eval_items=[])
    tr.cont_texts = texts
    g0 = tr.model.writer.gist_embeddings.detach().clone()
    hist = tr.train(progress=False)
    conts = [h["cont"] for h in hist if "cont" in h]
    assert len(conts) == 6 and all(c >= 0 for c in conts)
    assert not torch.equal(g0, tr.model.writer.gist_embeddings.detach())  # the writer learned
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    for (n, p), (_, q) in zip(sorted(base.named_parameters()), sorted(tr.model.model.named_parameters())):
        assert torch.equal(p, q), n  # the reader did not


def test_reconstruction_of_real_passages_draws_no_qa_items_and_repeats_the_passage_start(tmp_path, tiny_base_dir,
                                                                                        monkeypatch):
    texts = [P1 + " " + P2, P2 + " " + P1]
    cfg = _cfg(tmp_path, tiny_base_dir, steps=3, w_qa=0.0, w_recon=1.0, recon_on="cont", cont_items=2,
               recon_tokens=12)
    assert cfg.uses_cont and not cfg.uses_qa
    tr = Trainer(cfg, items=_items(), eval_items=[])
    tr.cont_texts = texts
    seen = []
    orig = tr._answer_logits

    def spy(prompt, states, target, teacher=False):
        seen.append(list(target))
        return orig(prompt, states, target, teacher)

    monkeypatch.setattr(tr, "_answer_logits", spy)
    hist = tr.train(progress=False)
    assert [sorted(h) for h in hist if "recon" in h] and all("qa" not in h and "cont" not in h for h in hist)
    contexts = {tuple(tr.model.encode(ctx)[:12]) for ctx, _ in tr._cont_batch(0) + tr._cont_batch(1)}
    assert len(seen) == 3 * 2 and {tuple(s) for s in seen} <= contexts and all(len(s) == 12 for s in seen)
    with pytest.raises(ValueError, match="recon_on"):
        _cfg(tmp_path, tiny_base_dir, recon_on="everything")
    with pytest.raises(ValueError, match="cont_items"):
        _cfg(tmp_path, tiny_base_dir, w_recon=1.0, recon_on="both", cont_items=0)


def test_anchor_dropout_compresses_some_steps_without_anchors(tmp_path, tiny_base_dir, monkeypatch):
    cfg = _cfg(tmp_path, tiny_base_dir, steps=8, anchor_dropout=0.5, gist={"target_ratio": 4.0, "anchors": "capitalized"})
    tr = Trainer(cfg, items=_items(), eval_items=[])
    seen = []
    orig = tr.losses

    def spy(items, cont=()):
        seen.append(tr.model.config.anchors)
        return orig(items, cont)

    monkeypatch.setattr(tr, "losses", spy)
    tr.train(progress=False)
    assert set(seen) == {"none", "capitalized"}
    saved = json.loads((tmp_path / "run" / "checkpoint" / "gist_config.json").read_text())
    assert saved["anchors"] == "capitalized"  # what is saved is the model's policy, never a dropped step's
    with pytest.raises(ValueError, match="anchor_dropout"):
        TrainConfig(out_dir=str(tmp_path), anchor_dropout=1.5)


def test_an_adapted_reader_run_keeps_the_teacher_on_the_base_and_saves_its_reader(tmp_path, tiny_base_dir, monkeypatch):
    cfg = _cfg(tmp_path, tiny_base_dir, steps=2, w_qa=0.0, w_recon=0.0, w_distill=1.0, reader="adapted")
    tr = Trainer(cfg, items=_items(), eval_items=[])
    calls = []
    orig = tr.model.forward_ids

    def spy(ids, layers, start, adapted=None):
        calls.append(adapted)
        return orig(ids, layers, start, adapted=adapted)

    monkeypatch.setattr(tr.model, "forward_ids", spy)
    tr.train(progress=False)
    assert calls.count(False) == calls.count(None) > 0  # one base teacher per adapted student
    assert json.loads((tmp_path / "run" / "checkpoint" / "gist_adapter.json").read_text())["reader"] == "adapted"
    assert GistModel.from_pretrained(tmp_path / "run" / "checkpoint").reader_adapted
    with pytest.raises(ValueError, match="stage 'lora'"):
        TrainConfig(out_dir=str(tmp_path), stage="gist", reader="adapted")


def test_mixed_qa_reads_the_answer_passage_raw_after_the_other_passages_states(tmp_path, tiny_base_dir, monkeypatch):
    P3 = "Ivo Brandt built the Kessel mill in 1790. The mill ground oats. It stood by a slow river."
    multi = QAItem(id="m", kind="planted_distractors", passages=[P1, P2, P3], question="Who built the Kessel mill?",
                   answer="Ivo Brandt", choices=["Ivo Brandt", "Maren Voss", "Anna Holt", "Tom Reed"],
                   answer_index=0, answer_passage=2)  # fmt: skip
    cfg = _cfg(tmp_path, tiny_base_dir, steps=3, batch_items=1, w_qa=0.0, w_recon=0.0, w_mixed=1.0)
    assert cfg.uses_qa and "w_mixed" in cfg.recipe()
    tr = Trainer(cfg, items=[_items()[0], multi], eval_items=[])
    seen = []
    orig = tr._answer_logits

    def spy(prompt, states, target, teacher=False):
        seen.append((prompt, len(states)))
        return orig(prompt, states, target, teacher)

    monkeypatch.setattr(tr, "_answer_logits", spy)
    g0 = tr.model.writer.gist_embeddings.detach().clone()
    hist = tr.train(progress=False)
    # only the three-passage item has a mixed term: its answer passage raw in the prompt, the two others as states
    assert seen and all(p.startswith(P3) and n == 2 for p, n in seen)
    assert [h for h in hist if "mixed" in h] and all(h["mixed"] > 0 for h in hist if "mixed" in h)
    assert not torch.equal(g0, tr.model.writer.gist_embeddings.detach())  # the states' writer got the gradient
    # a recipe without it is the recipe of runs saved before it existed (they resume unchanged)
    assert "w_mixed" not in _cfg(tmp_path, tiny_base_dir).recipe()
    with pytest.raises(ValueError, match="weights"):
        _cfg(tmp_path, tiny_base_dir, w_mixed=-1.0)


def test_answer_last_reads_the_answer_passage_last_in_qa(tmp_path, tiny_base_dir, monkeypatch):
    """`answer_last`: several-passage QA items are read with the answer's passage's state last (the order a
    relevance-ordered read gives), the teacher's rows likewise; the recipe records it only when on."""
    P3 = "Ivo Brandt built the Kessel mill in 1790. The mill ground oats. It stood by a slow river."
    multi = QAItem(id="m", kind="planted_distractors", passages=[P3, P1, P2], question="Who built the Kessel mill?",
                   answer="Ivo Brandt", choices=["Ivo Brandt", "Maren Voss", "Anna Holt", "Tom Reed"],
                   answer_index=0, answer_passage=0)  # fmt: skip
    cfg = _cfg(tmp_path, tiny_base_dir, steps=2, batch_items=1, w_qa=1.0, w_recon=0.0, w_distill=1.0,
               answer_last=True)
    assert cfg.recipe()["answer_last"] is True and "answer_last" not in _cfg(tmp_path, tiny_base_dir).recipe()
    tr = Trainer(cfg, items=[multi], eval_items=[])
    seen = []
    orig = tr._answer_logits

    def spy(prompt, states, target, teacher=False):
        seen.append((teacher, [s.num_tokens for s in states]))
        return orig(prompt, states, target, teacher)

    monkeypatch.setattr(tr, "_answer_logits", spy)
    tr.train(progress=False)
    n = [len(tr.model.plan(p).ids) for p in (P1, P2, P3)]
    assert seen and {t for t, _ in seen} == {False, True}
    assert all(toks == n for _, toks in seen)  # P1, P2, then the answer's passage P3
