"""Light stand-ins for tests and examples: a fake gist model and a hashing embedder (no downloads, no torch model).

`FakeGistModel` has the duck-typed surface `GistMemory` uses (`fingerprint`, `name`, `normalize`, `compress`,
`generate`, `tokenizer`) and builds deterministic random states, so store and memory code can be tested in
milliseconds. `HashingEmbedder` is a bag-of-words embedder: texts sharing words get a high cosine.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any, Optional

import numpy as np
import torch

from gist_memory.state.gist_state import KIND_ANCHOR, KIND_GIST, GistState, text_hash

_WORD = re.compile(r"\w+", re.UNICODE)


class FakeGistModel:
    """A model-shaped object whose `compress` returns seeded random states of the right shapes.

    Args:
        name: Reported as `model.name`.
        num_layers, num_heads, head_dim: Shape of the K/V of each state, (L, H, T, D).
        tokens_per_row: Raw (whitespace) tokens per kept row; sets `compression_ratio`.
        dtype: Dtype of the states.
        delay_s: Seconds `compress` sleeps per text (to make a subprocess slow enough to kill).
        salt: Changes the fingerprint (a "different adapter").

    Attributes:
        compress_calls: Number of `compress` calls; `compressed_texts`: texts compressed, in order.
        last_generate: kwargs of the last `generate` call (prompt and states included).
    """

    tokenizer: Any = None

    def __init__(
        self,
        name: str = "fake-gist-model",
        num_layers: int = 2,
        num_heads: int = 2,
        head_dim: int = 8,
        tokens_per_row: int = 4,
        dtype: torch.dtype = torch.float32,
        delay_s: float = 0.0,
        salt: str = "",
    ) -> None:
        self.name = name
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.tokens_per_row = tokens_per_row
        self.dtype = dtype
        self.delay_s = delay_s
        shape = f"{num_layers}x{num_heads}x{head_dim}/{tokens_per_row}/{dtype}"
        self.fingerprint = hashlib.sha256(f"fake|{name}|{shape}|{salt}".encode()).hexdigest()[:32]
        self.compress_calls = 0
        self.compressed_texts: list[str] = []
        self.last_generate: Optional[dict[str, Any]] = None

    def normalize(self, text: str) -> str:
        """Collapse whitespace runs and strip."""
        return " ".join(text.split())

    def compress(self, texts: list[str], batch_size: int = 8) -> list[GistState]:
        """One seeded random state per text: (L, H, T, D) with T = ceil(words / tokens_per_row)."""
        self.compress_calls += 1
        out = []
        for raw in texts:
            if self.delay_s:
                time.sleep(self.delay_s)
            text = self.normalize(raw)
            self.compressed_texts.append(text)
            h = text_hash(text)
            n_tok = max(1, len(text.split()))
            t = -(-n_tok // self.tokens_per_row)
            g = torch.Generator().manual_seed(int(h[:15], 16))
            shape = (self.num_layers, self.num_heads, t, self.head_dim)
            kinds = torch.full((t,), KIND_GIST, dtype=torch.uint8)
            kinds[::3] = KIND_ANCHOR
            out.append(
                GistState(
                    keys=torch.randn(shape, generator=g).to(self.dtype),
                    values=torch.randn(shape, generator=g).to(self.dtype),
                    positions=torch.arange(t, dtype=torch.int64) * (self.tokens_per_row + 1),
                    kinds=kinds,
                    span=t * (self.tokens_per_row + 1),
                    num_tokens=n_tok,
                    sentence_spans=[(0, len(text))],
                    text_hash=h,
                    model_fingerprint=self.fingerprint,
                    text=text,
                )
            )
        return out

    def relevance(self, query: str, contexts: list[GistState]) -> list[float]:
        """Words of `query` each context's text shares (a stand-in for the real query likelihood)."""
        words = set(query.lower().split())
        return [float(len(words & set(c.text.lower().split()))) for c in contexts]

    def generate(
        self, prompt: str, states: Optional[list[GistState]] = None, max_new_tokens: int = 64, **kw: Any
    ) -> str:
        """Records the call; refuses foreign states like the real model; answers with a summary string."""
        for s in states or []:
            if s.model_fingerprint != self.fingerprint:
                raise ValueError("state of another model")
        self.last_generate = {"prompt": prompt, "states": states, "max_new_tokens": max_new_tokens, **kw}
        return f"answer to {prompt!r} from {len(states or [])} states"


class HashingEmbedder:
    """Deterministic bag-of-words embedder: each lowercased word adds a seeded random unit vector.

    Args:
        dim: Embedding size.
        name: Identity recorded by `GistMemory` (an embedder of another name is refused on load).
    """

    def __init__(self, dim: int = 64, name: str = "hashing-bow") -> None:
        self.dim = dim
        self.name = f"{name}-{dim}"
        self.calls = 0

    def _word(self, w: str) -> np.ndarray:
        seed = int(hashlib.blake2b(w.encode(), digest_size=8).hexdigest(), 16) % (2**32)
        return np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)

    def encode(self, texts: list[str], **_: Any) -> np.ndarray:
        """(n, dim) float32, not normalised (GistMemory normalises)."""
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in _WORD.findall(t.lower()):
                out[i] += self._word(w)
            if not out[i].any():
                out[i, 0] = 1.0
        return out
