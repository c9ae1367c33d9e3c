"""Training throughput of the writer's objective mixes: passage tokens per second and seconds per optimiser step,
each mix run alone for a few steps from the shipped adapter (the shipped serving config: recall anchors per head,
global budget cap 4, template head). Prints a table; nothing is kept.

    python scripts/bench_train.py [--steps 8] [--threads 2] [--mixes qa,recon,shipped]

The first step of each run is left out of the rate (warm-up: prompt-prefix cache, allocator). Mixes:
`qa` = QA answers + KL to the base model on answers and on real continuations (stages 1-2);
`recon` = that plus reconstruction of the QA and continuation passages (stages 3-5);
`shipped` = that plus the mixed read, the answer's passage last and 8x drawn twice as often (stage 10).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MIXES = {
    "qa": dict(w_recon=0.0, w_mixed=0.0, answer_last=False, ratios=(4.0, 8.0)),
    "recon": dict(w_recon=1.0, recon_on="both", w_mixed=0.0, answer_last=False, ratios=(4.0, 8.0)),
    "shipped": dict(w_recon=1.0, recon_on="both", w_mixed=1.0, answer_last=True, ratios=(4.0, 8.0, 8.0)),
}


def run_mix(name: str, steps: int, init_from: str) -> dict:
    """Train `steps` steps of mix `name` in a temporary folder; the rate over steps 2..N from its log."""
    from gist_memory.train.trainer import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            out_dir=str(Path(tmp) / name), steps=400, stop_at=steps, init_from=init_from, curriculum=False,
            gist={"target_ratio": 4.0, "anchors": "recall", "max_sentence_tokens": 48, "max_anchor_fraction": 0.75,
                  "head_anchors": True, "head_budget": "global", "head_budget_cap": 4.0,
                  "head_budget_cap_ratio": 4.0, "write_head": "template"},
            stage="lora", lora_r=16, lora_alpha=32, warmup=20, batch_items=2, cont_items=4, w_qa=0.5, w_distill=1.0,
            w_cont=1.0, anchor_dropout=0.5, eval_every=10**9, eval_items=0, save_every=10**9, snapshot_every=10**9,
            log_every=1, pool_items=3000, **MIXES[name],
        )
        Trainer(cfg).train(progress=False)
        recs = [json.loads(x) for x in (Path(tmp) / name / "log.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "tok_per_s" in r]
    if len(recs) < 2:
        raise SystemExit(f"{name}: fewer than 2 logged steps; use --steps 2 or more")
    first, last = recs[0], recs[-1]
    secs = last["elapsed_s"] - first["elapsed_s"]
    return {"mix": name, "steps": len(recs) - 1, "tokens": last["tokens"] - first["tokens"], "seconds": secs,
            "tok_per_s": (last["tokens"] - first["tokens"]) / secs, "s_per_step": secs / (len(recs) - 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mixes", default="qa,recon,shipped")
    ap.add_argument("--init-from", default=None, help="an adapter folder (default: the shipped one)")
    a = ap.parse_args()
    names = [m for m in a.mixes.split(",") if m]
    bad = [m for m in names if m not in MIXES]
    if bad:
        raise SystemExit(f"unknown mix {bad}; choose from {sorted(MIXES)}")

    import torch

    from gist_memory.train.ship import DEFAULT_DIR  # the shipped adapter's folder

    torch.set_num_threads(a.threads)
    init = a.init_from or str(DEFAULT_DIR)
    rows = [run_mix(m, a.steps, init) for m in names]
    print(f"\ntraining throughput, {a.threads} thread(s), torch {torch.__version__}, from {init}")
    print("| mix | steps timed | passage tokens | seconds | passage tokens/s | s / step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mix']} | {r['steps']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tok_per_s']:.0f} | "
              f"{r['s_per_step']:.1f} |")


if __name__ == "__main__":
    main()
