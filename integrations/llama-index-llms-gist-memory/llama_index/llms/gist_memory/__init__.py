"""LlamaIndex LLM over a `gist_memory.GistModel`: known passages in the prompt are read from their gist states."""

from llama_index.llms.gist_memory.base import GistLLM, GistTextFallbackWarning
from llama_index.llms.gist_memory.registry import METADATA_KEY, GistRegistry, SplicedPrompt, mark_node, node_llm_text

__all__ = ["GistLLM", "GistTextFallbackWarning", "GistRegistry", "SplicedPrompt", "METADATA_KEY", "mark_node", "node_llm_text"]
