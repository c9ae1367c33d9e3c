"""scripts/interference.py lays each distractor item out in the seven arrangements it names."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from gist_memory.eval.heldout.items import build_items

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "interference.py"


def _load():
    spec = importlib.util.spec_from_file_location("interference_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Reader:
    """Right only when the answer passage is there and nothing before it in the context is a state of another
    passage (a caricature of a loud state); records the layouts."""

    def __init__(self, item):
        self.item = item
        self.layouts = []

    def compress(self, texts):
        return [("state", i) for i in range(len(texts))]

    def score_choices(self, prompt, continuations, states=None):
        t = self.item.answer_passage
        states = list(states or [])
        self.layouts.append(([i for _, i in states], self.item.passages[t] in prompt))
        has = ("state", t) in states or self.item.passages[t] in prompt
        loud = any(i != t for _, i in states)
        good = has and not loud
        return [1.0 if (j == self.item.answer_index) == good else 0.0 for j in range(len(continuations))]


def test_each_arrangement_reads_what_it_names():
    mod = _load()
    item = build_items(1, seed=1, kinds=["entity_distractors"])["entity_distractors"][0]
    gm = _Reader(item)
    got = mod.score_item(gm, item)
    assert set(got) == set(mod.CONDITIONS)
    t = item.answer_passage
    others = [i for i in range(4) if i != t]
    assert gm.layouts == [([0, 1, 2, 3], False), ([t], False), (others + [t], False), (others, True),
                          ([], True), ([], True), ([], True)]
    assert got == {"states": 0, "target state only": 1, "states, target last": 0,
                   "others' states + target text": 0, "full": 1, "full, target last": 1, "target text only": 1}


def test_render_prints_one_row_per_result(tmp_path):
    mod = _load()
    acc = dict.fromkeys(mod.CONDITIONS, 0.5)
    acc["full"] = 0.25
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(json.dumps({"kind": k, "n": 20, "seed": 1, "ratio": 4.0, "method": "gist+anchors",
                                       "tag": "t", "accuracy": acc}) for k in ("entity_distractors", "common_distractors")))
    lines = mod.render(str(f)).splitlines()
    assert len(lines) == 4 and "| entity_distractors | 20 | 0.50 | 0.50 | 0.50 | 0.50 | 0.25 |" in lines[2]
