"""Rows of the model card's retention table, as JSON lines (multiple choice by answer log-likelihood).

    # the shipped adapter (gist + anchors) and truncation to the same budget, items 40..149, at 4x and 8x
    python docs/training/eval_table.py --model gist_memory/assets/default_model --methods gist,trunc
    # ratio-independent rows
    python docs/training/eval_table.py --methods full,none --ratios 4
    # training-free KV pooling + anchors, and the untrained gist start
    python docs/training/eval_table.py --compressor pool+anchors --methods gist
    python docs/training/eval_table.py --model start --methods gist

Items 0..39 of `qa_dev.jsonl` chose the anchor budget (`--items 0:40` reproduces those numbers); 40..149 are
the test items the model card reports. `--set key=value` overrides the gist config (e.g. `anchor_budget=sentence`).
"""

from __future__ import annotations

import argparse
import json

import torch

from gist_memory import GistConfig, GistModel
from gist_memory.data import load_qa
from gist_memory.eval.retention import evaluate_retention

DEFAULT = "gist_memory/assets/default_model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT, help="adapter folder, or `start` for the untrained gist model")
    ap.add_argument("--compressor", default=None, help="pool+anchors / pool: the training-free compressors")
    ap.add_argument("--methods", default="gist")
    ap.add_argument("--ratios", default="4,8")
    ap.add_argument("--items", default="40:150")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="gist config override key=value (json value)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lo, hi = (int(x) for x in a.items.split(":"))
    items = load_qa()[lo:hi]
    methods = tuple(m.strip() for m in a.methods.split(","))
    extra = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        try:
            extra[k] = json.loads(v)
        except json.JSONDecodeError:
            extra[k] = v
    cfg0 = GistConfig.from_pretrained(DEFAULT).to_dict()  # the gist config the shipped adapter was trained with
    for r in (float(x) for x in a.ratios.split(",")):
        over = {"target_ratio": r, **extra}
        if a.compressor or a.model == "start":
            cfg = GistConfig.from_dict({**cfg0, **over, **({"compressor": a.compressor} if a.compressor else {})})
            m = GistModel.from_base(None, cfg)
            name = a.compressor or "start"
        else:
            m = GistModel.from_pretrained(a.model, config_overrides=over)
            name = a.model
        with torch.no_grad():
            res = evaluate_retention(m, items, methods=methods, calibrate=False)
        print(json.dumps({"model": name, "items": a.items, "target": r, "achieved": round(res.ratio, 2),
                          "acc": res.accuracy, "by_kind": res.by_kind, "overrides": extra,
                          "seconds": round(res.seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
