"""`GistModel`: a Hugging Face causal LM that writes gist states and answers from them.

    model = GistModel.from_pretrained()                       # embedded default
    states = model.compress(["passage one ...", "passage two ..."])
    model.generate("question", states=states)

Inference layout (training uses the same code path, see `gist_memory.train`):

    [raw prefix: chat template up to the user's text] [state 1] ... [state k] [raw suffix: "\\n\\n" question ...]

Each state was compressed alone, starting at position 0; when spliced it is re-rotated to its new offset. The
prefix and suffix are ordinary tokens; the suffix sees the prefix and every kept row, nothing raw of a passage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from gist_memory.config import GistConfig
from gist_memory.layout import KIND_GIST_TOKEN, Layout, Segment, build_writer_batch, float_mask, window_starts
from gist_memory.model import kv
from gist_memory.model.base import BUNDLED, load_base
from gist_memory.model.plan import Plan, make_plan
from gist_memory.model.usage import LastUsage, Usage, check_usage
from gist_memory.model.writer import LORA_TARGETS, Writer
from gist_memory.state import KIND_ANCHOR, KIND_GIST, KIND_POOL, GistState
from gist_memory.state.gist_state import text_hash
from gist_memory.text.split import SentenceSplitter, normalize_text

ADAPTER_WEIGHTS = "gist_adapter.safetensors"
ADAPTER_META = "gist_adapter.json"
FORMAT_VERSION = 2
_CONTEXT_MARK = "\u2063GIST-CONTEXT\u2063"
_ROLES = ("system", "user", "assistant")
Prompt = Union[str, Sequence[Mapping[str, str]]]


def _messages(prompt: Prompt, system_prompt: Optional[str]) -> list[dict[str, str]]:
    """A prompt string or a chat conversation as a checked list of {role, content} messages."""
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("messages is empty")
        msgs = []
        for i, m in enumerate(prompt):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must be a mapping with str 'role' and 'content', got {m!r:.80}")
            if m["role"] not in _ROLES:
                raise ValueError(f"message {i} has role {m['role']!r}; roles are {', '.join(_ROLES)}")
            msgs.append({"role": m["role"], "content": m["content"]})
        if msgs[-1]["role"] != "user":
            raise ValueError(f"the last message must be the user's (the model answers it), got {msgs[-1]['role']!r}")
    else:
        raise TypeError(f"prompt must be a str or a list of messages, got {type(prompt).__name__}")
    if system_prompt:
        if msgs[0]["role"] == "system":
            raise ValueError("pass the system prompt either as system_prompt or as a system message, not both")
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs
_GEN_KWARGS = {
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "eos_token_id",
    "stop",
    "seed",
    "system_prompt",
    "context_prefix",
}
DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_PREFIX_CACHE_BYTES = 32 * 1024 * 1024


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class GistModel:
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
        if config.uses_gist_tokens:
            self.writer = Writer(self.model, config.num_gist_tokens, r=lora_r, alpha=lora_alpha, targets=lora_targets)

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_base(
        cls,
        base: Optional[str] = None,
        config: Optional[GistConfig] = None,
        *,
        device: Optional[str] = None,
        dtype: Any = None,
        trust_remote_code: bool = False,
        attn_implementation: str = "sdpa",
        lora_r: int = 0,
        lora_alpha: float = 32.0,
    ) -> GistModel:
        """A fresh gist model over a base causal LM (None = the embedded SmolLM2-135M-Instruct).

        Args:
            base: Local folder or hub id of a causal LM; None for the embedded default.
            config: The `GistConfig` (default `GistConfig()`).
            device: `cuda`/`cpu`/...; default cuda when available.
            dtype: torch dtype or its name; default bf16 on CUDA, fp32 on CPU.
            trust_remote_code: Off unless asked for.
            attn_implementation: `sdpa` or `eager`.
            lora_r / lora_alpha: Rank and alpha of the writer's LoRA (0: gist embeddings only).
        """
        config = config or GistConfig()
        if isinstance(dtype, str):
            dtype = _dtype(dtype)
        lm, tok, ref = load_base(
            base, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
        return cls(lm, tok, config, ref, lora_r=lora_r, lora_alpha=lora_alpha)

    @classmethod
    def from_pretrained(
        cls,
        path: Optional[Union[str, os.PathLike]] = None,
        *,
        device: Optional[str] = None,
        dtype: Any = None,
        trust_remote_code: bool = False,
        config_overrides: Optional[dict[str, Any]] = None,
    ) -> GistModel:
        """Load a saved gist model (gist_config.json + writer + base reference); None = the shipped default.

        Args:
            path: Folder written by `save_pretrained`; None loads the adapter shipped with the package.
            device / dtype: As in `from_base`.
            trust_remote_code: Off unless asked for.
            config_overrides: GistConfig fields to change, e.g. `{"target_ratio": 8}` (a writer trained over
                several ratios serves each of them). The number of gist embeddings cannot grow.

        Raises:
            ValueError: not a gist model folder, an adapter of an older format, or a base whose weights differ
                from the ones the adapter was trained on (both fingerprints named).
        """
        if path is None:
            path = default_model_dir()
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no gist model folder at {path}")
        meta_file = path / ADAPTER_META
        if not meta_file.is_file():
            raise ValueError(f"{path} is not a saved gist model ({ADAPTER_META} missing)")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_file} is not valid json: {e}") from e
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path}: adapter format {version!r}, this gist-memory reads format {FORMAT_VERSION} "
                "(format 1 merged its LoRA into the reader; retrain with `gist-memory train`)"
            )
        config = GistConfig.from_pretrained(path)
        spec = meta.get("writer") or {}
        n_saved = int(spec.get("num_gist_tokens", config.num_gist_tokens))
        if config_overrides:
            config = GistConfig.from_dict({**config.to_dict(), **config_overrides})
            if config.compressor == "gist" and config.num_gist_tokens > n_saved:
                raise ValueError(
                    f"config_overrides need {config.num_gist_tokens} gist embeddings; the adapter has {n_saved} "
                    "(choose a larger target_ratio or fewer gists per sentence)"
                )
            config.num_gist_tokens = n_saved if config.compressor == "gist" else config.num_gist_tokens
        gm = cls.from_base(meta.get("base", BUNDLED), config, device=device, dtype=dtype,
                           trust_remote_code=trust_remote_code, lora_r=int(spec.get("r", 0)),
                           lora_alpha=float(spec.get("alpha", 32.0)))
        want = meta.get("base_fingerprint")
        have = gm.base_fingerprint()
        if want and want != have:
            raise ValueError(
                f"{path}: the adapter was trained on base weights with fingerprint {want}, but "
                f"{meta.get('base', BUNDLED)} loaded as {have}; load the base it was trained on"
            )
        if gm.writer is not None:
            gm.writer.load_tensors(_load_tensors(path / ADAPTER_WEIGHTS), where=str(path))
        gm.invalidate_fingerprint()
        return gm

    def save_pretrained(self, directory: Union[str, os.PathLike], adapter_dtype: Any = torch.float32) -> None:
        """Write gist_config.json, the writer (gist embeddings + LoRA, safetensors) and the base reference.

        Args:
            directory: Output folder.
            adapter_dtype: Storage dtype of the LoRA matrices (bf16 halves the file; gist rows stay fp32).
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self.writer.tensors(adapter_dtype) if self.writer is not None else {}
        meta = {
            "base": self.base_ref,
            "format_version": FORMAT_VERSION,
            "reader": "base",
            "writer": self.writer.spec() if self.writer is not None else None,
            "base_fingerprint": self.base_fingerprint(),
        }
        save_file(tensors, str(directory / ADAPTER_WEIGHTS))
        self.config.save_pretrained(directory)
        (directory / ADAPTER_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")

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

    def base_fingerprint(self) -> str:
        """Identity of the base model's architecture and weights, the same on every machine.

        Hashes the config without what varies with where and how the same weights were loaded (its path, the
        transformers version, the load dtype) and a strided sample of every parameter rounded to bf16, so the
        same checkpoint loaded in fp32 or bf16, from any folder, fingerprints alike.
        """
        h = hashlib.sha256()
        lm = self.model
        cfg = {k: v for k, v in lm.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        with torch.no_grad():
            for name, p in sorted(lm.named_parameters(), key=lambda kv_: kv_[0]):
                _update_sample(h, name, p, torch.bfloat16)
        return h.hexdigest()[:24]

    @property
    def fingerprint(self) -> str:
        """Identity of base weights + writer + gist config + dtype; a state is served only to its writer."""
        fp = self._fingerprint
        if fp is not None:
            return fp
        with self._lock:
            if self._fingerprint is None:
                self._fingerprint = self._compute_fingerprint()
            return self._fingerprint

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.base_ref.encode())
        h.update(self.base_fingerprint().encode())
        if self.writer is not None:
            with torch.no_grad():
                for name, p in sorted(self.writer.named_parameters(), key=lambda kv_: kv_[0]):
                    _update_sample(h, name, p)
                h.update(self.writer.gist_embeddings.detach().float().cpu().numpy().tobytes())
        h.update(self.config.fingerprint().encode())
        h.update(str(self.dtype).encode())
        return h.hexdigest()[:32]

    def invalidate_fingerprint(self) -> None:
        """Forget the cached fingerprint and prefix caches (call after changing the weights)."""
        with self._lock:
            self._fingerprint = None
            self._prefix_cache.clear()
            self._prefix_bytes = 0

    # ---- shared state ------------------------------------------------------------------------------
    @property
    def prefix_cache_bytes(self) -> int:
        """Most bytes the prefix cache (K/V of chat-template openings) may hold; set it to resize (0: off)."""
        return self._prefix_budget

    @prefix_cache_bytes.setter
    def prefix_cache_bytes(self, value: int) -> None:
        value = int(value)
        if value < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {value}")
        with self._lock:
            self._prefix_budget = value
            self._evict_prefixes()

    def cache_info(self) -> dict[str, int]:
        """What the model's own caches hold now: prefix entries, their bytes and the budget."""
        with self._lock:
            return {"prefix_entries": len(self._prefix_cache), "prefix_bytes": self._prefix_bytes,
                    "prefix_budget_bytes": self._prefix_budget}

    def _evict_prefixes(self) -> None:
        while self._prefix_cache and self._prefix_bytes > self._prefix_budget:
            _, layers = self._prefix_cache.popitem(last=False)
            self._prefix_bytes -= _layers_bytes(layers)

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

    def normalize(self, text: str) -> str:
        """The normalisation applied before hashing and compressing."""
        return normalize_text(text)

    def state_key(self, text: str) -> str:
        """Content key of the state `text` would get from this model."""
        return hashlib.sha256(f"{text_hash(self.normalize(text))}:{self.fingerprint}".encode()).hexdigest()

    def check_states(self, states: Optional[Sequence[GistState]]) -> list[GistState]:
        """Refuse states written by another model (or not states at all) with a ValueError naming both."""
        if not states:
            return []
        out = []
        for i, st in enumerate(states):
            if not isinstance(st, GistState):
                raise ValueError(f"states[{i}] is a {type(st).__name__}, not a GistState")
            if st.model_fingerprint != self.fingerprint:
                writer = st.meta.get("model_name", "another model")
                raise ValueError(
                    f"states[{i}] was written by {writer} (fingerprint {st.model_fingerprint[:12]}), "
                    f"not by this model {self.name} (fingerprint {self.fingerprint[:12]}); recompress it"
                )
            out.append(st)
        return out

    # ---- compression -------------------------------------------------------------------------------
    def plan(self, text: str) -> Plan:
        """How `text` would be compressed (pieces, anchors, rows per piece), without running the model."""
        norm = self.normalize(text)
        if not norm:
            raise ValueError("cannot compress an empty or whitespace-only text")
        return make_plan(norm, self.tokenizer, self.config, self.splitter)

    @torch.no_grad()
    def compress(
        self, texts: Union[str, Sequence[str]], batch_size: int = 8, device_out: Optional[str] = "cpu"
    ) -> list[GistState]:
        """Compress texts into gist states, one per text (batched; long texts window by window).

        Args:
            texts: Passages (a single str is accepted too).
            batch_size: Passages per forward pass.
            device_out: Where the returned states live (None: the model's device).

        Raises:
            ValueError: An empty/whitespace-only text.
        """
        if isinstance(texts, str):
            texts = [texts]
        with self._eval_mode():
            return self.compress_with_grad(texts, batch_size=batch_size, device_out=device_out)

    def compress_with_grad(
        self, texts: Sequence[str], batch_size: int = 8, device_out: Optional[str] = None,
        plans: Optional[Sequence[Plan]] = None,
    ) -> list[GistState]:
        """`compress` without `no_grad`: gradients flow into the gist rows (used by training).

        `plans` (from `plan`) may be given to skip re-planning the same texts.
        """
        plans = list(plans) if plans is not None else [self.plan(t) for t in texts]
        return self._states(plans, self._compress_plans(plans, batch_size), device_out)

    def compress_for_training(
        self, plans: Sequence[Plan], batch_size: int = 64
    ) -> tuple[list[GistState], list[GistState]]:
        """(compressed states with gradients, uncompressed twins) sharing one text pass.

        The twin of a text keeps every raw row the base model computed for it (ratio 1.0): reading it is what
        reading the full text would give, so it is the teacher that the compressed state is trained to match.
        """
        plans = list(plans)
        full: list = [None] * len(plans)
        states = self._states(plans, self._compress_plans(plans, batch_size, full=full), None)
        twins = self._states(plans, full, None)
        return states, twins

    def _states(self, plans: Sequence[Plan], results: Sequence, device_out: Optional[str]) -> list[GistState]:
        fp = self.fingerprint
        states = []
        for plan, (keys, values, positions, kinds, span) in zip(plans, results):
            st = GistState(
                keys=keys,
                values=values,
                positions=positions.to(torch.int64),
                kinds=kinds.to(torch.uint8),
                span=int(span),
                num_tokens=plan.num_tokens,
                sentence_spans=plan.char_spans,
                text_hash=text_hash(plan.text),
                model_fingerprint=fp,
                text=plan.text,
                meta={"model_name": self.name, "compressor": self.config.compressor},
            )
            states.append(st.to(device_out) if device_out is not None else st)
        return states

    def segment(self, plan: Plan) -> Segment:
        """The layout `Segment` of a plan (ids, pieces, gists per piece, anchors)."""
        return Segment(ids=plan.ids.tolist(), pieces=list(plan.pieces), n_gists=list(plan.n_other),
                       anchors=plan.anchors.tolist())

    def _compress_plans(self, plans: list[Plan], batch_size: int, full: Optional[list] = None) -> list:
        """Per plan (keys, values, positions, kinds, span) in plan order; `full` (a list as long as `plans`)
        receives the same for every raw row (the uncompressed twin)."""
        results: list = [None] * len(plans)
        W = int(self.config.window_tokens)
        short = [i for i, p in enumerate(plans) if p.num_tokens <= min(self.chunk_tokens, W)]
        long_ = [i for i, p in enumerate(plans) if p.num_tokens > min(self.chunk_tokens, W)]
        short.sort(key=lambda i: plans[i].num_tokens)  # similar lengths share a batch: less padding
        for b0 in range(0, len(short), batch_size):
            idx = short[b0 : b0 + batch_size]
            segs = [self.segment(plans[i]) for i in idx]
            with torch.no_grad():
                text = self.text_pass([s.ids for s in segs])
            for i, res in zip(idx, self._keep(plans, idx, segs, text)):
                results[i] = res
            if full is not None:
                for b, i in enumerate(idx):
                    full[i] = self._all_rows([(k[b : b + 1], v[b : b + 1]) for k, v in text], plans[i].num_tokens)
        for i in long_:
            seg = self.segment(plans[i])
            with torch.no_grad():
                text = self._text_pass_windows(seg)
            results[i] = self._keep(plans, [i], [seg], text)[0]
            if full is not None:
                full[i] = self._all_rows(text, plans[i].num_tokens)
        return results

    def _all_rows(self, text, n: int) -> tuple:  # noqa: ANN001
        K = torch.stack([k[0, :, :n] for k, _ in text])  # (L, H, n, D)
        V = torch.stack([v[0, :, :n] for _, v in text])
        pos = torch.arange(n, device=K.device)
        return K, V, pos, torch.full_like(pos, KIND_ANCHOR), n

    def text_pass(self, rows: Sequence[Sequence[int]], start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Pass 1: the base model reads raw ids causally (right-padded batch, positions from `start`).

        Returns per layer (keys, values), each (B, H, N, D), N the longest row. Rows never see their padding.
        """
        N = max(len(r) for r in rows)
        ids = torch.full((len(rows), N), self._pad_id(), dtype=torch.long, device=self.device)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        pos = (start + torch.arange(N, device=self.device))[None].expand(len(rows), -1)
        out = self.model.get_decoder()(input_ids=ids, position_ids=pos, use_cache=True)
        return kv.cache_layers(kv.out_cache(out))

    def _text_pass_windows(self, seg: Segment) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Pass 1 for a long text: each visibility window read alone (positions continue), in exact chunks."""
        ids = list(seg.ids)
        starts = window_starts(seg, self.config.window_tokens) + [len(ids)]
        ks: list[list[torch.Tensor]] = []
        vs: list[list[torch.Tensor]] = []
        for w0, w1 in zip(starts[:-1], starts[1:]):
            past = None
            for c0 in range(w0, w1, self.chunk_tokens):
                c1 = min(w1, c0 + self.chunk_tokens)
                x = torch.as_tensor([ids[c0:c1]], device=self.device)
                pos = torch.arange(c0, c1, device=self.device)[None]
                out = kv.call(self.model.get_decoder(), cache=past, input_ids=x, position_ids=pos, use_cache=True)
                past = kv.out_cache(out)
            layers = kv.cache_layers(past)
            if not ks:
                ks, vs = [[] for _ in layers], [[] for _ in layers]
            for li, (k, v) in enumerate(layers):
                ks[li].append(k)
                vs[li].append(v)
        return [(torch.cat(k, 2), torch.cat(v, 2)) for k, v in zip(ks, vs)]

    def _keep(self, plans: list[Plan], idx: list[int], segs: list[Segment], text) -> list:  # noqa: ANN001
        if self.config.compressor == "gist":
            return self._gist_rows(segs, text)
        return [self._pool_rows(plans[i], [(k[b : b + 1], v[b : b + 1]) for k, v in text])
                for b, i in enumerate(idx)]

    def _gist_rows(self, segs: list[Segment], text) -> list:  # noqa: ANN001
        """Pass 2 (the writer): gist slots attend to the text rows and earlier gists; anchors kept raw."""
        assert self.writer is not None
        dev = self.device
        wb = build_writer_batch(segs, self._pad_id(), self.config.window_tokens, device=dev)
        N = wb.text_ids.shape[1]
        text = [(k[:, :, :N], v[:, :, :N]) for k, v in text]
        G = wb.gist_slot.shape[1]
        gist_k = gist_v = None
        if G:
            mask = float_mask(wb.gist_allowed(), self._mask_dtype())
            embeds = self.writer.embed(wb.gist_slot, self.dtype)
            cache = kv.cache_from_layers(text)
            with self.writer.writing():
                out = kv.call(self.model.get_decoder(), cache=cache, inputs_embeds=embeds, attention_mask=mask,
                              position_ids=wb.gist_pos, use_cache=True)
            layers = kv.cache_layers(kv.out_cache(out))
            gist_k = torch.stack([k[:, :, N:] for k, _ in layers], 1)  # (B, L, H, G, D)
            gist_v = torch.stack([v[:, :, N:] for _, v in layers], 1)
        text_k = torch.stack([k for k, _ in text], 1)  # (B, L, H, N, D)
        text_v = torch.stack([v for _, v in text], 1)
        res = []
        for b, s in enumerate(segs):
            a = torch.nonzero(wb.anchors[b], as_tuple=False).reshape(-1)
            g = torch.nonzero(wb.gist_valid[b], as_tuple=False).reshape(-1)
            ks, vs = [text_k[b][:, :, a]], [text_v[b][:, :, a]]
            if gist_k is not None:
                ks.append(gist_k[b][:, :, g])
                vs.append(gist_v[b][:, :, g])
            pos = torch.cat([a, wb.gist_pos[b, g]])
            kinds = torch.cat([torch.full_like(a, KIND_ANCHOR), torch.full_like(g, KIND_GIST)])
            order = torch.argsort(pos * 2 + (kinds == KIND_GIST).long(), stable=True)
            K, V = torch.cat(ks, 2)[:, :, order], torch.cat(vs, 2)[:, :, order]
            res.append((K, V, pos[order], kinds[order], len(s.ids)))
        return res

    def _pool_rows(self, plan: Plan, text) -> tuple:  # noqa: ANN001
        """Training-free: anchors kept raw, the rest of each piece mean-pooled (keys un-rotated, averaged,
        re-rotated to the group's mean position)."""
        dev = self.device
        n = plan.num_tokens
        K = torch.stack([k[0, :, :n] for k, _ in text])  # (L, H, n, D)
        V = torch.stack([v[0, :, :n] for _, v in text])
        groups = np.empty(n, dtype=np.int64)
        row_kind, nxt = [], 0
        for (s, e), n_pool in zip(plan.pieces, plan.n_other):
            anc = plan.anchors[s:e]
            rest = np.flatnonzero(~anc)
            if len(rest):
                g = (np.arange(len(rest)) * n_pool) // len(rest)
                groups[s + rest] = nxt + g
                row_kind += [KIND_POOL] * n_pool
                nxt += n_pool
            for j in np.flatnonzero(anc):
                groups[s + j] = nxt
                row_kind.append(KIND_ANCHOR)
                nxt += 1
        g = torch.as_tensor(groups, device=dev)
        counts = torch.bincount(g, minlength=nxt).clamp_min(1)
        tok_pos = torch.arange(n, device=dev)
        K0 = kv.rotate(K, -tok_pos, self.rope)
        Ksum = torch.zeros(K.shape[0], K.shape[1], nxt, K.shape[3], dtype=torch.float32, device=dev)
        Vsum = torch.zeros(V.shape[0], V.shape[1], nxt, V.shape[3], dtype=torch.float32, device=dev)
        Ksum.index_add_(2, g, K0.float())
        Vsum.index_add_(2, g, V.float())
        gpos = torch.zeros(nxt, dtype=torch.float32, device=dev).index_add_(0, g, tok_pos.float())
        gpos = torch.round(gpos / counts).long()
        Kp = (Ksum / counts[None, None, :, None]).to(K.dtype)
        Vp = (Vsum / counts[None, None, :, None]).to(V.dtype)
        Kp = kv.rotate(Kp, gpos, self.rope)
        order = torch.argsort(gpos, stable=True)
        kinds = torch.as_tensor(row_kind, device=dev)[order]
        return Kp[:, :, order], Vp[:, :, order], gpos[order], kinds, n

    def forward_layout(self, lay: Layout) -> torch.Tensor:
        """Logits of the reference single pass over a `build_layout` batch (text, gists, tail in one forward).

        The writer acts on the gist rows only; text and tail rows run the base weights. Compressing each segment
        alone and continuing from its spliced state gives the same tail logits (the invariant tests pin).
        """
        emb = self.model.get_input_embeddings()(lay.input_ids.clamp_min(0))
        is_gist = lay.kind == KIND_GIST_TOKEN
        if is_gist.any():
            if self.writer is None:
                raise ValueError("this layout has gist rows but the model has no writer")
            g = self.writer.embed(lay.gist_slot.clamp_min(0), emb.dtype)
            emb = torch.where(is_gist[..., None], g, emb)
        mask = lay.attention_mask(self._mask_dtype())
        ctx = self.writer.writing(gate=is_gist) if self.writer is not None else contextlib.nullcontext()
        with ctx:
            out = self.model(inputs_embeds=emb, attention_mask=mask, position_ids=lay.position_ids)
        return out.logits

    def _pad_id(self) -> int:
        t = self.tokenizer
        for cand in (t.pad_token_id, t.eos_token_id, 0):
            if cand is not None:
                return int(cand)
        return 0

    def _mask_dtype(self) -> torch.dtype:
        return self.dtype if self.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32

    # ---- prompts -----------------------------------------------------------------------------------
    def _template(
        self, prompt: Prompt, with_states: bool, system_prompt: Optional[str], context_prefix: str = ""
    ) -> tuple[str, str]:
        """(text before the spliced states, text after them) for a chat or plain model.

        `prompt` is a user message, or a conversation (`[{"role": ..., "content": ...}, ...]`, as for HF chat
        templates); the states go at the start of its first user message, after any system message.
        """
        msgs = _messages(prompt, system_prompt)
        if with_states or context_prefix:
            first_user = next(i for i, m in enumerate(msgs) if m["role"] == "user")
            mark = (_CONTEXT_MARK + "\n\n") if with_states else ""
            msgs[first_user] = {**msgs[first_user], "content": context_prefix + mark + msgs[first_user]["content"]}
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            bos = tok.bos_token if (tok.bos_token and self._adds_bos()) else ""
            if len(msgs) == 1 or (len(msgs) == 2 and msgs[0]["role"] == "system"):  # a plain prompt, as before
                rendered = bos + "".join(m["content"] + "\n\n" for m in msgs[:-1]) + msgs[-1]["content"]
            else:
                turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in msgs)
                rendered = bos + turns + "Assistant:"
        if not with_states:
            return rendered, ""
        if rendered.count(_CONTEXT_MARK) != 1:
            raise ValueError("the chat template altered the context marker; cannot place gist states")
        before, after = rendered.split(_CONTEXT_MARK)
        return before, after

    def _adds_bos(self) -> bool:
        t = self.tokenizer
        ids = t("a", add_special_tokens=True)["input_ids"]
        return bool(t.bos_token_id is not None and ids and ids[0] == t.bos_token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens ([] for empty text)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    _ids = encode

    def prefix_cache(self, prefix_ids: list[int]) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
        """K/V of the raw prefix (the chat template's opening), cached per model state.

        It never sees a passage, so it is computed without gradients even while training (the trainer clears
        the cache every step, when the weights change).
        """
        if not prefix_ids:
            return None
        key = (tuple(prefix_ids), self.fingerprint)
        with self._lock:
            hit = self._prefix_cache.get(key)
            if hit is not None:
                self._prefix_cache.move_to_end(key)
                return hit
        # computed outside the lock (two threads may both compute a new prefix; the results are equal)
        ids = torch.as_tensor([prefix_ids], device=self.device)
        with torch.no_grad():
            out = self.model.get_decoder()(input_ids=ids,
                                           position_ids=torch.arange(len(prefix_ids), device=self.device)[None],
                                           use_cache=True)
        layers = [(k.detach(), v.detach()) for k, v in kv.cache_layers(kv.out_cache(out))]
        size = _layers_bytes(layers)
        with self._lock:
            if key in self._prefix_cache:
                return self._prefix_cache[key]
            if size <= self._prefix_budget and self._fingerprint == key[1]:  # not stale after invalidation
                self._prefix_cache[key] = layers
                self._prefix_bytes += size
                self._evict_prefixes()
        return layers

    _prefix_kv = prefix_cache

    def prepare(
        self,
        prompt: Prompt,
        states: Optional[Sequence[GistState]] = None,
        system_prompt: Optional[str] = None,
        context_prefix: str = "",
    ) -> tuple[Optional[list[tuple[torch.Tensor, torch.Tensor]]], int, list[int]]:
        """The cache the answer starts from: (per-layer K/V or None, next position, ids still to feed).

        With states: the raw prefix's K/V plus the re-rotated states; the suffix ids remain to be fed.
        Without: no cache; the whole templated prompt remains to be fed (the full-text / no-context twin).
        `context_prefix` is raw text placed right before the states (e.g. "Context information is below.").
        """
        states = self.check_states(states)
        before, after = self._template(prompt, bool(states), system_prompt, context_prefix)
        if not states:
            return None, 0, self.encode(before)
        prefix_ids = self.encode(before)
        prefix = self.prefix_cache(prefix_ids)
        layers, pos = kv.splice(
            prefix, len(prefix_ids), states, self.rope, self.config.position_mode, device=self.device, dtype=self.dtype
        )
        return layers, pos, self.encode(after)

    def forward_ids(self, ids: torch.Tensor, layers, start: int):  # noqa: ANN001, ANN201
        """Run the reader (the base LM) on ids (B, S) after cached per-layer K/V at position `start`.

        `layers`: per-layer (keys, values) of shape (1 or B, H, T, D) (e.g. from `prepare`), or None.
        Returns (logits (B, S, V), the updated cache). Gradients flow into `layers` if they carry any.
        """
        B, S = ids.shape
        cache = None
        if layers is not None:
            cache = kv.cache_from_layers([(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in layers])
        pos = (start + torch.arange(S, device=ids.device))[None].expand(B, -1)
        out = kv.call(self.model, cache=cache, input_ids=ids, position_ids=pos, use_cache=True)
        return out.logits, kv.out_cache(out)

    _forward = forward_ids

    # ---- scoring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self,
        prompt: Prompt,
        continuation: str,
        states: Optional[Sequence[GistState]] = None,
        system_prompt: Optional[str] = None,
        context_prefix: str = "",
        usage: Optional[Usage] = None,
    ) -> float:
        """Summed log-probability of `continuation` as the answer to `prompt` (reading `states` if given).

        `usage`: a `Usage` this call fills (positions read, prompt tokens, time).
        """
        return self.score_choices(prompt, [continuation], states=states, system_prompt=system_prompt,
                                  context_prefix=context_prefix, usage=usage)[0]

    @torch.no_grad()
    def score_choices(
        self,
        prompt: Prompt,
        continuations: Sequence[str],
        states: Optional[Sequence[GistState]] = None,
        system_prompt: Optional[str] = None,
        context_prefix: str = "",
        usage: Optional[Usage] = None,
    ) -> list[float]:
        """Summed log-probabilities of several continuations, sharing one prefill (a batch).

        `usage`: a `Usage` this call fills (positions read, prompt tokens, time).
        """
        check_usage(usage)
        t0 = time.perf_counter()
        if not continuations:
            return []
        layers, start, head = self.prepare(prompt, states, system_prompt, context_prefix)
        conts = [self.encode(c) for c in continuations]
        if any(len(c) == 0 for c in conts):
            raise ValueError("a continuation is empty (no tokens to score)")
        if not head and layers is None:
            raise ValueError("nothing to condition on: empty prompt and no states")
        S = len(head) + max(len(c) for c in conts)
        pad = self._pad_id()
        ids = torch.full((len(conts), S), pad, dtype=torch.long, device=self.device)
        for i, c in enumerate(conts):
            ids[i, : len(head) + len(c)] = torch.as_tensor(head + c)
        with self._eval_mode():
            logits, _ = self.forward_ids(ids, layers, start)
        logp = torch.log_softmax(logits.float(), -1)
        out = []
        for i, c in enumerate(conts):
            # token t of the continuation sits at index len(head)+t, predicted at index len(head)+t-1
            if len(head) == 0:
                raise ValueError("score needs a prompt before the continuation")
            tgt = torch.as_tensor(c, device=self.device)
            pos = len(head) - 1 + torch.arange(len(c), device=self.device)
            out.append(float(logp[i, pos, tgt].sum()))
        self._report(usage, self._usage(states, layers, len(head), total_s=time.perf_counter() - t0))
        return out

    @staticmethod
    def _usage(states, layers, fed: int, **extra: Any) -> Usage:  # noqa: ANN001
        cached = 0 if layers is None else int(layers[0][0].shape[2])
        states = states or []
        return Usage(
            raw_tokens=int(sum(s.num_tokens for s in states)),
            kept_rows=int(sum(s.num_kept for s in states)),
            positions_read=cached + fed,
            prompt_tokens=fed,
            **extra,
        )

    def _report(self, usage: Optional[Usage], measured: Usage) -> None:
        """Fill the caller's `usage` and this thread's (deprecated) `last_usage`."""
        if usage is not None:
            usage.update(measured)
        self._last_usage.value = measured.to_dict()

    @property
    def last_usage(self) -> dict[str, Any]:
        """Deprecated (use `usage=` or `generate_with_usage`): the calling thread's last call's usage, as a dict.

        Per thread, so concurrent callers do not read each other's numbers; `{}` before a call in this thread.
        """
        return dict(self._last_usage.value)

    @last_usage.setter
    def last_usage(self, value: dict[str, Any]) -> None:
        self._last_usage.value = dict(value)

    # ---- generation --------------------------------------------------------------------------------
    def generate(self, prompt: Prompt, states: Optional[Sequence[GistState]] = None, *,
                 usage: Optional[Usage] = None, **kwargs: Any) -> str:
        """Answer `prompt` reading `states` (chat template applied for chat models).

        Keyword args (as in HF `generate`): max_new_tokens (64), do_sample, temperature, top_k, top_p,
        repetition_penalty, eos_token_id, plus `stop` (strings), `seed`, `system_prompt` and `context_prefix`
        (raw text placed right before the states), and `usage` (a `Usage` this call fills).
        """
        return "".join(self.stream(prompt, states=states, usage=usage, **kwargs))

    def generate_with_usage(self, prompt: Prompt, states: Optional[Sequence[GistState]] = None,
                            **kwargs: Any) -> tuple[str, Usage]:
        """`generate`, returning `(text, Usage)` of this call."""
        usage = Usage()
        text = self.generate(prompt, states=states, usage=usage, **kwargs)
        return text, usage

    def stream(self, prompt: Prompt, states: Optional[Sequence[GistState]] = None, *,
               usage: Optional[Usage] = None, **kwargs: Any) -> Iterator[str]:
        """Like `generate`, yielding text pieces as they are decoded; `usage` is filled when the stream ends
        (exhausted, closed, or failed)."""
        unknown = set(kwargs) - _GEN_KWARGS
        if unknown:
            raise TypeError(f"unsupported generation arguments: {sorted(unknown)}; supported: {sorted(_GEN_KWARGS)}")
        check_usage(usage)
        return self._stream(prompt, states, usage, **kwargs)

    @torch.no_grad()
    def _stream(
        self,
        prompt: Prompt,
        states: Optional[Sequence[GistState]],
        usage: Optional[Usage],
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        eos_token_id: Optional[Union[int, list[int]]] = None,
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
        system_prompt: Optional[str] = None,
        context_prefix: str = "",
    ) -> Iterator[str]:
        t0 = time.perf_counter()
        layers, start, head = self.prepare(prompt, states, system_prompt, context_prefix)
        if not head:
            raise ValueError("empty prompt: nothing to generate from")
        eos = self._eos_ids(eos_token_id)
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        ids = torch.as_tensor([head], device=self.device)
        out_ids: list[int] = []
        emitted = ""
        ttft = None
        eval_mode = self._eval_mode()
        eval_mode.__enter__()
        try:
            logits, cache = self.forward_ids(ids, layers, start)
            pos = start + len(head)
            text = ""
            for _ in range(int(max_new_tokens)):
                nxt = self._pick(logits[0, -1], out_ids + head, do_sample, temperature, top_k, top_p,
                                 repetition_penalty, gen)
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if nxt in eos:
                    break
                out_ids.append(nxt)
                text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                cut = _stop_index(text, stop)
                if cut is not None:
                    if cut > len(emitted):
                        yield text[len(emitted):cut]
                    emitted = text[:cut]
                    break
                safe = len(text) - _held_back(text, stop)  # a possible start of a stop string waits
                if not text.endswith("\ufffd") and safe > len(emitted):
                    yield text[len(emitted):safe]
                    emitted = text[:safe]
                out = kv.call(
                    self.model,
                    cache=cache,
                    input_ids=torch.as_tensor([[nxt]], device=self.device),
                    position_ids=torch.as_tensor([[pos]], device=self.device),
                    use_cache=True,
                )
                logits, cache = out.logits, kv.out_cache(out)
                pos += 1
            else:
                text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
            if _stop_index(text, stop) is None and len(text) > len(emitted) and not text.endswith("\ufffd"):
                yield text[len(emitted):]  # the held-back tail was no stop string after all
        finally:
            eval_mode.__exit__(None, None, None)
            self._report(usage, self._usage(
                states, layers, len(head), new_tokens=len(out_ids), ttft_s=ttft, total_s=time.perf_counter() - t0
            ))

    def _eos_ids(self, eos_token_id: Optional[Union[int, list[int]]]) -> set[int]:
        if eos_token_id is not None:
            return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        ids = set()
        for cand in (self.tokenizer.eos_token_id, getattr(self._base_lm().generation_config, "eos_token_id", None)):
            if isinstance(cand, int):
                ids.add(cand)
            elif isinstance(cand, (list, tuple)):
                ids.update(int(c) for c in cand)
        for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"):
            i = self.tokenizer.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != self.tokenizer.unk_token_id and i is not None and i >= 0:
                if t in self.tokenizer.get_vocab():
                    ids.add(i)
        return ids

    @staticmethod
    def _pick(logits: torch.Tensor, history: list[int], do_sample: bool, temperature: float, top_k: int,
              top_p: float, repetition_penalty: float, gen: Optional[torch.Generator]) -> int:
        logits = logits.float().clone()
        if repetition_penalty != 1.0 and history:
            h = torch.as_tensor(sorted(set(history)), device=logits.device)
            sel = logits[h]
            logits[h] = torch.where(sel > 0, sel / repetition_penalty, sel * repetition_penalty)
        if not do_sample:
            return int(torch.argmax(logits))
        if temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        logits = logits / temperature
        if top_k and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits[logits < kth] = -math.inf
        if top_p < 1.0:
            srt, idx = torch.sort(logits, descending=True)
            cum = torch.softmax(srt, -1).cumsum(-1)
            drop = cum - torch.softmax(srt, -1) > top_p
            logits[idx[drop]] = -math.inf
        probs = torch.softmax(logits, -1).cpu()
        return int(torch.multinomial(probs, 1, generator=gen))


def _layers_bytes(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return int(sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers))


def _held_back(text: str, stop: Optional[Sequence[str]]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (not yet safe to show)."""
    if not stop:
        return 0
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


def _stop_index(text: str, stop: Optional[Sequence[str]]) -> Optional[int]:
    if not stop:
        return None
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "auto": None}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bfloat16, float16 or auto")
    return table[name]  # type: ignore[return-value]


def default_model_dir() -> Path:
    """Folder of the gist adapter shipped with the package."""
    p = Path(__file__).resolve().parent.parent / "assets" / "default_model"
    if not (p / ADAPTER_META).is_file():
        raise FileNotFoundError(
            f"no shipped gist adapter at {p}; train one (`gist-memory train`) or use "
            "GistModel.from_base(None, GistConfig(compressor='pool+anchors')) for the training-free compressor"
        )
    return p


_VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                                   "_attn_implementation", "_attn_implementation_autoset", "attn_implementation"})


def _update_sample(h, name: str, p: torch.Tensor, round_to: Optional[torch.dtype] = None) -> None:  # noqa: ANN001
    """Feed a strided sample of a parameter (257 values, optionally rounded to `round_to`), its name and shape."""
    flat = p.detach().reshape(-1)
    k = min(257, flat.numel())
    idx = (torch.arange(k, device=flat.device) * (flat.numel() - 1)) // max(1, k - 1)
    h.update(name.encode())
    h.update(str(tuple(p.shape)).encode())
    sample = flat[idx]
    if round_to is not None:
        sample = sample.to(round_to)
    h.update(sample.float().cpu().numpy().tobytes())


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read an adapter's safetensors file; a missing or damaged file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ValueError(f"{path} is missing: the adapter folder is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
