"""What ingest costs against reading: compression vs a plain batched decoder forward of the same passages, and the
whole ingest (embedding + compression + durable write) vs compression alone, in one process, side by side.

    OMP_NUM_THREADS=1 python -m gist_memory.eval.bench_ingest --threads 1           # shipped adapter, CPU fp32
    python -m gist_memory.eval.bench_ingest --device cuda --dtype bfloat16           # on a GPU

Rows (median seconds over `--repeats` rounds, the rows taking turns so load hits them alike; raw passage tokens/s):
  plain forward   the base model's decoder over the passages, padded batches of `--batch` sorted by length (as
                  `compress` batches), with a KV cache: what reading them once as text costs;
  compress        `GistModel.compress` of the same passages (its text pass carries the gist positions too);
  compress, surprisal / capitalized anchors   the same writer under cheaper anchor rules, shown when the model
                  ranks anchors with the model: recall's extra forward, surprisal's LM head over every token;
  embed           the memory's embedder over the passages (all-MiniLM-L6-v2 by default);
  ingest          `GistMemory.add_texts` into a fresh folder: embedding + compression + the durable write
                  (states to safetensors files, rows to SQLite, vectors to FAISS).
Goals (issue 16): compress >= 0.95x plain forward; ingest >= 0.8x compress. A script prints them; no test times them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional


def passages(tokenizer: Any, n: int, length: int) -> list[str]:
    """`n` passages of about `length` tokens, cut from the shipped sample corpus (distinct texts)."""
    from gist_memory.demo import load_sample

    recs = load_sample()
    out: list[str] = []
    i = 0
    while len(out) < n:
        a, b = recs[i % len(recs)], recs[(i * 7 + 3) % len(recs)]
        ids = tokenizer(a["text"] + " " + b["text"], add_special_tokens=False)["input_ids"]
        shift = (i // len(recs)) * 11  # later rounds start further in, so no two passages are equal
        text = tokenizer.decode(ids[shift: shift + length]).strip()
        if text and text not in out:
            out.append(text)
        i += 1
    return out


def plain_forward(gm: Any, texts: Sequence[str], batch: int) -> None:
    """The base decoder over `texts` in padded batches sorted by length, with a KV cache (no LM head)."""
    import torch

    ids = sorted((gm.encode(t) for t in texts), key=len)
    dec = gm.model.get_decoder()
    pad = gm.tokenizer.pad_token_id if gm.tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for b0 in range(0, len(ids), batch):
            chunk = ids[b0: b0 + batch]
            n = max(len(c) for c in chunk)
            x = torch.full((len(chunk), n), pad, dtype=torch.long, device=gm.device)
            mask = torch.zeros((len(chunk), n), dtype=torch.long, device=gm.device)
            for i, c in enumerate(chunk):
                x[i, : len(c)] = torch.as_tensor(c)
                mask[i, : len(c)] = 1
            dec(input_ids=x, attention_mask=mask, use_cache=True)
    if gm.device.type == "cuda":
        torch.cuda.synchronize()


CAPITALIZED = "compress, capitalized anchors"
SURPRISAL = "compress, surprisal anchors"


def policy_twins(gm: Any) -> dict[str, Any]:
    """The same model and writer under cheaper anchor rules, when `gm` ranks anchors with the model (surprisal
    needs the LM head over every passage token; recall an extra forward over about twice the passage): where the
    time goes. Empty for a rule policy."""
    from gist_memory.config import RECALL_ANCHOR_POLICIES, SCORED_ANCHOR_POLICIES

    out: dict[str, Any] = {}
    if gm.config.anchors in RECALL_ANCHOR_POLICIES:
        out[SURPRISAL] = gm.with_config(anchors="surprisal")
    if gm.config.anchors in SCORED_ANCHOR_POLICIES:
        out[CAPITALIZED] = gm.with_config(anchors="capitalized")
    return out


def measure(gm: Any, texts: Sequence[str], batch: int = 8, repeats: int = 3, embedder: Any = None,
            log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Seconds per row (median of `repeats` interleaved rounds), raw tokens/s and the goal ratios."""
    import torch

    from gist_memory.store.memory import GistMemory

    raw = sum(len(gm.encode(t)) for t in texts)
    emb = GistMemory(gm, None, embedder=embedder)._embedder  # the memory's own embedder, loaded once

    def sync() -> None:
        if gm.device.type == "cuda":
            torch.cuda.synchronize()

    def ingest() -> None:
        with tempfile.TemporaryDirectory(prefix="gist-bench-ingest-") as d:
            mem = GistMemory(gm, os.path.join(d, "mem"), embedder=emb.model)
            try:
                mem.add_texts(list(texts), batch_size=batch, show_progress=False)
                sync()
            finally:
                mem.close()

    rows: dict[str, Callable[[], Any]] = {
        "plain forward": lambda: plain_forward(gm, texts, batch),
        "compress": lambda: (gm.compress(list(texts), batch_size=batch), sync()),
        "embed": lambda: emb.encode(list(texts)),
        "ingest": ingest,
    }
    for label, alt in policy_twins(gm).items():  # where the time goes: the same writer, cheaper anchor rules
        rows[label] = lambda alt=alt: (alt.compress(list(texts), batch_size=batch), sync())
    for fn in rows.values():  # warm-up: allocator, embedder, SQLite, FAISS
        fn()
    secs: dict[str, list[float]] = {k: [] for k in rows}
    for r in range(repeats):
        for k, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            secs[k].append(time.perf_counter() - t0)
        log(f"[bench_ingest] round {r + 1}/{repeats}")
    med = {k: statistics.median(v) for k, v in secs.items()}
    out = {k: {"seconds": med[k], "tokens_per_s": raw / med[k], "all": secs[k]} for k in rows}
    out["compress"]["x_plain"] = med["plain forward"] / med["compress"]
    out["ingest"]["x_compress"] = med["compress"] / med["ingest"]
    out["ingest"]["x_plain"] = med["plain forward"] / med["ingest"]
    return {"rows": out, "raw_tokens": raw, "passages": len(texts), "batch": batch, "repeats": repeats}


def render(res: dict[str, Any]) -> str:
    r = res["rows"]
    lines = [
        f"{res['passages']} passages, {res['raw_tokens']} raw tokens, batches of {res['batch']}, median of "
        f"{res['repeats']} rounds. {res.get('machine', '')}",
        "",
        "| row | seconds | raw tokens/s | vs plain forward | vs compress |",
        "|---|---|---|---|---|",
    ]
    for k in ("plain forward", "compress", SURPRISAL, CAPITALIZED, "embed", "ingest"):
        if k not in r:
            continue
        x = r[k]
        vp = f"{r['plain forward']['seconds'] / x['seconds']:.2f}x" if k != "embed" else "-"
        vc = f"{r['compress']['seconds'] / x['seconds']:.2f}x" if k in ("compress", SURPRISAL, CAPITALIZED, "ingest") else "-"
        lines.append(f"| {k} | {x['seconds']:.2f} | {x['tokens_per_s']:.0f} | {vp} | {vc} |")
    c, i = r["compress"]["x_plain"], r["ingest"]["x_compress"]
    lines += ["", f"Goals: compress >= 0.95x plain forward: {c:.2f}x ({'met' if c >= 0.95 else 'missed'}); "
                  f"ingest >= 0.8x compress: {i:.2f}x ({'met' if i >= 0.8 else 'missed'})."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gist_memory.eval.bench_ingest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="saved gist model folder (default: the shipped adapter)")
    ap.add_argument("--compressor", default=None, help="a fresh model with this compressor (pool, gist) instead")
    ap.add_argument("--base", default=None, help="base model for --compressor (default: bundled SmolLM2)")
    ap.add_argument("--passages", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=150, help="tokens per passage (default 150)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) / bfloat16")
    ap.add_argument("--embedder", default=None, help="embedder id or path (default: bundled all-MiniLM-L6-v2)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    import torch

    from gist_memory import GistConfig, GistModel

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.compressor:
        gm = GistModel.from_base(args.base, GistConfig(compressor=args.compressor), device=device, dtype=dtype)
    else:
        gm = GistModel.from_pretrained(args.model, device=device, dtype=dtype)
    texts = passages(gm.tokenizer, args.passages, args.tokens)
    res = measure(gm, texts, args.batch, args.repeats, args.embedder, log=lambda s: print(s, file=sys.stderr))
    from gist_memory.eval.bench import cpu_model

    dev = torch.cuda.get_device_name(0) if gm.device.type == "cuda" else f"{cpu_model()}, {os.cpu_count()} cores"
    res["machine"] = (f"Machine: {dev}, torch threads {torch.get_num_threads()}, {str(gm.dtype).replace('torch.', '')}, "
                      f"model {gm.name} ({gm.config.compressor}), load {os.getloadavg()[0]:.1f} at the end.")
    res["command"] = "python -m gist_memory.eval.bench_ingest " + " ".join(sys.argv[1:] if argv is None else argv)
    print(render(res))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
