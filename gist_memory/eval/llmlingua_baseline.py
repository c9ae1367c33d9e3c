"""LLMLingua (microsoft/LLMLingua, PyPI `llmlingua`) as a peer baseline, run offline with the reader's own base
model as its scorer, at a token budget counted in the reader's tokens.

LLMLingua drops the tokens its scoring LM finds least surprising and hands the reader shorter *text*. Here it
compresses each passage on its own (question-agnostic, like a gist state, so results could be cached), with the
token-level filter only (a single passage has nothing for the context- or sentence-level filters to drop).

Two quirks of `llmlingua` 0.2.2 are handled:

- With `iterative_size` (default 200) larger than the passage, its windowing arithmetic goes negative and it
  keeps almost everything (~1.0-1.5x whatever the `rate`). Each passage is therefore scored as one window
  (`iterative_size` = its length), which also keeps it clear of its KV-cache reuse across windows, which
  `transformers` 5 no longer supports (tuple caches).
- Its `rate`/`target_token` are approximate after detokenisation, so `compress` searches the target (a few
  proportional corrections) until the output has the wanted number of *reader* tokens, and reports what it got.

Offline: `tiktoken` (used for LLMLingua's own report) and `nltk` read the caches bundled with
`llama-index-core` when it is installed (`TIKTOKEN_CACHE_DIR`, `NLTK_DATA`, only if not already set).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

INSTALL_HINT = "pip install -c constraints.txt llmlingua   (the constraint keeps the CPU torch pinned)"


class LLMLinguaUnavailable(RuntimeError):
    """The `llmlingua` package is missing or could not load its scorer."""


def llmlingua_status() -> tuple[bool, str]:
    """(available, a one-line message saying which version or why not)."""
    if importlib.util.find_spec("llmlingua") is None:
        return False, f"llmlingua is not installed, so the LLMLingua rows are skipped ({INSTALL_HINT})"
    try:
        from importlib.metadata import version

        return True, f"llmlingua {version('llmlingua')}"
    except Exception:  # noqa: BLE001 - metadata missing is not fatal
        return True, "llmlingua (version unknown)"


def offline_env() -> dict[str, str]:
    """Point tiktoken and nltk at llama-index-core's bundled caches (when present and not already set)."""
    set_: dict[str, str] = {}
    try:
        spec = importlib.util.find_spec("llama_index.core")
    except ModuleNotFoundError:
        spec = None
    if spec is None or spec.origin is None:
        return set_
    static = Path(spec.origin).parent / "_static"
    for var, sub in (("TIKTOKEN_CACHE_DIR", "tiktoken_cache"), ("NLTK_DATA", "nltk_cache")):
        if not os.environ.get(var) and (static / sub).is_dir():
            os.environ[var] = str(static / sub)
            set_[var] = str(static / sub)
    return set_


@dataclass
class LinguaResult:
    """One compressed passage.

    Attributes:
        text: The compressed passage (what the reader gets).
        tokens_in: Reader tokens of the original passage.
        tokens_out: Reader tokens of `text`.
        target: The reader-token budget asked for.
        seconds: Wall time of the final `compress_prompt` call (what a tuned deployment pays per passage).
        search_seconds: Wall time of all calls of the budget search.
        tries: `compress_prompt` calls made.
    """

    text: str
    tokens_in: int
    tokens_out: int
    target: int
    seconds: float
    search_seconds: float
    tries: int

    @property
    def ratio(self) -> float:
        """Achieved compression in reader tokens."""
        return self.tokens_in / max(1, self.tokens_out)


class LLMLinguaCompressor:
    """`llmlingua.PromptCompressor` over a local causal LM, compressing one passage to a reader-token budget.

    Args:
        scorer: Local folder (or hub id) of the scoring causal LM; use the reader's base model.
        device: `cpu` or `cuda`.
        count_tokenizer: The reader's tokenizer (budgets and achieved ratios are counted in it); default the
            scorer's own.

    Raises:
        LLMLinguaUnavailable: `llmlingua` is not installed or its scorer failed to load.
    """

    def __init__(self, scorer: str, device: str = "cpu", count_tokenizer: Any = None):
        ok, msg = llmlingua_status()
        if not ok:
            raise LLMLinguaUnavailable(msg)
        offline_env()
        try:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
            from llmlingua import PromptCompressor

            self.pc = PromptCompressor(
                model_name=str(scorer), device_map=device, model_config={"trust_remote_code": False}
            )
        except Exception as e:  # noqa: BLE001 - report any load failure as "unavailable" with its cause
            raise LLMLinguaUnavailable(f"llmlingua could not load its scorer {scorer}: {type(e).__name__}: {e}") from e
        self.scorer = str(scorer)
        self.count_tokenizer = count_tokenizer or self.pc.tokenizer
        self.max_window = int(getattr(self.pc, "max_position_embeddings", 2048) or 2048)
        self._factors: list[float] = []

    def count(self, text: str) -> int:
        """Reader tokens of `text`."""
        return len(self.count_tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def _call(self, text: str, n_scorer: int, target_token: float) -> str:
        out = self.pc.compress_prompt(
            [text],
            target_token=max(1.0, float(target_token)),
            iterative_size=n_scorer,
            use_context_level_filter=False,
            use_sentence_level_filter=False,
            use_token_level_filter=True,
        )
        return out["compressed_prompt"].strip()

    def compress(self, text: str, budget: int, tolerance: float = 0.05, max_tries: int = 4) -> LinguaResult:
        """Compress `text` to about `budget` reader tokens (within `tolerance`, else the closest of `max_tries`).

        The search scales LLMLingua's `target_token` by budget / achieved after each call; the first guess uses
        how earlier passages landed, so most passages take one call.
        """
        n_in = self.count(text)
        if budget >= n_in:
            return LinguaResult(text, n_in, n_in, budget, 0.0, 0.0, 0)
        n_scorer = len(self.pc.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n_scorer > self.max_window:
            raise ValueError(f"passage of {n_scorer} scorer tokens exceeds the scorer window {self.max_window}")
        target = float(budget) * (statistics.median(self._factors) if self._factors else 1.0)
        best: Optional[tuple[int, str, float, float]] = None  # (got, text, seconds, target asked)
        total = 0.0
        tries = 0
        while tries < max_tries:
            tries += 1
            t0 = time.perf_counter()
            out = self._call(text, n_scorer, target)
            dt = time.perf_counter() - t0
            total += dt
            got = self.count(out)
            if best is None or abs(got - budget) < abs(best[0] - budget):
                best = (got, out, dt, target)
            if abs(got - budget) <= max(1.0, tolerance * budget):
                break
            target = max(1.0, target * budget / max(1, got))
        assert best is not None
        got, out, dt, asked = best
        if got:
            self._factors.append(asked / got)
            del self._factors[:-32]
        return LinguaResult(out, n_in, got, int(budget), dt, total, tries)


LLMLINGUA2_NAMES = ("bert-base-multilingual-cased", "xlm-roberta-large")
"""llmlingua 0.2.2 chooses LLMLingua-2's tokenisation rules by these substrings of the model's path."""


class LLMLingua2Compressor(LLMLinguaCompressor):
    """LLMLingua-2: a token-classification model (a BERT/XLM-R encoder fine-tuned to label each word keep/drop)
    instead of a causal LM's surprisal, through `llmlingua.PromptCompressor(use_llmlingua2=True)`; the same
    per-passage budget search in reader tokens as `LLMLinguaCompressor`.

    Args:
        model_dir: Local folder of the token-classification model (e.g. a copy of
            microsoft/llmlingua-2-bert-base-multilingual-cased-meetingbank; no package ships one offline).
        device: `cpu` or `cuda`.
        count_tokenizer: The reader's tokenizer (budgets and achieved ratios are counted in it).

    Raises:
        LLMLinguaUnavailable: `llmlingua` is missing, the folder does not exist, or its model failed to load.
    """

    def __init__(self, model_dir: str, device: str = "cpu", count_tokenizer: Any = None):  # noqa: D107
        ok, msg = llmlingua_status()
        if not ok:
            raise LLMLinguaUnavailable(msg)
        if not Path(model_dir).is_dir():
            raise LLMLinguaUnavailable(f"LLMLingua-2 model folder {model_dir} does not exist")
        if not any(n in str(model_dir) for n in LLMLINGUA2_NAMES):
            raise LLMLinguaUnavailable(
                f"LLMLingua-2 model folder {model_dir}: llmlingua picks its word rules by the model's name, so the "
                f"path must contain one of {', '.join(LLMLINGUA2_NAMES)} (keep the hub name when copying it)")
        offline_env()
        try:
            import transformers

            transformers.logging.set_verbosity_error()
            from llmlingua import PromptCompressor

            self.pc = PromptCompressor(model_name=str(model_dir), device_map=device, use_llmlingua2=True,
                                       model_config={"trust_remote_code": False})
        except Exception as e:  # noqa: BLE001 - report any load failure as "unavailable" with its cause
            raise LLMLinguaUnavailable(f"llmlingua could not load the LLMLingua-2 model {model_dir}: "
                                       f"{type(e).__name__}: {e}") from e
        if "ForTokenClassification" not in type(self.pc.model).__name__:
            raise LLMLinguaUnavailable(f"{model_dir} is a {type(self.pc.model).__name__}, not a token-classification "
                                       "model (LLMLingua-2 needs one)")
        self.scorer = str(model_dir)
        self.count_tokenizer = count_tokenizer or self.pc.tokenizer
        self.max_window = 512  # it labels chunks of at most 512 of its own tokens itself
        self._factors = []

    def _call(self, text: str, n_scorer: int, target_token: float) -> str:  # noqa: ARG002 - it chunks by itself
        out = self.pc.compress_prompt([text], target_token=max(1, int(round(target_token))),
                                      use_context_level_filter=False, use_token_level_filter=True)
        return out["compressed_prompt"].strip()

    def compress(self, text: str, budget: int, tolerance: float = 0.05, max_tries: int = 4) -> LinguaResult:
        """Compress `text` to about `budget` reader tokens (see `LLMLinguaCompressor.compress`)."""
        self.max_window = max(self.max_window, len(self.pc.tokenizer(text, add_special_tokens=False)["input_ids"]))
        return super().compress(text, budget, tolerance, max_tries)
