"""Peers side by side on the same model, passages, prompts and budgets: full text, truncation, LLMLingua,
LLMLingua-2, KV pooling (+ anchors), gist states and NVIDIA's kvpress presses, at one compression ratio.

    python -m gist_memory.eval.peers --items 60 --threads 1          # writes docs/bench/peers.{md,json}

Per method: multiple-choice accuracy on the retention items (per kind), the achieved ratio in the reader's tokens,
positions the reader attends to per passage, time to first token for k passages against full text, and the
compression cost per passage. Every budgeted method keeps, passage by passage, as many positions as the gist
state keeps (kvpress: as many rows per KV head, on average for KVzip, whose budget is shared across heads).

kvpress pins transformers < 5.3, so it runs in its own environment as a subprocess
(`gist_memory/eval/kvpress_runner.py`; `make kvpress-env` builds `.venv-kvpress`); without one its rows are
skipped with the reason. LLMLingua-2 needs its token-classification model (e.g.
microsoft/llmlingua-2-bert-base-multilingual-cased-meetingbank), given by `--llmlingua2-model DIR`; skipped
with the reason otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

PRESSES = ("knorm", "expected_attention", "kvzip")
RUNNER = Path(__file__).with_name("kvpress_runner.py")
REPO_ENV = Path(__file__).resolve().parents[2] / ".venv-kvpress" / "bin" / "python"


def find_kvpress_python(explicit: Optional[str] = None) -> tuple[Optional[str], str]:
    """(a Python that imports kvpress, or None; a one-line message with its versions or why not).

    Looked for in order: `explicit`, `$GIST_KVPRESS_PYTHON`, the checkout's `.venv-kvpress`."""
    cands = [c for c in (explicit, os.environ.get("GIST_KVPRESS_PYTHON"), str(REPO_ENV)) if c]
    why = []
    for c in cands:
        if not Path(c).is_file():
            why.append(f"{c}: no such file")
            continue
        try:
            p = subprocess.run(
                [c, "-c", "import kvpress, transformers; from importlib.metadata import version; "
                          "print(version('kvpress'), transformers.__version__)"],
                capture_output=True, text=True, timeout=300,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            why.append(f"{c}: {e}")
            continue
        if p.returncode == 0:
            kv, tf = p.stdout.split()[-2:]
            return c, f"kvpress {kv} (transformers {tf}, own environment {c})"
        why.append(f"{c}: cannot import kvpress ({p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode})")
    hint = "make kvpress-env (builds .venv-kvpress: kvpress pins transformers<5.3) or --kvpress-python PATH"
    return None, "kvpress rows skipped: no Python with kvpress found (" + "; ".join(why or ["none given"]) + f"); {hint}"


class PassageTable:
    """The runner job's passages: each distinct text once, by id, with its token ids and its state's row budget."""

    def __init__(self, reader, budget_gm) -> None:  # noqa: ANN001 - GistModels
        self.reader, self.budget_gm = reader, budget_gm
        self.ids: dict[str, str] = {}
        self.passages: dict[str, list[int]] = {}
        self.budgets: dict[str, int] = {}

    def id(self, text: str) -> str:
        """The id of `text` (added on first sight)."""
        if text not in self.ids:
            pid = self.ids[text] = f"p{len(self.ids)}"
            self.passages[pid] = self.reader.encode(text)
            self.budgets[pid] = int(self.budget_gm.plan(text).num_kept)
        return self.ids[text]

    def job(self, model_dir: str, threads: Optional[int], presses: Sequence[str], items: list[dict[str, Any]],
            speed: Sequence[dict[str, Any]] = (), repeats: int = 1) -> dict[str, Any]:  # fmt: skip
        """The runner's job over these passages."""
        return {"model": model_dir, "dtype": "float32", "threads": threads, "presses": list(presses),
                "passages": self.passages, "budgets": self.budgets, "items": items, "speed": list(speed),
                "repeats": repeats}


def kvpress_job(reader, budget_gm, items, speed_passages: Sequence[str], question: str, presses: Sequence[str],  # noqa: ANN001
                model_dir: str, threads: Optional[int], repeats: int) -> dict[str, Any]:
    """The runner's job: token ids of every prompt piece (our tokenizer and chat template), per-passage budgets."""
    from gist_memory.data.qa import choice_continuations, question_prompt

    table = PassageTable(reader, budget_gm)
    job_items = []
    for it in items:
        pre, suf = reader.template_ids(question_prompt(it))
        job_items.append({"id": it.id, "prefix": pre, "suffix": suf, "passages": [table.id(p) for p in it.passages],
                          "choices": [reader.encode(c) for c in choice_continuations(it)]})
    speed = []
    if speed_passages:
        pre, suf = reader.template_ids(question)
        speed.append({"prefix": pre, "suffix": suf, "passages": [table.id(p) for p in speed_passages]})
    return table.job(model_dir, threads, presses, job_items, speed, repeats)


def run_kvpress(python: str, job: dict[str, Any], timeout: float = 6 * 3600) -> dict[str, Any]:
    """Run the job in the kvpress environment; a failure raises with the runner's last lines."""
    with tempfile.TemporaryDirectory(prefix="gist-kvpress-") as d:
        jp, op = Path(d) / "job.json", Path(d) / "out.json"
        jp.write_text(json.dumps(job), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": ""}  # never our packages in their environment
        p = subprocess.run([python, str(RUNNER), str(jp), str(op)], capture_output=True, text=True, timeout=timeout,
                           env=env)
        if p.returncode != 0:
            tail = "\n".join(p.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"kvpress runner failed (exit {p.returncode}):\n{tail}")
        return json.loads(op.read_text(encoding="utf-8"))


def kvpress_rows(res: dict[str, Any], items) -> list[dict[str, Any]]:  # noqa: ANN001
    """Accuracy, ratio, positions per passage, TTFT and compression cost per passage for each press."""
    from gist_memory.data.qa import pick_choice

    rows = []
    for name, r in res["presses"].items():
        hits = [int(pick_choice(x["scores"]) == it.answer_index) for x, it in zip(r["items"], items, strict=True)]
        kinds: dict[str, list[int]] = {}
        for h, it in zip(hits, items, strict=True):
            kinds.setdefault(it.kind, []).append(h)
        raw = sum(x["raw"] for x in r["items"])
        kept = sum(x["kept"] for x in r["items"])
        npass = sum(len(it.passages) for it in items)
        sp = r["speed"][0] if r["speed"] else {}
        rows.append({
            "method": f"kvpress:{name}", "label": f"kvpress {name}", "accuracy": statistics.mean(hits) if hits else None,
            "by_kind": {k: statistics.mean(v) for k, v in kinds.items()}, "n": len(hits),
            "ratio": raw / kept if kept else None, "positions_per_passage": kept / max(1, npass),
            "ttft_s": sp.get("ttft_s"), "full_ttft_s": sp.get("full_ttft_s"),
            "compress_s_per_passage": statistics.median(r["compress_s"].values()) if r["compress_s"] else None,
            "env": "kvpress environment",
        })
    return rows


# ------------------------------------------------------------------------------------------------------------
# the whole comparison


def run_peers(args: argparse.Namespace, log=print) -> dict[str, Any]:  # noqa: ANN001, C901
    from gist_memory.data.qa import load_qa
    from gist_memory.eval import bench as B

    r = float(args.ratio)
    cfg = B.BenchConfig(model=args.model, ratios=(r,), speed_ratio=r, qa_items=args.items, em_items=0, ppl_items=0,
                        ks=(args.k,), passage_tokens=args.passage_tokens, lengths=(), repeats=args.repeats,
                        threads=args.threads, llmlingua=not args.no_llmlingua, plots=False, base=args.base)
    bench = B.Bench(cfg, log=log)
    try:
        rk = B._r(r)
        keep = {"full", "none", f"trunc@{rk}", f"llmlingua@{rk}", f"pool@{rk}", f"pool+anchors@{rk}",
                f"gist-trained@{rk}"}
        if bench.trained is None:
            keep.add(f"gist-untrained@{rk}")
        bench.methods = [m for m in bench.methods if m.key in keep]
        for m in bench.methods:
            m.speed = True
        items = B.select_items(load_qa(args.qa_file), args.items)
        notes: list[str] = [bench.lingua_message]
        t0 = time.perf_counter()
        qa = B.eval_qa(bench, items, set())
        log(f"[peers] qa done in {time.perf_counter() - t0:.0f} s")
        texts, _ = B.heldout_texts()
        speed_passages = B.token_windows(bench, texts, args.passage_tokens, args.k)
        pts = {p["method"]: p for p in B.speed_points(bench, bench.methods, speed_passages)}
        full_ttft = pts["full"]["ttft_s"]
        npass = sum(len(it.passages) for it in items)
        rows = []
        for m in bench.methods:
            q, p = qa[m.key], pts[m.key]
            if m.kind == "state":
                secs = []
                for _ in range(args.repeats):
                    t1 = time.perf_counter()
                    m.gm.compress(list(speed_passages))
                    secs.append((time.perf_counter() - t1) / len(speed_passages))
                cost = statistics.median(secs)
            elif m.family == "llmlingua":
                cost = p.get("compress_s", 0.0) / len(speed_passages)
            else:
                cost = 0.0
            kept_per_passage = None
            if q["ratio"]:
                raw = sum(bench.ntok(x) for it in items for x in it.passages)
                kept_per_passage = raw / q["ratio"] / max(1, npass)
            rows.append({"method": m.key, "label": m.label, "accuracy": q["accuracy"], "by_kind": q["by_kind"],
                         "n": q["n"], "ratio": q["ratio"], "positions_per_passage": kept_per_passage,
                         "ttft_s": p["ttft_s"], "full_ttft_s": full_ttft, "compress_s_per_passage": cost,
                         "env": "ours"})
        # LLMLingua-2
        if args.llmlingua2_model:
            rows.append(_llmlingua2_row(bench, items, speed_passages, args, full_ttft, log))
        else:
            notes.append("LLMLingua-2 rows skipped: it needs its token-classification model (e.g. microsoft/"
                         "llmlingua-2-bert-base-multilingual-cased-meetingbank), which no package offline ships; "
                         "pass --llmlingua2-model DIR")
        # kvpress
        presses = [p for p in args.presses.split(",") if p]
        python, msg = find_kvpress_python(args.kvpress_python)
        notes.append(msg)
        if python and presses:
            base_tok = bench.reader
            budget_gm = bench.trained[r] if bench.trained is not None else bench.untrained[r]
            job = kvpress_job(base_tok, budget_gm, items, speed_passages, B.SPEED_QUESTION, presses,
                              bench.scorer_dir, args.threads, args.repeats)
            t0 = time.perf_counter()
            res = run_kvpress(python, job)
            log(f"[peers] kvpress done in {time.perf_counter() - t0:.0f} s")
            rows.extend(kvpress_rows(res, items))
            notes.append(f"kvpress runner versions: {res['versions']}")
        return {"rows": rows, "notes": notes, "items": len(items), "ratio": r, "k": args.k,
                "passage_tokens": args.passage_tokens, "machine": B.machine_info(bench),
                "trained": getattr(bench, "trained_path", None), "trained_anchors": _anchors_of(bench, r),
                "command": "python -m gist_memory.eval.peers " +
                " ".join(sys.argv[1:])}
    finally:
        bench.close()


def _llmlingua2_row(bench, items, speed_passages, args, full_ttft, log):  # noqa: ANN001, ANN202
    from gist_memory.data.qa import choice_continuations, pick_choice, question_prompt
    from gist_memory.eval.bench import SPEED_QUESTION, _time_once, score_choices_shared
    from gist_memory.eval.llmlingua_baseline import LLMLingua2Compressor

    comp = LLMLingua2Compressor(args.llmlingua2_model, count_tokenizer=bench.reader.tokenizer)
    r = float(args.ratio)
    budget_gm = bench.trained[r] if bench.trained is not None else bench.untrained[r]
    hits, kinds, raw, kept, secs = [], {}, 0, 0, []
    for it in items:
        texts = []
        for p in it.passages:
            res = comp.compress(p, budget_gm.plan(p).num_kept)
            texts.append(res.text)
            raw += res.tokens_in
            kept += res.tokens_out
            secs.append(res.seconds)
        prompt = "\n\n".join(texts) + "\n\n" + question_prompt(it)
        ok = int(pick_choice(score_choices_shared(bench.reader, prompt, choice_continuations(it))) == it.answer_index)
        hits.append(ok)
        kinds.setdefault(it.kind, []).append(ok)
    comp_texts = [comp.compress(p, budget_gm.plan(p).num_kept).text for p in speed_passages]
    prompt = "\n\n".join(comp_texts) + "\n\n" + SPEED_QUESTION
    ttft = statistics.median(_time_once(bench.reader, prompt, None, 2)["ttft_s"] for _ in range(args.repeats))
    npass = sum(len(it.passages) for it in items)
    return {"method": "llmlingua2", "label": f"LLMLingua-2 {args.ratio:g}x", "accuracy": statistics.mean(hits),
            "by_kind": {k: statistics.mean(v) for k, v in kinds.items()}, "n": len(hits),
            "ratio": raw / max(1, kept), "positions_per_passage": kept / max(1, npass), "ttft_s": ttft,
            "full_ttft_s": full_ttft, "compress_s_per_passage": statistics.median(secs), "env": "ours"}


def _anchors_of(bench, ratio: float) -> Optional[str]:  # noqa: ANN001
    """How the trained rows' model chose its anchors (e.g. "recall per head"), recorded with the results."""
    gm = (bench.trained or {}).get(ratio) if isinstance(getattr(bench, "trained", None), dict) else None
    cfg = getattr(gm, "config", None)
    if cfg is None or not isinstance(getattr(cfg, "anchors", None), str):
        return None
    return cfg.anchors + (" per head" if getattr(cfg, "head_anchors", False) else "")


def render(res: dict[str, Any]) -> str:
    """The markdown table (kinds as columns), with machine, command and notes."""
    kinds = sorted({k for r in res["rows"] for k in r["by_kind"]})
    mi = res["machine"]
    f = lambda x, fmt="{:.2f}": "-" if x is None else fmt.format(x)  # noqa: E731
    out = [
        f"Retention items: {res['items']} (the shipped `qa_dev.jsonl`, balanced over kinds; the same items and "
        f"prompts for every method), requested ratio {res['ratio']:g}x; speed: k = {res['k']} passages of "
        f"~{res['passage_tokens']} tokens. Machine: {mi['cpu']}, {mi['cores']} cores, torch threads "
        f"{mi['torch_threads']}, {mi['dtype']}, 1-min load average {f(mi.get('loadavg_1m_at_start'), '{:.1f}')} at "
        f"the start (another benchmark ran on the other core). Trained model: the shipped adapter"
        f"{'' if not res['trained'] or 'default_model' in str(res['trained']) else ' ' + str(res['trained'])}"
        f"{' (' + res['trained_anchors'] + ' anchors)' if res.get('trained_anchors') else ''}.",
        "",
        "| method | accuracy | " + " | ".join(kinds) + " | achieved ratio | positions / passage | TTFT k | "
        "TTFT full / method | compression s / passage |",
        "|---|---|" + "---|" * len(kinds) + "---|---|---|---|---|",
    ]
    for r in res["rows"]:
        x = (r["full_ttft_s"] / r["ttft_s"]) if r.get("ttft_s") and r.get("full_ttft_s") else None
        out.append(f"| {r['label']} | {f(r['accuracy'])} | " + " | ".join(f(r["by_kind"].get(k)) for k in kinds) +
                   f" | {f(r['ratio'], '{:.2f}x')} | {f(r['positions_per_passage'], '{:.1f}')} | "
                   f"{f(r['ttft_s'], '{:.3f}')} s | {f(x, '{:.1f}')}x | {f(r['compress_s_per_passage'], '{:.3f}')} |")
    out += ["", "Command: `" + res["command"] + "`", ""]
    out += [f"- {n}" for n in res["notes"]]
    out.append("- kvpress rows run in their own environment (their TTFT ratio is against full text timed there, in "
               "the same process); no context and full text have no compression.")
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gist_memory.eval.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=60, help="retention items, balanced over kinds (default 60)")
    p.add_argument("--ratio", type=float, default=4.0)
    p.add_argument("--k", type=int, default=8, help="passages per timed query (default 8)")
    p.add_argument("--passage-tokens", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default="auto", help="trained gist model folder, auto (shipped) or none")
    p.add_argument("--base", default=None)
    p.add_argument("--qa-file", default=None)
    p.add_argument("--presses", default=",".join(PRESSES), help=f"kvpress presses (default {','.join(PRESSES)}; '' = none)")
    p.add_argument("--kvpress-python", default=None, help="python of an environment with kvpress")
    p.add_argument("--llmlingua2-model", default=None, help="local LLMLingua-2 token-classification model folder")
    p.add_argument("--no-llmlingua", action="store_true")
    p.add_argument("--out", default="docs/bench", help="folder for peers.md / peers.json ('' = print only)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    res = run_peers(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    md = render(res)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "peers.json").write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
        (out / "peers.md").write_text(md, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
