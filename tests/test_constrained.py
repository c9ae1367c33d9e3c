"""Constrained decoding (`schema=` / `tools=`): every output parses and validates, whatever is sampled.

A tiny random model is the worst case for structured output (it has no idea what JSON is), so the tests sample
from it with many seeds and tight token budgets and check every answer against its schema.
"""

from __future__ import annotations

import json
from typing import Optional

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from gist_memory.model.constrained import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolCall,
    build_constraint,
    format_tool_calls,
    normalize_tools,
    parse_json,
    parse_tool_calls,
)


class Address(BaseModel):
    street: str
    zip_code: Optional[int] = None


class Person(BaseModel):
    """A person with a nested model (a `$defs` entry and a `$ref`)."""

    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=150)
    home: Address
    tags: list[str] = Field(default_factory=list, max_length=3)


class Movie(TypedDict):
    title: str
    year: int
    rating: float


SCHEMAS = {
    "flat": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
             "required": ["city", "days"]},
    "nested": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1}, "ok": {"type": "boolean"}}, "required": ["id", "ok"]}},
        "note": {"anyOf": [{"type": "string", "minLength": 2}, {"type": "null"}]}}, "required": ["items", "note"]},
    "enum": {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]},
                                              "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"}},
             "required": ["unit", "code"]},
    "array": {"type": "array", "items": {"type": "number"}, "minItems": 2},
    "open": {"type": "object"},  # JSON mode: any object
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "save_person", "description": "Store a person.",
                                      "parameters": Person.model_json_schema()}},
]


def _shortest(model, **kw) -> int:  # noqa: ANN001, ANN003
    """Tokens of the guide's own shortest completion from the start (the least budget that can work)."""
    return len(model.grammar_guide(build_constraint(**kw), 4096)._closure)


# ---- structured answers -------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from([*SCHEMAS, "person", "movie"]), seed=st.integers(0, 2**31 - 1),
       slack=st.sampled_from([0, 1, 3, 10, 40]), temperature=st.sampled_from([0.7, 1.0, 1.5]))
def test_sampled_json_always_parses_and_validates(tiny_model, name, seed, slack, temperature):
    schema = {"person": Person, "movie": Movie}.get(name, SCHEMAS.get(name))
    budget = _shortest(tiny_model, schema=schema) + slack
    text, usage = tiny_model.generate_with_usage("Describe it.", schema=schema, max_new_tokens=budget,
                                                 do_sample=True, temperature=temperature, seed=seed)
    value = json.loads(text)
    if name == "person":
        Person.model_validate(value)
        Person.model_validate_json(text)
    elif name == "movie":
        assert set(value) == {"title", "year", "rating"}
        assert isinstance(value["year"], int) and isinstance(value["rating"], (int, float))
    else:
        jsonschema.validate(value, SCHEMAS[name])
    assert usage.new_tokens <= budget


def test_budget_closes_the_answer_early_and_refuses_what_cannot_fit(tiny_model):
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    least = _shortest(tiny_model, schema=schema)
    text = tiny_model.generate("Write.", schema=schema, max_new_tokens=least + 1, do_sample=True, seed=3)
    assert json.loads(text).keys() == {"text"}
    with pytest.raises(ValueError, match="max_new_tokens=3 is too small"):
        tiny_model.stream("Write.", schema=schema, max_new_tokens=3)  # raised on the call, not on first next()


def test_end_of_sequence_only_where_the_grammar_accepts(tiny_model, monkeypatch):
    """A model that wants to stop at every step still gives complete JSON; without a schema it stops at once."""
    pick = type(tiny_model)._pick
    eos = sorted(tiny_model._eos_ids(None))

    def eager_to_stop(logits, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        logits = logits.clone()
        logits[eos] += 1e4
        return pick(logits, *args, **kwargs)

    monkeypatch.setattr(type(tiny_model), "_pick", staticmethod(eager_to_stop))
    assert tiny_model.generate("Hi", max_new_tokens=8) == ""
    text = tiny_model.generate("Hi", schema=SCHEMAS["flat"], max_new_tokens=64, do_sample=True, seed=0)
    jsonschema.validate(json.loads(text), SCHEMAS["flat"])


def test_guide_mask_allows_eos_only_when_complete(tiny_model):
    guide = tiny_model.grammar_guide(build_constraint(schema=SCHEMAS["flat"]), 64)
    eos = sorted(tiny_model._eos_ids(None))
    ids = tiny_model.tokenizer.encode('{"city": "Oslo", "days": 3}', add_special_tokens=False)
    for t in ids:
        assert not guide.allowed()[eos].any()
        assert guide.allowed()[t]
        assert guide.advance(t) == t
    assert guide.accepting and guide.done and guide.allowed()[eos].all()


def test_states_compose_with_a_schema_and_streaming_matches(tiny_model):
    states = tiny_model.compress(["Maren Voss became the chief curator in 1912. The archive code is QX-4471."])
    text, usage = tiny_model.generate_with_usage("Who?", states=states, schema=Person, max_new_tokens=120)
    Person.model_validate_json(text)
    assert usage.kept_rows > 0 and usage.raw_tokens > 0
    pieces = list(tiny_model.stream("Who?", states=states, schema=Person, max_new_tokens=120))
    assert "".join(pieces) == text and len(pieces) > 1


def test_stop_strings_do_not_cut_json(tiny_model):
    text = tiny_model.generate("Hi", schema=SCHEMAS["flat"], stop=['"', ":", "}"], max_new_tokens=64)
    jsonschema.validate(json.loads(text), SCHEMAS["flat"])


# ---- tool calls ------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice", ["auto", "required", "any", "add", "save_person"])
@pytest.mark.parametrize("parallel", [True, False])
def test_sampled_tool_calls_always_parse_and_validate(tiny_model, choice, parallel):
    tools = normalize_tools(TOOLS)
    budget = _shortest(tiny_model, tools=TOOLS, tool_choice=choice) + 24
    kinds = set()
    for seed in range(6):
        text = tiny_model.generate("Weather in Paris?", tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel,
                                   max_new_tokens=budget, do_sample=True, temperature=1.3, seed=seed)
        content, calls = parse_tool_calls(text, tools)  # validates names and arguments
        if choice == "auto":
            assert (content == "") == bool(calls)
            assert TOOL_CALL_OPEN not in content
            kinds.add(bool(calls))
        else:
            assert content == "" and calls
        if not parallel or choice in ("add", "save_person"):
            assert len(calls) <= 1
        if choice in ("add", "save_person"):
            assert calls[0].name == choice
        for c in calls:
            assert c.id.startswith("call_")
            if c.name == "save_person":
                Person.model_validate(c.arguments)


def test_auto_writes_text_or_calls_and_none_is_free_text(tiny_model):
    greedy_call = tiny_model.generate("Hi", tools=TOOLS, tool_choice="required", max_new_tokens=200)
    assert parse_tool_calls(greedy_call, normalize_tools(TOOLS))[1]
    plain = tiny_model.generate("Hi", max_new_tokens=12)
    assert tiny_model.generate("Hi", tools=TOOLS, tool_choice="none", max_new_tokens=12) == plain


def test_bad_input_is_a_clear_value_error(tiny_model):
    cases = [
        (dict(schema=SCHEMAS["flat"], tools=TOOLS), "either schema"),
        (dict(tools=TOOLS, tool_choice="nope"), "not one of the tools"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "not one of the tools"),
        (dict(tool_choice="required"), "needs tools"),
        (dict(schema=SCHEMAS["flat"], tool_choice="required"), "needs tools"),
        (dict(schema={"type": "strin"}), "invalid JSON schema"),
        (dict(schema={"type": "string", "pattern": "(a"}), "invalid JSON schema at pattern"),
        (dict(schema={"allOf": [{"type": "string"}, {"type": "integer"}]}), "refused this schema"),
        (dict(schema=42), "JSON-schema dict, a Pydantic model class or a TypedDict"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "names are"),
        (dict(tools=[TOOLS[0], {**TOOLS[1], "function": {**TOOLS[1]["function"], "name": "get_weather"}}]),
         "unique"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]),
         "object schema"),
        (dict(tools=["get_weather"]), "OpenAI tool dict"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            tiny_model.stream("Hi", **kw)


def test_parse_tool_calls_reads_the_wire_format():
    assert parse_tool_calls("Paris is sunny.") == ("Paris is sunny.", [])
    text = format_tool_calls([ToolCall("add", {"a": 1, "b": 2}),
                              {"name": "get_weather", "args": {"city": "Oslo </tool_call>"}}])
    content, calls = parse_tool_calls(text, normalize_tools(TOOLS))
    assert content == "" and [(c.name, c.arguments) for c in calls] == [
        ("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo </tool_call>"})]
    assert json.loads(calls[0].to_openai()["function"]["arguments"]) == {"a": 1, "b": 2}
    for bad, msg in [(TOOL_CALL_OPEN + "{", "not JSON"), (TOOL_CALL_OPEN + '{"name": "add"}' + TOOL_CALL_CLOSE, "must be"),
                     (TOOL_CALL_OPEN + '{"name": "add", "arguments": {}}', "not closed"),
                     (TOOL_CALL_OPEN + '{"name": "mul", "arguments": {}}' + TOOL_CALL_CLOSE, "not one of"),
                     (TOOL_CALL_OPEN + '{"name": "add", "arguments": {"a": "x"}}' + TOOL_CALL_CLOSE, "schema")]:
        with pytest.raises(ValueError, match=msg):
            parse_tool_calls(bad, normalize_tools(TOOLS))
    with pytest.raises(ValueError, match="does not match"):
        parse_json('{"city": 3}', SCHEMAS["flat"])


def test_instructions_reach_the_system_prompt(tiny_model):
    seen = {}
    prepare = tiny_model.prepare

    def spy(prompt, states, system_prompt, context_prefix, **kw):  # noqa: ANN001, ANN003, ANN202
        seen["prompt"], seen["system"] = prompt, system_prompt
        return prepare(prompt, states, system_prompt, context_prefix, **kw)

    tiny_model.prepare = spy
    try:
        tiny_model.generate("Hi", tools=TOOLS, max_new_tokens=4)
        assert "get_weather" in seen["system"] and TOOL_CALL_OPEN in seen["system"]
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        tiny_model.generate(msgs, schema=Movie, max_new_tokens=40)
        assert seen["system"] is None and seen["prompt"][0]["content"].startswith("Be brief.\n\n")
        assert '"rating"' in seen["prompt"][0]["content"]
    finally:
        del tiny_model.prepare
    assert torch.get_num_threads() >= 1
