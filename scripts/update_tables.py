"""Write the held-out tables into README.md (and optionally a model card) from the committed results file.

    python scripts/update_tables.py                 # README.md from docs/results/heldout.jsonl
    python scripts/update_tables.py --check         # exit 1 if README.md differs from what the results render

The README block between `<!-- heldout-table:start -->` and `<!-- heldout-table:end -->` is exactly
`gist_memory.eval.heldout.render_markdown(read_results(docs/results/heldout.jsonl))`: nobody copies numbers by
hand, and tests/test_readme_tables.py fails when the two drift apart. The results file is what
`python -m gist_memory.eval.heldout ... --out docs/results/heldout.jsonl` writes (commands in docs/evaluation.md).
A file may also hold optional blocks, filled in wherever their markers are: `reader-table` (frozen vs adapted
reader, docs/results/reader.jsonl), `peers-table` (docs/bench/peers.json), `ingest-table`
(docs/results/ingest.json), `ttft-table` (docs/results/ttft_breakdown.json), `bench-table` (docs/bench/results.json). docs/benchmarks.md is refreshed too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "heldout.jsonl"
READER = ROOT / "docs" / "results" / "reader.jsonl"
START, END = "<!-- heldout-table:start -->", "<!-- heldout-table:end -->"
NOTE = ("Machine: 2 vCPU AMD EPYC (AVX2), fp32, torch 1 thread, SmolLM2-135M-Instruct; 20 items per kind (one item "
        "is 0.05; differences under ~0.2 are noise). The shipped default is the `(recall per head, global budget cap "
        "4 at 4x anchors, stage 10 step 200, template head, relevance order)` rows where several passages are read "
        "(the library reads passages by relevance by default) and the `(..., stage 10 step 200, template head)` rows "
        "elsewhere: the writer trained beside the anchors it is served with, penalised for out-weighing raw text "
        "about other subjects, and trained to read the answer's passage last (recall "
        "anchors chosen per layer and head and spread unevenly over heads: one ranking over all heads, no head above "
        "4x the even count at 4x, a cap that scales with the ratio (8x at 8x); chosen on other items: "
        "docs/evaluation.md), reading each passage after the reader's prompt head (`template head`: "
        "`GistConfig.write_head`; rows without it: the same states written from the passage's first token, the "
        "default before); `apart`: every raw row of each passage, written alone (1x, nothing compressed); "
        "rows `(..., relevance order)`: each item's passages arranged by the reader's own ranking before the question "
        "(`GistModel.focus`: the question's likelihood after each passage alone; the most relevant last; full text "
        "ranked by the same scorer reading each text; one-passage kinds are unchanged by it, so only the distractor "
        "kinds ran); "
        "`reads`: raw tokens per position the states "
        "take in the reader's cache. Rows tagged `stage 10 step 200`: the stage-7 writer trained on with "
        "`--answer-last` (several-passage items read with the answer's passage last, as the relevance read does; "
        "chosen on dev items: model card, stage 10); `stage 10 step 100`: the same run 100 steps earlier, shipped "
        "before it; `stage 7 step 200`: the writer shipped before that. Rows `(recall per head, depth budget cap 4 "
        "at 4x anchors, stage 10 step 200, ...)`: the shipped writer served with `head_budget=\"depth\"` (each "
        "layer's rows from the same global ranking, split evenly over its heads: no head padded, so the states "
        "read at their row ratio; added after the writer shipped, not trained with it). "
        "Rows `(recall per head, global budget cap 4 anchors, stage 7 step 200)`: the same "
        "writer with the cap fixed at 4x the even count at every ratio (the default before; identical at 4x). Rows "
        "tagged `stage 6 step 325`: the default before that (the same writer "
        "before `--w-mixed`); `stage 5 step 400`: the one before that (the stage-5 writer, served with the same anchors); `stage 5`: the stage-5 writer at step 150 (`recall per head`: the same rows in every "
        "head). Untagged `gist`/`gist+anchors` rows: the stage-2 writer shipped before that, "
        "with the anchor policies it was served with over time (capitalized: trained with; then surprisal, recall "
        "shared by all heads, recall per head). `kvpress:kvzip`: NVIDIA kvpress's KVzip at the same rows per "
        "passage, spread unevenly over heads (kvpress masks the rest, so it reads every position); "
        "`kvpress:kvzip_uniform`: its scores with the same rows in every head (`python -m "
        "gist_memory.eval.heldout.kvpress`, in kvpress's own environment; it does not generate).")


READER_NOTE = ("Equal training: both writers start from the same stage-1 checkpoint and run the same stage 2 (100 steps, "
               "78,328 passage tokens, anchor dropout 0.5, seed 0); in the adapted one the writer's LoRA also acts on "
               "every token read after the states (the teacher stays the base model). Same machine and items as the "
               "held-out table; `frozen reader` is the shipped stage-2 writer with its training anchors (capitalized).")


def rendered(results: Path = RESULTS) -> str:
    """The markdown block the README must hold."""
    from gist_memory.eval.heldout.run import read_results, render_markdown

    return render_markdown(read_results(results), note=NOTE)


def rendered_reader(results: Path = READER) -> str:
    """The frozen-vs-adapted reader block."""
    from gist_memory.eval.heldout.run import read_results, render_markdown

    return render_markdown(read_results(results), title="Frozen reader vs adapted reader, at equal training",
                           note=READER_NOTE)  # fmt: skip


def replace_block(text: str, block: str, where: str, name: str = "heldout-table") -> str:
    """`text` with the marked block `name` replaced by `block` (ValueError naming `where` if its markers are
    missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{where} has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}{end}{tail}"


PEERS = ROOT / "docs" / "bench" / "peers.json"
INGEST = ROOT / "docs" / "results" / "ingest.json"
TTFT = ROOT / "docs" / "results" / "ttft_breakdown.json"
CHAT = ROOT / "docs" / "results" / "chat_bench.json"


def _json(path: Path):  # noqa: ANN202
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def rendered_peers(results: Path = PEERS) -> str:
    """The peers table (`python -m gist_memory.eval.peers` writes docs/bench/peers.json)."""
    from gist_memory.eval.peers import render

    return render(_json(results))


def rendered_ingest(results: Path = INGEST) -> str:
    """The ingest-cost table (`python -m gist_memory.eval.bench_ingest --json docs/results/ingest.json`)."""
    from gist_memory.eval.bench_ingest import render

    res = _json(results)
    return render(res) + f"\nCommand: `{res['command']}`\n"


def rendered_ttft(results: Path = TTFT) -> str:
    """Where TTFT goes (`python -m gist_memory.eval.engine_speed --breakdown ... --json docs/results/...`)."""
    from gist_memory.eval.engine_speed import render_breakdown

    res = _json(results)
    return f"{res['machine']}\n\n" + render_breakdown(res["rows"]) + f"\nCommand: `{res['command']}`\n"


BENCH = ROOT / "docs" / "bench" / "results.json"


def rendered_bench(results: Path = BENCH) -> str:
    """The README's summary of the full `gist-memory bench` run (docs/bench/results.json)."""
    from gist_memory.eval.bench import render_summary

    return render_summary(_json(results))


#: optional blocks: filled in wherever their markers are
BLOCKS = {"reader-table": rendered_reader, "peers-table": rendered_peers, "ingest-table": rendered_ingest,
          "ttft-table": rendered_ttft, "bench-table": rendered_bench}


def refresh(text: str, where: str, required: bool = True) -> str:
    """`text` with every known block it holds rendered anew (the held-out table is required when `required`)."""
    if required or "<!-- heldout-table:start -->" in text:
        text = replace_block(text, rendered(), where)
    for name, fn in BLOCKS.items():
        if f"<!-- {name}:start -->" in text:
            text = replace_block(text, fn(), where, name)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--card", type=Path, help="also write the block into this model card")
    a = ap.parse_args(argv)
    targets = [ROOT / "README.md", ROOT / "docs" / "benchmarks.md"] + ([a.card] if a.card else [])
    stale = []
    for path in targets:
        text = path.read_text(encoding="utf-8")
        new = refresh(text, str(path), required=path.name == "README.md")
        if new != text:
            stale.append(path)
            if not a.check:
                path.write_text(new, encoding="utf-8")
    if a.check and stale:
        print(f"stale tables in: {', '.join(map(str, stale))}; run python scripts/update_tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
