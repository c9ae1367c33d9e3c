"""Grammar engines for constrained decoding on CPU: llguidance vs xgrammar, with the bundled SmolLM2 tokenizer.

    python scripts/bench_grammar.py [--repeats 20] [--json out.json]

What it measures, for each engine (one thread each: the decode loop computes one mask per token on the CPU):

- tokenizer setup: turning the HF tokenizer (49,152 tokens) into the engine's token table (once per model);
- compile: a JSON-schema grammar for a tool call over three tools (`anyOf` of `{"name": const, "arguments": ...}`),
  from the schema to a matcher ready for its first mask (llguidance builds its lexer lazily, so the first mask is
  counted here too; xgrammar's compile cache is off so every repeat compiles);
- per-token mask: the bitmask over the vocabulary at each of the ~60 tokens of a realistic tool call, fed token by
  token (p50 / p99 / max over all steps of all repeats), checked to allow the token that comes next;
- two grammars: `json` (the schema alone) and `auto` (free text, or tool calls wrapped in `<tool_call>...</tool_call>`:
  a Lark grammar with an inline `%json` for llguidance, a structural tag with a trigger for xgrammar).

The choice this informs (llguidance) is written up in docs/structured_output.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOOLS = [
    {"name": "search_memory", "parameters": {
        "type": "object",
        "properties": {"query": {"type": "string"}, "k": {"type": "integer", "minimum": 1, "maximum": 20}},
        "required": ["query"], "additionalProperties": False}},
    {"name": "get_weather", "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
                       "days": {"type": "integer"}},
        "required": ["city", "unit"], "additionalProperties": False}},
    {"name": "add_note", "parameters": {
        "type": "object",
        "properties": {"title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
                       "pinned": {"type": "boolean"}},
        "required": ["title", "tags"], "additionalProperties": False}},
]
SCHEMA = {"anyOf": [{
    "type": "object",
    "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
    "required": ["name", "arguments"], "additionalProperties": False} for t in TOOLS]}
OUTPUT = json.dumps({"name": "add_note", "arguments": {
    "title": "Archive visit: the northern wing (code QX-4471) needs a pass",
    "tags": ["archive", "Tallin", "1912", "maps"], "pinned": True}})
SEPARATORS = (", ", ": ")


MARK, END = "<tool_call>", "</tool_call>"
# "auto": free text (never containing the marker) or tool calls, each `<tool_call>{json}</tool_call>`
AUTO_LARK = (
    'start: TEXT | calls\n'
    f'TEXT: /(?s:.*)/ & ~/(?s:.*){MARK}(?s:.*)/\n'
    'calls: call ("\\n" call)*\n'
    f'call: "{MARK}" %json {json.dumps(SCHEMA)} "{END}"\n'
)


def _bits(mask_row: Any, token: int) -> bool:
    return bool((int(mask_row[token // 32]) >> (token % 32)) & 1)


def _run(fresh: Any, fill: Any, consume: Any, mask_row: Any, ids: list[int], eos: int, repeats: int,
         tok: Any) -> tuple[list[float], list[float]]:
    """Time `repeats` fresh matchers (compile + first mask) and every later mask while feeding `ids`."""
    compiles, steps = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m = fresh()
        fill(m)
        compiles.append(time.perf_counter() - t0)
        for j, t in enumerate(ids):
            if j:
                t0 = time.perf_counter()
                fill(m)
                steps.append(time.perf_counter() - t0)
            assert _bits(mask_row(), t), f"token {j} ({tok.decode([t])!r}) masked out"
            assert consume(m, t), f"token {j} ({tok.decode([t])!r}) refused"
        fill(m)
        assert _bits(mask_row(), eos), "end of sequence not allowed at the end"
    return compiles, steps


def bench_llguidance(tok: Any, outputs: dict[str, list[int]], repeats: int) -> list[dict[str, Any]]:
    import llguidance
    import llguidance.hf
    import numpy as np

    t0 = time.perf_counter()
    lt = llguidance.hf.from_tokenizer(tok, eos_token=tok.eos_token_id)
    setup = time.perf_counter() - t0
    opts = {"whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1]}
    mask = np.zeros(((lt.vocab_size + 31) // 32,), dtype=np.int32)
    sources = {
        "json": lambda: llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=opts),
        "auto": lambda: llguidance.LLMatcher.grammar_from_lark(AUTO_LARK),
    }
    rows = []
    for kind, ids in outputs.items():
        def fresh(kind: str = kind) -> Any:
            m = llguidance.LLMatcher(lt, sources[kind]())
            assert not m.is_error(), m.get_error()
            return m

        compiles, steps = _run(fresh, lambda m: m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes),
                               lambda m, t: m.consume_token(t), lambda: mask, ids, tok.eos_token_id, repeats, tok)
        rows.append({"engine": f"llguidance {llguidance.__version__}", "grammar": kind, "setup_s": setup,
                     "compile_s": compiles, "mask_s": steps, "tokens": len(ids)})
    return rows


def bench_xgrammar(tok: Any, outputs: dict[str, list[int]], repeats: int) -> list[dict[str, Any]]:
    import warnings
    from importlib.metadata import version

    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, stop_token_ids=[tok.eos_token_id])
    setup = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def compile_auto(c: Any) -> Any:  # free text with tool calls after the trigger (xgrammar's structural tag)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return c.compile_structural_tag([xgr.StructuralTagItem(begin=MARK, schema=json.dumps(s), end=END)
                                             for s in SCHEMA["anyOf"]], [MARK])

    sources = {
        "json": lambda c: c.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=SEPARATORS),
        "auto": compile_auto,
    }
    rows = []
    for kind, ids in outputs.items():
        def fresh(kind: str = kind) -> Any:
            compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return xgr.GrammarMatcher(sources[kind](compiler))

        compiles, steps = _run(fresh, lambda m: m.fill_next_token_bitmask(mask), lambda m, t: m.accept_token(t),
                               lambda: mask[0], ids, tok.eos_token_id, repeats, tok)
        rows.append({"engine": f"xgrammar {version('xgrammar')}", "grammar": kind, "setup_s": setup,
                     "compile_s": compiles, "mask_s": steps, "tokens": len(ids)})
    return rows


def _ms(x: float) -> str:
    return f"{1000 * x:.3f}"


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| engine | grammar | tokenizer setup (ms) | compile + first mask, median (ms) | mask p50 (ms) "
        "| mask p99 (ms) | mask max (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = sorted(r["mask_s"])
        p50 = statistics.median(steps)
        p99 = steps[min(len(steps) - 1, int(0.99 * len(steps)))]
        out.append(f"| {r['engine']} | {r['grammar']} ({r['tokens']} tokens) | {_ms(r['setup_s'])} "
                   f"| {_ms(statistics.median(r['compile_s']))} | {_ms(p50)} | {_ms(p99)} | {_ms(steps[-1])} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20, help="fresh compiles (and decodes of the output) per engine")
    ap.add_argument("--json", default=None, help="also write the raw timings here")
    a = ap.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from gist_memory.model.base import bundled_base_dir

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(bundled_base_dir()))
    outputs = {"json": tok.encode(OUTPUT, add_special_tokens=False),
               "auto": tok.encode(MARK + OUTPUT + END, add_special_tokens=False)}
    rows = bench_llguidance(tok, outputs, a.repeats) + bench_xgrammar(tok, outputs, a.repeats)
    print(f"SmolLM2 tokenizer ({len(tok)} tokens), one thread, {a.repeats} repeats. json: the tool-call schema "
          "(3 tools) alone; auto: free text or tool calls after a `<tool_call>` marker.\n")
    print(table(rows))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
