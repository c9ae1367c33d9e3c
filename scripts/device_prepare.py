#!/usr/bin/env python3
"""Prepare a GPU training run here (CPU, spaCy): the bundle, the base in parts, and the exact device calls.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/device_prepare.py [--init-from runs/writer-v3/checkpoint]

Writes, under `.device/` (ignored through `.git/info/exclude`, never committed):
  bundle/                       the planned items (gist_memory.train.bundle), the recipe of
                                docs/training/train_writer.py
  base-side/                    config, tokenizer (gzipped), pack.json (tensor types, part list, digests)
  base-partN.safetensors        the embedded SmolLM2's GGUF blocks, split so each device call stays < 64 MiB
  init/                         the adapter to warm-start from (with --init-from)
  calls.json                    the `run` tool calls, in order (also printed)

Each device call carries the working tree (tracked + untracked-not-ignored files) plus what it names in `carry`;
the sizes are measured now, so rerun this after the tree grew. Ignored paths already sent stay on the machine
between back-to-back calls (and the command copies each part to /tmp/gm-parts as well), so the parts go one per
call and the last call carries the bundle and trains. See docs/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CALL_LIMIT = 64 * 2**20
MiB = 2**20


def tree_bytes(root: Path) -> int:
    """What every device call sends anyway: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    total = 0
    for name in out:
        p = root / name
        if name and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    shared = root / "shared"
    if shared.is_dir():
        total += sum(p.stat().st_size for p in shared.rglob("*") if p.is_file())
    return total


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else (p.stat().st_size if p.exists() else 0)


def exclude(root: Path, entry: str = "/.device/") -> None:
    f = root / ".git" / "info" / "exclude"
    f.parent.mkdir(parents=True, exist_ok=True)
    lines = f.read_text().splitlines() if f.is_file() else []
    if entry not in lines:
        f.write_text("\n".join(lines + [entry]) + "\n")


def recipe(a: argparse.Namespace):  # noqa: ANN201 - TrainConfig
    """The TrainConfig of docs/training/train_writer.py (the CPU run the device continues or repeats)."""
    from gist_memory.train.trainer import TrainConfig

    return TrainConfig(
        out_dir="unused", base=a.base, steps=2000,
        gist={"target_ratio": 4.0, "anchors": "capitalized", "max_sentence_tokens": 48, "max_anchor_fraction": 0.75},
        ratios=(4.0, 8.0), curriculum=False, stage="lora", lora_r=16, lora_alpha=32, lr_lora=1e-3, lr_gist=5e-3,
        warmup=20, batch_items=2, cont_items=4, w_qa=0.5, w_distill=1.0, w_cont=1.0, w_recon=a.w_recon,
        recon_on=a.recon_on,
        eval_every=10**9, save_every=25, snapshot_every=25, log_every=1, pool_items=a.pool_items, device="cpu",
    )  # fmt: skip


def main(argv=None) -> int:  # noqa: ANN001
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=".device")
    ap.add_argument("--base", default=None, help="base model (default: the embedded SmolLM2, packed from its GGUF)")
    ap.add_argument("--pool-items", type=int, default=3000, help="training QA items")
    ap.add_argument("--n-cont", type=int, default=6000, help="continuation pairs")
    ap.add_argument("--heldout-per-kind", type=int, default=20)
    ap.add_argument("--init-from", default=None, help="adapter folder to warm-start from on the device")
    ap.add_argument("--margin-mib", type=float, default=3.0, help="room left in each 64 MiB call")
    ap.add_argument("--time-budget", type=int, default=420, help="seconds the training call's script may take")
    ap.add_argument("--batch-items", type=int, default=8, help="QA items per step on the GPU")
    ap.add_argument("--cont-items", type=int, default=8, help="continuation passages per step on the GPU")
    ap.add_argument("--w-recon", type=float, default=1.0,
                    help="reconstruction weight (1.0: the stage-5 mix, the one that moved the FAQ share on CPU)")
    ap.add_argument("--recon-on", choices=("qa", "cont", "both"), default="both")
    ap.add_argument("--skip-bundle", action="store_true", help="keep an existing bundle (repack the base only)")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from gist_memory.model.base import BUNDLED, bundled_base_dir, bundled_gguf_path
    from gist_memory.train import bundle as B

    t0 = time.perf_counter()
    d = ROOT / a.dir
    d.mkdir(exist_ok=True)
    exclude(ROOT, f"/{a.dir.strip('/')}/")
    if not a.skip_bundle:
        if (d / "bundle").exists():
            shutil.rmtree(d / "bundle")
        s = B.build_bundle(d / "bundle", recipe(a), n_cont=a.n_cont, heldout_per_kind=a.heldout_per_kind)
        print(json.dumps(s, indent=1))
    bun = B.DeviceBundle(d / "bundle")
    ident = {k: v for k, v in bun.base.items()}
    extras = [d / "bundle", d / "base-side"]
    if a.init_from:
        if (d / "init").exists():
            shutil.rmtree(d / "init")
        (d / "init").mkdir()
        for n in ("gist_adapter.safetensors", "gist_adapter.json", "gist_config.json"):
            shutil.copy2(Path(a.init_from) / n, d / "init" / n)
        extras.append(d / "init")
    for old in d.glob("base-part*.safetensors"):
        old.unlink()
    tree = tree_bytes(ROOT)
    cap = CALL_LIMIT - tree - int(a.margin_mib * MiB)
    side_guess = 1 * MiB  # tokenizer.json.gz + pack.json
    extra_bytes = sum(dir_bytes(p) for p in extras if p.name != "base-side") + side_guess
    if a.base in (None, BUNDLED):
        meta = B.pack_gguf(bundled_gguf_path(), bundled_base_dir(), d, d / "base-side", ident, limit=cap,
                           last_limit=cap - extra_bytes)  # fmt: skip
    else:
        meta = B.pack_state_dict(a.base, d, d / "base-side", ident, limit=cap)
    parts = [p["file"] for p in meta["parts"]]
    calls = []
    for i, f in enumerate(parts[:-1]):
        calls.append({"command": f"mkdir -p /tmp/gm-parts && cp .device/{f} /tmp/gm-parts/ && ls -l /tmp/gm-parts"
                      + (" && nvidia-smi --query-gpu=name,memory.total --format=csv" if i == 0 else ""),
                      "carry": [f"{a.dir}/{f}"], "timeout_s": 120})  # fmt: skip
    init = " --init-from .device/init" if a.init_from else ""
    train_cmd = (
        f"mkdir -p /tmp/gm-parts && cp .device/{parts[-1]} /tmp/gm-parts/; "
        f"PYTHONUNBUFFERED=1 python3 scripts/device_train.py --bundle {a.dir}/bundle --base-side {a.dir}/base-side "
        f"--parts {a.dir},/tmp/gm-parts --out $OUT --time-budget {a.time_budget} --batch-items {a.batch_items} "
        f"--cont-items {a.cont_items}{init}"
    )
    calls.append({"command": train_cmd, "carry": [f"{a.dir}/{parts[-1]}"] + [f"{a.dir}/{p.name}" for p in extras],
                  "timeout_s": a.time_budget + 60})  # fmt: skip
    sizes = []
    for c in calls:
        carried = sum(dir_bytes(ROOT / p) for p in c["carry"])
        sizes.append({"carried_MiB": round(carried / MiB, 2), "with_tree_MiB": round((carried + tree) / MiB, 2)})
    over = [s for s in sizes if s["with_tree_MiB"] > 64]
    (d / "calls.json").write_text(json.dumps({"calls": calls, "sizes": sizes, "tree_MiB": round(tree / MiB, 2),
                                              "created": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))  # fmt: skip
    print(f"\nworking tree sent with every call: {tree / MiB:.2f} MiB; parts: "
          + ", ".join(f"{p['file']} {p['bytes'] / MiB:.2f} MiB" for p in meta["parts"]))
    print(f"bundle {dir_bytes(d / 'bundle') / MiB:.2f} MiB, base-side {dir_bytes(d / 'base-side') / MiB:.2f} MiB"
          + (f", init {dir_bytes(d / 'init') / MiB:.2f} MiB" if a.init_from else ""))
    print(f"\n{len(calls)} device calls, back to back (each within 30 s of the last), then give_back:")
    for i, (c, s) in enumerate(zip(calls, sizes), 1):
        print(f"\n# call {i}: {s['with_tree_MiB']} MiB with the tree (limit 64)")
        print(json.dumps(c))
    print(f"\nprepared in {time.perf_counter() - t0:.0f}s")
    if over:
        print(f"ERROR: a call would exceed 64 MiB: {over}; rerun with a larger --margin-mib", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
