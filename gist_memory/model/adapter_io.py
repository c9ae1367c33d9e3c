"""Adapter I/O: building a `GistModel` over a base, saving and loading its gist adapter, and the fingerprints
that tie adapters and states to the exact weights that wrote them.

A saved gist model is a folder with `gist_config.json`, `gist_adapter.json` (base reference, format version,
writer spec, base fingerprint) and `gist_adapter.safetensors` (gist embeddings + optional LoRA).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from gist_memory.config import GistConfig
from gist_memory.model.base import BUNDLED, load_base

if TYPE_CHECKING:
    from gist_memory.model.gist_model import GistModel

ADAPTER_WEIGHTS = "gist_adapter.safetensors"
ADAPTER_META = "gist_adapter.json"
FORMAT_VERSION = 2


class AdapterIO:
    """Mixin of `GistModel`: construction (`from_base`, `from_pretrained`), `save_pretrained`, fingerprints."""

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
        reader = meta.get("reader", "base")
        if reader not in ("base", "adapted"):
            raise ValueError(f"{path}: unknown reader {reader!r} in {ADAPTER_META} (base or adapted)")
        gm.reader_adapted = reader == "adapted" and gm.has_lora
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
            "reader": "adapted" if getattr(self, "reader_adapted", False) else "base",
            "writer": self.writer.spec() if self.writer is not None else None,
            "base_fingerprint": self.base_fingerprint(),
        }
        save_file(tensors, str(directory / ADAPTER_WEIGHTS))
        self.config.save_pretrained(directory)
        (directory / ADAPTER_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    # ---- fingerprints ------------------------------------------------------------------------------
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
        head = self.write_head()
        if head:  # the head comes from the tokenizer's chat template, which the base fingerprint does not cover
            h.update(json.dumps(head).encode())
        h.update(str(self.dtype).encode())
        return h.hexdigest()[:32]

    def invalidate_fingerprint(self) -> None:
        """Forget the cached fingerprint and prefix caches (call after changing the weights)."""
        with self._lock:
            self._fingerprint = None
            self._prefix_cache.clear()
            self._prefix_bytes = 0


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
