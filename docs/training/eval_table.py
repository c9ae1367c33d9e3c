"""The model card table: `python docs/training/eval_table.py start` (untrained start) or `... gist_memory/assets/default_model 2`."""
import json, sys, torch
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
from gist_memory import GistConfig, GistModel
from gist_memory.eval.qa import load_qa
from gist_memory.eval.retention import evaluate_retention
items = load_qa()[:40]
which = sys.argv[1]
cfg0 = GistConfig.from_pretrained("gist_memory/assets/default_model")  # same gist config as training
rows = []
for r in (4.0, 8.0):
    if which == "start":
        m = GistModel.from_base(None, GistConfig.from_dict({**cfg0.to_dict(), "target_ratio": r}))
        methods = ("gist",)
    else:
        m = GistModel.from_pretrained(which, config_overrides={"target_ratio": r})
        methods = ("gist", "trunc") if which.endswith("default_model") else ("gist",)
    with torch.no_grad():
        res = evaluate_retention(m, items, methods=methods, calibrate=False)
    row = {"model": which, "target": r, "achieved": round(res.ratio, 2), "acc": res.accuracy, "by_kind": res.by_kind}
    print(json.dumps(row), flush=True)
