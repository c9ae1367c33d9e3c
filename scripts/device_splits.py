"""Sentence splits recorded here (spaCy) and replayed where spaCy is missing (the GPU machine of docs/gpu.md).

`SentenceSplitter.split` (and `entity_spans`) depend on the text and the splitter settings alone, so what spaCy
answered here can be answered again over there, exactly: every plan, and so every state, is then the one this
machine would make from the same tokens. A text nobody recorded is an error (`ReplayMiss`), never a guess.

    with recording() as rec:        # here: run code that splits texts, then
        ...
    rec.save("splits.json.gz")      # gzipped json, no pickle
    install_replay(Recording.load("splits.json.gz"))   # there, before any GistModel is built

It is also a pytest plugin (`python -m pytest -p device_splits`, with `scripts/` on PYTHONPATH), driven by
environment variables:

    GIST_SPLITS_RECORD=path   record every split the tests make (merged into `path` at the end)
    GIST_SPLITS_REPLAY=path   replay them (`SentenceSplitter` never loads spaCy)
    GIST_TEST_BLOCK=spacy,... make these modules unimportable (to rehearse the GPU machine's image on CPU)
    GIST_TEST_DEVICE=cuda     build every test model there (`load_base` behind `GistModel.from_base`), keeping
                              the dtype a test asked for (fp32 where it asked for none and meant the CPU)
    GIST_TEST_REPORT=path     one json line per test phase (outcome, seconds, first line of the message)

A test that fails because a blocked/missing module (spacy, faiss, gguf, hypothesis, ...) cannot be imported, or
because a text it splits was not recorded (e.g. it compresses what a model generated), is reported *skipped* with
the reason, not failed.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

FORMAT = 1


class ReplayMiss(LookupError):
    """A text (or splitter setting) the recording does not hold."""


def _key(splitter: Any, text: str) -> str:
    return json.dumps([splitter.splitter, splitter.spacy_model, splitter.language, text], ensure_ascii=False)


class Recording:
    """Splits (and entity spans) by (splitter settings, text)."""

    def __init__(self) -> None:
        self.splits: dict[str, list[tuple[int, int]]] = {}
        self.entities: dict[str, list[tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self.splits) + len(self.entities)

    def merge(self, other: Recording) -> Recording:
        self.splits.update(other.splits)
        self.entities.update(other.entities)
        return self

    def save(self, path: Union[str, Path]) -> int:
        """Write gzipped json; returns the bytes written."""
        doc = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "splits": [[json.loads(k), v] for k, v in self.splits.items()],
               "entities": [[json.loads(k), v] for k, v in self.entities.items()]}  # fmt: skip
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(p, "wb", compresslevel=9) as f:
            f.write(json.dumps(doc, ensure_ascii=False).encode("utf-8"))
        return p.stat().st_size

    @classmethod
    def load(cls, path: Union[str, Path]) -> Recording:
        with gzip.open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path}: split recording format {doc.get('format')}, expected {FORMAT}")
        rec = cls()
        for k, v in doc["splits"]:
            rec.splits[json.dumps(k, ensure_ascii=False)] = [tuple(s) for s in v]
        for k, v in doc["entities"]:
            rec.entities[json.dumps(k, ensure_ascii=False)] = [tuple(s) for s in v]
        return rec


def _splitter_class():  # noqa: ANN202
    from gist_memory.text.split import SentenceSplitter

    return SentenceSplitter


@contextlib.contextmanager
def recording(rec: Optional[Recording] = None) -> Iterator[Recording]:
    """Inside, every `SentenceSplitter.split` / `entity_spans` answer is also written to `rec` (spaCy runs)."""
    rec = rec if rec is not None else Recording()
    cls = _splitter_class()
    split0, ents0 = cls.split, cls.entity_spans

    def split(self, text: str) -> list[tuple[int, int]]:  # noqa: ANN001
        out = split0(self, text)
        rec.splits[_key(self, text)] = [(int(s), int(e)) for s, e in out]
        return out

    def entity_spans(self, text: str) -> list[tuple[int, int]]:  # noqa: ANN001
        out = ents0(self, text)
        rec.entities[_key(self, text)] = [(int(s), int(e)) for s, e in out]
        return out

    cls.split, cls.entity_spans = split, entity_spans
    try:
        yield rec
    finally:
        cls.split, cls.entity_spans = split0, ents0


def install_replay(rec: Recording) -> Any:
    """From now on `SentenceSplitter` loads no spaCy and answers from `rec` (ReplayMiss for anything else).
    Returns a function that undoes it."""
    cls = _splitter_class()
    saved = (cls.__init__, cls.split, cls.entity_spans)

    def __init__(self, splitter: str = "sentencizer", spacy_model: Optional[str] = None,  # noqa: ANN001, N807
                 language: str = "en") -> None:  # fmt: skip
        self.splitter, self.spacy_model, self.language = splitter, spacy_model, language
        self.nlp = None  # replayed: no spaCy pipeline here

    def split(self, text: str) -> list[tuple[int, int]]:  # noqa: ANN001
        if not text.strip():
            return []
        got = rec.splits.get(_key(self, text))
        if got is None:
            raise ReplayMiss(f"no recorded sentence split for this text ({self.splitter}, {self.language}): "
                             f"{text[:80]!r}")  # fmt: skip
        return list(got)

    def entity_spans(self, text: str) -> list[tuple[int, int]]:  # noqa: ANN001
        got = rec.entities.get(_key(self, text))
        if got is None:
            raise ReplayMiss(f"no recorded entity spans for this text: {text[:80]!r}")
        return list(got)

    cls.__init__, cls.split, cls.entity_spans = __init__, split, entity_spans

    def undo() -> None:
        cls.__init__, cls.split, cls.entity_spans = saved

    return undo


def block(modules: list[str]) -> list[str]:
    """Make `modules` unimportable in this process (as they are on the GPU machine); returns them."""
    for m in modules:
        sys.modules[m] = None  # type: ignore[assignment]  # `import m` raises ImportError
    return modules


def force_device(device: str) -> None:
    """Every `GistModel.from_base` (hence `from_pretrained`, the test fixtures, the trainer) and every other caller
    of `gist_memory.model.base.load_base` builds on `device`; a call that asked for the CPU without a dtype keeps
    fp32 (what it would have had there)."""
    import torch

    import gist_memory.model.adapter_io as aio
    import gist_memory.model.base as mb

    load0 = mb.load_base

    def load_base(base: Any, *, dtype: Any = None, device: Optional[str] = None, **kw: Any) -> Any:
        if device is None or str(device) == "cpu":
            if dtype is None:
                dtype = torch.float32
            device = forced
        return load0(base, dtype=dtype, device=device, **kw)

    forced = device
    for mod in [mb, aio, *list(sys.modules.values())]:  # modules that imported it by name already
        if getattr(mod, "load_base", None) is load0:
            mod.load_base = load_base


# --------------------------------------------------------------------------------------------------------------
# pytest plugin

_MISSING = ("spacy", "faiss", "gguf", "hypothesis", "jsonschema", "fastapi", "uvicorn", "httpx", "fsspec",
            "sentence_transformers", "ray", "qdrant_client", "pytest_asyncio", "matplotlib", "llmlingua")  # fmt: skip
_state: dict[str, Any] = {}


def _why_skip(exc: BaseException) -> Optional[str]:
    """A reason to report the test skipped: a missing optional module or a split not recorded (in the chain)."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ReplayMiss) or type(e).__name__ == "ReplayMiss":
            return f"replay: {e}"[:300]
        if isinstance(e, ImportError):
            name = (getattr(e, "name", None) or "").split(".")[0]
            if name in _MISSING or name in _state.get("blocked", ()):
                return f"needs {name} (not on this machine)"
        e = e.__cause__ or e.__context__
    return None


def pytest_configure(config: Any) -> None:  # noqa: ARG001
    blocked = [m.strip() for m in os.environ.get("GIST_TEST_BLOCK", "").split(",") if m.strip()]
    _state["blocked"] = block(blocked)
    rec_path = os.environ.get("GIST_SPLITS_RECORD")
    if rec_path:
        cm = recording()
        _state["recording"] = (cm, cm.__enter__(), rec_path)
    replay = os.environ.get("GIST_SPLITS_REPLAY")
    if replay:
        install_replay(Recording.load(replay))
    dev = os.environ.get("GIST_TEST_DEVICE")
    if dev and dev != "cpu":
        force_device(dev)
    _state["report"] = os.environ.get("GIST_TEST_REPORT")


def pytest_unconfigure(config: Any) -> None:  # noqa: ARG001
    if "recording" in _state:
        cm, rec, path = _state.pop("recording")
        cm.__exit__(None, None, None)
        if Path(path).is_file():
            rec = Recording.load(path).merge(rec)
        rec.save(path)


try:
    import pytest

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
        outcome = yield
        rep = outcome.get_result()
        if call.excinfo is not None and rep.failed:
            why = _why_skip(call.excinfo.value)
            if why:
                rep.outcome = "skipped"
                rep.longrepr = (str(item.path), item.location[1] or 0, why)

except ImportError:  # the module is also imported outside pytest (device_perf.py), where pytest may be missing
    pass


def pytest_runtest_logreport(report: Any) -> None:
    path = _state.get("report")
    if not path:
        return
    if report.when != "call" and report.passed:
        return
    msg = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        msg = str(report.longrepr[2])
    elif report.failed:
        text = getattr(report, "longreprtext", "") or str(report.longrepr)
        lines = [ln for ln in text.splitlines() if ln.startswith("E ")]
        msg = (lines[0][1:].strip() if lines else text.strip().splitlines()[-1] if text.strip() else "")
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                            "seconds": round(report.duration, 3), "message": msg[:400]}) + "\n")  # fmt: skip


def summarize(jsonl: Union[str, Path], baseline: Optional[dict] = None) -> dict:
    """Per test its outcome (a failed setup = error), counts, and the tests whose outcome differs from
    `baseline` (an earlier summary's `tests`)."""
    tests: dict[str, dict] = {}
    p = Path(jsonl)
    for line in p.read_text(encoding="utf-8").splitlines() if p.is_file() else []:
        r = json.loads(line)
        t = tests.setdefault(r["nodeid"], {"outcome": "passed", "seconds": 0.0, "message": ""})
        t["seconds"] = round(t["seconds"] + r["seconds"], 3)
        if r["outcome"] == "failed":
            t["outcome"] = "error" if r["when"] != "call" else "failed"
            t["message"] = t["message"] or r["message"]
        elif r["outcome"] == "skipped" and t["outcome"] == "passed":
            t["outcome"], t["message"] = "skipped", r["message"]
    counts: dict[str, int] = {}
    for t in tests.values():
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    out = {"counts": counts, "tests": tests}
    if baseline:
        out["differs_from_baseline"] = {k: f"{baseline[k]['outcome']} -> {v['outcome']}" for k, v in tests.items()
                                        if k in baseline and baseline[k]["outcome"] != v["outcome"]}  # fmt: skip
    out["device_mismatch"] = sorted(k for k, v in tests.items() if "same device" in v.get("message", ""))
    return out
