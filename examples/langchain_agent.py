"""A LangChain v1 agent (`create_agent`) with two tools over a compressed memory, on the embedded model, offline.

    python examples/langchain_agent.py                                   # the scripted questions
    python examples/langchain_agent.py "What is the archive code of the northern wing?"

The memory is a `GistMemory` of short notes (each compressed once into a gist state). The agent has two tools:

- `search_notes(query)`: the notes closest to the query, found by a `GistRetriever`. They come back to the model
  inside a tool message; the retriever registered them, so `ChatGist` reads their gist states instead of their
  text (`response_metadata["gist"]["passages"]`, and far fewer positions than their raw tokens).
- `add_note(text)`: stores a new note (compressed once, searchable at once).

The model is `ChatGist`: every tool call it writes is decoded under a grammar, so it always names one of the two
tools with arguments that validate. The bundled SmolLM2-135M never picks a tool by itself, so the chat model is
built with `first_tool_choice="search_notes"`: the first reply of a turn searches (the model writes the query),
and once the result is in, the model answers in text or calls a tool again (tool_choice "auto"), one call per
reply (`parallel_tool_calls=False`). A larger model needs neither setting.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NOTES = [
    "Maren Voss became the chief curator of the Tallin archive in 1912. She catalogued the maps.",
    "The archive code of the northern wing is QX-4471. Visitors need a pass to enter it.",
    "The station sits at an altitude of 2,318 metres. Trains arrive twice a day in summer.",
    "The reading room opens at nine and closes at five; on Sundays it stays closed.",
]
QUESTIONS = [
    "Search the notes: what is the archive code of the northern wing?",
    "When does the reading room open? Look it up in the notes.",
]
SYSTEM = ("You answer questions about an archive from your notes. Search the notes first, then answer in one short "
          "sentence from what the search returned.")


def load_model(kind: str = "default"):  # noqa: ANN201 - a GistModel
    """The embedded default gist model, or the training-free pool+anchors compressor over the bundled SmolLM2."""
    from gist_memory import GistConfig, GistModel

    if kind == "default":
        try:
            return GistModel.from_pretrained(device="cpu")
        except FileNotFoundError as e:
            print(f"[note] {e}\n[note] using the training-free pool+anchors compressor (ratio 4) instead",
                  file=sys.stderr)
    return GistModel.from_base(None, GistConfig(compressor="pool+anchors", target_ratio=4), device="cpu")


def build_agent(model: Any, memory: Any, *, max_tokens: int = 48, structured_max_tokens: int = 64,
                k: int = 2) -> Any:
    """The agent: `ChatGist` over `model`, and the two tools over `memory`."""
    from langchain.agents import create_agent
    from langchain_core.tools import tool
    from langchain_gist_memory import ChatGist, GistRetriever

    retriever = GistRetriever(memory=memory, k=k)

    @tool
    def search_notes(query: str) -> str:
        """Search the archive notes; returns the notes most related to the query."""
        return "\n\n".join(d.page_content for d in retriever.invoke(query)) or "No note matches."

    @tool
    def add_note(text: str) -> str:
        """Store a new note in the archive notes."""
        (note_id,) = memory.add_texts([text], show_progress=False)
        return f"Stored note {note_id}."

    chat = ChatGist(model=model, max_tokens=max_tokens, structured_max_tokens=structured_max_tokens,
                    first_tool_choice="search_notes", parallel_tool_calls=False)
    return create_agent(chat, tools=[search_notes, add_note], system_prompt=SYSTEM)


def build_memory(model: Any, embedder: Any = None, path: Optional[str] = None) -> Any:
    """A `GistMemory` holding `NOTES` (in memory when `path` is None)."""
    from gist_memory import GistMemory

    memory = GistMemory(model=model, path=path, embedder=embedder)
    if not len(memory):
        memory.add_texts(NOTES, show_progress=False)
    return memory


def ask(agent: Any, question: str, recursion_limit: int = 8) -> dict[str, Any]:
    """Run the agent on `question`; returns the messages, the tool calls and the final answer with its usage."""
    from langchain_core.messages import AIMessage, ToolMessage

    out = agent.invoke({"messages": [{"role": "user", "content": question}]},
                       config={"recursion_limit": recursion_limit})
    msgs = out["messages"]
    final = msgs[-1]
    return {
        "question": question,
        "messages": msgs,
        "tool_calls": [c for m in msgs if isinstance(m, AIMessage) for c in m.tool_calls],
        "tool_results": [m for m in msgs if isinstance(m, ToolMessage)],
        "answer": final.content if isinstance(final, AIMessage) else "",
        "gist": final.response_metadata.get("gist", {}) if isinstance(final, AIMessage) else {},
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("questions", nargs="*", help="questions (default: the scripted ones)")
    ap.add_argument("--model", choices=["default", "pool"], default="default")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    model = load_model(a.model)
    agent = build_agent(model, build_memory(model))
    for q in a.questions or QUESTIONS:
        r = ask(agent, q)
        print(f"\nQ: {q}")
        for c in r["tool_calls"]:
            print(f"  calls {c['name']}({c['args']})")
        for t in r["tool_results"]:
            print(f"  {t.name} -> {t.content[:100]!r}")
        g = r["gist"]
        print(f"A: {r['answer']}")
        print(f"  [passages read from states: {g.get('passages', 0)}; positions read {g.get('positions_read')} "
              f"for {g.get('raw_tokens')} compressed tokens]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
