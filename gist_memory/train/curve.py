"""Learning curve of a training run: retention accuracy of each adapter snapshot against tokens seen.

    python -m gist_memory.train.curve runs/smollm2-main --n 40 --ratios 4,8 [--out curve.json]

Step 0 is the fresh model the run started from (gist embeddings are initialised deterministically), so the curve
starts at the untrained point. Items are the shipped held-out `qa_dev.jsonl` (the first N).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch


def snapshots(run_dir: Path) -> list[Path]:
    """Snapshot folders of a run, in step order (plus the final checkpoint if it is newer)."""
    snaps = sorted((run_dir / "snapshots").glob("step-*"))
    return [s for s in snaps if (s / "gist_adapter.json").is_file()]


def evaluate_curve(run_dir: Path, n: int = 40, ratios: tuple[float, ...] = (4.0, 8.0),
                   include_start: bool = True, every: int = 1) -> list[dict]:
    """Rows `{step, tokens, ratio, achieved, acc, by_kind}` for the start point and each snapshot."""
    from gist_memory import GistConfig, GistModel
    from gist_memory.data import load_qa
    from gist_memory.eval.retention import evaluate_retention

    items = load_qa()[:n]
    snaps = snapshots(run_dir)[::every]
    if not snaps:
        raise FileNotFoundError(f"no snapshots under {run_dir / 'snapshots'}")
    rows = []
    points: list[tuple[int, int, Optional[Path]]] = []
    if include_start:
        points.append((0, 0, None))
    for s in snaps:
        prog = json.loads((s / "progress.json").read_text())
        points.append((int(prog["step"]), int(prog["tokens"]), s))
    cfg0 = GistConfig.from_pretrained(snaps[0])
    for step, tokens, path in points:
        for r in ratios:
            if path is None:
                m = GistModel.from_base(None, GistConfig.from_dict({**cfg0.to_dict(), "target_ratio": r}))
            else:
                m = GistModel.from_pretrained(path, config_overrides={"target_ratio": r})
            with torch.no_grad():
                res = evaluate_retention(m, items, methods=("gist",), calibrate=False)
            row = {"step": step, "tokens": tokens, "ratio": r, "achieved": round(res.ratio, 2),
                   "acc": round(res.accuracy["gist"], 4),
                   "by_kind": {k: round(v["gist"], 4) for k, v in res.by_kind.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    """CLI: print one json row per (snapshot, ratio) and a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--ratios", default="4,8")
    ap.add_argument("--every", type=int, default=1, help="evaluate every k-th snapshot")
    ap.add_argument("--no-start", action="store_true", help="skip the untrained starting point")
    ap.add_argument("--out", help="write the rows as json here")
    a = ap.parse_args(argv)
    rows = evaluate_curve(Path(a.run_dir), a.n, tuple(float(x) for x in a.ratios.split(",")),
                          include_start=not a.no_start, every=a.every)
    print("\n| step | tokens seen | target | achieved | accuracy | planted single | distractors | cloze |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        k = r["by_kind"]
        print(f"| {r['step']} | {r['tokens']} | {r['ratio']:g}x | {r['achieved']}x | {r['acc']:.3f} | "
              f"{k.get('planted_single', float('nan')):.2f} | {k.get('planted_distractors', float('nan')):.2f} | "
              f"{k.get('cloze_swap', float('nan')):.2f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
