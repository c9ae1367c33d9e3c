"""Engine speed: compress throughput and prefill time from states vs from full text.

    python -m gist_memory.eval.engine_speed [--model PATH | --compressor pool+anchors] [--passages 8] [--dtype float32]

Prints a markdown table. Passages come from the shipped sample corpus (~150 tokens each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
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


@torch.no_grad()
def ttft_breakdown(model, passages: list[str], repeats: int = 5,  # noqa: ANN001
                   question: str = "Question: Which of these topics is described first?\nAnswer:") -> dict:
    """Where time to first token goes, from states vs from full text, for the same passages (states precomputed).

    States: `prepare` = template + tokenizing + prefix-cache lookup (`other`) + `splice` (copies and re-rotation of
    every kept row into one cache); then the forward over the prompt's remaining tokens and the first pick.
    Full text: tokenizing + one forward over everything. `bound` = positions full text prefills / positions the
    states' prompt prefills (the question and the template's end; the states' rows are attended, not computed):
    the speed-up if time were proportional to positions computed; the gap to it is the fixed cost of a forward."""
    from gist_memory.model import kv

    states = model.compress(passages, batch_size=8)
    full_prompt = "\n\n".join(passages) + "\n\n" + question

    def first(layers, start, head) -> int:  # noqa: ANN001
        logits, _ = model.forward_ids(torch.as_tensor([head], device=model.device), layers, start)
        return int(logits[0, -1].argmax())

    prefix_ids, _after = model.template_ids(question)

    def splice_only() -> None:
        prefix = model.prefix_cache(prefix_ids)
        kv.splice(prefix, len(prefix_ids), states, model.rope, model.config.position_mode, device=model.device,
                  dtype=model.dtype)

    layers, start, head = model.prepare(question, states)
    first(layers, start, head)  # warm-up (prefix cache, allocator)
    t_prepare = _median_time(lambda: model.prepare(question, states), repeats)
    t_splice = _median_time(splice_only, repeats)
    t_fwd = _median_time(lambda: first(layers, start, head), repeats)
    t_states = _median_time(lambda: first(*model.prepare(question, states)), repeats)
    f_layers, f_start, f_head = model.prepare(full_prompt, None)
    first(f_layers, f_start, f_head)
    t_full = _median_time(lambda: first(*model.prepare(full_prompt, None)), repeats)
    pos_states = int(layers[0][0].shape[2]) + len(head)
    pos_full = len(f_head)
    return {
        "k": len(passages), "raw_tokens": sum(s.num_tokens for s in states),
        "kept_rows": sum(s.num_kept for s in states), "positions_states": pos_states, "positions_full": pos_full,
        "prefix_tokens": len(prefix_ids), "suffix_tokens": len(head),
        "ttft_states_s": t_states, "ttft_full_s": t_full, "speedup": t_full / t_states,
        "bound": pos_full / max(1, len(head)),
        "splice_s": t_splice, "prepare_other_s": max(0.0, t_prepare - t_splice), "forward_s": t_fwd,
    }


def render_breakdown(rows: list[dict]) -> str:
    lines = ["| k | raw tokens | positions read, full / states | prefilled, full / states | bound | TTFT full s | "
             "TTFT states s | speed-up | of which splice s | template+prefix s | forward (suffix) s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['raw_tokens']} | {r['positions_full']} / {r['positions_states']} | "
                     f"{r['positions_full']} / {r['suffix_tokens']} | "
                     f"{r['bound']:.0f}x | {r['ttft_full_s']:.3f} | {r['ttft_states_s']:.3f} | {r['speedup']:.1f}x | "
                     f"{r['splice_s']:.3f} | {r['prepare_other_s']:.3f} | {r['forward_s']:.3f} |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    from gist_memory.eval.bench import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores"


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
    ap.add_argument("--breakdown", default=None,
                    help="comma-separated k values: print where TTFT goes at each k (e.g. 2,4,8,16,32) instead")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")
    ap.add_argument("--json", default=None, help="with --breakdown: also write the rows here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.compressor:
        m = GistModel.from_base(None, GistConfig(compressor=a.compressor, target_ratio=a.ratio), dtype=a.dtype,
                                device=a.device)
        label = f"{a.compressor} @ {a.ratio}x"
    else:
        m = GistModel.from_pretrained(a.model, dtype=a.dtype, config_overrides={"target_ratio": a.ratio},
                                      device=a.device)
        label = f"gist model {a.model or '(shipped)'} @ {a.ratio}x"
    if a.breakdown:
        ks = [int(x) for x in a.breakdown.split(",") if x.strip()]
        pool = _passages(max(ks), m)
        while len(pool) < max(ks):  # the sample corpus is small: repeat it (states are per passage anyway)
            pool = pool + pool
        rows = [ttft_breakdown(m, pool[:k], a.repeats) for k in ks]
        dev = torch.cuda.get_device_name(0) if m.device.type == "cuda" else _cpu_name()
        machine = (f"Machine: {dev}, torch threads {torch.get_num_threads()}, {a.dtype}; {label}; median of "
                   f"{a.repeats}; passages from the shipped sample corpus; states precomputed.")
        print(machine)
        print(render_breakdown(rows))
        if a.json:
            cmd = "python -m gist_memory.eval.engine_speed " + " ".join(sys.argv[1:] if argv is None else argv)
            Path(a.json).write_text(json.dumps({"machine": machine, "rows": rows, "command": cmd}, indent=1),
                                    encoding="utf-8")
        return 0
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
