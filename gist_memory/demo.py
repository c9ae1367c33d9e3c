"""`make demo` / `python -m gist_memory.demo`: the product end to end on the shipped sample corpus.

It ingests `gist_memory/assets/sample_corpus/passages.jsonl` (Wikipedia leads, CC BY-SA 4.0, and Python docs,
PSF licence: see ATTRIBUTION.md beside it) into a memory in the user cache (one per model, so a second run only
loads it), asks a few questions the corpus answers, and for each prints the answer and its sources, then what the
model read with gist states against the same passages pasted as raw text: compression ratio, positions read,
time to first token and KV-cache memory (positions x bytes per position).

The helpers here (`compare`, `kv_bytes_per_position`, `full_text_prompt`) are shared with `gist-memory ask
--compare` and the web app in `examples/rag_web_app`.

    python -m gist_memory.demo                 # the default model (shipped adapter, else training-free)
    python -m gist_memory.demo --quick --base tests/tiny-model   # seconds: a tiny model, 2 questions
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

SAMPLE_CORPUS = Path(__file__).resolve().parent / "assets" / "sample_corpus" / "passages.jsonl"

QUESTIONS: list[tuple[str, str]] = [
    ("When did Abuja replace Lagos as the capital of Nigeria?", "wiki-000"),
    ("How high above sea level does Mount Elbrus rise?", "wiki-024"),
    ("In which year did Robert Fulton's steamboat carry passengers from New York City to Albany?", "wiki-031"),
    ("How many missions did Harriet Tubman make to rescue enslaved people?", "wiki-016"),
]
"""(question, id of the passage that answers it)."""


# ---- measuring -----------------------------------------------------------------------------------------------
def kv_bytes_per_position(model: Any) -> int:
    """Bytes one position occupies in the model's KV cache: 2 (K, V) x layers x KV heads x head dim x dtype size."""
    import torch

    lm = model.base_model if hasattr(model, "base_model") else model.model
    cfg = lm.config
    cfg = getattr(cfg, "text_config", None) or cfg
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    elsize = torch.empty((), dtype=model.dtype).element_size()
    return 2 * layers * kv_heads * head_dim * elsize


def full_text_prompt(question: str, texts: Sequence[str]) -> str:
    """The full-text twin: the passages as raw text, then the question (the layout gist states replace)."""
    return "\n\n".join(texts) + "\n\n" + question if texts else question


@dataclass
class Usage:
    """What one answer cost: positions in the KV cache at the first new token, timings, KV bytes."""

    positions: int
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    total_s: float
    kv_bytes: int

    @classmethod
    def from_last_usage(cls, u: dict[str, Any], per_position: int) -> Usage:
        """From a call's usage dict (`gist_memory.model.usage.Usage.to_dict()`)."""
        pos = int(u.get("positions_read", 0))
        held = int(u.get("positions_held") or pos)  # less the states' empty slots where the cache is packed
        return cls(
            positions=pos,
            prompt_tokens=int(u.get("prompt_tokens", 0)),
            new_tokens=int(u.get("new_tokens", 0)),
            ttft_s=float(u.get("ttft_s") or 0.0),
            total_s=float(u.get("total_s") or 0.0),
            kv_bytes=held * per_position,
        )


@dataclass
class Comparison:
    """An answer from gist states beside the same question with the same passages as raw text.

    Attributes:
        question: The question.
        answer: The answer read from gist states.
        sources: The retrieved hits (`GistMemory.search`), best first.
        raw_tokens: Tokens the read states stand for.
        kept_rows: Rows the states keep (what the model attends to instead).
        gist: Cost of the gist-state answer.
        full: Cost of the full-text answer (None when not run).
        full_answer: The full-text answer ("" when it ran for the first token only, or not at all).
    """

    question: str
    answer: str
    sources: list[Any]
    raw_tokens: int
    kept_rows: int
    gist: Usage
    full: Optional[Usage] = None
    full_answer: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Compression ratio of the states read: raw tokens / kept rows."""
        return self.raw_tokens / self.kept_rows if self.kept_rows else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (sources as id/title/score/text)."""
        def src(h: Any) -> dict[str, Any]:
            md = dict(getattr(h, "metadata", {}) or {})
            return {"id": h.id, "title": str(md.get("title", "")), "score": round(float(h.score), 4),
                    "text": h.text, "metadata": md}

        def use(u: Optional[Usage]) -> Optional[dict[str, Any]]:
            return None if u is None else {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(u).items()}

        return {
            "question": self.question,
            "answer": self.answer,
            "sources": [src(h) for h in self.sources],
            "raw_tokens": self.raw_tokens,
            "kept_rows": self.kept_rows,
            "ratio": round(self.ratio, 3) if self.kept_rows else None,
            "gist": use(self.gist),
            "full": use(self.full),
            "full_answer": self.full_answer,
            **({"rank_s": self.extra["rank_s"]} if "rank_s" in self.extra else {}),
        }


def compare(
    model: Any,
    memory: Any,
    question: str,
    k: int = 4,
    max_new_tokens: int = 64,
    full_new_tokens: Optional[int] = None,
    on_token: Optional[Callable[[str], None]] = None,
    filter: Optional[dict[str, Any]] = None,
    repeats: int = 1,
    context_order: str = "relevance",
) -> Comparison:
    """Answer `question` from the states of the `k` best passages, then (optionally) from the same passages as text.

    Args:
        model: A `GistModel`.
        memory: A `GistMemory` built with `model`.
        question: The question (also the search query).
        k: Passages to read.
        max_new_tokens: Answer length from gist states.
        full_new_tokens: Answer length of the full-text twin; None = `max_new_tokens`; 0 skips the twin; 1 measures
            its time to first token and memory without decoding a whole answer.
        on_token: Called with each piece of the gist-state answer as it is decoded.
        filter: Metadata filter for the search.
        repeats: Time to first token is the median of this many runs of each twin (the extra runs decode one
            token), which steadies the numbers on a busy machine.
        context_order: The order both twins read the passages in (`GistMemory.ask`): `relevance` (default: the
            model's own ranking, from the states; its time counts in the gist answer's time to first token and is
            `extra["rank_s"]`), `best_last` or `best_first`.
    """
    hits = memory.search(question, k=k, filter=filter)
    t_read = time.perf_counter()
    read, states = memory.reading(question, hits, context_order)
    rank_s = time.perf_counter() - t_read if context_order == "relevance" else 0.0  # the ranking passes (and loads)
    per_pos = kv_bytes_per_position(model)
    pieces = []
    used = call_usage()
    for piece in model.stream(question, states=states, max_new_tokens=max_new_tokens, usage=used):
        pieces.append(piece)
        if on_token is not None:
            on_token(piece)
    u = used.to_dict()
    gist = Usage.from_last_usage(u, per_pos)
    raw = int(u.get("raw_tokens", sum(s.num_tokens for s in states)))
    kept = int(u.get("kept_rows", sum(s.num_kept for s in states)))
    gist.ttft_s = _median_ttft(model, question, states, repeats, gist.ttft_s)
    if rank_s and gist.ttft_s is not None:  # ranking by relevance happens before the answer: it counts
        gist.ttft_s += rank_s
    out = Comparison(question, "".join(pieces).strip(), hits, raw, kept, gist)
    if rank_s:
        out.extra["rank_s"] = round(rank_s, 4)
    n_full = max_new_tokens if full_new_tokens is None else full_new_tokens
    if n_full > 0 and hits:
        prompt = full_text_prompt(question, [h.text for h in read])
        text, full = model.generate_with_usage(prompt, max_new_tokens=n_full)
        out.full = Usage.from_last_usage(full.to_dict(), per_pos)
        out.full.ttft_s = _median_ttft(model, prompt, None, repeats, out.full.ttft_s)
        out.full_answer = text.strip() if n_full == max_new_tokens else ""
    return out


def call_usage() -> Any:
    """A fresh per-call `gist_memory.model.usage.Usage` (imported late: the demo module loads no torch)."""
    from gist_memory.model.usage import Usage as CallUsage

    return CallUsage()


def _median_ttft(model: Any, prompt: str, states: Any, repeats: int, first: float) -> float:
    times = [first]
    for _ in range(max(0, repeats - 1)):
        _, used = model.generate_with_usage(prompt, states=states, max_new_tokens=1)
        times.append(float(used.ttft_s or 0.0))
    times.sort()
    return times[len(times) // 2]


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def saved(gist: float, full: float) -> str:
    """'-71%' (how much smaller gist is than full), or '' when there is nothing to compare."""
    if not full:
        return ""
    return f"{100.0 * (gist - full) / full:+.0f}%"


# ---- the sample corpus ---------------------------------------------------------------------------------------
def load_sample(path: Path = SAMPLE_CORPUS) -> list[dict[str, Any]]:
    """Records of the shipped sample corpus: id, title, text, source, license, url."""
    if not path.is_file():
        raise FileNotFoundError(f"sample corpus missing at {path}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def add_records(memory: Any, records: Sequence[dict[str, Any]], progress: Any = None, batch: int = 8) -> int:
    """Add corpus records not yet in `memory` (id = record id; title/url/license kept as metadata); returns added."""
    present = memory.has_ids([r["id"] for r in records])
    todo = [r for r in records if r["id"] not in present]
    task = progress.add_task("compressing passages", total=len(todo)) if progress is not None and todo else None
    for i in range(0, len(todo), batch):
        group = todo[i : i + batch]
        memory.add_texts(
            [r["text"] for r in group],
            metadatas=[{k: r[k] for k in ("title", "source", "license", "url") if k in r} for r in group],
            ids=[r["id"] for r in group],
            batch_size=batch,
            show_progress=False,
        )
        if task is not None:
            progress.update(task, advance=len(group))
    if todo and getattr(memory, "path", None):
        memory.save()
    return len(todo)


# ---- the demo ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gist_memory.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", default=bool(os.environ.get("GIST_DEMO_QUICK")),
                    help="seconds, for tests: 2 questions, 8 passages, short answers, a temporary store "
                         "(env GIST_DEMO_QUICK=1)")
    ap.add_argument("--model", default=None, help="a saved gist model folder (default: the shipped adapter)")
    ap.add_argument("--base", default=None, help="a base LM folder or hub id (training-free compressor over it)")
    ap.add_argument("--compressor", default=None, help="with --base: gist | pool | pool+anchors")
    ap.add_argument("--ratio", type=float, default=None, help="target compression ratio (default 4)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU)")
    ap.add_argument("--store", default=None, help="memory folder (default: one per model in the user cache)")
    ap.add_argument("-k", type=int, default=3, help="passages read per question")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="answer length (default 48; quick: 8)")
    ap.add_argument("--questions", type=int, default=None, help="how many of the demo questions to ask")
    ap.add_argument("--threads", default=os.environ.get("GIST_MEMORY_THREADS", "auto"),
                    help="torch CPU threads, a number or 'auto' (default: the cores other processes leave idle)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns the exit status."""
    args = _parser().parse_args(argv)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from gist_memory._options import ModelOptions, UserError, quiet_libraries, set_threads

    quiet_libraries()
    out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 100)
    max_new = args.max_new_tokens or (8 if args.quick else 48)
    questions = QUESTIONS[: args.questions or (2 if args.quick else len(QUESTIONS))]
    t_start = time.perf_counter()
    try:
        records = load_sample()
        if args.quick:  # the answering passages and a few others
            want = {qid for _, qid in questions}
            records = [r for r in records if r["id"] in want] + [r for r in records if r["id"] not in want][:6]
        out.print(f"[bold]gist-memory demo[/bold]: {len(records)} passages of the shipped sample corpus "
                  f"(Wikipedia CC BY-SA 4.0, Python docs PSF; see {SAMPLE_CORPUS.parent.name}/ATTRIBUTION.md)")
        threads = set_threads(args.threads)
        t0 = time.perf_counter()
        opts = ModelOptions(model=args.model, base=args.base, compressor=args.compressor, ratio=args.ratio,
                            device=args.device, dtype=args.dtype)
        model, desc = opts.load()
        out.print(f"model: {desc}  [dim]({time.perf_counter() - t0:.1f} s)[/dim]")
        import torch

        out.print(f"KV cache: {human_bytes(kv_bytes_per_position(model))} per position "
                  f"({str(model.dtype).replace('torch.', '')}); torch threads {torch.get_num_threads()}"
                  + (f" (auto, load average {os.getloadavg()[0]:.1f})" if args.threads == "auto" and threads else ""))
        from gist_memory.model.base import cache_dir
        from gist_memory.store import GistMemory

        tmp = None
        if args.store:
            path = Path(args.store)
        elif args.quick:
            tmp = tempfile.TemporaryDirectory(prefix="gist-demo-")
            path = Path(tmp.name) / "memory"
        else:
            path = cache_dir() / "demo" / str(model.fingerprint)[:16]
        t0 = time.perf_counter()
        mem = GistMemory(model, path)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as progress:
            added = add_records(mem, records, progress)
        what = f"compressed {added} passages" if added else f"all {len(records)} passages already compressed"
        out.print(f"memory: {path}  ({what}, {time.perf_counter() - t0:.1f} s)")
        # one untimed answer, so the first question's timings do not include one-off warm-up costs
        model.generate("Hello", states=mem.states_for(mem.search("Hello", k=1)), max_new_tokens=1)
        model.generate("Hello", max_new_tokens=1)
        out.print(f"{len(questions)} questions, {args.k} passages each; time to first token: median of 3 runs; "
                  "* marks the passage that holds the answer")
        rows = []
        for i, (q, expected) in enumerate(questions, 1):
            c = compare(model, mem, q, k=args.k, max_new_tokens=max_new, repeats=3)
            rows.append(c)
            _print_comparison(out, Table, i, c, expected)
        _print_summary(out, Table, rows)
        out.print(f"[dim]done in {time.perf_counter() - t_start:.1f} s; run it again to reuse the stored states[/dim]")
        mem.close()
        if tmp is not None:
            tmp.cleanup()
    except (UserError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


def _print_comparison(out: Any, Table: Any, i: int, c: Comparison, expected: str) -> None:  # noqa: N803
    from rich.markup import escape

    out.print()
    out.print(f"[bold]Q{i}. {escape(c.question)}[/bold]")
    out.print(f"  answer (gist states): {escape(_one_line(c.answer))}")
    if c.full is not None:
        out.print(f"  answer (full text):   {escape(_one_line(c.full_answer))}")
    srcs = []
    for h in c.sources:
        title = str(h.metadata.get("title", "")) or h.id
        mark = "*" if h.id == expected else ""
        srcs.append(f"{escape(title)} ({h.id}{mark}, {h.score:.2f})")
    out.print("  sources: " + "; ".join(srcs) + ("" if any(h.id == expected for h in c.sources)
                                                  else "  [dim](answering passage not retrieved)[/dim]"))
    t = Table(show_header=True, header_style="bold", box=None, padding=(0, 2), pad_edge=False)
    t.add_column("  ", no_wrap=True)
    t.add_column("gist states", justify="right")
    t.add_column("full text", justify="right")
    t.add_column("change", justify="right")
    f = c.full
    t.add_row("  compression ratio", f"{c.ratio:.1f}x", "1.0x", f"{c.raw_tokens} tokens -> {c.kept_rows} rows")
    if f is not None:
        t.add_row("  positions read", str(c.gist.positions), str(f.positions), saved(c.gist.positions, f.positions))
        t.add_row("  time to first token", f"{c.gist.ttft_s:.3f} s", f"{f.ttft_s:.3f} s", saved(c.gist.ttft_s, f.ttft_s))
        t.add_row("  KV memory", human_bytes(c.gist.kv_bytes), human_bytes(f.kv_bytes), saved(c.gist.kv_bytes, f.kv_bytes))
    out.print(t)


def _print_summary(out: Any, Table: Any, rows: list[Comparison]) -> None:  # noqa: N803
    rows = [r for r in rows if r.full is not None]
    if not rows:
        return
    n = len(rows)
    t = Table(title=f"mean over {n} questions", show_header=True, header_style="bold", box=None, padding=(0, 2))
    t.add_column("", no_wrap=True)
    t.add_column("gist states", justify="right")
    t.add_column("full text", justify="right")
    t.add_column("change", justify="right")

    def mean(xs: list[float]) -> float:
        return sum(xs) / max(1, len(xs))

    raw, kept = sum(r.raw_tokens for r in rows), sum(r.kept_rows for r in rows)
    gp, fp = mean([r.gist.positions for r in rows]), mean([r.full.positions for r in rows])  # type: ignore[union-attr]
    gt, ft = mean([r.gist.ttft_s for r in rows]), mean([r.full.ttft_s for r in rows])  # type: ignore[union-attr]
    gk, fk = mean([r.gist.kv_bytes for r in rows]), mean([r.full.kv_bytes for r in rows])  # type: ignore[union-attr]
    t.add_row("compression ratio", f"{raw / max(1, kept):.1f}x", "1.0x", "")
    t.add_row("positions read", f"{gp:.0f}", f"{fp:.0f}", saved(gp, fp))
    t.add_row("time to first token", f"{gt:.3f} s", f"{ft:.3f} s", saved(gt, ft))
    t.add_row("KV memory", human_bytes(gk), human_bytes(fk), saved(gk, fk))
    out.print()
    out.print(t)


def _one_line(s: str, limit: int = 300) -> str:
    s = " ".join(s.split())
    if not s:
        return "(empty answer)"
    return s if len(s) <= limit else s[: limit - 1] + "…"


if __name__ == "__main__":
    raise SystemExit(main())
