"""`GistState`: the kept key/value rows of one compressed passage, and their safetensors form."""

from gist_memory.state.gist_state import KIND_ANCHOR, KIND_GIST, KIND_POOL, GistState, StateFormatError

__all__ = ["GistState", "StateFormatError", "KIND_GIST", "KIND_ANCHOR", "KIND_POOL"]
