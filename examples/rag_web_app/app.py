"""The RAG web app, now served from the package (`gist_memory.server`): this file is a thin wrapper kept so that
`python examples/rag_web_app/app.py [serve options]` and code importing `create_app` from here keep working.

    gist-memory serve                          # http://127.0.0.1:8000, documents kept in RAM
    gist-memory serve --sample --store mem/    # preload the sample corpus, keep documents in mem/
    python examples/rag_web_app/app.py --port 8080

The page (HTML/JS/CSS) lives in gist_memory/server/static/; the OpenAI-compatible routes (`/v1/...`) are served
beside it. See docs/server.md.
"""

from gist_memory.server import GistService, create_app

__all__ = ["GistService", "create_app"]

if __name__ == "__main__":  # python examples/rag_web_app/app.py [serve options]
    import sys

    from gist_memory.cli import main

    main(["serve", *sys.argv[1:]])
