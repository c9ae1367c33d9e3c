"""Shared fixtures: tiny random models (built offline, once per session) and the bundled SmolLM2 (slow)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """Folder of a tiny random Llama with a trained byte-level BPE tokenizer and a chat template."""
    from tests.tiny import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """Folder of a tiny random Qwen2 (same tokenizer)."""
    from tests.tiny import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_model(tiny_base_dir):
    """A tiny GistModel (fp32, CPU, 2 gists per sentence, capitalised-word anchors)."""
    from gist_memory import GistConfig, GistModel

    return GistModel.from_base(tiny_base_dir, GistConfig(gists_per_sentence=2, anchors="capitalized"), device="cpu")


@pytest.fixture(scope="session")
def smol_model():
    """The bundled SmolLM2-135M-Instruct with fresh (untrained) gist tokens, fp32 on CPU."""
    from gist_memory import GistConfig, GistModel

    return GistModel.from_base(None, GistConfig(gists_per_sentence=2, anchors="capitalized"), device="cpu")
