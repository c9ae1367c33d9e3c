"""`GistCompressedRetriever` over a Qdrant vector store, with the gist states in a shared store. Offline.

    python examples/llama_index_qdrant.py                          # Qdrant on disk in a temp folder, states beside it
    python examples/llama_index_qdrant.py --workdir /tmp/gq --states redis://127.0.0.1:6379/0
    python examples/llama_index_qdrant.py --qdrant-url http://10.0.0.7:6333 --states s3://my-bucket/gist-states

Two phases, as two kinds of machine would run them:

1. **ingest** (a batch job): the documents are split into nodes, embedded (the bundled all-MiniLM-L6-v2) and
   written to a LlamaIndex `QdrantVectorStore`; each node's gist state is compressed once and put into the
   shared `GistStore` (`--states`: a folder, `s3://...`, `redis://...`, or comma-separated tiers).
2. **query** (a serving process, started fresh): it opens the same Qdrant collection and the same store, and
   answers with a stock `RetrieverQueryEngine` whose retriever is `GistCompressedRetriever` wrapping the Qdrant
   retriever and whose LLM is `GistLLM`: every retrieved passage is read from its stored state (nothing is
   compressed again), and the model attends over far fewer positions than the passages' raw tokens.

Qdrant runs embedded (`QdrantClient(path=...)`, its local mode: no server) unless `--qdrant-url` names a server;
the code is the same either way. Node ids are uuid5 of the document id, so a rerun upserts the same points.

Model: the shipped gist model (`GistModel.from_pretrained()`), or `--model` (a saved gist model folder), or
`--base` (a base LM with the training-free `pool+anchors` compressor).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llama_index.core import Document, StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.llms.gist_memory import GistLLM, GistRegistry  # noqa: E402
from llama_index.retrievers.gist_memory import GistCompressedRetriever, default_embed_model  # noqa: E402
from llama_index.vector_stores.qdrant import QdrantVectorStore  # noqa: E402
from qdrant_client import QdrantClient  # noqa: E402

from gist_memory import GistConfig, GistModel  # noqa: E402
from gist_memory.store import GistStore  # noqa: E402

CORPUS = Path(__file__).resolve().parent.parent / "gist_memory" / "assets" / "sample_corpus" / "passages.jsonl"
COLLECTION = "gist_demo"
QUESTIONS = [
    "Which city did Abuja replace as the capital of Nigeria?",
    "How high is Mount Elbrus?",
    "In which year did Robert Fulton's steamboat travel on the Hudson River?",
    "Who wrote the poem The Raven?",
]
_NS = uuid.UUID("5b0c6a52-6b7e-4b8e-9c1c-2f4f8e0b1a77")


def load_model(model: Optional[str] = None, base: Optional[str] = None) -> GistModel:
    """The shipped gist model, a saved one (`model`), or `base` with the training-free `pool+anchors`."""
    if base:
        return GistModel.from_base(base, GistConfig(compressor="pool+anchors", target_ratio=4), device="cpu")
    return GistModel.from_pretrained(model, device="cpu")


def load_documents(limit: Optional[int] = None) -> list[Document]:
    """The shipped sample corpus (Wikipedia leads, Python docs) as LlamaIndex documents; the question passages
    come first, so a `limit` keeps them."""
    rows = [json.loads(line) for line in CORPUS.open(encoding="utf-8")]
    wanted = ("Abuja", "Mount Elbrus", "Robert Fulton", "The Raven")
    rows = [r for r in rows if r["title"] in wanted] + [r for r in rows if r["title"] not in wanted]
    return [Document(id_=r["id"], text=r["text"], metadata={"title": r["title"]}) for r in rows[:limit]]


def qdrant_client(workdir: str, url: Optional[str] = None) -> QdrantClient:
    """A Qdrant server client (`url`), or Qdrant's embedded local mode in `workdir/qdrant`."""
    return QdrantClient(url=url) if url else QdrantClient(path=os.path.join(workdir, "qdrant"))


def split(documents: list[Document]) -> list[Any]:
    """Nodes of at most 512 tokens; ids are uuid5 of (document id, chunk) (Qdrant point ids are UUIDs)."""
    splitter = SentenceSplitter(chunk_size=512, id_func=lambda i, doc: str(uuid.uuid5(_NS, f"{doc.doc_id}#{i}")))
    return splitter.get_nodes_from_documents(documents)


def ingest(model: GistModel, embed_model: Any, documents: list[Document], client: QdrantClient,
           store: GistStore) -> dict[str, Any]:
    """Documents -> nodes -> Qdrant (vectors + text payload) and the shared store (one state per node)."""
    t0 = time.perf_counter()
    nodes = split(documents)
    vector_store = QdrantVectorStore(collection_name=COLLECTION, client=client)
    VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=vector_store),
                     embed_model=embed_model)
    # the states: compressed once, put into the shared store (text the LLM sees -> content key)
    registry = GistRegistry(model, store=store)
    registry.register(nodes, compress=True)
    return {"nodes": len(nodes), "compressed": registry.stats["compressed"], "seconds": time.perf_counter() - t0,
            "store": dict(store.stats)}


def query_engine(model: GistModel, embed_model: Any, client: QdrantClient, store: GistStore, top_k: int = 2,
                 max_new_tokens: int = 24, splice: bool = True) -> tuple[RetrieverQueryEngine, GistLLM, GistRegistry]:
    """A stock query engine over the Qdrant collection, made gist-aware by the retriever and the LLM
    (`splice=False`: the same engine with the model reading the passages as text, for comparison)."""
    vector_store = QdrantVectorStore(collection_name=COLLECTION, client=client)
    index = VectorStoreIndex.from_vector_store(vector_store, embed_model=embed_model)
    registry = GistRegistry(model, store=store)  # states come from the shared store, not from this process
    retriever = GistCompressedRetriever.from_defaults(retriever=index.as_retriever(similarity_top_k=top_k),
                                                      model=model, registry=registry)
    llm = GistLLM(model=model, registry=registry, max_new_tokens=max_new_tokens, splice=splice)
    return RetrieverQueryEngine.from_args(retriever, llm=llm), llm, registry


def run(workdir: str, states: str, questions: list[str], *, model: Optional[GistModel] = None,
        docs: Optional[int] = None, top_k: int = 2, max_new_tokens: int = 24, qdrant_url: Optional[str] = None,
        storage_dtype: Optional[str] = None, verbose: bool = True) -> dict[str, Any]:
    """Ingest (phase 1), then answer `questions` from a fresh client, registry and store (phase 2).

    Returns {"ingest": {...}, "answers": [{"question", "answer", "ids", "titles", "usage", "text_positions"}],
    "registry": stats of the query side's registry, "store": the query side's store counters}; `text_positions`
    is what the same engine reads with the passages as text (`GistLLM(splice=False)`).
    """
    model = model if model is not None else load_model()
    embed_model = default_embed_model()
    tiers = [t for t in states.split(",") if t]
    kw = {"storage_dtype": storage_dtype} if storage_dtype else {}

    client = qdrant_client(workdir, qdrant_url)
    writer_store = GistStore(tiers if len(tiers) > 1 else tiers[0], **kw)
    done = ingest(model, embed_model, load_documents(docs), client, writer_store)
    writer_store.close()
    client.close()  # local mode holds a lock on its folder: the serving side opens it afresh
    if verbose:
        print(f"ingest: {done['nodes']} nodes into Qdrant, {done['compressed']} states into {states} "
              f"({done['seconds']:.1f} s)")

    client = qdrant_client(workdir, qdrant_url)
    store = GistStore(tiers if len(tiers) > 1 else tiers[0], **kw)
    try:
        engine, llm, registry = query_engine(model, embed_model, client, store, top_k, max_new_tokens)
        text_engine, text_llm, _ = query_engine(model, embed_model, client, store, top_k, 1, splice=False)
        answers = []
        for q in questions:
            resp = engine.query(q)
            u = llm.last_gist_usage
            text_engine.query(q)  # the same question with the passages read as text (one token: the prefill)
            a = {"question": q, "answer": str(resp).strip(), "ids": [n.node.node_id for n in resp.source_nodes],
                 "titles": [n.node.metadata.get("title") for n in resp.source_nodes], "usage": u,
                 "text_positions": text_llm.last_gist_usage.get("positions_read")}
            answers.append(a)
            if verbose:
                print(f"\nQ: {q}\n   sources: {', '.join(a['titles'])}\n   A: {a['answer'][:120]!r}\n"
                      f"   read {u.get('positions_read')} positions ({u.get('kept_rows')} state rows for "
                      f"{u.get('raw_tokens')} raw passage tokens); as text: {a['text_positions']} positions")
        out = {"ingest": done, "answers": answers, "registry": dict(registry.stats), "store": dict(store.stats)}
    finally:
        store.close()
        client.close()
    if verbose:
        print(f"\nquery side: {out['registry']['compressed']} states compressed, {out['registry']['reloaded']} "
              f"loaded from the shared store {out['store']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None, help="folder for Qdrant's local mode and the default state store")
    ap.add_argument("--states", default=None, help="shared state store: folder, s3://..., redis://..., or "
                    "comma-separated tiers fastest first (default: WORKDIR/states)")
    ap.add_argument("--qdrant-url", default=None, help="a Qdrant server (default: embedded local mode)")
    ap.add_argument("--model", default=None, help="a saved gist model folder (default: the shipped one)")
    ap.add_argument("--base", default=None, help="a base LM, compressed with the training-free pool+anchors")
    ap.add_argument("--storage-dtype", default=None, help="float32, bfloat16, float16, int8 or int4")
    ap.add_argument("--docs", type=int, default=None, help="index only the first N documents")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="gist-qdrant-")
    states = args.states or f"local://{os.path.join(os.path.abspath(workdir), 'states')}"
    print(f"workdir {workdir}; states in {states}")
    run(workdir, states, QUESTIONS, model=load_model(args.model, args.base), docs=args.docs, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, qdrant_url=args.qdrant_url, storage_dtype=args.storage_dtype)


if __name__ == "__main__":
    main()
