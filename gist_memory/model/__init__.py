"""The model layer: `GistModel`, base loading, planning and all KV-cache handling."""

from gist_memory.model.gist_model import GistModel, default_model_dir

__all__ = ["GistModel", "default_model_dir"]
