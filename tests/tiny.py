"""Tiny offline models for unit tests: a byte-level BPE tokenizer trained in-process and random Llama/Qwen2."""

from __future__ import annotations

import os
from pathlib import Path

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


def build_tokenizer(path: Path):
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
    """Save a tiny random causal LM (+ tokenizer) to `path`; returns the path as str."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

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
