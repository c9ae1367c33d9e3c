"""What ranking passages by relevance costs before an answer: `GistModel.relevance` over the states of each
held-out distractor item (one forward per state, and the states in one padded forward) against the time to the
answer's first token with the same states. Prints a table.

    python scripts/bench_relevance.py [--items 5] [--ratio 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=5, help="dev distractor items (seed 1) to time")
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import torch

    from gist_memory import GistModel
    from gist_memory.eval.heldout.items import build_items, prompt
    from gist_memory.model.usage import Usage

    torch.set_num_threads(a.threads)
    gm = GistModel.from_pretrained(None, config_overrides={"target_ratio": a.ratio})
    items = build_items(a.items, seed=1, kinds=["entity_distractors"])["entity_distractors"]
    rank: dict[int, list[float]] = {1: [], 8: []}
    ttft, rows = [], []
    for it in items:
        states = gm.compress(it.passages)
        for bs, times in rank.items():
            gm.relevance(it.question, states, batch_size=bs)  # warm (prefix cache, kernels)
            t = time.perf_counter()
            gm.relevance(it.question, states, batch_size=bs)
            times.append(time.perf_counter() - t)
        u = Usage()
        gm.generate(prompt(it), states=states, max_new_tokens=1, usage=u)
        ttft.append(u.ttft_s)
        rows.append(sum(s.num_positions for s in states))
    print("| states per item | state positions (median) | relevance, one forward per state (s, median) | "
          "relevance, one padded forward (s, median) | first answer token (s, median) |")
    print("|---|---|---|---|---|")
    print(f"| {len(items[0].passages)} @{a.ratio:g}x | {statistics.median(rows):.0f} | "
          f"{statistics.median(rank[1]):.3f} | {statistics.median(rank[8]):.3f} | {statistics.median(ttft):.3f} |")


if __name__ == "__main__":
    main()
