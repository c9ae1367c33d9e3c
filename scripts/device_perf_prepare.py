#!/usr/bin/env python3
"""Prepare the GPU performance job here (CPU, spaCy): the perf bundle, the recorded test splits, pytest wheels, the
base in parts (reused from `device_prepare.py` when they fit) and the exact device calls.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/device_perf_prepare.py            # shipped adapter, 64 passages

Writes, under `.device/` (ignored through `.git/info/exclude`, never committed):
  perf/bundle.safetensors.gz, perf/manifest.json.gz
                     a `gist_memory.train.bundle` bundle with one plan set: `--passages` passages of ~`--tokens`
                     tokens (`gist_memory.eval.bench_ingest.passages`), planned for the adapter at `--ratio`x here
                     (fp32 surprisal: the cross-check of the plans made over there); its manifest's `perf` entry
                     names the adapter (the shipped one travels with the working tree; any other is copied to
                     perf/adapter/) with the sha256 of its files
  perf/splits.json.gz  spaCy's sentence splits of those passages and of every text the selected tests split
                     (`device_splits`), so that plans over there are made exactly as here, without spaCy
  perf/tests-cpu.json  the selected tests' outcomes here (the baseline the CUDA pass is compared with)
  wheels/            pytest and its pure-python dependencies, py3 wheels (the GPU image has no pytest)
  base-side/, base-partN.safetensors   the base in parts (those of `device_prepare.py` if present and right)
  perf-calls.json    the `run` calls (also printed)

See docs/gpu.md, "Performance job".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(SCRIPTS))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MiB = 2**20
#: tests that build models and run them (compression, reading, batching, training) and import nothing the GPU
#: image lacks at module level; tests inside them that need faiss etc. are reported skipped over there
DEFAULT_TESTS = (
    "tests/test_model.py", "tests/test_batching.py", "tests/test_layout.py", "tests/test_with_config.py",
    "tests/test_concurrency.py", "tests/test_plan.py", "tests/test_text_and_bad_input.py", "tests/test_train.py",
    "tests/test_chat_turns.py", "tests/test_heldout.py", "tests/test_bench.py", "tests/test_peers.py",
)  # fmt: skip
WHEELS = ("pytest", "pluggy", "iniconfig", "packaging", "pygments")
PERF_KEY = "perf"


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tracked(p: Path) -> Optional[str]:
    """`p` relative to the checkout when git tracks it (it travels with every device call), else None."""
    try:
        rel = p.resolve().relative_to(ROOT)
    except ValueError:
        return None
    r = subprocess.run(["git", "ls-files", "--error-unmatch", str(rel / "gist_adapter.safetensors")], cwd=ROOT,
                       capture_output=True)  # fmt: skip
    return rel.as_posix() if r.returncode == 0 else None


def build_perf_bundle(out_dir: Any, gm: Any, adapter_dir: Any, *, n: int = 64, tokens: int = 150,
                      ratio: float = 4.0, log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Plan `n` passages of ~`tokens` tokens for `gm` (the model of `adapter_dir`, fp32) at `ratio`x; write the
    perf bundle and the passages' recorded splits into `out_dir`. Returns a summary."""
    import device_splits

    from gist_memory.eval.bench_ingest import passages
    from gist_memory.train import bundle as B

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter = Path(adapter_dir)
    m = gm if float(gm.config.target_ratio or 0) == float(ratio) else gm.with_config(target_ratio=float(ratio))
    texts = passages(m.tokenizer, n, tokens)
    with device_splits.recording() as rec:
        plans = [m.plan(t) for t in texts]
    files = {f.name: _sha256(f) for f in sorted(adapter.iterdir()) if f.is_file()}
    rel = _tracked(adapter)
    if rel is None:  # not in the working tree: it travels inside the perf folder
        if (out / "adapter").exists():
            shutil.rmtree(out / "adapter")
        shutil.copytree(adapter, out / "adapter")
    base = {"base_ref": gm.base_ref, **B.base_identity(gm.model), "base_fingerprint": gm.base_fingerprint()}
    perf = {"adapter": rel, "adapter_copy": rel is None, "adapter_files": files, "ratio": float(ratio),
            "config": m.config.to_dict(), "passages": [p.text for p in plans], "tokens": tokens,
            "raw_tokens": [p.num_tokens for p in plans], "kept_rows": [p.num_kept for p in plans],
            "planned_on": "cpu float32"}  # fmt: skip
    s = B.write_bundle(out, plan_sets=[(m.config, plans)], items=[], cont_pairs=[], answer_ids=[],
                       train_config={}, base=base, extra={PERF_KEY: perf})  # fmt: skip
    splits = out / "splits.json.gz"
    if splits.is_file():
        rec = device_splits.Recording.load(splits).merge(rec)
    rec.save(splits)
    s.update({"passages": len(plans), "raw_tokens": sum(perf["raw_tokens"]), "kept_rows": sum(perf["kept_rows"]),
              "adapter": rel or str(out / "adapter"), "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
    log(f"perf bundle: {len(plans)} passages, {s['raw_tokens']} tokens -> {s['kept_rows']} rows at {ratio:g}x "
        f"({s['seconds']}s)")  # fmt: skip
    return s


def record_tests(out_dir: Any, files: Sequence[str], *, timeout: float = 1800,
                 log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Run `files` here (pytest, not slow) with the splits recorder on: every text they split is added to
    `out_dir/splits.json.gz`; their outcomes go to `out_dir/tests-cpu.json` (the baseline)."""
    import device_splits

    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="gm-rec-") as tmp:
        report = Path(tmp) / "report.jsonl"
        rec = Path(tmp) / "splits.json.gz"
        env = {**os.environ, "GIST_SPLITS_RECORD": str(rec), "GIST_TEST_REPORT": str(report),
               "PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        cmd = [sys.executable, "-m", "pytest", "-p", "device_splits", "-p", "no:cacheprovider", "-m", "not slow",
               "-q", *files]  # fmt: skip
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        secs = round(time.perf_counter() - t0, 1)
        summary = device_splits.summarize(report)
        splits = out / "splits.json.gz"
        got = device_splits.Recording.load(rec) if rec.is_file() else device_splits.Recording()
        if splits.is_file():
            got = device_splits.Recording.load(splits).merge(got)
        got.save(splits)
    summary.update({"files": list(files), "seconds": secs, "returncode": r.returncode, "device": "cpu",
                    "tail": r.stdout[-2000:]})  # fmt: skip
    (out / "tests-cpu.json").write_text(json.dumps(summary, indent=1))
    log(f"tests here ({secs}s): {summary['counts']}; {len(got)} splits recorded in all")
    return summary


def fetch_wheels(dest: Path, log: Callable[[str], None] = print) -> list[str]:
    """pytest and its pure-python dependencies, at this venv's versions, as py3 wheels (pip download)."""
    from importlib.metadata import PackageNotFoundError, version

    dest.mkdir(parents=True, exist_ok=True)
    want = []
    for name in WHEELS:
        try:
            want.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            want.append(name)
    have = [p.name.lower() for p in dest.glob("*.whl")]
    if all(any(h.startswith(w.lower().replace("==", "-") + "-") for h in have) for w in want):
        return sorted(have)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "py", "--platform", "any", "-d", str(dest), *want]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"pip download failed ({' '.join(want)}): {r.stderr[-1500:]}")
    got = sorted(p.name for p in dest.glob("*.whl"))
    log(f"wheels: {', '.join(got)}")
    return got


def _parts_ok(d: Path, side: Path, digest: str) -> Optional[dict]:
    """The packed base already in `d` (from device_prepare.py or an earlier run), if whole and of these weights."""
    f = side / "pack.json"
    if not f.is_file():
        return None
    meta = json.loads(f.read_text())
    if meta.get("weights_digest") != digest:
        return None
    for p in meta.get("parts", []):
        q = d / p["file"]
        if not q.is_file() or q.stat().st_size != p["bytes"]:
            return None
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=".device")
    ap.add_argument("--adapter", default=None, help="gist model folder (default: the shipped adapter)")
    ap.add_argument("--passages", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--tests", nargs="*", default=list(DEFAULT_TESTS), help="test files for the CUDA pass")
    ap.add_argument("--no-tests", action="store_true", help="no CUDA test pass (nothing recorded)")
    ap.add_argument("--keep-tests", action="store_true", help="keep an earlier recording of the tests' splits")
    ap.add_argument("--time-budget", type=int, default=330, help="seconds device_perf.py may take on the device")
    ap.add_argument("--test-budget", type=int, default=150, help="of which at most this for the CUDA test pass")
    ap.add_argument("--margin-mib", type=float, default=3.0)
    ap.add_argument("--repack", action="store_true", help="pack the base again even if the parts there fit")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    import device_prepare as DP

    from gist_memory import GistModel
    from gist_memory.model.adapter_io import default_model_dir
    from gist_memory.model.base import BUNDLED
    from gist_memory.train import bundle as B

    t0 = time.perf_counter()
    d = ROOT / a.dir
    d.mkdir(exist_ok=True)
    DP.exclude(ROOT, f"/{a.dir.strip('/')}/")
    perf = d / "perf"
    keep = {}
    if a.keep_tests and perf.is_dir():
        for n in ("splits.json.gz", "tests-cpu.json"):
            if (perf / n).is_file():
                keep[n] = (perf / n).read_bytes()
    if perf.exists():
        shutil.rmtree(perf)
    perf.mkdir()
    for n, data in keep.items():
        (perf / n).write_bytes(data)
    adapter = Path(a.adapter) if a.adapter else default_model_dir()
    gm = GistModel.from_pretrained(adapter, device="cpu", dtype=torch.float32)
    s = build_perf_bundle(perf, gm, adapter, n=a.passages, tokens=a.tokens, ratio=a.ratio)
    tests: list[str] = [] if a.no_tests else list(a.tests)
    if tests and not keep:
        del gm  # the tests build their own models; keep memory free
        record_tests(perf, tests)
    if tests:
        fetch_wheels(d / "wheels")
    bun = B.DeviceBundle(perf)
    ident = bun.base
    side = d / "base-side"
    tree = DP.tree_bytes(ROOT)
    cap = DP.CALL_LIMIT - tree - int(a.margin_mib * MiB)
    extra = DP.dir_bytes(perf) + (DP.dir_bytes(d / "wheels") if tests else 0) + 1 * MiB
    meta = None if a.repack else _parts_ok(d, side, ident["weights_digest"])
    if meta is not None and meta["parts"][-1]["bytes"] + extra + DP.dir_bytes(side) > cap:
        meta = None  # the last part does not leave room for the perf folder: pack again
    if meta is None:
        for old in d.glob("base-part*.safetensors"):
            old.unlink()
        if ident.get("base_ref") in (None, BUNDLED) or str(ident.get("base_ref", "")).startswith("bundled:"):
            from gist_memory.model.base import bundled_base_dir, bundled_gguf_path

            meta = B.pack_gguf(bundled_gguf_path(), bundled_base_dir(), d, side, ident, limit=cap,
                               last_limit=cap - extra)  # fmt: skip
        else:
            meta = B.pack_state_dict(ident["base_ref"], d, side, ident, limit=cap)
        print("packed the base again: rerun scripts/device_prepare.py --skip-bundle before a training run")
    else:
        print("reusing the base parts already in " + str(d))
    parts = [p["file"] for p in meta["parts"]]
    calls = []
    for i, f in enumerate(parts[:-1]):
        calls.append({"command": f"mkdir -p /tmp/gm-parts && cp {a.dir}/{f} /tmp/gm-parts/ && ls -l /tmp/gm-parts"
                      + (" && nvidia-smi --query-gpu=name,memory.total --format=csv" if i == 0 else ""),
                      "carry": [f"{a.dir}/{f}"], "timeout_s": 120})  # fmt: skip
    cmd = (f"mkdir -p /tmp/gm-parts && cp {a.dir}/{parts[-1]} /tmp/gm-parts/; PYTHONUNBUFFERED=1 python3 "
           f"scripts/device_perf.py --perf {a.dir}/perf --base-side {a.dir}/base-side --parts {a.dir},/tmp/gm-parts "
           f"--wheels {a.dir}/wheels --out $OUT --time-budget {a.time_budget} --test-budget {a.test_budget}"
           + ("" if tests else " --tests none"))  # fmt: skip
    if len(parts) == 1:
        cmd = cmd.replace("; PYTHONUNBUFFERED", " && nvidia-smi --query-gpu=name --format=csv; PYTHONUNBUFFERED")
    carry = [f"{a.dir}/{parts[-1]}", f"{a.dir}/perf", f"{a.dir}/base-side"] + ([f"{a.dir}/wheels"] if tests else [])
    calls.append({"command": cmd, "carry": carry, "timeout_s": a.time_budget + 60})
    sizes = []
    for c in calls:
        carried = sum(DP.dir_bytes(ROOT / p) for p in c["carry"])
        sizes.append({"carried_MiB": round(carried / MiB, 2), "with_tree_MiB": round((carried + tree) / MiB, 2)})
    (d / "perf-calls.json").write_text(json.dumps({"calls": calls, "sizes": sizes, "tree_MiB": round(tree / MiB, 2),
                                                   "perf_MiB": round(DP.dir_bytes(perf) / MiB, 2),
                                                   "created": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))  # fmt: skip
    print(f"\nworking tree sent with every call: {tree / MiB:.2f} MiB; perf folder {DP.dir_bytes(perf) / MiB:.2f} MiB "
          f"(bundle {s['bytes'] / MiB:.2f}, splits {(perf / 'splits.json.gz').stat().st_size / MiB:.2f}, wheels "
          f"{DP.dir_bytes(d / 'wheels') / MiB if tests else 0:.2f}); base-side {DP.dir_bytes(side) / MiB:.2f} MiB")
    print(f"\n{len(calls)} device calls, back to back, then give_back:")
    for i, (c, z) in enumerate(zip(calls, sizes), 1):
        print(f"\n# call {i}: {z['with_tree_MiB']} MiB with the tree (limit 64)")
        print(json.dumps(c))
    print(f"\nprepared in {time.perf_counter() - t0:.0f}s")
    over = [z for z in sizes if z["with_tree_MiB"] > 64]
    if over:
        print(f"ERROR: a call would exceed 64 MiB: {over}; rerun with --repack or a larger --margin-mib",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
