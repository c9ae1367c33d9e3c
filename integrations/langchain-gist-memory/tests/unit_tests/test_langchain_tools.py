"""`ChatGist.bind_tools` and `with_structured_output` on the tiny random Llama: whatever it samples, tool calls and
structured answers parse and validate; tool history reaches the model in the format it writes calls in."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_gist_memory import ChatGist
from pydantic import BaseModel, Field
from typing_extensions import TypedDict


@tool
def get_weather(city: str, days: int = 1) -> str:
    """Weather forecast of a city."""
    return f"Sunny in {city} for {days} days."


class Note(BaseModel):
    """Store a note."""

    title: str = Field(max_length=30)
    tags: list[str] = Field(max_length=2)
    pinned: Optional[bool] = None


class Movie(TypedDict):
    """A movie."""

    title: Annotated[str, ..., "its title"]
    year: Annotated[int, ..., "release year"]


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def _chat(model, **kw):  # noqa: ANN001, ANN003, ANN202
    return ChatGist(model=model, max_tokens=8, structured_max_tokens=96, temperature=1.2, **kw)


def test_bound_tools_always_give_valid_calls(gist_tiny):
    for seed in range(4):
        chat = _chat(gist_tiny, seed=seed)
        for choice in ("any", "get_weather", "Note", "add"):
            msg = chat.bind_tools([get_weather, Note, add], tool_choice=choice).invoke("Weather in Paris?")
            assert msg.tool_calls and msg.content == "" and msg.response_metadata["finish_reason"] == "tool_calls"
            for c in msg.tool_calls:
                assert c["id"] and c["type"] == "tool_call"
                if c["name"] == "get_weather":
                    assert get_weather.invoke(c["args"]).startswith("Sunny")  # the tool takes its arguments as they are
                elif c["name"] == "Note":
                    Note.model_validate(c["args"])
                else:
                    assert add(**c["args"]) == c["args"]["a"] + c["args"]["b"]
            if choice != "any":
                assert [c["name"] for c in msg.tool_calls] == [choice]


@pytest.mark.parametrize("choice", ["auto", "any"])
def test_text_or_calls_and_streaming_matches(gist_tiny, choice):
    """"auto": text that never holds a call marker, or calls (the tiny model's 600-token vocabulary spells the
    marker in 11 tokens, so it nearly always writes text); the stream aggregates to the same message."""
    chat = _chat(gist_tiny, parallel_tool_calls=False)
    bound = chat.bind_tools([get_weather, add], tool_choice=choice)
    for seed in range(3):
        msg = bound.invoke("Weather in Paris?", seed=seed)
        assert len(msg.tool_calls) <= 1 and "<tool_call>" not in msg.content
        assert not (msg.tool_calls and msg.content)
        if choice == "any":
            assert msg.tool_calls
        full = None
        for chunk in bound.stream("Weather in Paris?", seed=seed):
            full = chunk if full is None else full + chunk
        assert full.content == msg.content
        assert [(c["name"], c["args"]) for c in full.tool_calls] == [(c["name"], c["args"]) for c in msg.tool_calls]


def test_first_tool_choice_forces_a_call_until_a_tool_answered(gist_tiny):
    chat = _chat(gist_tiny, seed=1, first_tool_choice="get_weather")
    bound = chat.bind_tools([get_weather, add])
    first = bound.invoke([HumanMessage("Weather in Paris?")])
    assert [c["name"] for c in first.tool_calls] == ["get_weather"]
    result = get_weather.invoke(first.tool_calls[0])
    assert isinstance(result, ToolMessage)
    seen = []
    stream = gist_tiny.stream

    def spy(prompt, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append((prompt, kwargs))
        return stream(prompt, *args, **kwargs)

    gist_tiny.stream = spy
    try:
        bound.invoke([HumanMessage("Weather in Paris?"), first, result])
    finally:
        del gist_tiny.stream
    prompt, kwargs = seen[-1]
    assert kwargs["tool_choice"] == "auto"  # the tool has answered: the model decides again
    call = json.dumps({"name": "get_weather", "arguments": first.tool_calls[0]["args"]}, ensure_ascii=False)
    assert prompt[-2] == {"role": "assistant", "content": f"<tool_call>{call}</tool_call>"}
    assert prompt[-1]["role"] == "user" and prompt[-1]["content"].startswith('<tool_response name="get_weather">')
    assert kwargs["tools"][0]["function"]["name"] == "get_weather"  # the core describes them in the system prompt


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_structured_output_always_validates(gist_tiny, method):
    chat = _chat(gist_tiny)
    for schema in (Note, Movie, Note.model_json_schema()):
        runnable = chat.with_structured_output(schema, method=method)
        for seed in range(3):
            out = runnable.invoke("Make one.", seed=seed)
            if schema is Note:
                assert isinstance(out, Note)
            else:
                assert isinstance(out, dict)
                (Note.model_validate(out) if isinstance(schema, dict) else None)
                if schema is Movie:
                    assert set(out) == {"title", "year"} and isinstance(out["year"], int)


def test_json_mode_without_schema_and_include_raw(gist_tiny):
    chat = _chat(gist_tiny, seed=2)
    out = chat.with_structured_output(None, method="json_mode").invoke("Make one.")
    assert isinstance(out, dict)
    raw = chat.with_structured_output(Note, include_raw=True).invoke("Make one.")
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], Note)
    assert Note.model_validate_json(raw["raw"].content) == raw["parsed"]
    chunks = list(chat.with_structured_output(Note).stream("Make one."))
    assert chunks and all(isinstance(c, Note) for c in chunks)


def test_budget_and_bad_input(gist_tiny):
    chat = ChatGist(model=gist_tiny, max_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens=4 is too small"):
        chat.bind_tools([get_weather], tool_choice="any").invoke("hi")
    with pytest.raises(ValueError, match="either tools .* or a response format"):
        chat.invoke("hi", tools=[get_weather.tool_call_schema.model_json_schema()],
                    response_format={"type": "json_object"})
    with pytest.raises(ValueError, match="response_format must be"):
        chat.invoke("hi", response_format={"type": "xml"})
    with pytest.raises(ValueError, match="needs a schema"):
        chat.with_structured_output(None)


def test_tool_history_with_system_and_list_content(gist_tiny):
    chat = _chat(gist_tiny, seed=0)
    msgs = [
        SystemMessage("Be brief."),
        HumanMessage("What is 1 + 2?"),
        AIMessage([{"type": "text", "text": "Let me add."}], tool_calls=[{"name": "add", "args": {"a": 1, "b": 2},
                                                                           "id": "c1", "type": "tool_call"}]),
        ToolMessage("3", tool_call_id="c1"),  # no name: taken from the call it answers
    ]
    seen = []
    stream = gist_tiny.stream

    def spy(prompt, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append((prompt, kwargs))
        return stream(prompt, *args, **kwargs)

    gist_tiny.stream = spy
    try:
        msg = chat.bind_tools([add]).invoke(msgs)
    finally:
        del gist_tiny.stream
    assert isinstance(msg, AIMessage)
    prompt, kwargs = seen[-1]
    assert prompt[-2]["content"] == 'Let me add.\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    assert prompt[-1]["content"] == '<tool_response name="add">\n3\n</tool_response>'
    assert kwargs["system_prompt"] == "Be brief."  # the tool instructions are added by the core, after it
