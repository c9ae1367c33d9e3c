"""Serving many users: answers/s at 1, 4 and 16 concurrent clients, batched vs one at a time.

    OMP_NUM_THREADS=1 python scripts/bench_serving.py --repeats 2      # bundled model + shipped adapter
    python scripts/bench_serving.py --clients 1,4 --answers 4 --max-new-tokens 8 --tiny      # a quick check

Every request reads k = 4 passages of ~150 tokens from their gist states (compressed once, before timing) and
answers greedily with `--max-new-tokens` tokens (end-of-turn ignored, so every answer has the same length). Each
client is a thread that asks its questions back to back; `--answers` answers per client count (at least 8 in all).
Modes, all over one shared `GistModel` in this process (no HTTP: what is measured is the model's side):

  serialised   one request at a time (a lock around `GistModel.generate`): the baseline of the goal;
  threads      every client calls `GistModel.generate` at once, unbatched (what the server did before batching:
               one thread per request, the threads share the cores);
  batched      every client calls `Batcher.generate` (`gist_memory.server.batcher`: prefill and decode batched,
               rows joining and leaving between steps), as `gist-memory serve` does by default.

answers/s = answers / wall time of the whole run of that mode (the best of `--repeats` rounds, the modes taking
turns); `vs serialised` divides by the serialised row at the same number of clients. `unlike serialised` counts
answers (over all rounds) that differ from the serialised answer to the same question (greedy: none should; the
exit status is 1 if any does). A second table times the prefill of 16 new rows: one padded forward vs one forward
per row. This is a script, not a timed test: numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout


def passages(tokenizer: Any, n: int, length: int) -> list[tuple[str, str]]:
    """`n` (title, text) passages of about `length` tokens from the shipped sample corpus."""
    from gist_memory.demo import load_sample

    recs = load_sample()
    out = []
    for i in range(n):
        a, b = recs[i % len(recs)], recs[(i + 7) % len(recs)]
        ids = tokenizer(a["text"] + " " + b["text"], add_special_tokens=False)["input_ids"][:length]
        out.append((a["title"], tokenizer.decode(ids).strip()))
    return out


def run_mode(mode: str, ask: Any, questions: list[tuple[str, Any]], clients: int, per_client: int
             ) -> tuple[float, dict[int, tuple[int, str]]]:
    """(wall seconds, {request: (question index, answer)}) with `clients` threads each asking `per_client` questions."""
    answers: dict[int, tuple[int, str]] = {}
    errors: list[BaseException] = []

    def client(c: int) -> None:
        for j in range(per_client):
            qi = (c * per_client + j) % len(questions)
            try:
                answers[c * per_client + j] = (qi, ask(*questions[qi]))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{mode}: {len(errors)} requests failed, first: {errors[0]!r}")
    return wall, answers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    ap.add_argument("--answers", type=int, default=2, help="answers per client (at least 8 per run in all)")
    ap.add_argument("--k", type=int, default=4, help="passages read per request")
    ap.add_argument("--passage-tokens", type=int, default=150)
    ap.add_argument("--passages", type=int, default=16, help="distinct passages compressed")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--modes", default="serialised,threads,batched")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of the bundled one (checks)")
    ap.add_argument("--padded-cache", action="store_true",
                    help="lay every head out as wide as its layer's widest (GistModel.packed_cache = False)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds per number of clients; the best wall time counts")
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - {"serialised", "threads", "batched"} or not clients or min(clients) < 1:
        ap.error("--modes: serialised, threads, batched; --clients: numbers >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from gist_memory import GistModel
    from gist_memory.model.batching import BatchRequest, Decoder, Row
    from gist_memory.server.batcher import Batcher

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.tiny:
        import tempfile

        from gist_memory.testing import build_tiny_base, tiny_gist_model

        model = tiny_gist_model(build_tiny_base(tempfile.mkdtemp(prefix="gm-bench-"), "llama"))
        what = "tiny random Llama (2 layers, hidden 32)"
    else:
        model = GistModel.from_pretrained()
        what = f"{model.name}, {model.dtype}"
    model.packed_cache = not args.padded_cache
    what += f", head_budget={model.config.head_budget!r}, {'padded' if args.padded_cache else 'packed'} cache"
    texts = passages(model.tokenizer, args.passages, args.passage_tokens)
    states = model.compress([t for _, t in texts])
    print(f"[bench] model loaded and {len(states)} passages compressed in {time.perf_counter() - t0:.1f} s "
          f"(mean {sum(s.num_tokens for s in states) / len(states):.0f} raw tokens -> "
          f"{sum(s.num_rows for s in states) / len(states):.0f} kept rows a head, "
          f"{sum(s.num_positions for s in states) / len(states):.0f} positions wide)", file=sys.stderr, flush=True)
    gen = {"max_new_tokens": args.max_new_tokens, "eos_token_id": -1}  # no end-of-turn: equal lengths
    questions = []
    for i in range(max(16, max(clients) * args.answers)):
        picks = [(i * args.k + j) % len(states) for j in range(args.k)]
        title = texts[picks[0]][0]
        questions.append((f"What does the context say about {title}? ({i})", [states[p] for p in picks]))

    lock = threading.Lock()

    def serialised(q: str, st: Any) -> str:
        with lock:
            return model.generate(q, states=st, **gen)

    def threads(q: str, st: Any) -> str:
        return model.generate(q, states=st, **gen)

    batcher = Batcher(model, max_batch=args.max_batch)
    asks = {"serialised": serialised, "threads": threads, "batched": lambda q, st: batcher.generate(q, st, **gen)}
    serialised(*questions[0])  # warm-up: prefix cache, kernels
    batcher.generate(*questions[1], **gen)
    ref: dict[int, str] = {}
    rows = []
    load0 = os.getloadavg()[0]
    for n in clients:
        per = max(args.answers, -(-8 // n))
        best: dict[str, tuple[int, float]] = {}  # mode -> (answers, best wall s)
        differ: dict[str, int] = {m: 0 for m in modes}  # answers unlike the serialised one, over all rounds
        for rep in range(args.repeats):  # modes take turns, so a busy spell of the machine hits them alike
            for mode in modes:
                print(f"[bench] {n} clients, {mode}, round {rep + 1} ...", file=sys.stderr, flush=True)
                wall, answers = run_mode(mode, asks[mode], questions, n, per)
                if mode == "serialised":
                    for qi, a in answers.values():
                        ref.setdefault(qi, a)
                differ[mode] += sum(1 for qi, a in answers.values() if qi in ref and ref[qi] != a)
                if mode not in best or wall < best[mode][1]:
                    best[mode] = (len(answers), wall)
        base = best["serialised"][0] / best["serialised"][1] if "serialised" in best else None
        for mode in modes:
            cnt, wall = best[mode]
            rate = cnt / wall
            rows.append((n, mode, cnt, wall, rate, rate / base if base else float("nan"), differ[mode]))
    load1 = os.getloadavg()[0]
    batcher.close()

    # prefill of 16 new rows: one padded forward vs one forward per row
    pre = []
    for how in ("padded", "rows"):
        times = []
        for _ in range(3):
            dec = Decoder(model, prefill=how)
            new = [Row(model, BatchRequest(q, st, dict(gen))) for q, st in questions[:16]]
            t1 = time.perf_counter()
            dec.add(new)
            times.append(time.perf_counter() - t1)
        pre.append((how, min(times)))

    print(f"\nmodel: {what}; k = {args.k} passages of ~{args.passage_tokens} tokens from their states; "
          f"{args.max_new_tokens} new tokens, greedy")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} intra-op threads); load average {load0:.1f} before, {load1:.1f} after\n")
    print("| clients | mode | answers | wall s | answers/s | vs serialised | unlike serialised |")
    print("|---|---|---|---|---|---|---|")
    for n, mode, cnt, wall, rate, ratio, bad in rows:
        vs = "-" if ratio != ratio else f"{ratio:.2f}x"  # no serialised row to divide by
        print(f"| {n} | {mode} | {cnt} | {wall:.1f} | {rate:.2f} | {vs} | {bad} |")
    print("\n| prefill of 16 new rows | seconds (best of 3) |")
    print("|---|---|")
    for how, t in pre:
        print(f"| {'one padded forward' if how == 'padded' else 'one forward per row'} | {t:.3f} |")
    return 1 if any(r[-1] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
