"""`GistModel`: a Hugging Face causal LM that writes gist states and answers from them.

    model = GistModel.from_pretrained()                       # embedded default
    states = model.compress(["passage one ...", "passage two ..."])
    model.generate("question", states=states)

Inference layout (training uses the same code path, see `gist_memory.train`):

    [raw prefix: chat template up to the user's text] [state 1] ... [state k] [raw suffix: "\\n\\n" question ...]

Each state was compressed alone, starting at position 0; when spliced it is re-rotated to its new offset. The
prefix and suffix are ordinary tokens; the suffix sees the prefix and every kept row, nothing raw of a passage.

The class is assembled from one mixin per concern, each in its own file:

    prompt.py      chat messages, the chat template and where the states go, token ids
    adapter_io.py  from_base / from_pretrained / save_pretrained, fingerprints
    compress.py    texts -> plans -> states (text pass, writer pass, pooling), forward_layout
    reader.py      prefix cache, splicing states, forward_ids, usage reports
    scoring.py     score / score_choices
    generation.py  generate / stream: the decode loop, sampling, stop strings
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch

from gist_memory.config import GistConfig
from gist_memory.model import kv
from gist_memory.model.adapter_io import (  # noqa: F401 - re-exported: older callers import them from here
    _VOLATILE_CONFIG_KEYS,
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    FORMAT_VERSION,
    AdapterIO,
    _dtype,
    _load_tensors,
    _update_sample,
    default_model_dir,
)
from gist_memory.model.compress import Compressing
from gist_memory.model.generation import _GEN_KWARGS, Generating, _held_back, _stop_index  # noqa: F401
from gist_memory.model.prompt import _CONTEXT_MARK, _ROLES, Prompt, Prompting, _messages  # noqa: F401
from gist_memory.model.reader import Reading, _layers_bytes  # noqa: F401
from gist_memory.model.scoring import Scoring
from gist_memory.model.usage import LastUsage
from gist_memory.model.writer import LORA_TARGETS, Writer
from gist_memory.text.split import SentenceSplitter

DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_PREFIX_CACHE_BYTES = 32 * 1024 * 1024


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class GistModel(AdapterIO, Prompting, Compressing, Reading, Scoring, Generating):
    """A base causal LM plus a gist writer that compresses texts into `GistState`s; the reader is the base.

    Build with `from_base` (fresh, to train) or `from_pretrained` (a saved gist model, or the shipped default).
    What is trained (gist embeddings, an optional LoRA) acts only while states are written: reading states and
    every call without states run the untouched base weights.

    Attributes:
        model: The transformers causal LM (never modified).
        tokenizer: Its fast tokenizer (unchanged: gist slots are not vocabulary tokens).
        config: The `GistConfig`.
        writer: The `Writer` (gist embeddings + optional LoRA), None for training-free compressors.
        base_ref: What `save_pretrained` records as the base (`bundled:...`, a path or a hub id).

    Usage: every `generate`/`stream`/`score`/`score_choices` call takes `usage=` (a `Usage` it fills) and
    `generate_with_usage` returns `(text, Usage)`. `last_usage` (deprecated; kept for 0.2 callers) is
    the calling thread's last usage as a dict.
    """

    def __init__(self, model, tokenizer, config: GistConfig, base_ref: str, lora_r: int = 0,  # noqa: ANN001
                 lora_alpha: float = 32.0, lora_targets: Sequence[str] = LORA_TARGETS):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.base_ref = base_ref
        self.splitter = SentenceSplitter.from_config(config)
        self.rope = kv.rope_spec(self.model)
        self._fingerprint: Optional[str] = None
        # Shared mutable state, all guarded by `_lock`: the fingerprint cache, the prefix cache (LRU, bounded in
        # bytes) and the count of calls running in eval mode. Everything else a call touches is its own.
        self._lock = threading.RLock()
        self._prefix_cache: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._prefix_bytes = 0
        self._prefix_budget = DEFAULT_PREFIX_CACHE_BYTES
        self._eval_users = 0
        self._eval_was_training = False
        self._last_usage = LastUsage()
        self.chunk_tokens = DEFAULT_CHUNK_TOKENS
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.writer: Optional[Writer] = None
        # False: the reader is the base model everywhere (the default, and every shipped adapter). True: an
        # adapted reader whose writer LoRA also acts on tokens read after states (see `Reading.reading`).
        self.reader_adapted = False
        if config.uses_gist_tokens:
            self.writer = Writer(self.model, config.num_gist_tokens, r=lora_r, alpha=lora_alpha, targets=lora_targets)

    # ---- identity ----------------------------------------------------------------------------------
    @property
    def base_model(self):  # noqa: ANN201 - transformers PreTrainedModel
        """The transformers causal LM: the reader, never modified by the writer."""
        return self.model

    def _base_lm(self):  # noqa: ANN202 - kept for callers of 0.2
        return self.model

    @property
    def has_lora(self) -> bool:
        """True when the writer has a LoRA."""
        return self.writer is not None and self.writer.r > 0

    @property
    def device(self) -> torch.device:
        """Device of the model's weights."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's weights."""
        return next(self.model.parameters()).dtype

    @property
    def name(self) -> str:
        """Human-readable identity: the base reference and the compressor."""
        return f"{self.base_ref} [{self.config.compressor}]"

    def with_config(self, **changes: Any) -> GistModel:
        """This model with some config fields changed (e.g. `target_ratio`, `anchors`), sharing its weights and
        its writer (trained gist rows and LoRA): what to use to serve or evaluate one trained writer at other
        ratios or anchor rules. Building `GistModel(model, tokenizer, config, ...)` instead gives a *fresh*
        writer. The compressor and the number of gist tokens cannot change (the writer is shared); at a lower
        ratio, slots beyond the writer's gist tokens reuse its last one, as in training.

        Raises:
            ValueError: A change of compressor or of the number of gist tokens, or an unknown field.
        """
        import dataclasses

        unknown = set(changes) - {f.name for f in dataclasses.fields(self.config)}
        if unknown:
            raise ValueError(f"unknown GistConfig fields: {sorted(unknown)}")
        cfg = dataclasses.replace(self.config, **changes)
        if cfg.compressor != self.config.compressor:
            raise ValueError("with_config shares the writer: the compressor cannot change "
                             f"({self.config.compressor!r} -> {cfg.compressor!r}); build a new GistModel")
        if "num_gist_tokens" in changes and int(changes["num_gist_tokens"]) != self.config.num_gist_tokens:
            raise ValueError(f"with_config shares the writer: it has {self.config.num_gist_tokens} gist tokens, "
                             f"not {changes['num_gist_tokens']}")
        # a lower ratio asks for more gist slots per sentence than the writer has tokens: the extra slots reuse the
        # last token, as in training (the config's own default would grow the vocabulary instead)
        cfg.num_gist_tokens = self.config.num_gist_tokens
        twin = type(self)(self.model, self.tokenizer, cfg, self.base_ref)
        twin.writer = self.writer
        twin.reader_adapted = self.reader_adapted
        twin.chunk_tokens = self.chunk_tokens
        return twin

    # ---- shared state ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """The model in eval mode for the duration of a call; the mode it had comes back after the last call
        running at the same time ends (calls from several threads overlap)."""
        with self._lock:
            if self._eval_users == 0:
                self._eval_was_training = self.model.training
                self.model.eval()
            self._eval_users += 1
        try:
            yield
        finally:
            with self._lock:
                self._eval_users -= 1
                if self._eval_users == 0 and self._eval_was_training:
                    self.model.train(True)

    def _mask_dtype(self) -> torch.dtype:
        return self.dtype if self.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
