"""Engine speed: compress throughput and prefill time from states vs from full text.

    python -m gist_memory.eval.engine_speed [--model PATH | --compressor pool+anchors] [--passages 8] [--dtype float32]

Prints a markdown table. Passages come from the shipped sample corpus (~150 tokens each).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample_corpus" / "passages.jsonl"


def _passages(n: int, model, lo: int = 110, hi: int = 200) -> list[str]:  # noqa: ANN001
    texts = [json.loads(line)["text"] for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    picked = [t for t in texts if lo <= len(model.tokenizer(t)["input_ids"]) <= hi]
    if len(picked) < n:
        picked = texts
    return picked[:n]


def _median_time(fn, repeats: int) -> float:  # noqa: ANN001
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@torch.no_grad()
def measure(model, n_passages: int = 8, repeats: int = 3) -> dict:  # noqa: ANN001
    """Compress tokens/s (batched), and prefill seconds to the first answer logits with states vs full text."""
    passages = _passages(n_passages, model)
    raw = sum(len(model.tokenizer(p)["input_ids"]) for p in passages)
    model.compress(passages[:1])  # warm-up
    t_comp = _median_time(lambda: model.compress(passages, batch_size=8), repeats)
    states = model.compress(passages, batch_size=8)
    q = "Question: Which of these topics is described first?\nAnswer:"

    def prefill(prompt: str, st) -> None:  # noqa: ANN001
        layers, start, head = model.prepare(prompt, st)
        model.forward_ids(torch.as_tensor([head], device=model.device), layers, start)

    full_prompt = "\n\n".join(passages) + "\n\n" + q
    prefill(q, states)
    t_states = _median_time(lambda: prefill(q, states), repeats)
    prefill(full_prompt, None)
    t_full = _median_time(lambda: prefill(full_prompt, None), repeats)
    kept = sum(s.num_kept for s in states)
    return {
        "passages": len(passages),
        "raw_tokens": raw,
        "kept_rows": kept,
        "ratio": raw / max(1, kept),
        "compress_s": t_comp,
        "compress_tok_per_s": raw / t_comp,
        "prefill_states_s": t_states,
        "prefill_full_s": t_full,
        "speedup": t_full / t_states,
    }


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry: print the table."""
    from gist_memory import GistConfig, GistModel

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", help="a saved gist model folder (default: shipped adapter if present)")
    ap.add_argument("--compressor", default=None, help="use a fresh model with this compressor instead")
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--passages", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.compressor:
        m = GistModel.from_base(None, GistConfig(compressor=a.compressor, target_ratio=a.ratio), dtype=a.dtype)
        label = f"{a.compressor} @ {a.ratio}x"
    else:
        m = GistModel.from_pretrained(a.model, dtype=a.dtype, config_overrides={"target_ratio": a.ratio})
        label = f"gist model {a.model or '(shipped)'} @ {a.ratio}x"
    r = measure(m, a.passages, a.repeats)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"dtype {a.dtype}, device {m.device}; {label}")
    print("| passages | raw tokens | kept rows | ratio | compress tok/s | prefill from states (s) | "
          "prefill from full text (s) | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {r['passages']} | {r['raw_tokens']} | {r['kept_rows']} | {r['ratio']:.2f} | "
          f"{r['compress_tok_per_s']:.0f} | {r['prefill_states_s']:.3f} | {r['prefill_full_s']:.3f} | "
          f"{r['speedup']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
