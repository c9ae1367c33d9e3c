"""A LangChain chat whose history is compressed into gist states and survives a restart (offline, embedded model).

    python examples/langchain_chat_memory.py                 # a scripted conversation; run it twice: the second
                                                             # run continues it and compresses nothing old again
    python examples/langchain_chat_memory.py --chat          # talk to it (one line per message, empty line quits)
    python examples/langchain_chat_memory.py --bench         # per-turn latency at turns 5, 25, 50, with/without
                                                             # compression (prints a table)

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


def bench(args: argparse.Namespace) -> None:
    import torch
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
    from langchain_gist_memory import ChatGist

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    marks = sorted({int(x) for x in args.turns.split(",")})
    n_turns = max(marks)
    system = SystemMessage("You are a helpful tour planner. Answer briefly.")
    common = dict(model=model, max_tokens=args.max_tokens, stop_at_next_turn=False, max_prompt_tokens=100_000)
    modes = {
        "compressed": ChatGist(keep_recent=args.keep_recent, **common),
        "full text": ChatGist(keep_recent=10**6, **common),
    }
    model.generate("warm up", max_new_tokens=2)
    rows: dict[tuple[str, int], dict] = {}
    for name, chat in modes.items():
        msgs: list[BaseMessage] = [system]
        for t in range(1, n_turns + 1):
            user, reply = bench_turn(t)
            msgs.append(HumanMessage(user))
            if t in marks:
                runs = []
                for _ in range(args.repeats):  # the first run compresses the turn that just aged out
                    t0 = time.perf_counter()
                    out = chat.invoke(msgs)
                    runs.append((time.perf_counter() - t0, out.response_metadata["gist"], out.usage_metadata))
                wall, g, um = runs[0]
                rows[(name, t)] = {
                    "wall": statistics.median(w for w, _, _ in runs),
                    "first": wall,
                    "ttft": statistics.median(x["ttft_s"] or 0 for _, x, _ in runs),
                    "compress": g["compress_s"],
                    "read": g["positions_read"],
                    "raw": g["raw_tokens"] + g["prompt_tokens"],
                    "out": um["output_tokens"],
                }
                print(f"  {name:10s} turn {t:3d}: {rows[(name, t)]['first']:.2f}s", file=sys.stderr, flush=True)
            elif name == "compressed":
                chat.compress_history(msgs)  # the work this turn would have done, so turn t+1 is steady state
            msgs.append(AIMessage(reply))

    print(f"\nmodel: {model.name}; device cpu, torch threads {torch.get_num_threads()}; keep_recent "
          f"{args.keep_recent}; max_tokens {args.max_tokens}; median of {args.repeats} run(s)")
    print("| turn | mode | latency s (first run) | TTFT s | compress s | positions read | tokens stood for | out |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for t in marks:
        for name in modes:
            r = rows[(name, t)]
            print(f"| {t} | {name} | {r['wall']:.2f} ({r['first']:.2f}) | {r['ttft']:.2f} | {r['compress']:.2f} | "
                  f"{r['read']} | {r['raw']} | {r['out']} |")


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
    p.add_argument("--turns", default="5,25,50", help="--bench: the turns to time")
    p.add_argument("--repeats", type=int, default=1, help="--bench: runs per timed turn (median)")
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
