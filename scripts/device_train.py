#!/usr/bin/env python3
"""Train the gist writer on a GPU machine from a device bundle alone (no spaCy, no corpus, no registry).

    python3 scripts/device_train.py --bundle .device/bundle --base-side .device/base-side \\
        --parts .device,/tmp/gm-parts --out "$OUT" --time-budget 420

What it does, within `--time-budget` seconds of its own wall time (loading, training and the report):

1. rebuilds the base model from its parts (`--base-side` + `--parts`; or `--base-dir`, an HF folder) and checks
   its weights digest and tokenizer against the bundle's (same weights as the CPU machine, bit for bit);
2. builds the `GistModel` with the bundle's `TrainConfig` recipe; every plan comes from the bundle;
3. trains (CUDA: fp32 weights, bf16 autocast) in chunks of `--snapshot-every` steps; after a probe chunk the
   cosine schedule is fitted to the steps the budget allows (`--max-steps` caps it);
4. writes, to `--out` (at most 8 files, each < 16 MiB, as the device's $OUT returns them):
   `adapter/` (gist_adapter.safetensors, gist_adapter.json, gist_config.json: format 2, `save_pretrained`,
   reloadable with `GistModel.from_pretrained`), `snapshots.tar` (intermediate adapters, LoRA in bf16),
   `log.jsonl` (the trainer's log), `heldout.jsonl` (held-out cells, the table's results format),
   `report.md` (a json summary, dev and held-out numbers), `train_config.json` (for `ship`'s model card);
5. prints the dev numbers (trainer kinds, 4x/8x) and the held-out table (kinds training never generated).

See docs/gpu.md for the whole procedure (prepare here, upload the parts, train, ship).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUT_FILES = 8
FILE_LIMIT = 16 * 2**20


def parse_args(argv=None) -> argparse.Namespace:  # noqa: ANN001
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="bundle folder (gist_memory.train.bundle)")
    ap.add_argument("--base-side", help="packed base: the folder with pack.json, config and tokenizer")
    ap.add_argument("--parts", default=".device", help="comma-separated folders to look for base-part*.safetensors")
    ap.add_argument("--base-dir", help="instead of parts: an HF model folder")
    ap.add_argument("--out", default=os.environ.get("OUT") or "device-out")
    ap.add_argument("--work", default=None, help="scratch folder for checkpoints (default: a temp folder)")
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds for the whole script")
    ap.add_argument("--eval-reserve", type=float, default=120.0, help="seconds kept for the report at the end")
    ap.add_argument("--max-steps", type=int, default=None, help="cap on training steps")
    ap.add_argument("--probe-steps", type=int, default=5)
    ap.add_argument("--snapshot-every", type=int, default=50)
    ap.add_argument("--batch-items", type=int, default=None, help="QA items per step (default: the recipe's)")
    ap.add_argument("--cont-items", type=int, default=None, help="continuation passages per step")
    ap.add_argument("--lr-lora", type=float, default=None)
    ap.add_argument("--lr-gist", type=float, default=None)
    ap.add_argument("--init-from", default=None, help="adapter folder to warm-start from (e.g. the CPU run's)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--dev-items", type=int, default=60, help="dev items scored at the end (0: none)")
    ap.add_argument("--heldout-items", type=int, default=16, help="held-out items per kind at the end (0: none)")
    ap.add_argument("--generate", choices=("single", "all", "none"), default="single")
    ap.add_argument("--allow-other-base", action="store_true", help="train even if the base digest differs")
    return ap.parse_args(argv)


def log(msg: str) -> None:
    print(f"[device_train] {msg}", flush=True)


def load_base(a: argparse.Namespace, bundle) -> tuple:  # noqa: ANN001
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gist_memory.train.bundle import BundleError, load_packed_base, weights_digest

    if a.base_dir:
        tok = AutoTokenizer.from_pretrained(a.base_dir)
        lm = AutoModelForCausalLM.from_pretrained(a.base_dir, dtype=torch.float32)
        digest = weights_digest(lm)
    elif a.base_side:
        lm, tok, meta = load_packed_base(a.base_side, [p for p in a.parts.split(",") if p], check=False)
        digest = meta["weights_digest_here"]
    else:
        raise SystemExit("give --base-side (packed parts) or --base-dir")
    want = bundle.base.get("weights_digest")
    same = digest == want
    if not same:
        msg = f"base weights digest {digest} differs from the bundle's {want}"
        if not a.allow_other_base:
            raise BundleError(msg + " (--allow-other-base to train anyway)")
        log("WARNING: " + msg)
    return lm, tok, same


def build_model(a: argparse.Namespace, bundle, lm, tok, same_base: bool):  # noqa: ANN001, ANN201
    import torch

    from gist_memory.config import GistConfig
    from gist_memory.model import GistModel
    from gist_memory.train.bundle import no_spacy_splitter
    from gist_memory.train.trainer import TrainConfig

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rc = bundle.train_config
    over = {"out_dir": str(Path(a.work) / "run"), "device": device, "stop_at": None, "init_from": a.init_from,
            "eval_every": 10**9, "save_every": a.snapshot_every, "snapshot_every": a.snapshot_every,
            "log_every": 1, "steps": a.max_steps or 10**6,
            "bf16": {"auto": None, "on": True, "off": False}[a.bf16]}  # fmt: skip
    for k in ("batch_items", "cont_items", "lr_lora", "lr_gist"):
        if getattr(a, k) is not None:
            over[k] = getattr(a, k)
    cfg = TrainConfig(**{**rc, **over})
    # as Trainer.__init__ sizes it
    gcfg = GistConfig(**{**cfg.gist, "target_ratio": cfg.gist.get("target_ratio") or max(cfg.ratios)})
    gcfg.num_gist_tokens = max(gcfg.num_gist_tokens, -(-gcfg.max_sentence_tokens // int(min(cfg.ratios))))
    ref = bundle.base.get("base_ref", "device-base") if same_base else (a.base_dir or "device-base")
    r = cfg.lora_r if cfg.stage == "lora" else 0
    with no_spacy_splitter():
        gm = GistModel(lm.to(device), tok, gcfg, ref, lora_r=r, lora_alpha=cfg.lora_alpha)
    bundle.install(gm)
    return gm, cfg


def make_trainer(cfg, gm, bundle):  # noqa: ANN001, ANN201
    from gist_memory.train.trainer import Trainer

    pairs = bundle.cont_pairs()

    class DeviceTrainer(Trainer):
        """The CPU trainer, with continuation pairs from the bundle (no sentence splitting here)."""

        def _cont_batch(self, micro: int) -> list[tuple[str, list[int]]]:
            c = self.cfg
            if not c.uses_cont or not pairs:  # continuation KL, or reconstruction of these passages
                return []
            j = micro * c.cont_items
            return [pairs[(j + i) % len(pairs)] for i in range(c.cont_items)]

    tr = DeviceTrainer(cfg, model=gm, items=bundle.qa_items("items"), eval_items=[])
    tr.cont_texts = []  # set: the trainer never reads a corpus here
    return tr


def train(a: argparse.Namespace, tr, t0: float) -> dict:  # noqa: ANN001
    """Chunks of `snapshot_every` steps until the budget (minus the report's reserve) is spent."""
    deadline = t0 + a.time_budget - a.eval_reserve
    cap = a.max_steps
    chunk = max(1, a.probe_steps)
    tr.cfg.steps = cap or 10**6
    start_step = tr.step
    timed_from, timed_step = None, None
    sps = None
    while True:
        tr.cfg.stop_at = min(tr.cfg.steps, tr.step + chunk)
        tr.train(progress=False)
        now = time.perf_counter()
        if timed_from is None:  # the probe chunk (kernel warm-up) is not timed
            timed_from, timed_step = now, tr.step
            first = now - t0
            sps = first / max(1, tr.step - start_step)
        elif tr.step > timed_step:
            sps = (now - timed_from) / (tr.step - timed_step)
        left = deadline - now
        if tr.step >= tr.cfg.steps or left < sps:
            break
        fit = tr.step + int(left / sps)
        tr.cfg.steps = max(tr.step + 1, min(cap, fit) if cap else fit)  # cosine schedule fitted to the budget
        chunk = a.snapshot_every - (tr.step % a.snapshot_every) or a.snapshot_every
        log(f"step {tr.step}: {sps:.3f} s/step, {left:.0f}s left -> schedule of {tr.cfg.steps} steps")
    return {"steps": tr.step - start_step, "s_per_step": round(sps or 0.0, 4), "final_step": tr.step,
            "schedule_steps": tr.cfg.steps}  # fmt: skip


def save_adapter(gm, cfg, bundle, out: Path, same_base: bool, extra: dict) -> Path:  # noqa: ANN001
    """The final adapter (format 2) in `out/adapter`; its base fingerprint is the CPU machine's when the weights
    are the same bit for bit (the fingerprint also hashes the transformers version, which differs there)."""
    d = out / "adapter"
    keep = gm.config.target_ratio
    gm.config.target_ratio = cfg.gist.get("target_ratio") or keep
    try:
        gm.save_pretrained(d)
    finally:
        gm.config.target_ratio = keep
    meta_f = d / "gist_adapter.json"
    meta = json.loads(meta_f.read_text())
    meta["trained_on"] = {"base_fingerprint_here": meta.get("base_fingerprint"), **extra}
    if same_base and bundle.base.get("base_fingerprint"):
        meta["base_fingerprint"] = bundle.base["base_fingerprint"]
        meta["base"] = bundle.base.get("base_ref", meta["base"])
    meta_f.write_text(json.dumps(meta, indent=2))
    return d


def pack_snapshots(run: Path, out: Path, limit: int = FILE_LIMIT - 2**20) -> list[str]:
    """Intermediate snapshots (LoRA in bf16, evenly spaced, newest last) in one tar under `limit` bytes."""
    import torch
    from safetensors.torch import load_file, save

    snaps = sorted((run / "snapshots").glob("step-*"))
    if not snaps:
        return []
    blobs = []
    for s in snaps:
        t = load_file(str(s / "gist_adapter.safetensors"))
        t = {k: (v.to(torch.bfloat16) if k.startswith("lora.") else v) for k, v in t.items()}
        files = {"gist_adapter.safetensors": save(t)}
        for n in ("gist_adapter.json", "gist_config.json", "progress.json"):
            if (s / n).is_file():
                files[n] = (s / n).read_bytes()
        blobs.append((s.name, files))
    per = max(1, sum(len(b) for b in blobs[0][1].values()))
    k = max(1, min(len(blobs), limit // per))
    pick = sorted({round(i * (len(blobs) - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [len(blobs) - 1]
    names = []
    with tarfile.open(out / "snapshots.tar", "w") as tf:
        for i in pick:
            name, files = blobs[i]
            for n, data in files.items():
                info = tarfile.TarInfo(f"{name}/{n}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            names.append(name)
    return names


def evaluate(a: argparse.Namespace, gm, bundle, out: Path, hard_deadline: float) -> tuple[dict, list]:  # noqa: ANN001
    """Dev (trainer kinds) at 4x/8x, then the held-out table, cell by cell until the deadline."""
    import torch

    from gist_memory.config import GistConfig
    from gist_memory.eval.heldout.run import LABEL, RESULTS_VERSION, pool_config, run_cell
    from gist_memory.eval.retention import evaluate_retention
    from gist_memory.model import GistModel
    from gist_memory.train.bundle import no_spacy_splitter

    gm.model.eval()
    trained = gm.config.to_dict()
    dev_res: dict = {}
    dev = bundle.qa_items("dev_items")[: a.dev_items]
    with torch.no_grad():
        for r, methods in ((4.0, ("gist", "full", "none")), (8.0, ("gist",))):
            if not dev or time.perf_counter() > hard_deadline:
                break
            gm.config = GistConfig.from_dict({**trained, "target_ratio": r})
            gm.invalidate_fingerprint()
            res = evaluate_retention(gm, dev, methods=methods, calibrate=False)
            dev_res[str(r)] = {"n": res.n, "ratio": round(res.ratio, 3), "accuracy": res.accuracy,
                               "by_kind": res.by_kind, "seconds": round(res.seconds, 1)}  # fmt: skip
            log(f"dev @{r:g}x (n={res.n}, achieved {res.ratio:.2f}x): {json.dumps(res.accuracy)}")
    records: list = []
    items = bundle.heldout_items(a.heldout_items) if a.heldout_items else {}
    if not items:
        gm.config = GistConfig.from_dict(trained)
        return dev_res, records
    ratios = bundle.manifest.get("heldout_ratios", [4.0, 8.0])
    methods = bundle.manifest.get("heldout_methods", ["gist+anchors"])
    cells = [(m, None) for m in ("full", "none")] + [(m, float(r)) for r in ratios for m in methods]
    meta = {"version": RESULTS_VERSION, "label": LABEL, "seed": 0, "n_requested": a.heldout_items,
            "base": bundle.base.get("base_ref"), "model": "device-trained",
            "generate": False if a.generate == "none" else a.generate}  # fmt: skip
    plain = None
    for method, ratio in cells:
        if method in ("full", "none"):
            if plain is None:
                with no_spacy_splitter():
                    plain = GistModel(gm.model, gm.tokenizer, pool_config("pool", 4.0), gm.base_ref)
            model = plain
        elif method in ("pool", "pool+anchors"):
            with no_spacy_splitter():
                model = bundle.install(GistModel(gm.model, gm.tokenizer, pool_config(method, ratio), gm.base_ref))
        else:
            over = {"target_ratio": ratio, **({"anchors": "none"} if method == "gist" else {})}
            gm.config = GistConfig.from_dict({**trained, **over})
            gm.invalidate_fingerprint()
            model = gm
        for kind, its in items.items():
            if time.perf_counter() > hard_deadline:
                log(f"time budget reached: held-out cells from {method} {ratio} {kind} on skipped")
                gm.config = GistConfig.from_dict(trained)
                return dev_res, records
            with torch.no_grad():
                rec = {**meta, **run_cell(model, method, ratio, kind, its, generate=meta["generate"])}
            if method.startswith("gist"):
                rec["model_anchors"] = str(model.config.anchors)
            records.append(rec)
            with open(out / "heldout.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            ach = rec["achieved_ratio"]
            log(f"{method:13s} {'' if ratio is None else f'{ratio:g}x':>4s} {kind:19s} n={rec['n']:3d} "
                f"ratio={'-' if ach is None else f'{ach:.2f}'} {json.dumps(rec['metrics'])} {rec['seconds']:.1f}s")
    gm.config = GistConfig.from_dict(trained)
    gm.invalidate_fingerprint()
    return dev_res, records


def main(argv=None) -> int:  # noqa: ANN001
    t0 = time.perf_counter()
    a = parse_args(argv)
    import torch
    import transformers

    from gist_memory.train.bundle import DeviceBundle

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.work = a.work or tempfile.mkdtemp(prefix="gm-device-")
    bundle = DeviceBundle(a.bundle)
    lm, tok, same = load_base(a, bundle)
    bundle.check_tokenizer(tok)
    gm, cfg = build_model(a, bundle, lm, tok, same)
    env = {"device": str(gm.device), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    log(f"ready in {time.perf_counter() - t0:.1f}s: {json.dumps(env)}; base digest ok: {same}; "
        f"{len(bundle.manifest['items'])} QA items, {len(bundle.cont_pairs())} continuation pairs")
    tr = make_trainer(cfg, gm, bundle)
    info = train(a, tr, t0)
    run = Path(cfg.out_dir)
    hist = [h for h in tr.history if "tokens" in h and "eval" not in h]
    last = hist[-1] if hist else {}
    log(f"trained {info['steps']} steps ({info['s_per_step']} s/step), last: {json.dumps(last)}")
    extra = {**env, "steps": tr.step, "bundle_created": bundle.manifest.get("created")}
    adapter = save_adapter(gm, cfg, bundle, out, same, extra)
    snaps = pack_snapshots(run, out)
    if (run / "log.jsonl").is_file():
        (out / "log.jsonl").write_bytes((run / "log.jsonl").read_bytes())
    dev_res, records = evaluate(a, gm, bundle, out, t0 + a.time_budget)
    from gist_memory.eval.heldout.run import render_details, render_markdown

    table = render_markdown(records, note=f"device run, step {tr.step}; {env['gpu'] or env['device']}") if records else ""
    lines = [f"# Device training run (step {tr.step})", "", "```", json.dumps({**info, **env}, indent=1), "```", "",
             "## Dev (trainer kinds; multiple choice)", "", "```", json.dumps(dev_res, indent=1), "```", "", table,
             "", render_details(records) if records else ""]  # fmt: skip
    summary = {"train": info, "env": env, "last_log": last, "dev": dev_res, "snapshots": snaps,
               "adapter": str(adapter), "base_digest_ok": same, "seconds": round(time.perf_counter() - t0, 1)}
    lines[2:6] = ["<!-- summary -->", "```json", json.dumps(summary, indent=1), "```"]
    (out / "report.md").write_text("\n".join(lines))
    # beside adapter/ and log.jsonl, what `python -m gist_memory.train.ship OUT/adapter` reads for the model card
    tc = {**asdict(cfg), "ratios": list(cfg.ratios), "kinds": list(cfg.kinds), "out_dir": str(out),
          "device_run": {"time_budget": a.time_budget, **env}}
    (out / "train_config.json").write_text(json.dumps(tc, indent=2))
    print(table, flush=True)
    files = [p for p in out.rglob("*") if p.is_file()]
    big = [f"{p} ({p.stat().st_size} bytes)" for p in files if p.stat().st_size > FILE_LIMIT]
    if len(files) > OUT_FILES or big:
        log(f"WARNING: {len(files)} files under {out} (max {OUT_FILES}); too big: {big}")
    log(f"done in {summary['seconds']}s: {sorted(str(p.relative_to(out)) for p in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
