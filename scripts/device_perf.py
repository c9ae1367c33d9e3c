#!/usr/bin/env python3
"""The performance job of the GPU machine: speed of the shipped model in bf16 on CUDA, and a CUDA test pass, in one
script, from the perf bundle and the packed base alone (no spaCy, faiss or gguf there). It also runs on CPU (fp32).

    python3 scripts/device_perf.py --perf .device/perf --base-side .device/base-side --parts .device,/tmp/gm-parts \\
        --wheels .device/wheels --out "$OUT" --time-budget 330

Within `--time-budget` seconds of its own wall time it:

1. rebuilds the base from its parts (`device_train.load_base`: weights digest checked against the bundle's),
   loads the adapter the bundle names (sha256 of its files checked) with `GistModel.from_pretrained` in
   `--dtype` (bf16 on CUDA) and replays the sentence splits recorded here (`device_splits`), so every plan is
   made over there exactly as here (anchors ranked by the model's own surprisal, as `compress` does);
2. compression: raw tokens/s of `GistModel.compress` vs a plain batched decoder forward of the same passages
   (`bench_ingest.plain_forward`), at each of `--batches`; also that forward with a dense 4D float mask (what a
   float mask costs where the fast kernels drop out), compress's first pass alone (text pass + anchor scores; the
   rest of compress is the writer pass, whose gist rows carry a dense 4D float mask) and, for a surprisal writer,
   compress with capitalisation anchors (no LM head over every token);
3. TTFT from states vs full text at each of `--ks` passages (`engine_speed.ttft_breakdown`), and decode tokens/s
   from states vs full text (generate 1 vs 1 + `--decode-tokens` tokens);
4. serving: answers/s at `--clients` concurrent clients, `Batcher` vs one request at a time
   (`bench_serving.run_mode`, k = 4 passages per request);
5. how many plans made here (bf16) equal the CPU's fp32 plans in the bundle;
6. the CUDA test pass: pytest (from `--wheels` if the machine has none) over the recorded test files, every test
   model built on this device (`GIST_TEST_DEVICE`), splits replayed; a test needing faiss/spaCy/... or a text
   never recorded is reported skipped. At most `--test-budget` seconds.

Writes to `--out` (< 8 files): `perf.json` (every row, the environment, the plan check, skipped sections),
`perf.md` (the tables, also printed), `tests.json` (per test: outcome, seconds, message; counts; differences from
the CPU baseline recorded here), `tests.log` (pytest's output), and `states.safetensors` with `--dump-states N`
(the first N passages' states, for the CPU check in tests/test_device_perf.py). perf.json and perf.md are
rewritten after every section, so a run stopped early still returns what it measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(SCRIPTS))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTION = "Question: Which of these topics is described first?\nAnswer:"
BLOCKABLE = ("spacy", "faiss", "gguf")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--perf", default=".device/perf", help="perf bundle folder (scripts/device_perf_prepare.py)")
    ap.add_argument("--base-side", help="packed base: the folder with pack.json, config and tokenizer")
    ap.add_argument("--parts", default=".device", help="comma-separated folders holding base-part*.safetensors")
    ap.add_argument("--base-dir", help="instead of parts: an HF model folder")
    ap.add_argument("--adapter", default=None, help="adapter folder (default: the one the bundle names)")
    ap.add_argument("--wheels", default=None, help="folder of py3 wheels (pytest ...) used when pytest is missing")
    ap.add_argument("--out", default=os.environ.get("OUT") or "device-out")
    ap.add_argument("--time-budget", type=float, default=330.0, help="seconds for the whole script")
    ap.add_argument("--device", default=None, help="default: cuda when present")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--passages", type=int, default=None, help="use the bundle's first N passages (default: all)")
    ap.add_argument("--batches", default="8,32", help="compression batch sizes")
    ap.add_argument("--ks", default="8,32", help="passages per prompt for TTFT and decode")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--answers", type=int, default=2, help="answers per client (at least 8 per run in all)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens per served answer")
    ap.add_argument("--serve-k", type=int, default=4, help="passages read per served request")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (median; serving: best)")
    ap.add_argument("--serve-repeats", type=int, default=2)
    ap.add_argument("--tests", default=None, help="pytest files/args, space-separated (default: the recorded "
                                                  "ones), or 'none'")  # fmt: skip
    ap.add_argument("--test-budget", type=float, default=150.0, help="most seconds for the test pass")
    ap.add_argument("--dump-states", type=int, default=0, help="write the first N passages' states")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--allow-other-base", action="store_true")
    return ap.parse_args(argv)


def log(msg: str) -> None:
    print(f"[device_perf] {msg}", flush=True)


class Clock:
    def __init__(self, budget: float) -> None:
        self.t0 = time.perf_counter()
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


# --------------------------------------------------------------------------------------------------------------
# loading


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def load_model(a: argparse.Namespace, bundle: Any, perf: dict) -> tuple[Any, dict]:
    """(GistModel, info): the packed base (digest checked), the bundle's adapter on `a.device` in `a.dtype`."""
    import device_train

    import gist_memory.model.adapter_io as aio
    from gist_memory import GistModel

    ns = argparse.Namespace(base_dir=a.base_dir, base_side=a.base_side, parts=a.parts,
                            allow_other_base=a.allow_other_base)  # fmt: skip
    t0 = time.perf_counter()
    lm, tok, same = device_train.load_base(ns, bundle)
    bundle.check_tokenizer(tok)
    t_base = time.perf_counter() - t0
    try:  # as gist_memory.model.base.load_base builds it
        lm.set_attn_implementation("sdpa")
    except Exception as e:  # noqa: BLE001 - an older transformers: keep its default, say so
        log(f"set_attn_implementation('sdpa') failed ({e!r}); keeping {lm.config._attn_implementation}")
    if a.adapter:
        src = Path(a.adapter)
    elif perf.get("adapter_copy"):
        src = Path(a.perf) / "adapter"
    else:
        src = ROOT / perf["adapter"]
    bad = [n for n, h in perf.get("adapter_files", {}).items() if not (src / n).is_file() or _sha256(src / n) != h]
    if bad and not a.adapter:
        raise SystemExit(f"the adapter at {src} is not the one the bundle was planned for: {bad} differ")
    tmp = Path(tempfile.mkdtemp(prefix="gm-perf-adapter-"))
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    meta = json.loads((tmp / "gist_adapter.json").read_text())
    fp_adapter = meta.get("base_fingerprint")
    if same and fp_adapter and fp_adapter == bundle.base.get("base_fingerprint"):
        # the weights are those the adapter was trained on, bit for bit (digest); the fingerprint differs across
        # machines only through the config dict transformers writes
        meta.pop("base_fingerprint")
        (tmp / "gist_adapter.json").write_text(json.dumps(meta))
    load0 = aio.load_base

    def load_base(base: Any, *, dtype: Any = None, device: Any = None, **kw: Any) -> tuple:  # noqa: ARG001
        return lm.to(device=device, dtype=dtype).eval(), tok, base

    aio.load_base = load_base
    try:
        gm = GistModel.from_pretrained(tmp, device=a.device, dtype=a.torch_dtype,
                                       config_overrides={"target_ratio": perf["ratio"]})  # fmt: skip
    finally:
        aio.load_base = load0
    fp_here = gm.base_fingerprint()
    info = {"base_digest_ok": same, "adapter": str(src), "adapter_files_ok": not bad, "load_base_s": round(t_base, 1),
            "base_fingerprint_adapter": fp_adapter, "base_fingerprint_here": fp_here, "model": gm.name,
            "config": gm.config.to_dict(), "lora_r": gm.writer.r if gm.writer is not None else 0,
            "attn_implementation": getattr(lm.config, "_attn_implementation", None)}  # fmt: skip
    return gm, info


# --------------------------------------------------------------------------------------------------------------
# measurements


def _sync(gm: Any) -> None:
    import torch

    if gm.device.type == "cuda":
        torch.cuda.synchronize()


def plain_forward_4d(gm: Any, texts: list[str], batch: int) -> None:
    """`bench_ingest.plain_forward` with the causal + padding mask given as a dense 4D float mask (B, 1, N, N)."""
    import torch

    ids = sorted((gm.encode(t) for t in texts), key=len)
    dec = gm.model.get_decoder()
    pad = gm.tokenizer.pad_token_id if gm.tokenizer.pad_token_id is not None else 0
    dt = gm._mask_dtype()
    with torch.no_grad():
        for b0 in range(0, len(ids), batch):
            chunk = ids[b0 : b0 + batch]
            n = max(len(c) for c in chunk)
            x = torch.full((len(chunk), n), pad, dtype=torch.long, device=gm.device)
            lens = torch.as_tensor([len(c) for c in chunk], device=gm.device)
            for i, c in enumerate(chunk):
                x[i, : len(c)] = torch.as_tensor(c)
            ar = torch.arange(n, device=gm.device)
            allowed = (ar[None, :, None] >= ar[None, None, :]) & (ar[None, None, :] < lens[:, None, None])
            mask = torch.zeros(allowed.shape, dtype=dt, device=gm.device).masked_fill(~allowed, torch.finfo(dt).min)
            dec(input_ids=x, attention_mask=mask[:, None], use_cache=True)
    _sync(gm)


def compress_pass1(gm: Any, texts: list[str], batch: int) -> None:
    """What `compress` does before the writer: plans, the text pass in its batches and (scored anchor policies) the
    anchor scores (surprisal: the LM head over every token; recall: its extra forward), plans finished from them."""
    import torch

    from gist_memory.config import RECALL_ANCHOR_POLICIES
    from gist_memory.model.plan import finish_plan

    plans = [gm._provisional_plan(t) for t in texts]
    order = sorted(range(len(plans)), key=lambda i: plans[i].num_tokens)
    with torch.no_grad():
        for b0 in range(0, len(order), batch):
            idx = order[b0 : b0 + batch]
            score = [i for i in idx if not plans[i].scored]
            _text, hidden = gm._text_pass([plans[i].ids.tolist() for i in idx], want_hidden=bool(score))
            for b, i in enumerate(idx):
                if not plans[i].scored:
                    ids_i = plans[i].ids.tolist()
                    sup = (gm.token_recall(ids_i) if gm.config.anchors in RECALL_ANCHOR_POLICIES
                           else gm._surprisal(hidden[b, : plans[i].num_tokens], ids_i))
                    plans[i] = finish_plan(plans[i], gm.config, gm.splitter, sup)
    _sync(gm)


def compression(gm: Any, texts: list[str], batch: int, repeats: int, deadline: float) -> list[dict]:
    from gist_memory.eval.bench_ingest import plain_forward, policy_twins

    raw = sum(len(gm.encode(t)) for t in texts)
    fns: dict[str, Callable[[], Any]] = {
        "plain forward": lambda: plain_forward(gm, texts, batch),
        "plain forward, dense 4D float mask": lambda: plain_forward_4d(gm, texts, batch),
        "compress pass 1 (text pass + anchor scores)": lambda: compress_pass1(gm, texts, batch),
        "compress": lambda: (gm.compress(texts, batch_size=batch), _sync(gm)),
    }
    for label, twin in policy_twins(gm).items():  # the same writer under cheaper anchor rules
        fns[label] = lambda twin=twin: (twin.compress(texts, batch_size=batch), _sync(gm))
    for fn in fns.values():  # warm-up: allocator, kernels
        fn()
    secs: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):  # rows take turns
        if r and time.perf_counter() > deadline:
            break
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            secs[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in secs.items()}
    rows = []
    for k, s in med.items():
        row = {"section": "compress", "batch": batch, "what": k, "passages": len(texts), "raw_tokens": raw,
               "seconds": s, "tokens_per_s": raw / s, "x_plain": med["plain forward"] / s, "rounds": len(secs[k])}
        rows.append(row)
    writer = med["compress"] - med["compress pass 1 (text pass + anchor scores)"]
    rows.append({"section": "compress", "batch": batch, "what": "compress pass 2 (writer; compress - pass 1)",
                 "passages": len(texts), "raw_tokens": raw, "seconds": writer,
                 "tokens_per_s": raw / writer if writer > 0 else float("inf"),
                 "share_of_compress": writer / med["compress"], "rounds": len(secs["compress"])})  # fmt: skip
    return rows


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def decode(gm: Any, texts: list[str], k: int, new: int, repeats: int) -> list[dict]:
    """Decode tokens/s after a prompt from `k` states vs from the `k` passages as text: the time of generating
    1 + `new` tokens minus that of 1 token (the prefill and the first pick), greedy, end-of-turn ignored."""
    states = gm.compress(texts[:k], batch_size=8)
    full = "\n\n".join(texts[:k]) + "\n\n" + QUESTION
    rows = []
    for what, prompt, st in (("states", QUESTION, states), ("full text", full, None)):
        def gen(n: int, prompt: str = prompt, st: Any = st) -> Any:
            out = gm.generate(prompt, states=st, max_new_tokens=n, eos_token_id=-1)
            _sync(gm)
            return out

        gen(1 + new)  # warm-up
        t1 = _median_time(lambda: gen(1), repeats)
        tn = _median_time(lambda: gen(1 + new), repeats)
        rows.append({"section": "decode", "k": k, "from": what, "new_tokens": new, "first_token_s": t1,
                     "total_s": tn, "tokens_per_s": new / max(1e-9, tn - t1)})  # fmt: skip
    return rows


def serving(gm: Any, texts: list[str], a: argparse.Namespace, clients: list[int], deadline: float) -> list[dict]:
    """answers/s at each number of concurrent clients: `Batcher` vs one request at a time (bench_serving)."""
    import bench_serving

    from gist_memory.server.batcher import Batcher

    states = gm.compress(texts, batch_size=8)
    gen = {"max_new_tokens": a.max_new_tokens, "eos_token_id": -1}
    questions = []
    for i in range(max(16, max(clients) * a.answers)):
        picks = [(i * a.serve_k + j) % len(states) for j in range(a.serve_k)]
        questions.append((f"{QUESTION} ({i})", [states[p] for p in picks]))
    lock = threading.Lock()

    def serialised(q: str, st: Any) -> str:
        with lock:
            return gm.generate(q, states=st, **gen)

    batcher = Batcher(gm, max_batch=max(16, max(clients)))
    asks = {"serialised": serialised, "batched": lambda q, st: batcher.generate(q, st, **gen)}
    rows: list[dict] = []
    try:
        serialised(*questions[0])  # warm-up
        batcher.generate(*questions[1], **gen)
        ref: dict[int, str] = {}
        for n in clients:
            if rows and time.perf_counter() > deadline:
                log(f"time budget: serving from {n} clients on skipped")
                break
            per = max(a.answers, -(-8 // n))
            best: dict[str, tuple[int, float]] = {}
            differ = {m: 0 for m in asks}
            for _ in range(a.serve_repeats):
                for mode, ask in asks.items():
                    wall, answers = bench_serving.run_mode(mode, ask, questions, n, per)
                    if mode == "serialised":
                        for qi, ans in answers.values():
                            ref.setdefault(qi, ans)
                    differ[mode] += sum(1 for qi, ans in answers.values() if qi in ref and ref[qi] != ans)
                    if mode not in best or wall < best[mode][1]:
                        best[mode] = (len(answers), wall)
            base = best["serialised"][0] / best["serialised"][1]
            for mode, (cnt, wall) in best.items():
                rows.append({"section": "serving", "clients": n, "mode": mode, "answers": cnt, "wall_s": wall,
                             "answers_per_s": cnt / wall, "x_serialised": cnt / wall / base,
                             "unlike_serialised": differ[mode], "k": a.serve_k,
                             "new_tokens": a.max_new_tokens})  # fmt: skip
    finally:
        batcher.close()
    return rows


def plan_check(gm: Any, bundle: Any, texts: list[str]) -> dict:
    """How many plans made here (the model's own surprisal in its dtype) equal the CPU fp32 plans of the bundle."""
    same = anchors = 0
    for t in texts:
        here, there = gm.plan(t), bundle.plan(gm.config, t)
        anchors += int(bool((here.anchors == there.anchors).all()))
        same += int(here.pieces == there.pieces and here.n_other == there.n_other
                    and bool((here.anchors == there.anchors).all()))  # fmt: skip
    return {"passages": len(texts), "plans_equal": same, "anchors_equal": anchors}


def dump_states(gm: Any, texts: list[str], n: int, out: Path) -> None:
    from safetensors.torch import save_file

    states = gm.compress(texts[:n], batch_size=8)
    t = {}
    for i, s in enumerate(states):
        t[f"{i}.keys"] = s.keys.contiguous()
        t[f"{i}.values"] = s.values.contiguous()
        t[f"{i}.positions"] = s.positions.contiguous()
        t[f"{i}.kinds"] = s.kinds.contiguous()
    save_file(t, str(out / "states.safetensors"))


# --------------------------------------------------------------------------------------------------------------
# the CUDA test pass


def run_test_pass(a: argparse.Namespace, perf: dict, device: str, out: Path, budget: float) -> dict:
    import importlib.util

    import device_splits

    pdir = Path(a.perf)
    baseline_f = pdir / "tests-cpu.json"
    baseline = json.loads(baseline_f.read_text()) if baseline_f.is_file() else {}
    files = a.tests.split() if a.tests else list(baseline.get("files", []))
    if not files:
        return {"skipped": "no test files (none recorded; give --tests)"}
    paths = [str(SCRIPTS), str(ROOT)]
    if importlib.util.find_spec("pytest") is None:
        wheels = sorted(Path(a.wheels or pdir.parent / "wheels").glob("*.whl"))
        if not wheels:
            return {"skipped": "pytest is not installed here and no wheels were given (--wheels)"}
        site = Path(tempfile.mkdtemp(prefix="gm-wheels-"))
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(site)
        paths.insert(0, str(site))
    report = Path(tempfile.mkdtemp(prefix="gm-tests-")) / "report.jsonl"
    blocked = [m for m in BLOCKABLE if m in sys.modules and sys.modules[m] is None]  # rehearsal on CPU
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]),
           "GIST_SPLITS_REPLAY": str((pdir / "splits.json.gz").resolve()), "GIST_TEST_REPORT": str(report),
           "GIST_TEST_BLOCK": ",".join(blocked), "GIST_TEST_DEVICE": device if device != "cpu" else ""}  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-p", "device_splits", "-p", "no:cacheprovider", "-m", "not slow",
           "-q", "-rfE", "--tb=short", *files]  # fmt: skip
    t0 = time.perf_counter()
    timed_out = False
    with open(out / "tests.log", "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(5.0, budget))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    secs = round(time.perf_counter() - t0, 1)
    log_f = out / "tests.log"
    if log_f.stat().st_size > 4 * 2**20:  # keep the tail (the summary) under the return limits
        data = log_f.read_bytes()[-4 * 2**20 :]
        log_f.write_bytes(data)
    summary = device_splits.summarize(report, baseline.get("tests"))
    summary.update({"files": files, "device": device, "seconds": secs, "returncode": rc, "timed_out": timed_out,
                    "baseline_counts": baseline.get("counts"), "blocked": blocked})  # fmt: skip
    (out / "tests.json").write_text(json.dumps(summary, indent=1))
    return summary


# --------------------------------------------------------------------------------------------------------------
# report


def render(res: dict) -> str:
    from gist_memory.eval.engine_speed import render_breakdown

    env, m = res["env"], res.get("model", {})
    rows = res["rows"]
    lines = [f"# Performance job: {env.get('gpu') or env.get('cpu')}", "",
             f"{env.get('gpu') or env.get('cpu')}, {env['dtype']}, torch {env['torch']}, transformers "
             f"{env['transformers']}, attention {m.get('attn_implementation')}; model {m.get('model')} "
             f"(target ratio {m.get('config', {}).get('target_ratio')}x, anchors {m.get('config', {}).get('anchors')}); "
             f"{res.get('passages', {}).get('n')} passages of ~{res.get('passages', {}).get('tokens')} tokens planned "
             "on CPU (splits replayed). Medians of the rounds shown (serving: best round).", ""]  # fmt: skip
    comp = [r for r in rows if r["section"] == "compress"]
    for b in sorted({r["batch"] for r in comp}):
        lines += [f"## Compression, batches of {b}", "", "| row | seconds | raw tokens/s | vs plain forward |",
                  "|---|---|---|---|"]  # fmt: skip
        for r in (r for r in comp if r["batch"] == b):
            vs = f"{r['x_plain']:.2f}x" if "x_plain" in r else f"{r['share_of_compress']:.0%} of compress"
            lines.append(f"| {r['what']} | {r['seconds']:.4f} | {r['tokens_per_s']:.0f} | {vs} |")
        lines.append("")
    tt = [r for r in rows if r["section"] == "ttft"]
    if tt:
        lines += ["## Time to first token, states vs full text", "", render_breakdown(tt)]
    dec = [r for r in rows if r["section"] == "decode"]
    if dec:
        lines += ["## Decode", "", "| k | from | first token s | tokens/s after it |", "|---|---|---|---|"]
        lines += [f"| {r['k']} | {r['from']} | {r['first_token_s']:.4f} | {r['tokens_per_s']:.1f} |" for r in dec]
        lines.append("")
    srv = [r for r in rows if r["section"] == "serving"]
    if srv:
        r0 = srv[0]
        lines += [f"## Serving (k = {r0['k']} passages from states, {r0['new_tokens']} new tokens, greedy)", "",
                  "| clients | mode | answers | wall s | answers/s | vs serialised | unlike serialised |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['clients']} | {r['mode']} | {r['answers']} | {r['wall_s']:.2f} | {r['answers_per_s']:.2f} | "
                  f"{r['x_serialised']:.2f}x | {r['unlike_serialised']} |" for r in srv]  # fmt: skip
        lines.append("")
    if res.get("plans"):
        p = res["plans"]
        lines += [f"Plans made here equal to the CPU fp32 plans: {p['plans_equal']}/{p['passages']} "
                  f"(anchors equal: {p['anchors_equal']}).", ""]  # fmt: skip
    t = res.get("tests")
    if t:
        lines += ["## Test pass", ""]
        if "counts" in t:
            lines.append(f"{t['device']}: {t['counts']} in {t['seconds']}s over {' '.join(t['files'])}"
                         f"{' (timed out)' if t.get('timed_out') else ''}; here on CPU: {t.get('baseline_counts')}.")
            bad = {k: v for k, v in t["tests"].items() if v["outcome"] in ("failed", "error")}
            for k, v in list(bad.items())[:40]:
                lines.append(f"- {v['outcome']}: `{k}`: {v['message'][:200]}")
        else:
            lines.append(str(t.get("skipped")))
        lines.append("")
    if res.get("skipped") or res.get("errors"):
        lines += ["## Not measured", ""] + [f"- {s}" for s in res.get("skipped", []) + res.get("errors", [])] + [""]
    lines.append(f"Script time {res.get('seconds')} s of a {res['time_budget']} s budget.")
    return "\n".join(lines) + "\n"


def write(res: dict, out: Path) -> None:
    res["seconds"] = round(res["clock"].elapsed(), 1)
    doc = {k: v for k, v in res.items() if k != "clock"}
    (out / "perf.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "perf.md").write_text(render(doc))


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    clock = Clock(a.time_budget)
    import platform

    import device_splits
    import torch
    import transformers

    from gist_memory.train.bundle import DeviceBundle

    if a.threads:
        torch.set_num_threads(a.threads)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    a.torch_dtype = getattr(torch, a.dtype)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = DeviceBundle(a.perf)
    perf = bundle.manifest.get("perf")
    if not perf:
        raise SystemExit(f"{a.perf} is a device bundle without a perf entry (scripts/device_perf_prepare.py)")
    device_splits.install_replay(device_splits.Recording.load(Path(a.perf) / "splits.json.gz"))
    texts = list(perf["passages"])[: a.passages or None]
    cpu = platform.processor() or platform.machine()
    env = {"device": a.device, "dtype": a.dtype, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": sys.version.split()[0], "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else None,
           "cpu": f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
           "blocked": [m for m in BLOCKABLE if m in sys.modules and sys.modules[m] is None]}  # fmt: skip
    res: dict[str, Any] = {"clock": clock, "time_budget": a.time_budget, "env": env, "rows": [], "skipped": [],
                           "errors": [], "passages": {"n": len(texts), "tokens": perf.get("tokens")}}  # fmt: skip
    gm, info = load_model(a, bundle, perf)
    res["model"] = info
    log(f"ready in {clock.elapsed():.1f}s: {json.dumps(env)}; base digest ok: {info['base_digest_ok']}; "
        f"{gm.name}, attention {info['attn_implementation']}")
    if a.dump_states:
        dump_states(gm, texts, a.dump_states, out)
    batches = [int(x) for x in a.batches.split(",") if x.strip()]
    ks = [int(x) for x in a.ks.split(",") if x.strip()]
    clients = [int(x) for x in a.clients.split(",") if x.strip()]
    run_tests = (a.tests or "").strip().lower() != "none"
    reserve = min(a.test_budget, max(0.0, a.time_budget * 0.45)) if run_tests else 0.0
    share = {"compress": 0.35, "ttft": 0.5, "decode": 0.6, "serving": 0.95}  # of the time before the test pass

    def deadline(section: str) -> float:
        return clock.t0 + (a.time_budget - reserve) * share[section]

    def section(name: str, fn: Callable[[], Any]) -> None:
        if time.perf_counter() > deadline(name) and name != "compress":
            res["skipped"].append(f"{name}: time budget reached")
            log(f"time budget: {name} skipped")
            return
        t = time.perf_counter()
        try:
            with torch.no_grad():
                got = fn()
            if isinstance(got, list):
                res["rows"].extend(got)
        except Exception as e:  # noqa: BLE001 - one section failing leaves the others
            import traceback

            res["errors"].append(f"{name}: {e!r}")
            log(f"{name} failed: {traceback.format_exc()}")
        log(f"{name} done in {time.perf_counter() - t:.1f}s ({clock.elapsed():.0f}s in all)")
        write(res, out)

    for b in batches:
        section("compress", lambda b=b: compression(gm, texts, b, a.repeats, deadline("compress")))
    for k in ks:
        from gist_memory.eval.engine_speed import ttft_breakdown

        section("ttft", lambda k=k: [{"section": "ttft", **ttft_breakdown(gm, texts[:k], max(3, a.repeats))}])
    for k in ks:
        section("decode", lambda k=k: decode(gm, texts, k, a.decode_tokens, a.repeats))
    section("serving", lambda: serving(gm, texts, a, clients, deadline("serving")))
    try:
        res["plans"] = plan_check(gm, bundle, texts)
    except Exception as e:  # noqa: BLE001
        res["errors"].append(f"plans: {e!r}")
    write(res, out)
    if run_tests:
        budget = min(a.test_budget, clock.left() - 10)
        if budget < 20:
            res["tests"] = {"skipped": f"time budget: {budget:.0f}s left for the test pass"}
        else:
            log(f"test pass on {a.device}, at most {budget:.0f}s")
            res["tests"] = run_test_pass(a, perf, a.device, out, budget)
    write(res, out)
    print(render({k: v for k, v in res.items() if k != "clock"}), flush=True)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    log(f"done in {clock.elapsed():.1f}s: {files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
