"""kvpress presses on the held-out table: `python -m gist_memory.eval.heldout.kvpress`.

The same items, prompts and per-passage row budgets as the table's state methods (each passage keeps as many rows
per head, on average, as its state keeps positions at that ratio), run by `gist_memory.eval.kvpress_runner` in an
environment that has kvpress (`make kvpress-env`; it pins another transformers). Multiple-choice kinds are scored
by summed log-probability of each choice, the FAQ by the reference answer's log-likelihood (its recovered fraction
uses the table's own `full` and `none` cells). The runner does not generate, so the generation columns stay empty.
Records are appended to the results file as `kvpress:<press>` rows, so `render_markdown` shows them beside the
rest.

Example:
    python -m gist_memory.eval.heldout.kvpress --presses kvzip --ratios 4 8 --items 20 --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from gist_memory.eval.heldout.items import KINDS, HeldoutError, HeldoutItem, build_items, prompt
from gist_memory.eval.heldout.run import LABEL, RESULTS_VERSION, cell_key, pool_config, read_results

PRESSES = ("kvzip", "kvzip_uniform", "knorm", "expected_attention")


def job_for(reader: Any, budget_gm: Any, items: dict[str, list[HeldoutItem]], presses: Sequence[str],
            model_dir: str, threads: Optional[int]) -> tuple[dict[str, Any], list[tuple[str, HeldoutItem]]]:  # fmt: skip
    """The runner's job for every item (our tokenizer and chat template; budgets from `budget_gm`'s plans) and the
    (kind, item) each job item stands for."""
    from gist_memory.eval.peers import PassageTable

    table = PassageTable(reader, budget_gm)
    job_items, order = [], []
    for kind, its in items.items():
        for it in its:
            pre, suf = reader.template_ids(prompt(it))
            conts = [it.answer] if kind == "faq" else list(it.continuations or it.choices)
            job_items.append({"id": it.id, "prefix": pre, "suffix": suf,
                              "passages": [table.id(p) for p in it.passages],
                              "choices": [reader.encode(c) for c in conts]})
            order.append((kind, it))
    return table.job(model_dir, threads, presses, job_items), order


def records(res: dict[str, Any], order: list[tuple[str, HeldoutItem]], ratio: float, meta: dict[str, Any],
            seconds: float) -> list[dict[str, Any]]:  # fmt: skip
    """Held-out cell records (one per press and kind) from the runner's result."""
    out = []
    for name, r in res["presses"].items():
        by_kind: dict[str, list[tuple[HeldoutItem, dict]]] = {}
        for (kind, it), x in zip(order, r["items"], strict=True):
            by_kind.setdefault(kind, []).append((it, x))
        for kind, pairs in by_kind.items():
            per_item = []
            for it, x in pairs:
                s = x["scores"]
                if kind == "faq":
                    per_item.append({"id": it.id, "ll": s[0]})
                else:
                    best = max(range(len(s)), key=lambda i: (s[i], -i))
                    per_item.append({"id": it.id, "correct": int(best == it.answer_index)})
            n = len(per_item)
            metrics = ({"mean_ll": sum(p["ll"] for p in per_item) / n} if kind == "faq"
                       else {"mc_accuracy": sum(p["correct"] for p in per_item) / n})  # fmt: skip
            raw = sum(x["raw"] for _, x in pairs)
            kept = sum(x["kept"] for _, x in pairs)
            out.append({**meta, "method": f"kvpress:{name}", "ratio": ratio, "kind": kind, "n": n,
                        "metrics": metrics, "raw_tokens": raw, "kept_rows": kept,
                        "achieved_ratio": raw / kept if kept else None, "seconds": round(seconds, 2),
                        "per_item": per_item, "env": res.get("versions", {})})  # fmt: skip
    return out


def run(items: dict[str, list[HeldoutItem]], presses: Sequence[str], ratios: Sequence[float], python: str,
        out: Optional[Path], seed: int, n_requested: int, base: Optional[str] = None, threads: Optional[int] = 1,
        log: Callable[[str], None] = print) -> list[dict[str, Any]]:  # fmt: skip
    """Runs every (press, ratio) not already in `out` (a cell counts as done when all its kinds are there)."""
    from gist_memory import GistModel
    from gist_memory.eval.peers import run_kvpress
    from gist_memory.model.base import BUNDLED, bundled_base_dir

    meta = {"version": RESULTS_VERSION, "label": LABEL, "seed": seed, "n_requested": n_requested,
            "base": base or "embedded", "model": "kvpress", "generate": False}  # fmt: skip
    done = {cell_key(r) for r in (read_results(out) if out else [])}
    got: list[dict[str, Any]] = []
    reader = None
    for ratio in ratios:
        todo = [p for p in presses
                if any(cell_key({**meta, "method": f"kvpress:{p}", "ratio": float(ratio), "kind": k}) not in done
                       for k in items)]  # fmt: skip
        if not todo:
            log(f"kvpress @{ratio:g}x: done already")
            continue
        budget_gm = GistModel.from_base(base, pool_config("pool+anchors", float(ratio)), device="cpu")
        reader = reader or budget_gm
        model_dir = str(bundled_base_dir()) if base is None or base == BUNDLED else str(base)
        job, order = job_for(reader, budget_gm, items, todo, model_dir, threads)
        t0 = time.perf_counter()
        res = run_kvpress(python, job)
        recs = records(res, order, float(ratio), meta, time.perf_counter() - t0)
        for r in recs:
            log(f"{r['method']:22s} {ratio:g}x {r['kind']:19s} n={r['n']:3d} ratio={r['achieved_ratio']:.2f} "
                f"{json.dumps(r['metrics'])}")
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a", encoding="utf-8") as f:
                for r in recs:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        got += recs
    return got


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point."""
    from gist_memory.eval.peers import find_kvpress_python

    ap = argparse.ArgumentParser(prog="python -m gist_memory.eval.heldout.kvpress", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--presses", nargs="+", default=["kvzip"], choices=list(PRESSES))
    ap.add_argument("--ratios", type=float, nargs="+", default=[4.0, 8.0])
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default=None, help="base LM (default: the embedded SmolLM2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kvpress-python", default=None, help="a Python with kvpress (default: .venv-kvpress)")
    ap.add_argument("--out", default="heldout_results.jsonl")
    a = ap.parse_args(argv)
    python, why = find_kvpress_python(a.kvpress_python)
    if python is None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    try:
        items = build_items(a.items, seed=a.seed, kinds=a.kinds)
    except HeldoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(items, a.presses, a.ratios, python, Path(a.out), a.seed, a.items, base=a.base, threads=a.threads,
        log=lambda s: print(s, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
