"""Load test: `gist-memory serve` and a LangChain app, each under concurrent clients; prints a table.

    python scripts/load_test.py                        # tiny random model, 32 clients, up to 60 s per target
    python scripts/load_test.py --model bundled --seconds 30 --max-new-tokens 16

For each target, every question is first asked alone (one at a time) to get its reference answer; then
`--clients` threads each ask their own questions in a loop, greedy, until `--seconds` have passed or each client
has made `--max-requests` requests. Every answer under load must equal the reference answer of its question.

Targets:
  server     `gist-memory serve` started in a subprocess on 127.0.0.1 (a free port); documents added through its
             JSON API; clients POST to `/v1/chat/completions` with `model="gist-memory:default"` (the server
             retrieves passages and answers from their gist states).
  langchain  In this process: `GistRetriever` -> `ChatPromptTemplate` -> `ChatGist`, one shared `GistModel`;
             known passages in the prompt are read from their states.

Nothing leaves 127.0.0.1. Exit status 1 when any request failed or any answer differed from its reference.
This is a script, not a timed test: numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PASSAGES = [
    ("Archive", "Maren Voss became the chief curator of the Tallin archive in 1912. She catalogued the maps of "
                "the northern coast. The archive code of the map room is QX-4471."),
    ("Station", "The Kessel station sits at an altitude of 2,318 metres. Trains arrive twice a day in summer and "
                "once a day in winter. The station master is Ilse Brandt."),
    ("Python", "Python is a programming language created by Guido van Rossum. Its first release was in 1991. "
               "It is named after the comedy group Monty Python."),
    ("Paris", "Paris is the capital of France. The river Seine runs through the city. The Louvre holds the "
              "Mona Lisa, painted by Leonardo da Vinci."),
    ("Harbour", "The harbour of Velmar handles 40,000 containers a year. Its lighthouse was built in 1887 and "
                "stands 31 metres tall. The harbour pilot is Tomas Reyes."),
    ("Observatory", "The Orla observatory opened in 1964 on Mount Keld. Its main telescope has a mirror of 2.4 "
                    "metres. The director is Dr. Anja Solberg."),
    ("Bakery", "The Linden bakery on Mill Street bakes 600 loaves every morning. It was founded by Otto Linden in "
               "1931. Its rye bread won the county prize in 2019."),
    ("River", "The river Aune is 212 kilometres long. It rises in the Sorn hills and flows into Lake Mira. Salmon "
              "return to it every autumn."),
]
QUESTIONS = [
    "Who became chief curator of the archive?", "What is the code of the map room?", "When did Maren Voss start?",
    "How high is the Kessel station?", "How often do trains arrive in winter?", "Who is the station master?",
    "Who created Python?", "When was Python first released?", "What is Python named after?",
    "What is the capital of France?", "Which river runs through Paris?", "Who painted the Mona Lisa?",
    "How many containers does Velmar handle?", "When was the lighthouse built?", "Who is the harbour pilot?",
    "When did the Orla observatory open?", "How large is the telescope mirror?", "Who directs the observatory?",
    "How many loaves does the bakery bake?", "Who founded the Linden bakery?", "What prize did the rye bread win?",
    "How long is the river Aune?", "Where does the Aune rise?", "Which fish return to the Aune?",
    "Where is the Linden bakery?", "How tall is the lighthouse?", "On which mountain is the observatory?",
    "What did Maren Voss catalogue?", "Into which lake does the Aune flow?", "What does the Louvre hold?",
    "How often do trains arrive in summer?", "In which year did the rye bread win?",
]


@dataclass
class Run:
    """What one target did under load."""

    target: str
    clients: int
    alone_s: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    distinct: int = 0

    def row(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else float("nan")

        return {
            "target": self.target, "clients": self.clients, "questions": len(QUESTIONS),
            "distinct_answers": self.distinct, "requests": len(self.latencies) + len(self.errors),
            "errors": len(self.errors), "mismatches": len(self.mismatches),
            "alone_p50_s": statistics.median(self.alone_s) if self.alone_s else float("nan"),
            "p50_s": pct(50), "p95_s": pct(95), "max_s": lat[-1] if lat else float("nan"),
            "req_per_s": len(self.latencies) / self.wall_s if self.wall_s else 0.0,
        }


def load(target: str, ask: Callable[[str], str], questions: list[str], clients: int, seconds: float,
         max_requests: int) -> Run:
    """Reference answers alone, then `clients` threads asking their questions until time or count runs out."""
    run = Run(target, clients)
    ref = {}
    for q in questions:
        t0 = time.perf_counter()
        ref[q] = ask(q)
        run.alone_s.append(time.perf_counter() - t0)
    run.distinct = len(set(ref.values()))
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(c: int) -> None:
        for i in range(max_requests):
            if time.monotonic() >= deadline:
                return
            q = questions[(c + i * 7) % len(questions)]  # every client its own order: different questions at once
            t0 = time.perf_counter()
            try:
                got = ask(q)
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                with lock:
                    run.errors.append(f"client {c}: {type(e).__name__}: {e}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                run.latencies.append(dt)
                if got != ref[q]:
                    run.mismatches.append(f"{q!r}: {got!r} != alone {ref[q]!r}")

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 600)
    run.wall_s = time.perf_counter() - t0
    if any(t.is_alive() for t in threads):
        run.errors.append("a client was still waiting 10 minutes after the deadline")
    return run


# ---- the server ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(port: int, method: str, path: str, body: Any = None, timeout: float = 300) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body) if body is not None else None
        conn.request(method, path, data, {"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {raw[:300]!r}")
        return json.loads(raw)
    finally:
        conn.close()


def start_server(model_args: list[str], max_new_tokens: int, log: Path) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("gist-memory", path=os.path.dirname(sys.executable)) or shutil.which("gist-memory")
    if exe is None:
        raise SystemExit("gist-memory is not installed in this environment (pip install -e .)")
    port = free_port()
    cmd = [exe, "serve", "--host", "127.0.0.1", "--port", str(port), "--max-new-tokens", str(max_new_tokens),
           *model_args]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); its log:\n{log.read_text()[-3000:]}")
        try:
            request(port, "GET", "/api/info", timeout=5)
            return proc, port
        except (OSError, RuntimeError):
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the server did not answer within 300 s; its log:\n{log.read_text()[-3000:]}")


def server_target(model_args: list[str], args: argparse.Namespace, workdir: Path) -> Run:
    proc, port = start_server(model_args, args.max_new_tokens, workdir / "server.log")
    try:
        for title, text in PASSAGES:
            request(port, "POST", "/api/documents", {"title": title, "text": text})

        def ask(q: str) -> str:
            body = {"model": "gist-memory:default", "messages": [{"role": "user", "content": q}],
                    "max_tokens": args.max_new_tokens, "temperature": 0}
            out = request(port, "POST", "/v1/chat/completions", body)
            return out["choices"][0]["message"]["content"]

        return load("gist-memory serve (HTTP, /v1/chat/completions)", ask, QUESTIONS, args.clients, args.seconds,
                    args.max_requests)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- the LangChain app ---------------------------------------------------------------------------------------
def langchain_target(model: Any, args: argparse.Namespace) -> Run:
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough
    from langchain_gist_memory import ChatGist, GistRetriever, PassageRegistry

    from gist_memory import GistMemory
    from gist_memory.testing import HashingEmbedder

    memory = GistMemory(model, None, embedder=HashingEmbedder())
    memory.add_texts([t for _, t in PASSAGES], metadatas=[{"title": n} for n, _ in PASSAGES], show_progress=False)
    registry = PassageRegistry()
    retriever = GistRetriever(memory=memory, k=3, registry=registry)
    chat = ChatGist(model=model, registry=registry, max_tokens=args.max_new_tokens)
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from the context."), ("human", "Context:\n{context}\n\nQuestion: {question}")]
    )
    chain = ({"context": retriever | (lambda docs: "\n\n".join(d.page_content for d in docs)),
              "question": RunnablePassthrough()} | prompt | chat | StrOutputParser())
    return load("LangChain app (retriever, prompt, ChatGist)", chain.invoke, QUESTIONS, args.clients,
                args.seconds, args.max_requests)


def load_model_in_process(model_args: list[str]) -> Any:
    from gist_memory import GistConfig, GistModel

    if "--base" in model_args:
        return GistModel.from_base(model_args[model_args.index("--base") + 1], GistConfig(compressor="pool+anchors"),
                                   device="cpu")
    return GistModel.from_base(None, GistConfig(compressor="pool+anchors"), device="cpu")


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["target", "clients", "questions", "distinct_answers", "requests", "errors", "mismatches", "alone_p50_s", "p50_s", "p95_s", "max_s",
            "req_per_s"]
    head = "| " + " | ".join(cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["tiny", "bundled"], default="tiny",
                    help="tiny: a random 2-layer Llama built offline (seconds); bundled: SmolLM2-135M-Instruct with "
                         "the training-free pool+anchors compressor")
    ap.add_argument("--targets", default="server,langchain", help="comma-separated: server, langchain")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0, help="no new request after this many seconds")
    ap.add_argument("--max-requests", type=int, default=20, help="requests per client at most")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.max_requests < 1 or args.max_new_tokens < 1:
        ap.error("--clients, --max-requests and --max-new-tokens must be >= 1, --seconds > 0")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = set(targets) - {"server", "langchain"}
    if bad:
        ap.error(f"unknown targets {sorted(bad)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory(prefix="gm-load-") as tmp:
        workdir = Path(tmp)
        if args.model == "tiny":
            from gist_memory.testing import build_tiny_base

            model_args = ["--base", build_tiny_base(workdir / "tiny", "llama"), "--compressor", "pool+anchors",
                          "--device", "cpu"]
        else:
            model_args = ["--compressor", "pool+anchors", "--device", "cpu"]
        rows = []
        for t in targets:
            print(f"[load test] {t}: reference answers alone, then {args.clients} clients for up to "
                  f"{args.seconds:.0f} s ...", file=sys.stderr, flush=True)
            if t == "server":
                run = server_target(model_args, args, workdir)
            else:
                run = langchain_target(load_model_in_process(model_args), args)
            for e in (run.errors + run.mismatches)[:5]:
                print(f"  {e}", file=sys.stderr)
            rows.append(run.row())
    import torch

    print(f"\nmodel: {args.model} (pool+anchors, greedy, {args.max_new_tokens} new tokens); {args.clients} clients; "
          f"up to {args.seconds:.0f} s and {args.max_requests} requests per client")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} intra-op threads)\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    failed = sum(r["errors"] + r["mismatches"] for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
