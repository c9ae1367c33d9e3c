"""The `gist-memory` command on the tiny model: every command's help, the ingest -> ask -> info flow, chat with
compressed history, eval, train (+ resume), bench/data delegation, serve wiring, and one-line errors."""

from __future__ import annotations

import json
import shlex
import sys
import types

import pytest
from typer.testing import CliRunner

from gist_memory import GistModel, cli

COMMANDS = ["ingest", "ask", "chat", "serve", "train", "eval", "info", "data", "data build"]

DOC_A = (
    "Maren Voss became the chief curator of the Bergen archive in 1912. The archive code QX-4471 marks the "
    "oldest maps. Nobody opened them until the flood of 1954 forced a move to a dry cellar."
)
DOC_B = (
    "# Prythwaite\n\nThe Prythwaite weather station sits at an altitude of 4,301 metres. It was built in 1931 "
    "and records wind speeds every ten minutes.\n"
)


@pytest.fixture(scope="module", autouse=True)
def _threads_for_a_busy_machine():
    """torch threads `auto` (fewer on a busy CPU, where waiting OpenMP threads stall), restored afterwards."""
    import torch

    from gist_memory.cli import set_threads

    before = torch.get_num_threads()
    set_threads("auto")
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def run(runner: CliRunner, *args: str, input: str | None = None):  # noqa: A002
    return runner.invoke(cli.app, [str(a) for a in args], input=input)


def assert_one_line_error(res, *needles: str) -> None:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) >= 1 and lines[-1].startswith("error: "), res.stderr
    err_lines = [ln for ln in lines if ln.startswith("error: ")]
    assert len(err_lines) == 1
    for n in needles:
        assert n in err_lines[0], err_lines[0]


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    (d / "a.txt").write_text(DOC_A, encoding="utf-8")
    (d / "b.md").write_text(DOC_B, encoding="utf-8")
    (d / "blob.txt").write_bytes(b"\x00\x01binary\x00" * 10)
    (d / "image.png").write_bytes(b"\x89PNG....")
    return d


@pytest.fixture(scope="module")
def store(runner, docs, tiny_base_dir, tmp_path_factory):
    """A memory with the two documents, built through `gist-memory ingest`."""
    path = tmp_path_factory.mktemp("stores") / "mem"
    res = run(runner, "ingest", docs, "--store", path, "--base", tiny_base_dir, "--max-passage-tokens", "32", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["files_read"] == 2 and summary["passages_added"] >= 2 and summary["passages_present"] == 0
    skipped = {p.split("/")[-1]: why for p, why in summary["files_skipped"]}
    assert "binary" in skipped["blob.txt"] and "unsupported" in skipped["image.png"]
    assert summary["compression_ratio"] > 1.5
    return path


def test_help_everywhere(runner):
    res = run(runner, "--help")
    assert res.exit_code == 0 and "ingest" in res.stdout and "serve" in res.stdout
    for cmd in COMMANDS:
        res = run(runner, *cmd.split(), "--help")
        assert res.exit_code == 0, (cmd, res.output)
        assert "Usage" in res.stdout
    for cmd in ("ingest", "ask", "chat", "serve", "eval"):
        text = run(runner, cmd, "--help").stdout
        assert "--device" in text and "--dtype" in text and "--model" in text and "--base" in text, cmd


def test_ingest_is_resumable_and_reports(runner, store, docs, tiny_base_dir):
    res = run(runner, "ingest", docs / "a.txt", docs / "b.md", "--store", store, "--base", tiny_base_dir,
              "--max-passage-tokens", "32", "--json")
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout)
    assert again["passages_added"] == 0 and again["passages_present"] >= 2
    res = run(runner, "ingest", docs / "a.txt", "--store", store, "--base", tiny_base_dir, "--max-passage-tokens", "32")
    assert res.exit_code == 0 and "already present" in res.stdout and "store:" in res.stdout
    assert "training-free" not in res.stderr and "pool+anchors" in res.stderr  # says which model it used


def test_ask_prints_answer_sources_and_costs(runner, store, tiny_base_dir):
    res = run(runner, "ask", "Who became the chief curator in 1912?", "--store", store, "--base", tiny_base_dir,
              "-k", "2", "--max-new-tokens", "4", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert isinstance(d["answer"], str) and 1 <= len(d["sources"]) <= 2
    assert d["ratio"] > 1 and d["gist"]["positions"] > 0 and d["gist"]["kv_bytes"] > 0 and d["full"] is None
    res = run(runner, "ask", "Where does the weather station sit?", "--store", store, "--base", tiny_base_dir,
              "-k", "2", "--max-new-tokens", "4", "--compare")
    assert res.exit_code == 0, res.output
    for needle in ("sources", "positions read", "time to first token", "KV memory", "compression ratio"):
        assert needle in res.stdout
    res = run(runner, "ask", "Where?", "--store", store, "--base", tiny_base_dir, "-k", "3", "--max-new-tokens", "3",
              "--compare", "--json")
    d = json.loads(res.stdout)
    assert d["full"]["positions"] > d["gist"]["positions"]  # the states stand for more tokens than they keep
    assert d["full"]["kv_bytes"] > d["gist"]["kv_bytes"]
    res = run(runner, "ask", "Where does the weather station sit?", "--store", store, "--base", tiny_base_dir,
              "-k", "2", "--max-new-tokens", "3", "--context-order", "relevance", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert len(d["sources"]) == 2 and d["rank_s"] > 0  # the ranking passes are timed and reported
    assert_one_line_error(run(runner, "ask", "q", "--store", store, "--context-order", "shuffled"), "--context-order")


def test_info(runner, store):
    res = run(runner, "info", "--store", store, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["packages"]["torch"] and d["store"]["passages"] >= 2 and d["store"]["states_bytes"] > 0
    assert d["model"]["kind"] in ("shipped", "training-free")
    assert "folders" in d["cache"]
    res = run(runner, "info", "--store", store)
    assert res.exit_code == 0 and "passages" in res.stdout and "cache:" in res.stdout and "model:" in res.stdout


def test_one_line_errors(runner, store, tmp_path, tiny_base_dir):
    assert_one_line_error(run(runner, "ask", "q", "--store", tmp_path / "nope"), "no gist memory at")
    assert_one_line_error(run(runner, "info", "--store", tmp_path / "nope"), "no gist memory at")
    assert_one_line_error(run(runner, "ingest", tmp_path / "missing.txt", "--store", tmp_path / "s"), "no such file")
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line_error(run(runner, "ask", "q", "--store", f), "is a file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    assert_one_line_error(run(runner, "ingest", f, "--store", tmp_path / "full"), "not a gist memory")
    assert_one_line_error(run(runner, "ask", "q", "--store", store, "--model", tmp_path / "nomodel"), "no gist model")
    assert_one_line_error(run(runner, "ask", "q", "--store", store, "--model", tmp_path, "--base", "x"), "not both")
    assert_one_line_error(run(runner, "ask", "q", "--store", store, "--base", tiny_base_dir, "--dtype", "int3"),
                          "--dtype")
    assert_one_line_error(run(runner, "ask", "q", "--store", store, "--base", tmp_path / "nobase"), "does not exist")
    # a memory written by another model (here: another ratio, so another fingerprint) is refused
    assert_one_line_error(run(runner, "ask", "q", "--store", store, "--base", tiny_base_dir, "--ratio", "2"),
                          "was written by model")
    assert_one_line_error(run(runner, "ask", "   ", "--store", store), "empty")
    assert_one_line_error(run(runner, "ingest", f, "--store", tmp_path / "s2", "--base", tiny_base_dir,
                              "--compressor", "zip"), "compressor")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.bin").write_bytes(b"\x00" * 10)
    assert_one_line_error(run(runner, "ingest", bad / "x.bin", "--store", tmp_path / "s3", "--base", tiny_base_dir),
                          "nothing to ingest", "binary")
    assert_one_line_error(run(runner, "eval", "--qa", tmp_path / "none.jsonl"), "no QA file")


def test_chat_compresses_old_turns(runner, store, tiny_base_dir):
    lines = "Hello there\nWhat is the archive code?\nAnd the curator?\n/stats\n/reset\n/stats\n/exit\n"
    res = run(runner, "chat", "--base", tiny_base_dir, "--store", store, "--keep-raw", "1", "--max-new-tokens", "3",
              "-k", "1", input=lines)
    assert res.exit_code == 0, res.output
    assert res.stdout.count("bot>") == 3
    assert "2 old turns as gist states" in res.stdout  # 3 exchanges, 1 kept raw
    assert "no compressed turns yet, 0 recent turns raw" in res.stdout  # after /reset
    assert "positions" in res.stderr
    # without a store, and ended by EOF
    res = run(runner, "chat", "--base", tiny_base_dir, "--max-new-tokens", "2", input="hi\n")
    assert res.exit_code == 0 and res.stdout.count("bot>") == 1


def test_compressed_history_unit(tiny_base_dir):
    gm, _ = cli.load_model(base=tiny_base_dir)
    h = cli.CompressedHistory(gm, keep_raw=2)
    assert h.prompt("first") == "first"
    for i in range(4):
        h.add(f"question {i}", f"answer {i}")
    assert len(h.states) == 2 and [u for u, _ in h.raw] == ["question 2", "question 3"]
    assert h.states[0].text.startswith("User: question 0")
    p = h.prompt("next")
    assert p.startswith("User: question 2\nAssistant: answer 2\n") and p.endswith("User: next")
    with pytest.raises(ValueError):
        cli.CompressedHistory(gm, keep_raw=-1)


def test_eval_table(runner, tiny_base_dir):
    res = run(runner, "eval", "--base", tiny_base_dir, "-n", "2", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["n"] == 2 and set(d["accuracy"]) == {"gist", "full", "none", "trunc"} and d["ratio"] > 1
    res = run(runner, "eval", "--base", tiny_base_dir, "-n", "1", "--methods", "gist,none")
    assert res.exit_code == 0 and "retention QA" in res.stdout and "compression ratio" in res.stdout
    assert_one_line_error(run(runner, "eval", "--methods", "gist,magic"), "--methods")


@pytest.fixture()
def tiny_corpus(tmp_path):
    base = (
        "The town of {n} lies on the river Alde and has a population of about {p} people. Its market hall was "
        "built in 18{y} by the merchant Tomas Ekdahl, and the harbour was deepened in 19{y} after a long dispute "
        "with the county council about the cost of dredging and the rights of the fishermen who used it."
    )
    d = tmp_path / "corpus"
    d.mkdir()
    recs = [{"text": base.format(n=f"Velm{i}", p=1000 + 37 * i, y=10 + i), "source": "test", "doc_id": f"d{i}"}
            for i in range(12)]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n", encoding="utf-8")
    return d


def test_train_dry_run_resume_and_refusals(runner, tiny_base_dir, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    common = ["--base", tiny_base_dir, "--corpus", tiny_corpus, "--batch-items", "1", "--pool-items", "6",
              "--eval-items", "0", "--kinds", "planted_single", "--ratios", "4", "--recon-tokens", "8",
              "--lora-r", "2", "--lora-alpha", "4", "--dtype", "float32", "--device", "cpu", "--save-every", "1"]
    res = run(runner, "train", out, *common, "--steps", "2", "--target-ratio", "4", "--dry-run")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)
    assert cfg["steps"] == 2 and cfg["ratios"] == [4.0] and cfg["bf16"] is False and cfg["gist"]["target_ratio"] == 4
    assert cfg["base"] == str(tiny_base_dir) and cfg["kinds"] == ["planted_single"]
    res = run(runner, "train", out, *common, "--steps", "2")
    assert res.exit_code == 0, res.output
    assert (out / "checkpoint" / "gist_adapter.json").is_file() and "--model" in res.stdout
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "ratio" in r] == [1, 2]
    # a second run into the same folder must be explicit
    assert_one_line_error(run(runner, "train", out, *common, "--steps", "3"), "--resume")
    assert_one_line_error(run(runner, "train", tmp_path / "fresh", "--resume"), "nothing to resume")
    # resume: saved settings come back, --steps extends the run
    res = run(runner, "train", out, "--resume", "--steps", "3", "--dry-run")
    assert json.loads(res.stdout)["corpus"] == str(tiny_corpus)
    res = run(runner, "train", out, "--resume", "--steps", "3")
    assert res.exit_code == 0, res.output
    assert "resuming" in res.stderr and "step 2/3" in res.stderr
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "ratio" in r] == [1, 2, 3]
    # a changed recipe is refused by the trainer, in one line
    assert_one_line_error(run(runner, "train", out, "--resume", "--steps", "4", "--lora-r", "8"), "different recipe")
    # the checkpoint is a gist model the other commands load
    res = run(runner, "eval", "--model", out / "checkpoint", "-n", "2", "--methods", "gist", "--json")
    assert res.exit_code == 0, res.output
    r4 = json.loads(res.stdout)["ratio"]
    res = run(runner, "eval", "--model", out / "checkpoint", "--ratio", "8", "-n", "2", "--methods", "gist", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["ratio"] > r4 * 1.3  # the adapter serves another ratio
    # a second stage starts from the first one's weights and keeps snapshots for the learning curve
    stage2 = tmp_path / "stage2"
    res = run(runner, "train", stage2, *common, "--steps", "1", "--init-from", out / "checkpoint",
              "--snapshot-every", "1")
    assert res.exit_code == 0, res.output
    assert (stage2 / "snapshots" / "step-00001" / "gist_adapter.safetensors").is_file()
    assert json.loads((stage2 / "train_config.json").read_text())["init_from"] == str(out / "checkpoint")
    # shipping follows init_from back to stage 1; each stage's command rebuilds that stage's settings
    from gist_memory.train.ship import ship, stages

    chain = stages(stage2 / "checkpoint")
    assert [s.step for s in chain] == [3, 1] and chain[0].tokens > 0
    for st in chain:
        argv = shlex.split(st.command())[2:]
        assert argv[0] == st.config["out_dir"]
        res = run(runner, "train", tmp_path / "again", *argv[1:], "--dry-run")
        assert res.exit_code == 0, res.output
        again = json.loads(res.stdout)
        assert {k: v for k, v in again.items() if k != "out_dir"} == {
            k: v for k, v in st.config.items() if k != "out_dir"}
    shipped = ship(stage2 / "checkpoint", tmp_path / "shipped")
    card = (shipped / "MODEL_CARD.md").read_text()
    assert "--init-from" in card and card.count("gist-memory train") == 2
    # a stage started from a shipped adapter (or a copy of one) keeps the chain its stages.json records
    assert [s.step for s in stages(shipped)] == [3, 1]
    stage3 = tmp_path / "stage3-from-shipped"
    (stage3 / "checkpoint").mkdir(parents=True)
    cfg3 = {**json.loads((stage2 / "train_config.json").read_text()), "out_dir": str(stage3),
            "init_from": str(shipped)}
    (stage3 / "train_config.json").write_text(json.dumps(cfg3))
    (stage3 / "log.jsonl").write_text(json.dumps({"step": 1, "tokens": 7, "elapsed_s": 1.0, "lr_scale": 1.0}) + "\n")
    chain3 = stages(stage3 / "checkpoint")
    assert [s.step for s in chain3] == [3, 1, 1] and chain3[1].config["init_from"] == str(out / "checkpoint")
    assert shlex.split(chain3[2].command())[2] == str(stage3)
    (tmp_path / "bad-shipped").mkdir()
    (tmp_path / "bad-shipped" / "stages.json").write_text("{not json")
    with pytest.raises(ValueError, match="stages.json"):
        stages(tmp_path / "bad-shipped")
    assert GistModel.from_pretrained(shipped, device="cpu").compress(["A short text. Another one."])[0].num_kept > 0
    other = ship(stage2 / "checkpoint", tmp_path / "shipped-surprisal", anchors="surprisal")  # serve another policy
    assert GistModel.from_pretrained(other, device="cpu").config.anchors == "surprisal"
    assert "--anchors surprisal" in (other / "MODEL_CARD.md").read_text()
    heads = ship(stage2 / "checkpoint", tmp_path / "shipped-heads", anchors="recall", head_anchors=True)
    assert GistModel.from_pretrained(heads, device="cpu").config.head_anchors
    assert "--anchors recall --head-anchors" in (heads / "MODEL_CARD.md").read_text()
    scaled = ship(stage2 / "checkpoint", tmp_path / "shipped-scaled", anchors="recall", head_anchors=True,
                  head_budget="global", head_budget_cap=4, head_budget_cap_ratio=4)  # the cap stated at 4x
    assert GistModel.from_pretrained(scaled, device="cpu", config_overrides={"target_ratio": 8}).config.head_cap() == 8
    assert "--head-budget-cap 4 --head-budget-cap-ratio 4`" in (scaled / "MODEL_CARD.md").read_text()
    headed = ship(stage2 / "checkpoint", tmp_path / "shipped-head", write_head="template")  # writes after the head
    assert GistModel.from_pretrained(headed, device="cpu").config.write_head == "template"
    assert GistModel.from_pretrained(headed, device="cpu").write_head()
    assert "--write-head template`" in (headed / "MODEL_CARD.md").read_text()
    res = run(runner, "train", tmp_path / "stage3", *common, "--steps", "1", "--init-from", tmp_path / "nowhere")
    assert_one_line_error(res, "nowhere")
    assert_one_line_error(run(runner, "train", tmp_path / "x", "--stage", "half", "--dry-run"), "stage")
    assert_one_line_error(run(runner, "train", tmp_path / "x", "--ratios", "a,b", "--dry-run"), "--ratios")


def test_train_options_cover_train_config(runner, tmp_path):
    """Every TrainConfig field is a `gist-memory train` option of the same name or set apart, and the model card's
    command lines (train/ship.py) come from the same table: the continuation objective round-trips."""
    import typer

    from gist_memory.train.options import TRAIN_OPTION_FIELDS, option_name
    from gist_memory.train.ship import Stage
    from gist_memory.train.trainer import TrainConfig

    cmd = typer.main.get_command(cli.app).commands["train"]
    opts = {o for p in cmd.params for o in p.opts}
    assert {p.name for p in cmd.params} >= set(TRAIN_OPTION_FIELDS)
    assert all(option_name(f) in opts for f in TRAIN_OPTION_FIELDS if f != "curriculum")
    apart = {"out_dir", "gist", "ratios", "kinds", "bf16"}  # argument, GistConfig options, lists, --dtype
    assert set(TrainConfig.__dataclass_fields__) == set(TRAIN_OPTION_FIELDS) | apart
    assert "--w-lm" not in opts
    res = run(runner, "train", tmp_path / "c", "--w-cont", "1", "--cont-items", "2", "--cont-tokens", "16",
              "--stage", "gist", "--dry-run")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)
    assert (cfg["w_cont"], cfg["cont_items"], cfg["cont_tokens"], cfg["stage"]) == (1.0, 2, 16, "gist")
    line = Stage(folder=tmp_path / "c" / "checkpoint", config=cfg, step=None, tokens=None, seconds=None).command()
    assert "--w-cont 1.0 --cont-items 2 --cont-tokens 16" in line and "--stage gist" in line
    res = run(runner, "train", tmp_path / "again", *shlex.split(line)[3:], "--dry-run")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) | {"out_dir": cfg["out_dir"]} == cfg
    assert_one_line_error(run(runner, "train", tmp_path / "x", "--stage", "full", "--dry-run"), "stage")
    assert_one_line_error(run(runner, "train", tmp_path / "x", "--w-cont", "1", "--dry-run"), "cont_items")
    help_text = run(runner, "train", "--help").stdout
    assert "--w-cont" in help_text and "--cont-items" in help_text and "--w-lm" not in help_text


def test_damaged_store_is_one_line(runner, tiny_base_dir, tmp_path):
    """A memory whose docstore is not a database (damaged, or another file under its name): one line, no traceback."""
    store = tmp_path / "mem"
    store.mkdir()
    (store / "memory.sqlite").write_bytes(b"not a database at all" * 100)
    res = run(runner, "ask", "Who became curator?", "--store", store, "--base", tiny_base_dir)
    assert_one_line_error(res, "not a readable gist memory", str(store))


def test_bench_delegates(runner, monkeypatch):
    monkeypatch.setitem(sys.modules, "gist_memory.eval.bench", None)  # as if the module were absent
    assert_one_line_error(run(runner, "bench", "--quick"), "not installed")
    seen = {}
    fake = types.ModuleType("gist_memory.eval.bench")
    fake.__spec__ = __import__("importlib.machinery").machinery.ModuleSpec("gist_memory.eval.bench", None)

    def main(argv):
        seen["argv"] = argv
        return 0

    fake.main = main
    monkeypatch.setitem(sys.modules, "gist_memory.eval.bench", fake)
    res = run(runner, "bench", "--quick", "--ratios", "2,4", "--help")
    assert res.exit_code == 0, res.output
    assert seen["argv"] == ["--quick", "--ratios", "2,4", "--help"]

    def failing(argv):
        raise SystemExit(2)

    fake.main = failing
    assert run(runner, "bench", "--bogus").exit_code == 2


def test_data_build(runner, tmp_path):
    src = tmp_path / "texts"
    src.mkdir()
    words = " ".join(f"word{i}" for i in range(60))
    for i in range(4):
        (src / f"doc{i}.md").write_text(f"# Doc {i}\n\nThis is document number {i}. {words} end{i}.\n\n"
                                        f"A second paragraph of document {i} follows here. {words} fin{i}.\n")
    out = tmp_path / "corpus"
    res = run(runner, "data", "build", out, "--sources", f"dir:{src}", "--heldout-fraction", "0.25")
    assert res.exit_code == 0, res.output
    assert (out / "train.jsonl").is_file() and "wrote" in res.stdout
    res = run(runner, "data", "build", tmp_path / "c2", "--sources", "nosuchsource")
    assert res.exit_code == 1


def test_serve_wires_the_web_app(runner, monkeypatch, tiny_base_dir, tmp_path):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    res = run(runner, "serve", "--base", tiny_base_dir, "--port", "8123", "--max-upload-kb", "64", "-k", "2")
    assert res.exit_code == 0, res.output
    svc = seen["app"].state.gist
    assert seen["port"] == 8123 and seen["host"] == "127.0.0.1"
    assert svc.max_upload_bytes == 64 * 1024 and svc.k == 2 and "pool+anchors" in svc.model_description
    f = tmp_path / "f"
    f.write_text("x")
    assert_one_line_error(run(runner, "serve", "--store", f), "is a file")
    assert_one_line_error(run(runner, "serve", "--app-dir", tmp_path), "source repository")


# ---- ingest: missing paths, progress, concurrent runs, another model -------------------------------------------
def test_ingest_skips_a_missing_path_with_a_warning(runner, docs, tiny_base_dir, tmp_path):
    res = run(runner, "ingest", docs / "a.txt", tmp_path / "gone.txt", "--store", tmp_path / "m", "--base",
              tiny_base_dir, "--max-passage-tokens", "32", "--json")
    assert res.exit_code == 0, res.output
    assert "warning: skipping" in res.stderr and "gone.txt: no such file or folder" in res.stderr
    summary = json.loads(res.stdout)
    assert summary["files_read"] == 1 and summary["passages_added"] >= 1
    assert [why for p, why in summary["files_skipped"] if p.endswith("gone.txt")] == ["no such file or folder"]


def test_ingest_progress_shows_rate_and_eta_when_not_a_terminal(runner, docs, tiny_base_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cli._IngestProgress, "EVERY_S", 0.0)  # a line at every step (default: every 15 s)
    res = run(runner, "ingest", docs / "a.txt", docs / "b.md", "--store", tmp_path / "p", "--base", tiny_base_dir,
              "--max-passage-tokens", "16", "--batch-size", "1")
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("compressing:")]
    assert lines and all("passages/s" in ln and "ETA" in ln for ln in lines), res.stderr
    assert any(ln.startswith("reading:") and "MB/s" in ln for ln in res.stderr.splitlines()), res.stderr


def test_second_concurrent_ingest_waits_says_what_the_other_did_and_skips_it(docs, tiny_base_dir, tmp_path):
    """Another ingest holds the store (here: this test, through the Python API, while a real `gist-memory ingest`
    process waits): the second one says what the first did and compresses nothing it stored."""
    import os
    import subprocess

    from filelock import FileLock

    from gist_memory._options import ModelOptions
    from gist_memory.store import GistMemory
    from gist_memory.store.ingest import ingest

    path = tmp_path / "shared"
    gm, _ = ModelOptions(base=str(tiny_base_dir)).load()
    mem = GistMemory(gm, path)
    lock = FileLock(str(path / cli.LOCK))
    lock.acquire()
    cli._write_owner(path, {"pid": 4242, "state": "running"})
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gist_memory.cli", "ingest", str(docs / "a.txt"), "--store", str(path), "--base",
         str(tiny_base_dir), "--max-passage-tokens", "32", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = ""
        while "waiting for it" not in seen:
            line = proc.stderr.readline()
            assert line, f"the second ingest ended without waiting: {seen}"
            seen += line
        assert "another ingest (pid 4242) is writing to" in seen
        done = ingest([docs / "a.txt"], mem, max_passage_tokens=32, show_progress=False)
        assert done.passages_added >= 1
        cli._write_owner(path, {"pid": 4242, "state": "finished", "passages_added": done.passages_added, "files": 1})
    finally:
        lock.release()
    out, rest = proc.communicate(timeout=300)
    assert proc.returncode == 0, seen + rest
    summary = json.loads(out)
    assert summary["passages_added"] == 0 and summary["passages_present"] == done.passages_added
    assert (f"it added {done.passages_added} passages from 1 file(s); {done.passages_added} of this run's "
            f"passages were stored by it and are skipped") in rest
    mem.close()


def test_store_of_another_model_names_only_the_differing_fields(runner, store, tiny_base_dir):
    res = run(runner, "ingest", store.parent / "nothing.txt", "--store", store, "--base", tiny_base_dir)
    assert res.exit_code == 1  # the path is missing: refused before any model loads
    (store.parent / "more.txt").write_text("The ferry leaves the harbour at nine. It returns at noon.")
    res = run(runner, "ingest", store.parent / "more.txt", "--store", store, "--base", tiny_base_dir,
              "--ratio", "2")
    assert_one_line_error(res, "was written by model", "target_ratio: 4.0 (store) vs 2.0 (now)")
    line = res.stderr.strip().splitlines()[-1]
    assert "dtype" not in line and "compressor" not in line and "base:" not in line, line


def test_ingest_puts_states_where_asked_in_the_dtype_asked_and_ask_finds_them(runner, docs, tiny_base_dir, tmp_path):
    shared = tmp_path / "shared-states"
    res = run(runner, "ingest", docs / "a.txt", "--store", tmp_path / "m", "--base", tiny_base_dir,
              "--max-passage-tokens", "32", "--states", shared, "--storage-dtype", "int4", "--json")
    assert res.exit_code == 0, res.output
    files = [p for p in shared.rglob("*") if p.is_file()]
    assert files and not (tmp_path / "m" / "states").exists()
    import sqlite3

    from gist_memory.store.memory import DB_NAME

    db = sqlite3.connect(tmp_path / "m" / DB_NAME)
    try:
        rec = dict(db.execute("SELECT key, value FROM meta").fetchall())
    finally:
        db.close()
    assert rec["storage_dtype"] == "int4" and str(shared) in rec["states"], rec
    res = run(runner, "ask", "Who became the chief curator in 1912?", "--store", tmp_path / "m", "--base",
              tiny_base_dir, "-k", "1", "--max-new-tokens", "2", "--json")
    assert res.exit_code == 0, res.output
    res = run(runner, "ingest", docs / "a.txt", "--store", tmp_path / "m2", "--base", tiny_base_dir,
              "--storage-dtype", "int3")
    assert res.exit_code != 0 and "--storage-dtype must be one of" in res.output
    res = run(runner, "ingest", docs / "a.txt", "--store", tmp_path / "m3", "--ray", "local", "--states", shared)
    assert res.exit_code != 0 and "not taken with --ray" in res.output
