"""The server behind `gist-memory serve`: the RAG web page with its JSON API, and OpenAI-compatible routes
(`/v1/chat/completions`, `/v1/completions`, `/v1/models`). Needs fastapi, uvicorn and python-multipart.

    from gist_memory.server import create_app
    app = create_app(model, memory)          # a FastAPI app; run it with uvicorn

See docs/server.md.
"""

from gist_memory.server.app import create_app
from gist_memory.server.service import GistService, call_usage

__all__ = ["GistService", "call_usage", "create_app"]
