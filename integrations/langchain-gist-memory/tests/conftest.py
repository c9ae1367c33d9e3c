"""Fixtures of the LangChain integration tests: the tiny random Llama as a GistModel (once per session), a
deterministic hashing embedder, and the bundled SmolLM2 (slow tests only)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

from gist_memory.testing import HashingEmbedder, build_tiny_base

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_pycollect_makeitem(collector, name, obj):  # noqa: ANN001, ANN201
    """Run this folder's async tests (the langchain-tests suites have some) with pytest-asyncio whatever the root's
    `asyncio_mode`: this wrapper runs inside pytest-asyncio's and marks coroutine tests before it looks at them."""
    outcome = yield
    if not inspect.iscoroutinefunction(obj) or not str(getattr(collector, "path", "")).startswith(str(_HERE)):
        return
    res = outcome.get_result()
    for item in res if isinstance(res, list) else [res]:
        if isinstance(item, pytest.Function) and item.get_closest_marker("asyncio") is None:
            item.add_marker(pytest.mark.asyncio)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run faster on one thread (and the test machine is shared): restore the setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def gist_tiny_dir(tmp_path_factory) -> str:  # noqa: ANN001
    """Folder of the tiny random Llama (with the byte-level BPE tokenizer and chat template)."""
    return build_tiny_base(tmp_path_factory.mktemp("lc-tiny-llama"), "llama")


@pytest.fixture(scope="session")
def gist_tiny(gist_tiny_dir):  # noqa: ANN001, ANN201
    """A tiny GistModel: fp32 on CPU, 2 gists per sentence."""
    from gist_memory import GistConfig, GistModel

    return GistModel.from_base(gist_tiny_dir, GistConfig(gists_per_sentence=2), device="cpu")


@pytest.fixture
def hash_embedder() -> HashingEmbedder:
    """The shared deterministic bag-of-words embedder of `gist_memory.testing`."""
    return HashingEmbedder(dim=256)


DOCS = [
    "Maren Voss became the chief curator of the Tallin archive in 1912. She catalogued the maps.",
    "The archive code of the northern wing is QX-4471. Visitors need a pass to enter it.",
    "The station sits at an altitude of 2,318 metres. Trains arrive twice a day in summer.",
    "Python is a programming language. Its creator named it after a comedy group.",
    "The quick brown fox jumps over the lazy dog. It was a sunny day in Paris.",
    "Paris is the capital of France. The river Seine runs through the city.",
]


@pytest.fixture
def docs() -> list[str]:
    return list(DOCS)


@pytest.fixture(scope="session")
def smol_pool():  # noqa: ANN201
    """The bundled SmolLM2-135M-Instruct with the training-free pool+anchors compressor at ratio 4 (slow)."""
    from gist_memory import GistConfig, GistModel

    return GistModel.from_base(None, GistConfig(compressor="pool+anchors", target_ratio=4), device="cpu")
