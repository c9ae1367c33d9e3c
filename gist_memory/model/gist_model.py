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
from gist_memory.layout import KIND_GIST_TOKEN, Segment, build_layout
from gist_memory.layout.layout import float_mask
from gist_memory.model import kv
from gist_memory.model.base import BUNDLED, load_base
from gist_memory.model.plan import Plan, make_plan
from gist_memory.state import KIND_ANCHOR, KIND_GIST, KIND_POOL, GistState
from gist_memory.state.gist_state import text_hash
from gist_memory.text.split import SentenceSplitter, normalize_text

ADAPTER_WEIGHTS = "gist_adapter.safetensors"
ADAPTER_META = "gist_adapter.json"
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


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class GistModel:
    """A causal LM with gist tokens (and optionally a LoRA adapter) that compresses texts into `GistState`s.

    Build with `from_base` (fresh, to train) or `from_pretrained` (a saved gist model, or the shipped default).

    Attributes:
        model: The transformers causal LM (possibly wrapped by peft while training).
        tokenizer: Its fast tokenizer, with the gist tokens added.
        config: The `GistConfig`.
        base_ref: What `save_pretrained` records as the base (`bundled:...`, a path or a hub id).
        last_usage: After `generate`/`stream`/`score`: raw tokens stood for, positions read, timings.
    """

    def __init__(self, model, tokenizer, config: GistConfig, base_ref: str):  # noqa: ANN001
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.base_ref = base_ref
        self.splitter = SentenceSplitter.from_config(config)
        self.rope = kv.rope_spec(self._base_lm())
        self.gist_token_ids: list[int] = []
        self._fingerprint: Optional[str] = None
        self._prefix_cache: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.last_usage: dict[str, Any] = {}
        self.chunk_tokens = DEFAULT_CHUNK_TOKENS
        self._lock = threading.RLock()
        if config.uses_gist_tokens:
            self._add_gist_tokens()

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
    ) -> GistModel:
        """A fresh gist model over a base causal LM (None = the embedded SmolLM2-135M-Instruct).

        Args:
            base: Local folder or hub id of a causal LM; None for the embedded default.
            config: The `GistConfig` (default `GistConfig()`).
            device: `cuda`/`cpu`/...; default cuda when available.
            dtype: torch dtype or its name; default bf16 on CUDA, fp32 on CPU.
            trust_remote_code: Off unless asked for.
            attn_implementation: `sdpa` or `eager`.
        """
        config = config or GistConfig()
        if isinstance(dtype, str):
            dtype = _dtype(dtype)
        lm, tok, ref = load_base(
            base, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
        return cls(lm, tok, config, ref)

    @classmethod
    def from_pretrained(
        cls,
        path: Optional[Union[str, os.PathLike]] = None,
        *,
        device: Optional[str] = None,
        dtype: Any = None,
        merge: bool = True,
        trust_remote_code: bool = False,
        config_overrides: Optional[dict[str, Any]] = None,
    ) -> GistModel:
        """Load a saved gist model (gist_config.json + adapter + base reference); None = the shipped default.

        Args:
            path: Folder written by `save_pretrained`; None loads the adapter shipped with the package.
            device / dtype: As in `from_base`.
            merge: Merge a LoRA adapter into the base weights (fast inference); False keeps it trainable.
            trust_remote_code: Off unless asked for.
            config_overrides: GistConfig fields to change, e.g. `{"target_ratio": 8}` (an adapter trained over
                several ratios serves each of them). The number of gist tokens cannot change.
        """
        if path is None:
            path = default_model_dir()
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no gist model folder at {path}")
        meta_file = path / ADAPTER_META
        if not meta_file.is_file():
            raise ValueError(f"{path} is not a saved gist model ({ADAPTER_META} missing)")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        config = GistConfig.from_pretrained(path)
        if config_overrides:
            d = {**config.to_dict(), **config_overrides}
            config = GistConfig.from_dict(d)
            if config.num_gist_tokens != len(meta.get("gist_token_ids", [])) and meta.get("gist_token_ids"):
                raise ValueError(
                    f"config_overrides need {config.num_gist_tokens} gist tokens; the adapter has "
                    f"{len(meta['gist_token_ids'])} (choose a larger target_ratio or fewer gists per sentence)"
                )
        base = meta.get("base", BUNDLED)
        gm = cls.from_base(base, config, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        gm._load_adapter(path, meta, merge=merge)
        return gm

    def save_pretrained(self, directory: Union[str, os.PathLike], adapter_dtype: Any = torch.float32) -> None:
        """Write gist_config.json, the adapter (gist embeddings + LoRA, safetensors) and the base reference.

        Args:
            directory: Output folder.
            adapter_dtype: Storage dtype of the LoRA matrices (bf16 halves the file; gist rows stay fp32).
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        if self.gist_token_ids:
            emb = self._base_lm().get_input_embeddings().weight
            tensors["gist_embeddings"] = emb[self.gist_token_ids].detach().float().cpu().contiguous()
        lora_cfg = None
        if self.has_lora:
            from peft import get_peft_model_state_dict

            sd = get_peft_model_state_dict(self.model, save_embedding_layers=False)
            for k, v in sd.items():
                if "trainable_tokens" in k or "token_adapter" in k or "lora_" not in k:
                    continue  # gist rows are saved above
                tensors[f"lora.{k}"] = v.detach().to(adapter_dtype).cpu().contiguous()
            lora_cfg = self.model.peft_config["default"].to_dict()
            lora_cfg = json.loads(json.dumps(lora_cfg, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
        meta = {
            "base": self.base_ref,
            "lora": lora_cfg,
            "gist_token_ids": self.gist_token_ids,
            "base_fingerprint": self._weights_fingerprint(base_only=True),
            "format_version": 1,
        }
        save_file(tensors, str(directory / ADAPTER_WEIGHTS))
        self.config.save_pretrained(directory)
        (directory / ADAPTER_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    def _load_adapter(self, path: Path, meta: dict, merge: bool) -> None:
        from safetensors.torch import load_file

        f = path / ADAPTER_WEIGHTS
        tensors = load_file(str(f)) if f.is_file() else {}
        if "gist_embeddings" in tensors:
            rows = tensors["gist_embeddings"]
            if rows.shape[0] != len(self.gist_token_ids):
                raise ValueError(
                    f"{path}: adapter has {rows.shape[0]} gist embeddings, config needs {len(self.gist_token_ids)}"
                )
            emb = self._base_lm().get_input_embeddings().weight
            if rows.shape[1] != emb.shape[1]:
                raise ValueError(f"{path}: adapter hidden size {rows.shape[1]} != base model's {emb.shape[1]}")
            with torch.no_grad():
                emb[self.gist_token_ids] = rows.to(emb.dtype).to(emb.device)
        if meta.get("lora"):
            from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

            cfg = dict(meta["lora"])
            allowed = set(LoraConfig.__dataclass_fields__)
            cfg = {k: v for k, v in cfg.items() if k in allowed and k not in ("peft_type", "task_type")}
            cfg.pop("trainable_token_indices", None)
            lcfg = LoraConfig(**cfg)
            self.model = get_peft_model(self.model, lcfg)
            wdtype = self.dtype
            sd = {k[len("lora."):]: v.to(wdtype) for k, v in tensors.items() if k.startswith("lora.")}
            res = set_peft_model_state_dict(self.model, sd)
            unexpected = getattr(res, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"{path}: adapter weights do not fit the base model: {unexpected[:3]}")
            if merge:
                self.model = self.model.merge_and_unload()
            self.model.eval()
        self._fingerprint = None
        self._prefix_cache.clear()

    def _add_gist_tokens(self) -> None:
        tok = self.tokenizer
        wanted = self.config.gist_tokens
        tok.add_tokens(wanted, special_tokens=True)
        ids = tok.convert_tokens_to_ids(wanted)
        lm = self._base_lm()
        emb = lm.get_input_embeddings()
        if max(ids) >= emb.weight.shape[0]:
            old = emb.weight.shape[0]
            lm.resize_token_embeddings(len(tok), mean_resizing=False)
            emb = lm.get_input_embeddings()
            with torch.no_grad():
                w = emb.weight
                mean, std = w[:old].float().mean(0), w[:old].float().std(0)
                g = torch.Generator().manual_seed(0)
                noise = torch.randn(len(w) - old, w.shape[1], generator=g) * 0.02
                w[old:] = (mean.cpu() + noise * std.cpu()).to(w.dtype).to(w.device)
        self.gist_token_ids = [int(i) for i in ids]

    # ---- identity ----------------------------------------------------------------------------------
    def _base_lm(self):  # noqa: ANN202
        """The transformers causal LM under any peft wrapper."""
        m = self.model
        if hasattr(m, "peft_config") and hasattr(m, "get_base_model"):
            return m.get_base_model()
        return m

    @property
    def has_lora(self) -> bool:
        """True while a (non-merged) peft adapter wraps the model."""
        return hasattr(self.model, "peft_config")

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

    def _weights_fingerprint(self, base_only: bool = False) -> str:
        h = hashlib.sha256()
        lm = self._base_lm()
        h.update(json.dumps(lm.config.to_dict(), sort_keys=True, default=str).encode())
        skip = set(self.gist_token_ids) if base_only else set()
        with torch.no_grad():
            for name, p in sorted(lm.named_parameters(), key=lambda kv_: kv_[0]):
                flat = p.detach().reshape(-1)
                if base_only and skip and p.dim() == 2 and p.shape[0] >= len(self.tokenizer) - len(skip):
                    flat = p.detach()[: min(p.shape[0], len(self.tokenizer) - len(skip))].reshape(-1)
                k = min(257, flat.numel())
                idx = (torch.arange(k, device=flat.device) * (flat.numel() - 1)) // max(1, k - 1)
                sample = flat[idx].float().cpu().numpy().tobytes()
                h.update(name.encode())
                h.update(str(tuple(p.shape)).encode())
                h.update(sample)
                if not base_only and self.gist_token_ids and p.dim() == 2 and p.shape[0] > max(self.gist_token_ids):
                    h.update(p.detach()[self.gist_token_ids].float().cpu().numpy().tobytes())
        return h.hexdigest()[:24]

    @property
    def fingerprint(self) -> str:
        """Identity of base weights + adapter + gist config + dtype; a state is served only to its writer."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self.base_ref.encode())
            h.update(self._weights_fingerprint().encode())
            h.update(self.config.fingerprint().encode())
            h.update(str(self.dtype).encode())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def invalidate_fingerprint(self) -> None:
        """Forget the cached fingerprint and prefix caches (call after changing the weights)."""
        self._fingerprint = None
        self._prefix_cache.clear()

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
        """Compress texts into gist states, one per text (batched; long texts in exact sequential chunks).

        Args:
            texts: Passages (a single str is accepted too).
            batch_size: Passages per forward pass.
            device_out: Where the returned states live (None: the model's device).

        Raises:
            ValueError: An empty/whitespace-only text.
        """
        if isinstance(texts, str):
            texts = [texts]
        was_training = self.model.training
        self.model.eval()
        try:
            return self.compress_with_grad(texts, batch_size=batch_size, device_out=device_out)
        finally:
            self.model.train(was_training)

    def compress_with_grad(
        self, texts: Sequence[str], batch_size: int = 8, device_out: Optional[str] = None
    ) -> list[GistState]:
        """`compress` without `no_grad`/eval: gradients flow into the kept K/V (used by training)."""
        plans = [self.plan(t) for t in texts]
        with self._lock:
            if self.config.compressor == "gist":
                results = self._compress_gist(plans, batch_size)
            else:
                results = self._compress_pool(plans, batch_size)
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

    def _segment(self, plan: Plan, lo: int = 0, hi: Optional[int] = None) -> Segment:
        hi = len(plan.pieces) if hi is None else hi
        s0 = plan.pieces[lo][0]
        s1 = plan.pieces[hi - 1][1]
        return Segment(
            ids=plan.ids[s0:s1].tolist(),
            pieces=[(s - s0, e - s0) for s, e in plan.pieces[lo:hi]],
            n_gists=plan.n_other[lo:hi],
            anchors=plan.anchors[s0:s1].tolist(),
        )

    def _chunks(self, plan: Plan) -> list[tuple[int, int, bool]]:
        """Piece ranges `(lo, hi, starts_window)`: interleaved length within `chunk_tokens`, and a new
        visibility window every `config.window_tokens` raw tokens."""
        out: list[tuple[int, int, bool]] = []
        lo, cur, raw, new_window = 0, 0, 0, True
        for i, (s, e) in enumerate(plan.pieces):
            n = (e - s) + plan.n_other[i]
            if raw and raw + (e - s) > self.config.window_tokens:
                out.append((lo, i, new_window))
                lo, cur, raw, new_window = i, 0, 0, True
            elif cur and cur + n > self.chunk_tokens:
                out.append((lo, i, new_window))
                lo, cur, new_window = i, 0, False
            cur += n
            raw += e - s
        out.append((lo, len(plan.pieces), new_window))
        return out

    def _decoder(self):  # noqa: ANN202
        return self._base_lm().get_decoder()

    def _compress_gist(self, plans: list[Plan], batch_size: int):  # noqa: ANN202
        results: list = [None] * len(plans)
        short = [i for i, p in enumerate(plans) if len(self._chunks(p)) == 1]
        long_ = [i for i, p in enumerate(plans) if len(self._chunks(p)) > 1]
        # short texts: batched, one segment per row; sort by length to limit padding
        short.sort(key=lambda i: plans[i].num_tokens + sum(plans[i].n_other))
        for b0 in range(0, len(short), batch_size):
            idx = short[b0 : b0 + batch_size]
            rows = [[self._segment(plans[i])] for i in idx]
            for i, res in zip(idx, self._run_rows(rows)):
                results[i] = res
        # long texts: alone, chunk by chunk, earlier kept rows as the past (exactly the full masked pass)
        for i in long_:
            results[i] = self._run_chunked(plans[i])
        return results

    def _run_rows(self, rows: list[list[Segment]]):  # noqa: ANN202
        dev = self.device
        lay = build_layout(rows, self.gist_token_ids, self._pad_id(), device=dev)
        mask = lay.attention_mask(self._mask_dtype())
        out = self._decoder()(
            input_ids=lay.input_ids, attention_mask=mask, position_ids=lay.position_ids, use_cache=True
        )
        layers = kv.cache_layers(out.past_key_values)
        res = []
        for b in range(len(rows)):
            sel = torch.nonzero(lay.kept[b], as_tuple=False).reshape(-1)
            keys = torch.stack([k[b, :, sel] for k, _ in layers])  # (L, H, T_kept, D)
            values = torch.stack([v[b, :, sel] for _, v in layers])
            kinds = torch.where(lay.kind[b, sel] == KIND_GIST_TOKEN, KIND_GIST, KIND_ANCHOR)
            res.append((keys, values, lay.position_ids[b, sel], kinds, int(lay.lengths[b])))
        return res

    def _run_chunked(self, plan: Plan):  # noqa: ANN202
        dev = self.device
        pos_all, kinds_all = [], []
        offset = 0
        past: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
        kept_k: list[torch.Tensor] = []
        kept_v: list[torch.Tensor] = []
        for lo, hi, new_window in self._chunks(plan):
            if new_window and past is not None:
                kept_k.append(torch.stack([k[0] for k, _ in past]))
                kept_v.append(torch.stack([v[0] for _, v in past]))
                past = None
            seg = self._segment(plan, lo, hi)
            lay = build_layout([[seg]], self.gist_token_ids, self._pad_id(), device=dev)
            allowed = lay.allowed()  # (1, Tc, Tc)
            P = 0 if past is None else past[0][0].shape[2]
            if P:
                allowed = torch.cat([torch.ones(1, allowed.shape[1], P, dtype=torch.bool, device=dev), allowed], 2)
            mask = float_mask(allowed, self._mask_dtype())
            cache = kv.cache_from_layers(past) if past is not None else None
            out = self._decoder()(
                input_ids=lay.input_ids,
                attention_mask=mask,
                position_ids=lay.position_ids + offset,
                past_key_values=cache,
                use_cache=True,
            )
            layers = kv.cache_layers(out.past_key_values)
            sel = torch.nonzero(lay.kept[0], as_tuple=False).reshape(-1)
            new = [(k[:, :, P + sel], v[:, :, P + sel]) for k, v in layers]  # (1, H, n, D)
            past = new if past is None else [
                (torch.cat([pk, nk], 2), torch.cat([pv, nv], 2)) for (pk, pv), (nk, nv) in zip(past, new)
            ]
            pos_all.append(lay.position_ids[0, sel] + offset)
            kinds_all.append(torch.where(lay.kind[0, sel] == KIND_GIST_TOKEN, KIND_GIST, KIND_ANCHOR))
            offset += int(lay.lengths[0])
        assert past is not None
        kept_k.append(torch.stack([k[0] for k, _ in past]))
        kept_v.append(torch.stack([v[0] for _, v in past]))
        return torch.cat(kept_k, 2), torch.cat(kept_v, 2), torch.cat(pos_all), torch.cat(kinds_all), offset

    def _compress_pool(self, plans: list[Plan], batch_size: int):  # noqa: ANN202
        """Training-free: causal forward (windows of `chunk_tokens`), anchors kept raw, the rest mean-pooled."""
        dev = self.device
        results = []
        for plan in plans:
            n = plan.num_tokens
            ids = torch.as_tensor(plan.ids, device=dev)
            kk, vv = [], []
            for w0 in range(0, n, self.chunk_tokens):
                w = ids[w0 : w0 + self.chunk_tokens][None]
                pos = torch.arange(w0, w0 + w.shape[1], device=dev)[None]
                out = self._decoder()(input_ids=w, position_ids=pos, use_cache=True)
                layers = kv.cache_layers(out.past_key_values)
                kk.append(torch.stack([k[0] for k, _ in layers]))  # (L, H, w, D)
                vv.append(torch.stack([v[0] for _, v in layers]))
            K = torch.cat(kk, 2)
            V = torch.cat(vv, 2)
            # group id per token: anchors get their own row; other tokens pooled contiguously per piece
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
            # un-rotate keys to position 0, average, re-rotate to each group's mean position
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
            results.append((Kp[:, :, order], Vp[:, :, order], gpos[order], kinds, n))
        return results

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

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _prefix_kv(self, prefix_ids: list[int]) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
        """K/V of the raw prefix (the chat template's opening), cached per model state.

        It never sees a passage, so it is computed without gradients even while training (the trainer clears
        the cache every step, when the weights change).
        """
        if not prefix_ids:
            return None
        key = (tuple(prefix_ids), self.fingerprint)
        hit = self._prefix_cache.get(key)
        if hit is not None:
            self._prefix_cache.move_to_end(key)
            return hit
        ids = torch.as_tensor([prefix_ids], device=self.device)
        with torch.no_grad():
            out = self._decoder()(input_ids=ids, position_ids=torch.arange(len(prefix_ids), device=self.device)[None],
                                  use_cache=True)
        layers = [(k.detach(), v.detach()) for k, v in kv.cache_layers(out.past_key_values)]
        self._prefix_cache[key] = layers
        while len(self._prefix_cache) > 16:
            self._prefix_cache.popitem(last=False)
        return layers

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
            return None, 0, self._ids(before)
        prefix_ids = self._ids(before)
        prefix = self._prefix_kv(prefix_ids)
        layers, pos = kv.splice(
            prefix, len(prefix_ids), states, self.rope, self.config.position_mode, device=self.device, dtype=self.dtype
        )
        return layers, pos, self._ids(after)

    def _forward(self, ids: torch.Tensor, layers, start: int):  # noqa: ANN001, ANN202
        """Run the LM on ids (B, S) after cached layers at position `start`; returns (logits, cache)."""
        B, S = ids.shape
        cache = None
        if layers is not None:
            cache = kv.cache_from_layers([(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in layers])
        pos = (start + torch.arange(S, device=ids.device))[None].expand(B, -1)
        out = self.model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True)
        return out.logits, out.past_key_values

    # ---- scoring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self,
        prompt: Prompt,
        continuation: str,
        states: Optional[Sequence[GistState]] = None,
        system_prompt: Optional[str] = None,
        context_prefix: str = "",
    ) -> float:
        """Summed log-probability of `continuation` as the answer to `prompt` (reading `states` if given)."""
        return self.score_choices(prompt, [continuation], states=states, system_prompt=system_prompt,
                                  context_prefix=context_prefix)[0]

    @torch.no_grad()
    def score_choices(
        self,
        prompt: Prompt,
        continuations: Sequence[str],
        states: Optional[Sequence[GistState]] = None,
        system_prompt: Optional[str] = None,
        context_prefix: str = "",
    ) -> list[float]:
        """Summed log-probabilities of several continuations, sharing one prefill (a batch)."""
        if not continuations:
            return []
        layers, start, head = self.prepare(prompt, states, system_prompt, context_prefix)
        conts = [self._ids(c) for c in continuations]
        if any(len(c) == 0 for c in conts):
            raise ValueError("a continuation is empty (no tokens to score)")
        if not head and layers is None:
            raise ValueError("nothing to condition on: empty prompt and no states")
        S = len(head) + max(len(c) for c in conts)
        pad = self._pad_id()
        ids = torch.full((len(conts), S), pad, dtype=torch.long, device=self.device)
        for i, c in enumerate(conts):
            ids[i, : len(head) + len(c)] = torch.as_tensor(head + c)
        was = self.model.training
        self.model.eval()
        try:
            logits, _ = self._forward(ids, layers, start)
        finally:
            self.model.train(was)
        logp = torch.log_softmax(logits.float(), -1)
        out = []
        for i, c in enumerate(conts):
            # token t of the continuation sits at index len(head)+t, predicted at index len(head)+t-1
            if len(head) == 0:
                raise ValueError("score needs a prompt before the continuation")
            tgt = torch.as_tensor(c, device=self.device)
            pos = len(head) - 1 + torch.arange(len(c), device=self.device)
            out.append(float(logp[i, pos, tgt].sum()))
        self.last_usage = self._usage(states, layers, len(head))
        return out

    def _usage(self, states, layers, fed: int, **extra: Any) -> dict[str, Any]:  # noqa: ANN001
        cached = 0 if layers is None else int(layers[0][0].shape[2])
        states = states or []
        return {
            "raw_tokens": int(sum(s.num_tokens for s in states)),
            "kept_rows": int(sum(s.num_kept for s in states)),
            "positions_read": cached + fed,
            "prompt_tokens": fed,
            **extra,
        }

    # ---- generation --------------------------------------------------------------------------------
    def generate(self, prompt: Prompt, states: Optional[Sequence[GistState]] = None, **kwargs: Any) -> str:
        """Answer `prompt` reading `states` (chat template applied for chat models).

        Keyword args (as in HF `generate`): max_new_tokens (64), do_sample, temperature, top_k, top_p,
        repetition_penalty, eos_token_id, plus `stop` (strings), `seed`, `system_prompt` and `context_prefix`
        (raw text placed right before the states).
        """
        return "".join(self.stream(prompt, states=states, **kwargs))

    def stream(self, prompt: Prompt, states: Optional[Sequence[GistState]] = None, **kwargs: Any) -> Iterator[str]:
        """Like `generate`, yielding text pieces as they are decoded."""
        unknown = set(kwargs) - _GEN_KWARGS
        if unknown:
            raise TypeError(f"unsupported generation arguments: {sorted(unknown)}; supported: {sorted(_GEN_KWARGS)}")
        return self._stream(prompt, states, **kwargs)

    @torch.no_grad()
    def _stream(
        self,
        prompt: Prompt,
        states: Optional[Sequence[GistState]],
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
        was = self.model.training
        self.model.eval()
        ids = torch.as_tensor([head], device=self.device)
        out_ids: list[int] = []
        emitted = ""
        ttft = None
        try:
            logits, cache = self._forward(ids, layers, start)
            pos = start + len(head)
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
                if not text.endswith("\ufffd") and len(text) > len(emitted):
                    yield text[len(emitted):]
                    emitted = text
                out = self.model(
                    input_ids=torch.as_tensor([[nxt]], device=self.device),
                    past_key_values=cache,
                    position_ids=torch.as_tensor([[pos]], device=self.device),
                    use_cache=True,
                )
                logits, cache = out.logits, out.past_key_values
                pos += 1
        finally:
            self.model.train(was)
            self.last_usage = self._usage(
                states, layers, len(head), new_tokens=len(out_ids), ttft_s=ttft, total_s=time.perf_counter() - t0
            )

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
