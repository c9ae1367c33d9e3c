"""What storing only each head's kept rows costs and saves while decoding (`GistModel.packed_cache`).

    OMP_NUM_THREADS=1 python scripts/bench_packed_cache.py [--model FOLDER] [--rows 1 16] [--steps 16]

Where states' heads keep uneven numbers of rows (the shipped adapter's `head_budget="global"`), a read's cache can
lay every head out as wide as its layer's widest (`padded`: the new K/V of a step written in place) or store each
head's real rows only (`packed`: `kv.cache_from_layers`; every forward lays one layer out padded while it attends).
Each row reads k = 4 passages of ~150 tokens from their states (compressed once, before timing), as
`scripts/bench_serving.py` does; the rows are prefilled together (`batching.padded_forward`, one width for all
layers, as the server lays a batch out) and then decode `--steps` one-token steps over each layout, the layouts
taking turns for `--repeats` rounds. Prints the median step time (best round) and the bytes the cache holds between
steps (`kv.cache_bytes`). Outputs are the same in both layouts (`tests/test_batching.py`); this script times them.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="saved gist model folder (default: the shipped one)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--passage-tokens", type=int, default=150)
    a = ap.parse_args(argv)

    import torch

    from gist_memory import GistModel
    from gist_memory.model import batching, kv
    from scripts.bench_serving import passages

    model = GistModel.from_pretrained(a.model)
    if model.config.head_budget not in ("global", "layer"):
        print(f"note: head_budget={model.config.head_budget!r} keeps as many rows in every head of a layer: the "
              "layouts are the same", file=sys.stderr)
    n = 4 * max(a.rows)
    states = model.compress([t for _, t in passages(model.tokenizer, n, a.passage_tokens)])
    raw = sum(s.num_tokens for s in states[:4])
    kept = sum(s.num_rows for s in states[:4])
    table = []
    for B in a.rows:
        rows = [batching.Row(model, batching.BatchRequest(f"Question {i}: what is this about?", states[4 * i:4 * i + 4],
                                                          {"max_new_tokens": a.steps}))
                for i in range(B)]
        with torch.no_grad():
            out, mask = batching.padded_forward(model, rows)
        layers = kv.cache_layers(kv.out_cache(out))
        L = int(mask.shape[1])
        mask = torch.cat([mask, torch.ones((B, a.steps), dtype=mask.dtype, device=mask.device)], dim=1)
        best: dict[str, float] = {}
        held: dict[str, int] = {}
        for _ in range(a.repeats):
            for layout in ("padded", "packed"):
                cache = batching.roomy_cache(layers, spare=a.steps, packed=layout == "packed")
                times = []
                with torch.no_grad():
                    for s in range(a.steps):
                        t0 = time.perf_counter()
                        kv.call(model.model, cache=cache, input_ids=torch.full((B, 1), 5, device=model.device),
                                position_ids=torch.full((B, 1), 10_000 + s, device=model.device),
                                attention_mask=mask[:, :L + s + 1], use_cache=True)
                        times.append(time.perf_counter() - t0)
                times.sort()
                best[layout] = min(best.get(layout, float("inf")), times[len(times) // 2])
                held[layout] = kv.cache_bytes(cache)
        table.append((B, best, held))
        print(f"{B} rows: done", file=sys.stderr, flush=True)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s), {model.dtype}; each row reads 4 passages: {raw} raw tokens -> {kept:.0f} kept rows "
          f"(head_budget={model.config.head_budget!r}); median of {a.steps} steps, best of {a.repeats} rounds\n")
    print("| rows | layout | ms / step | cache MB held between steps | vs padded |")
    print("|---|---|---|---|---|")
    for B, best, held in table:
        for layout in ("padded", "packed"):
            print(f"| {B} | {layout} | {1000 * best[layout]:.0f} | {held[layout] / 1e6:.1f} | "
                  f"{best[layout] / best['padded']:.2f}x time, {held[layout] / held['padded']:.2f}x bytes |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
