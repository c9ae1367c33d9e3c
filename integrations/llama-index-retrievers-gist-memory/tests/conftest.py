"""Fixtures for the retriever/pipeline tests: a tiny GistModel, a hashing embedding, a small node set."""

from __future__ import annotations

import os

import numpy as np
import pytest
from llama_index.core.base.embeddings.base import BaseEmbedding

from gist_memory.testing import HashingEmbedder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEXTS = [
    ("Maren Voss became the chief curator in 1912. The archive code is QX-4471!", "archive"),
    ("The quick brown fox jumps over the lazy dog. It was a sunny day in Paris.", "fox"),
    ("Python is a programming language. Numbers like 2,318 metres and 3.14 matter.", "python"),
    ("The station sits at an altitude of 2,318 metres. Its code is QX-9.", "station"),
]


class HashEmbedding(BaseEmbedding):
    """`gist_memory.testing.HashingEmbedder` as a LlamaIndex embedding (64 dims, unit norm): offline, meaningful."""

    dim: int = 64

    @classmethod
    def class_name(cls) -> str:
        return "HashEmbedding"

    def _vec(self, text: str) -> list[float]:
        v = HashingEmbedder(dim=self.dim).encode([text])[0].astype(np.float64)
        return (v / np.linalg.norm(v)).tolist()

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vec(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vec(text)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vec(query)


@pytest.fixture(scope="session")
def li_tiny_model(tmp_path_factory):
    """A tiny GistModel (fp32, CPU, 2 gists per sentence) over a random Llama with a ChatML template."""
    from gist_memory import GistConfig, GistModel
    from gist_memory.testing import build_tiny_base

    base = build_tiny_base(tmp_path_factory.mktemp("li-retriever-tiny"), "llama")
    return GistModel.from_base(base, GistConfig(gists_per_sentence=2), device="cpu")


@pytest.fixture
def embed():
    return HashEmbedding()


@pytest.fixture
def nodes():
    from llama_index.core.schema import TextNode

    return [TextNode(id_=f"n{i}", text=t, metadata={"topic": topic}) for i, (t, topic) in enumerate(TEXTS)]


@pytest.fixture
def registry(li_tiny_model):
    from llama_index.llms.gist_memory import GistRegistry

    return GistRegistry(li_tiny_model)


@pytest.fixture
def llm(li_tiny_model, registry):
    from llama_index.llms.gist_memory import GistLLM

    return GistLLM(model=li_tiny_model, registry=registry, max_new_tokens=6)


@pytest.fixture(autouse=True)
def li_settings(embed, llm):
    """Explicit LlamaIndex settings (no OpenAI defaults, no downloads), restored afterwards."""
    from llama_index.core import Settings

    old = (Settings._llm, Settings._embed_model)
    Settings.llm = llm
    Settings.embed_model = embed
    yield
    Settings._llm, Settings._embed_model = old


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model's ops are too small for threads to pay off (and the CI box is shared): 1 thread, restored."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
