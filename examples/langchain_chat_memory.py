"""A LangChain chat whose history is compressed into gist states and survives a restart (offline, embedded model).

    python examples/langchain_chat_memory.py                 # a scripted conversation; run it twice: the second
                                                             # run continues it and compresses nothing old again
    python examples/langchain_chat_memory.py --chat          # talk to it (one line per message, empty line quits)
    python examples/langchain_chat_memory.py --bench         # per-turn cost at turns 1..200, full text vs
                                                             # compressed with a raw-token budget (markdown
                                                             # table; --out FILE for JSON)

The history lives in a SQLite file (`--db`, default `langchain_chat.sqlite` in the temp folder); each compressed
turn's gist state is kept on its row, so a restarted app reads old turns from their states. Turns older than the
last `--keep-recent` are read from states; the recent ones as text.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SCRIPT = [
    "Hi! I am planning a birthday dinner for my friend Tom next Friday.",
    "There will be eight guests, and the dinner starts at 7 pm at my flat on Baker Street.",
    "Tom is vegetarian and one guest cannot eat peanuts. What could I cook?",
    "I also want a cake. Should I bake it or buy it?",
    "My budget is 120 dollars for everything.",
    "How many guests are coming again?",
    "And what time does the dinner start?",
]


def load_model(kind: str):  # noqa: ANN201
    """The embedded default gist model, or the training-free pool+anchors compressor over the bundled SmolLM2."""
    from gist_memory import GistConfig, GistModel

    if kind == "default":
        try:
            return GistModel.from_pretrained(device="cpu")
        except FileNotFoundError as e:
            print(f"[note] {e}\n[note] using the training-free pool+anchors compressor (ratio 4) instead", file=sys.stderr)
    return GistModel.from_base(None, GistConfig(compressor="pool+anchors", target_ratio=4), device="cpu")


def show(meta: dict) -> str:
    g = meta["gist"]
    return (
        f"[read {g['positions_read']} positions for {g['raw_tokens']} compressed tokens + {g['prompt_tokens']} text; "
        f"{g['compressed_turns']} old turns from states ({g['states_from_store']} loaded from disk, "
        f"{g['new_compressions']} compressed now); {g['total_s']:.2f}s]"
    )


def converse(args: argparse.Namespace) -> None:
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_gist_memory import ChatGist, GistChatMessageHistory, GistHistoryStore

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    db = GistHistoryStore(args.db)
    history = GistChatMessageHistory(args.session, db)
    chat = ChatGist(
        model=model, keep_recent=args.keep_recent, max_tokens=args.max_tokens, repetition_penalty=1.15, state_store=db
    )
    system = "You are a concise, friendly assistant. Answer in English."
    past = history.messages
    print(f"history {args.db} session {args.session!r}: {len(past)} messages, {db.count_states()} gist states stored")

    def ask(text: str) -> None:
        msgs = [SystemMessage(system), *history.messages, HumanMessage(text)]
        reply = chat.invoke(msgs)
        history.add_messages([HumanMessage(text), reply])
        print(f"\nUser: {text}\nAssistant: {reply.content.strip()}\n  {show(reply.response_metadata)}")

    if args.chat:
        print("type a message (empty line quits)")
        for line in sys.stdin:
            if not line.strip():
                break
            ask(line.strip())
    else:
        start = len(past) // 2
        for text in (SCRIPT[start:] if start < len(SCRIPT) else SCRIPT[-2:]):
            ask(text)
    print(f"\n{db.count_states()} gist states stored in {args.db}; run again to continue after a 'restart'")
    db.close()


# ---- benchmark --------------------------------------------------------------------------------------------------
FACTS = ["the blue ledger", "gate 14", "Captain Ilse Marr", "the 7:45 ferry", "room 302", "the Orla bakery",
         "code KX-2291", "the north tower", "platform 9", "the red kayak"]


def bench_turn(t: int) -> tuple[str, str]:
    """A user message and a reply of about 60 tokens each, with a planted fact."""
    fact = FACTS[t % len(FACTS)]
    user = (f"Turn {t}. Yesterday we talked about the museum schedule, and today I want to add one more detail: "
            f"the guide said that {fact} matters for step {t} of the tour. Could you remember it and tell me how "
            f"it changes our plan for the afternoon walk along the river?")
    reply = (f"Noted: for step {t}, {fact} is the detail to keep in mind. It shifts the afternoon walk by about "
             f"twenty minutes, so we start at the old bridge, pass the market, and reach the museum garden before "
             f"it closes. I will keep this in the plan for later questions.")
    return user, reply


BENCH_TURNS = "1,2,4,8,16,25,50,100,150,200"


def context_window(model) -> int:  # noqa: ANN001
    """Positions the base model was built for (`max_position_embeddings` of its config; SmolLM2-135M: 8192)."""
    cfg = model.base_model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(cfg, name, None)
        if n:
            return int(n)
    raise ValueError(f"{type(cfg).__name__} names no context window")


def _timed(chat, msgs) -> dict:  # noqa: ANN001
    """One streamed call: wall seconds to the first text piece and to the end, and the call's metadata."""
    t0 = time.perf_counter()
    first = None
    last = None
    for chunk in chat.stream(msgs):
        if first is None and chunk.content:
            first = time.perf_counter() - t0
        last = chunk
    total = time.perf_counter() - t0
    g = last.response_metadata["gist"]
    return {"total": total, "ttft": first if first is not None else total, "gist": g,
            "out": last.usage_metadata["output_tokens"]}


def run_bench(model, marks, *, keep_recent: int = 2, raw_token_budget: Optional[int] = 256,  # noqa: ANN001
              max_tokens: int = 16, repeats: int = 3, n_ctx: Optional[int] = None,
              cache_bytes: int = 8 * 2**30, log=None) -> dict:  # noqa: ANN001
    """Per-turn cost of a chat at each turn count in `marks`: full history as text vs old turns from gist states.

    The history is built once, turn by turn (`bench_turn`); at turn t the call answers the t-th user message after
    t-1 complete exchanges. Compressed: `keep_recent` recent turns as text within `raw_token_budget` tokens (the
    current turn and the last exchange always verbatim), older turns from their states, each compressed once (the
    states are cached by content; between timed turns `compress_history` does the work each turn would have done,
    so the first timed call at a turn compresses only the turn that just aged out). Full text: everything as text,
    measured while the prompt plus `max_tokens` fits in `n_ctx` positions (default: the model config's); past that
    it is reported unavailable with the reason.

    Returns a dict: `config` and `rows` (one per turn and mode) with `ttft_s` / `total_s` (median of `repeats`
    streamed calls; `first_total_s` the first one), `positions` (positions read), `raw_tokens` (the tokens of the
    whole history as the full-text prompt, i.e. what full text reads), `ratio` (positions / raw tokens),
    `half_ok` (compressed, turn >= 8: positions <= 0.5 x raw tokens; None otherwise), and for compressed calls the
    compression counts and `max_position` (the last RoPE position index used: with `gapped` positions the states
    keep their place in the raw text, so it grows like the raw tokens).
    `cache_bytes` is the compressed chat's RAM state cache: large by default, so that no old turn is evicted and
    compressed again (the ChatGist default, 256 MiB, holds about 180 turns of SmolLM2 states).
    """
    import torch
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
    from langchain_gist_memory import ChatGist

    marks = sorted({int(t) for t in marks})
    if not marks or marks[0] < 1:
        raise ValueError(f"turn counts must be >= 1, got {marks}")
    n_ctx = int(n_ctx) if n_ctx else context_window(model)
    common = dict(model=model, max_tokens=max_tokens, stop_at_next_turn=False, cache_bytes=cache_bytes)
    comp = ChatGist(keep_recent=keep_recent, raw_token_budget=raw_token_budget, **common)
    full = ChatGist(keep_recent=10**6, max_prompt_tokens=10**7, **common)
    model.generate("warm up", max_new_tokens=2)
    msgs: list[BaseMessage] = [SystemMessage("You are a helpful tour planner. Answer briefly.")]
    rows: list[dict] = []
    t_start = time.perf_counter()
    for t in range(1, marks[-1] + 1):
        user, reply = bench_turn(t)
        msgs.append(HumanMessage(user))
        if t not in marks:
            comp.compress_history(msgs)  # the work turn t would have done: compress the turn that aged out
            msgs.append(AIMessage(reply))
            continue
        plan = full._plan(msgs, None, {})  # what full text reads: the whole history, templated (no model call)
        raw = len(model.prepare(plan.prompt, None, plan.system_prompt)[2])
        for mode in ("compressed", "full text"):
            row: dict = {"turn": t, "mode": mode, "raw_tokens": raw}
            if mode == "full text" and raw + max_tokens > n_ctx:  # the history only grows: so do later turns
                row.update(available=False, positions=None, ratio=None, half_ok=None,
                           reason=f"{raw} + {max_tokens} positions > the {n_ctx}-position context window")
                rows.append(row)
                continue
            chat = comp if mode == "compressed" else full
            runs = [_timed(chat, msgs) for _ in range(max(1, repeats))]
            g = runs[0]["gist"]
            row.update(
                available=True,
                ttft_s=statistics.median(r["ttft"] for r in runs),
                total_s=statistics.median(r["total"] for r in runs),
                first_total_s=runs[0]["total"],
                runs=len(runs),
                out_tokens=runs[0]["out"],
                positions=g["positions_read"],
                ratio=g["positions_read"] / raw,
            )
            if mode == "compressed":
                p = comp._plan(msgs, None, {})  # from the cache: nothing is compressed here
                _, start, head = model.prepare(p.prompt, p.states, p.system_prompt, reserve=max_tokens)
                row.update(compressed_turns=g["compressed_turns"], raw_turns=g["raw_turns"],
                           raw_turn_tokens=g["raw_turn_tokens"], new_compressions=g["new_compressions"],
                           compress_s=g["compress_s"], max_position=start + len(head) + max_tokens - 1)
                row["half_ok"] = (row["positions"] <= 0.5 * raw) if t >= 8 else None
            else:
                row["half_ok"] = None
            rows.append(row)
            if log:
                log(f"  turn {t:3d} {mode:10s}: {row['total_s']:.2f}s, {row['positions']} positions / {raw} raw "
                    f"({time.perf_counter() - t_start:.0f}s so far)")
        msgs.append(AIMessage(reply))
    config = {
        "model": model.name, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(), "keep_recent": keep_recent, "raw_token_budget": raw_token_budget,
        "max_tokens": max_tokens, "repeats": max(1, repeats), "context_window": n_ctx, "turns": marks,
        "position_mode": model.config.position_mode, "wall_s": round(time.perf_counter() - t_start, 1),
    }
    return {"config": config, "rows": rows}


def bench_table(result: dict) -> str:
    """The markdown table of `run_bench`'s result (plus a header line and the half-of-raw verdict per turn)."""
    c = result["config"]
    budget = "none" if c["raw_token_budget"] is None else f"{c['raw_token_budget']} tokens"
    lines = [
        f"model: {c['model']}; {c['device']} {c['dtype']}, torch threads {c['torch_threads']}; keep_recent "
        f"{c['keep_recent']}, raw_token_budget {budget}; {c['max_tokens']} new tokens; median of {c['repeats']} "
        f"streamed call(s) (first in brackets: it compresses the turn that just aged out); context window "
        f"{c['context_window']} positions",
        "",
        "| turn | mode | TTFT s | total s (first) | positions read | raw tokens | positions / raw | <= 0.5 raw | "
        "max position | out |",
        "|---:|---|---:|---:|---:|---:|---:|:-:|---:|---:|",
    ]
    notes = []
    for r in result["rows"]:
        ok = "" if r["half_ok"] is None else ("yes" if r["half_ok"] else "**no**")
        if not r["available"]:
            notes.append(f"turn {r['turn']}: {r['reason']}")
            lines.append(f"| {r['turn']} | {r['mode']} | - | - | - | {r['raw_tokens']} | - | | - | - |")
            continue
        maxpos = r.get("max_position", r["positions"] + c["max_tokens"] - 1)
        lines.append(
            f"| {r['turn']} | {r['mode']} | {r['ttft_s']:.2f} | {r['total_s']:.2f} ({r['first_total_s']:.2f}) | "
            f"{r['positions']} | {r['raw_tokens']} | {r['ratio']:.2f} | {ok} | {maxpos} | {r['out_tokens']} |"
        )
    if notes:
        lines.append("")
        lines.append("\"-\": full text not run, the history does not fit the model: " + "; ".join(notes) + ".")
    over = [r["turn"] for r in result["rows"] if r.get("max_position", 0) >= c["context_window"]]
    if over:
        lines.append(f"Compressed turns {', '.join(map(str, over))} use RoPE positions past the "
                     f"{c['context_window']}-position window ({c.get('position_mode')} positions keep each state's "
                     f"place in the raw text) although they read fewer positions than that.")
    lines.append("")
    for r in result["rows"]:
        if r["mode"] == "compressed" and r["turn"] >= 8:
            verdict = "yes" if r["half_ok"] else "NO"
            lines.append(f"turn {r['turn']}: positions {r['positions']} <= 0.5 x raw {r['raw_tokens']} "
                         f"({0.5 * r['raw_tokens']:.0f}): {verdict}")
    return "\n".join(lines)


def bench(args: argparse.Namespace) -> None:
    import json

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    budget = None if str(args.raw_token_budget).lower() == "none" else int(args.raw_token_budget)
    result = run_bench(model, [int(x) for x in args.turns.split(",")], keep_recent=args.keep_recent,
                       raw_token_budget=budget, max_tokens=args.max_tokens, repeats=args.repeats,
                       log=lambda s: print(s, file=sys.stderr, flush=True))
    print()
    print(bench_table(result))
    print(f"\n({result['config']['wall_s']:.0f}s wall in all)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", default=os.path.join(tempfile.gettempdir(), "langchain_chat.sqlite"))
    p.add_argument("--session", default="demo")
    p.add_argument("--chat", action="store_true", help="read messages from stdin")
    p.add_argument("--bench", action="store_true", help="per-turn latency with and without compression")
    p.add_argument("--model", choices=["default", "pool"], default="default",
                   help="default: the embedded gist model (falls back to pool+anchors); pool: pool+anchors, ratio 4")
    p.add_argument("--keep-recent", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--turns", default=BENCH_TURNS, help="--bench: the turn counts to time")
    p.add_argument("--repeats", type=int, default=3, help="--bench: streamed calls per timed turn and mode (median)")
    p.add_argument("--raw-token-budget", default="256",
                   help="--bench: the compressed chat's raw_token_budget (tokens of recent turns read as text; 'none')")
    p.add_argument("--out", default=None, help="--bench: also write the rows as JSON to this file")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default; 1 on a busy machine)")
    args = p.parse_args(argv)
    if args.bench:
        if args.max_tokens == 48:
            args.max_tokens = 16
        bench(args)
    else:
        converse(args)


if __name__ == "__main__":
    main()
