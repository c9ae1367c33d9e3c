"""`examples/langchain_agent.py` end to end on the bundled SmolLM2 (slow): a LangChain v1 `create_agent` with two
tools over a `GistMemory`; the search result comes back as a tool message and is read from its gist states."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[4] / "examples" / "langchain_agent.py"


def _load_example():  # noqa: ANN202 - the example module
    spec = importlib.util.spec_from_file_location("gist_example_langchain_agent", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_agent_searches_the_memory_and_answers_from_states(smol_pool, hash_embedder):
    ex = _load_example()
    memory = ex.build_memory(smol_pool, embedder=hash_embedder)
    agent = ex.build_agent(smol_pool, memory, max_tokens=12, structured_max_tokens=40)
    r = ex.ask(agent, ex.QUESTIONS[0])

    kinds = [type(m) for m in r["messages"]]
    assert kinds[:3] == [HumanMessage, AIMessage, ToolMessage] and kinds[-1] is AIMessage, kinds
    (first,) = r["messages"][1].tool_calls  # one call per reply; the first one searches
    assert first["name"] == "search_notes" and isinstance(first["args"]["query"], str) and first["id"]
    result = r["tool_results"][0]
    assert result.status == "success" and result.tool_call_id == first["id"]
    assert sum(note in result.content for note in ex.NOTES) == 2  # k=2 notes came back
    # every later call validated against its tool too (the agent ran them without errors)
    assert {c["name"] for c in r["tool_calls"]} <= {"search_notes", "add_note"}
    assert all(t.status == "success" for t in r["tool_results"])

    final = r["messages"][-1]
    assert final.content and not final.tool_calls
    g = r["gist"]
    assert g["passages"] >= 2, g  # the notes in the tool message were read from their states
    assert 0 < g["kept_rows"] < g["raw_tokens"], g
