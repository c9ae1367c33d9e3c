"""Test helpers shared by the core tests, the integration packages and examples: offline, small, deterministic.

    from gist_memory.testing import HashingEmbedder, build_tiny_base, tiny_gist_model

    base = build_tiny_base(tmp_path / "tiny", "llama")   # a random 2-layer Llama + a trained byte-level BPE
    model = tiny_gist_model(base)                         # a GistModel over it (fp32, CPU)
    mem = GistMemory(model, None, embedder=HashingEmbedder())

- `build_tokenizer`, `build_tiny_base`: a tiny random Llama or Qwen2 with a ChatML template, built in seconds
  without downloads (`CORPUS` trains its ~600-token tokenizer).
- `tiny_gist_model`: a `GistModel` over such a base.
- `HashingEmbedder`: a deterministic bag-of-words embedder (texts sharing words get a high cosine).
- `FakeGistModel`: a model-shaped object with seeded random states, for store and memory code (no torch model).

`import gist_memory` does not load this module. Importing it loads torch (for `FakeGistModel`'s states);
transformers and tokenizers load when a builder runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gist_memory.store.testing import FakeGistModel, HashingEmbedder

__all__ = ["CHATML", "CORPUS", "FakeGistModel", "HashingEmbedder", "build_tiny_base", "build_tokenizer",
           "tiny_gist_model"]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny day in Paris.",
    "Maren Voss became the chief curator in 1912. The archive code is QX-4471!",
    "Python is a programming language. def f(x):\n    return x + 1",
    "Numbers like 2,318 metres and 3.14 matter. Привет, мир. 日本語のテキスト。 Emoji 🙂 too.",
    "Question: what is the capital of France? Answer: Paris. The station sits at an altitude.",
]


def build_tokenizer(path: Path):  # noqa: ANN201 - a transformers PreTrainedTokenizerFast
    """Train a ~600-token byte-level BPE and save it as a transformers fast tokenizer in `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


def build_tiny_base(path: os.PathLike, arch: str = "llama", seed: int = 0) -> str:
    """Save a tiny random causal LM (+ tokenizer) to `path` (kept if already there); returns the path as str.

    Args:
        path: Output folder.
        arch: `llama` or `qwen2`.
        seed: Torch seed of the random weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if arch not in ("llama", "qwen2"):
        raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    path = Path(path)
    if (path / "config.json").exists():
        return str(path)
    tok = build_tokenizer(path)
    common = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    cfg = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    return str(path)


def tiny_gist_model(base: os.PathLike, **config: Any):  # noqa: ANN201 - a GistModel
    """A `GistModel` (fp32, CPU) over a tiny base from `build_tiny_base`; `config` sets `GistConfig` fields
    (default: 2 gists per sentence)."""
    from gist_memory import GistConfig, GistModel

    return GistModel.from_base(str(base), GistConfig(**{"gists_per_sentence": 2, **config}), device="cpu")
