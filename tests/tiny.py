"""Tiny offline models for unit tests: kept as a thin re-export of `gist_memory.testing` (import that instead)."""

from gist_memory.testing import CHATML, CORPUS, build_tiny_base, build_tokenizer

__all__ = ["CHATML", "CORPUS", "build_tiny_base", "build_tokenizer"]
