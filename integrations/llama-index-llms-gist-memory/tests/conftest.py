"""Fixtures for the GistLLM tests: a tiny random Llama GistModel, built offline once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PASSAGES = [
    "Maren Voss became the chief curator in 1912. The archive code is QX-4471!",
    "The quick brown fox jumps over the lazy dog. It was a sunny day in Paris.",
    "Python is a programming language. Numbers like 2,318 metres and 3.14 matter.",
]


@pytest.fixture(scope="session")
def li_tiny_model(tmp_path_factory):
    """A tiny GistModel (fp32, CPU, 2 gists per sentence) over a random Llama with a ChatML template."""
    from gist_memory import GistConfig, GistModel
    from gist_memory.testing import build_tiny_base

    base = build_tiny_base(tmp_path_factory.mktemp("li-llm-tiny"), "llama")
    return GistModel.from_base(base, GistConfig(gists_per_sentence=2), device="cpu")


@pytest.fixture
def registry(li_tiny_model):
    """A fresh registry (tests must not see each other's passages)."""
    from llama_index.llms.gist_memory import GistRegistry

    return GistRegistry(li_tiny_model)


@pytest.fixture
def passages():
    return list(PASSAGES)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model's ops are too small for threads to pay off (and the CI box is shared): 1 thread, restored."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
