"""`examples/llama_index_qdrant.py`: `GistCompressedRetriever` over a LlamaIndex `QdrantVectorStore` (Qdrant's
embedded local mode) with the states in a shared store reached through fsspec, run end to end offline.

The serving side must read every retrieved passage from the state the ingest side stored (no compression), the
model must attend over fewer positions than the passages' raw tokens, and the retrieved node ids must be the exact
cosine top-k of the same embeddings.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("qdrant_client", reason="the example needs qdrant-client")
pytest.importorskip("llama_index.vector_stores.qdrant", reason="the example needs llama-index-vector-stores-qdrant")
pytest.importorskip("llama_index.retrievers.gist_memory", reason="the LlamaIndex integration is not installed")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "llama_index_qdrant.py"
DOCS = 10
EXPECTED = {"Which city did Abuja replace as the capital of Nigeria?": "Abuja", "How high is Mount Elbrus?": "Mount Elbrus"}


def _load_example():  # noqa: ANN202 - the example module
    spec = importlib.util.spec_from_file_location("gist_example_llama_index_qdrant", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_qdrant_example_answers_from_shared_states(tmp_path):
    import torch
    from llama_index.core.schema import MetadataMode

    torch.set_num_threads(1)
    ex = _load_example()
    states = f"local://{tmp_path / 'states'}"  # fsspec's local file system (the S3 code path), shared by both sides
    out = ex.run(str(tmp_path), states, list(EXPECTED), docs=DOCS, top_k=2, max_new_tokens=8, verbose=False)

    nodes = ex.split(ex.load_documents(DOCS))
    assert out["ingest"]["nodes"] == len(nodes) == DOCS and out["ingest"]["compressed"] == DOCS
    assert (tmp_path / "qdrant").is_dir()  # Qdrant's local mode kept the collection on disk

    # the serving side compressed nothing: every state came from the shared store
    assert out["registry"]["compressed"] == 0 and out["registry"]["reloaded"] >= 2, out["registry"]
    assert out["store"]["misses"] == 0 and out["store"]["corrupt"] == 0, out["store"]

    embed = ex.default_embed_model()
    vecs = np.asarray(embed.get_text_embedding_batch([n.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    for a in out["answers"]:
        u = a["usage"]
        assert u["context"] == "gist" and u["passages"] == 2, u
        # the answer read states: fewer rows than the passages' raw tokens, so fewer positions than the same engine
        # reading the passages as text (the states take as many as their widest head keeps: `state_positions`)
        assert 0 < u["kept_rows"] <= u["state_positions"] < u["raw_tokens"], (u, a)
        assert u["positions_read"] < a["text_positions"], (u, a)
        assert a["text_positions"] - u["positions_read"] >= (u["raw_tokens"] - u["state_positions"]) * 0.9, (u, a)
        assert a["titles"][0] == EXPECTED[a["question"]], a
        q = np.asarray(embed.get_query_embedding(a["question"]))
        exact = [nodes[i].node_id for i in np.argsort(-(vecs @ (q / np.linalg.norm(q))))[:2]]
        assert a["ids"] == exact
        assert isinstance(a["answer"], str) and a["answer"]
