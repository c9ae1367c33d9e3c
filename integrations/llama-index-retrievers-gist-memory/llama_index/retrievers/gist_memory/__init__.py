"""LlamaIndex retriever over gist-memory: every returned node has a cached gist state that `GistLLM` splices."""

from llama_index.llms.gist_memory import METADATA_KEY, GistLLM, GistRegistry
from llama_index.retrievers.gist_memory.base import GistCompressedRetriever, LlamaIndexEmbedder, add_nodes_to_memory
from llama_index.retrievers.gist_memory.embeddings import GistMiniLMEmbedding, default_embed_model
from llama_index.retrievers.gist_memory.synthesizer import GistSynthesizer

__all__ = [
    "GistCompressedRetriever",
    "GistSynthesizer",
    "GistLLM",
    "GistMiniLMEmbedding",
    "GistRegistry",
    "LlamaIndexEmbedder",
    "METADATA_KEY",
    "add_nodes_to_memory",
    "default_embed_model",
]
