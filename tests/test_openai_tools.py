"""Tools and structured output on the OpenAI-compatible server (#15), driven by the real openai client and LangChain's
`ChatOpenAI` against a uvicorn server on 127.0.0.1 with the tiny random model: a model that knows nothing of JSON, so
every tool call and JSON answer below validating is the grammar's doing. Memory states are still read; tool calls
stream as OpenAI delta chunks; bad tools and schemas are OpenAI 400 error objects; constrained requests bypass the
micro-batcher.
"""

from __future__ import annotations

import json
import threading

import pytest

from tests.test_openai_server import QUESTION, client, memories, server, tiny  # noqa: F401 - module fixtures

openai = pytest.importorskip("openai", reason="the openai client is not installed (requirements-extra)")
jsonschema = pytest.importorskip("jsonschema")

ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city"]}}}
TOOLS = [ADD, WEATHER]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ANSWER = {"type": "object", "properties": {
    "answer": {"type": "string", "maxLength": 20}, "year": {"type": "integer"},
    "sure": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["answer", "year", "sure"]}
SAMPLED = [{}, {"temperature": 1.5, "seed": 1}, {"temperature": 2.0, "seed": 2}]
MSGS = [{"role": "user", "content": "What is 2 + 3? Then the weather in Oslo."}]


def _check_calls(calls, one=False):  # noqa: ANN001, ANN202 - OpenAI tool calls (objects or dicts)
    out = []
    for c in calls:
        c = c if isinstance(c, dict) else c.model_dump()
        assert c["id"].startswith("call_") and c["type"] == "function"
        name, args = c["function"]["name"], json.loads(c["function"]["arguments"])
        jsonschema.validate(args, PARAMS[name])  # KeyError: no such tool; ValidationError: bad arguments
        out.append((name, args))
    assert out and (len(out) == 1 or not one)
    return out


def _streamed_calls(chunks):  # noqa: ANN001, ANN202
    """Tool calls put together from stream chunks as a client does (by index), and the finish reasons seen."""
    calls: dict[int, dict] = {}
    finishes, content = [], ""
    for ch in chunks:
        for choice in ch.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": None, "type": None, "function": {"name": "", "arguments": ""}})
                c["id"] = d.id or c["id"]
                c["type"] = d.type or c["type"]
                c["function"]["name"] += d.function.name or ""
                c["function"]["arguments"] += d.function.arguments or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return [calls[i] for i in sorted(calls)], finishes, content


# ---- tool calls --------------------------------------------------------------------------------------------
def test_tool_calls_always_validate_and_read_memory_states(client, tiny, memories):  # noqa: F811
    from gist_memory.model.constrained import parse_tool_calls

    for kw in SAMPLED:
        r = client.chat.completions.create(model="gist-memory", messages=MSGS, tools=TOOLS, tool_choice="required",
                                           max_tokens=96, **kw)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        _check_calls(r.choices[0].message.tool_calls)
        one = client.chat.completions.create(model="gist-memory", messages=MSGS, tools=TOOLS, max_tokens=96,
                                             tool_choice="required", parallel_tool_calls=False, **kw)
        _check_calls(one.choices[0].message.tool_calls, one=True)
        named = client.chat.completions.create(
            model="gist-memory", messages=MSGS, tools=TOOLS, max_tokens=96,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, **kw)
        assert [n for n, _ in _check_calls(named.choices[0].message.tool_calls, one=True)] == ["get_weather"]

    # from a memory: the passages' states are read, and the calls are the core's over those states
    msgs = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="gist-memory:default", messages=msgs, tools=TOOLS,
                                       tool_choice="required", max_tokens=96)
    assert r.usage.model_extra["passages"] == 2 and r.usage.model_extra["state_positions"] > 0
    main, _ = memories
    states = main.states_for([main.get(s["id"]) for s in r.model_extra["sources"]])
    text = tiny.generate(msgs, states=states, tools=TOOLS, tool_choice="required", max_new_tokens=96)
    want = [(c.name, c.arguments) for c in parse_tool_calls(text)[1]]
    assert _check_calls(r.choices[0].message.tool_calls) == want


def test_tool_calls_stream_as_openai_delta_chunks(client):  # noqa: F811
    kw = {"model": "gist-memory", "messages": MSGS, "tools": TOOLS, "tool_choice": "required", "max_tokens": 96,
          "temperature": 1.5, "seed": 3}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    calls, finishes, content = _streamed_calls(chunks)
    assert finishes == ["tool_calls"] and content == ""
    assert _check_calls(calls) == _check_calls(whole.choices[0].message.tool_calls)
    assert len({c["id"] for c in calls}) == len(calls)
    pieces = sum(len(ch.choices[0].delta.tool_calls or []) for ch in chunks if ch.choices)
    assert pieces > 2 * len(calls)  # arguments arrive as they are decoded, not in one piece
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    # the openai client's own stream helper puts the calls together (and checks the chunks' shape)
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    assert _check_calls(final.choices[0].message.tool_calls) == _check_calls(calls)


def test_auto_and_none_tool_choice(client):  # noqa: F811
    plain = client.chat.completions.create(model="gist-memory", messages=MSGS, max_tokens=12)
    none = client.chat.completions.create(model="gist-memory", messages=MSGS, tools=TOOLS, tool_choice="none",
                                          max_tokens=12)
    assert none.choices[0].message.content == plain.choices[0].message.content  # no grammar, no tool prompt
    assert none.choices[0].message.tool_calls is None
    for kw in SAMPLED:
        r = client.chat.completions.create(model="gist-memory", messages=MSGS, tools=TOOLS, max_tokens=96, **kw)
        m = r.choices[0].message
        if m.tool_calls:
            assert r.choices[0].finish_reason == "tool_calls"
            _check_calls(m.tool_calls)
        else:
            assert "<tool_call>" not in m.content and r.choices[0].finish_reason in ("stop", "length")
        chunks = list(client.chat.completions.create(model="gist-memory", messages=MSGS, tools=TOOLS,
                                                     max_tokens=96, stream=True, **kw))
        calls, finishes, content = _streamed_calls(chunks)
        assert finishes == [r.choices[0].finish_reason] and content == (m.content or "")
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            (c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls or []]


def test_tool_results_in_the_history(client, tiny, memories):  # noqa: F811
    from gist_memory.model.constrained import format_tool_calls, format_tool_result

    first = client.chat.completions.create(model="gist-memory:default", messages=[
        {"role": "user", "content": QUESTION}], tools=TOOLS, tool_choice="required", max_tokens=96)
    msg = first.choices[0].message
    history = [{"role": "user", "content": QUESTION}, msg.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": c.id, "content": f"result {i}"} for i, c in enumerate(msg.tool_calls)]
    r = client.chat.completions.create(model="gist-memory:default", messages=history, max_tokens=8)
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    # what the model read: the calls as it writes them, each result named by the call it answers
    calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls]
    conv = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": format_tool_calls(calls)}]
    conv += [{"role": "user", "content": format_tool_result(f"result {i}", c.function.name)}
             for i, c in enumerate(msg.tool_calls)]
    assert [s["id"] for s in r.model_extra["sources"]] == [s["id"] for s in first.model_extra["sources"]]
    main, _ = memories  # the memory is searched with the user's question, not the tool results
    states = main.states_for([main.get(s["id"]) for s in r.model_extra["sources"]])
    assert r.choices[0].message.content == tiny.generate(conv, states=states, max_new_tokens=8)
    # the model reads the tool results: longer results, more prompt tokens
    longer = [*history[:2]] + [{**h, "content": h["content"] + " and much more text"} for h in history[2:]]
    again = client.chat.completions.create(model="gist-memory:default", messages=longer, max_tokens=8)
    assert again.usage.prompt_tokens > r.usage.prompt_tokens


# ---- response_format ----------------------------------------------------------------------------------------
def test_response_format_json_schema_and_json_object(client):  # noqa: F811
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    for kw in SAMPLED:
        r = client.chat.completions.create(model="gist-memory:default", messages=MSGS, response_format=fmt,
                                           max_tokens=64, **kw)
        jsonschema.validate(json.loads(r.choices[0].message.content), ANSWER)
        assert r.choices[0].finish_reason == "stop"
        obj = client.chat.completions.create(model="gist-memory", messages=MSGS,
                                             response_format={"type": "json_object"}, max_tokens=64, **kw)
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    # a budget that the sampled answer would overrun: the string ends early, the JSON still closes
    loose, tight = (client.chat.completions.create(model="gist-memory:default", messages=MSGS, response_format=fmt,
                                                   max_tokens=n, temperature=1.5, seed=1) for n in (64, 36))
    assert tight.usage.completion_tokens <= 36 < loose.usage.completion_tokens
    a, b = (json.loads(x.choices[0].message.content) for x in (loose, tight))
    jsonschema.validate(b, ANSWER)
    assert len(b["answer"]) < len(a["answer"]) and tight.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(model="gist-memory:default", messages=MSGS, response_format=fmt,
                                                   max_tokens=64, stream=True))
    _, finishes, content = _streamed_calls(streamed)
    whole = client.chat.completions.create(model="gist-memory:default", messages=MSGS, response_format=fmt,
                                           max_tokens=64)
    assert content == whole.choices[0].message.content and finishes == ["stop"]


def test_openai_client_parse_with_a_pydantic_model(client):  # noqa: F811
    from pydantic import BaseModel

    class Answer(BaseModel):
        who: str
        year: int

    for kw in SAMPLED:
        r = client.chat.completions.parse(model="gist-memory:default", messages=MSGS, response_format=Answer,
                                          max_tokens=48, **kw)
        assert isinstance(r.choices[0].message.parsed, Answer)


# ---- LangChain's ChatOpenAI ---------------------------------------------------------------------------------
def test_langchain_chat_openai_tools_and_structured_output(server):  # noqa: F811
    lc = pytest.importorskip("langchain_openai", reason="langchain-openai is not installed (requirements-extra)")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from pydantic import BaseModel

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    chat = lc.ChatOpenAI(base_url=server.url + "/v1", api_key="not-needed", model="gist-memory:default",
                         max_tokens=96, temperature=0, max_retries=0)
    bound = chat.bind_tools([add, get_weather], tool_choice="any")
    ai = bound.invoke([HumanMessage(QUESTION)])
    assert ai.tool_calls and ai.response_metadata["finish_reason"] == "tool_calls"
    for c in ai.tool_calls:
        {"add": add, "get_weather": get_weather}[c["name"]].args_schema.model_validate(c["args"])
    assert ai.response_metadata["token_usage"]["passages"] == 2  # memory states read
    streamed = None
    for chunk in bound.stream([HumanMessage(QUESTION)]):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"]) for c in ai.tool_calls]
    named = chat.bind_tools([add, get_weather], tool_choice="add").invoke(QUESTION)
    assert [c["name"] for c in named.tool_calls] == ["add"]
    # the tool results go back to the model
    results = [ToolMessage(content=str(i), tool_call_id=c["id"]) for i, c in enumerate(ai.tool_calls)]
    reply = chat.bind_tools([add, get_weather]).invoke([HumanMessage(QUESTION), ai, *results])
    assert isinstance(reply.content, str)

    class Fact(BaseModel):
        who: str
        year: int

    for method in ("json_schema", "function_calling"):
        got = chat.with_structured_output(Fact, method=method).invoke(QUESTION)
        assert isinstance(got, Fact), method
    raw = chat.with_structured_output(Fact, method="json_schema", include_raw=True).invoke(QUESTION)
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], Fact)
    assert isinstance(chat.with_structured_output(None, method="json_mode").invoke(
        "Reply in JSON: who built the lighthouse?"), dict)


# ---- batching and errors -------------------------------------------------------------------------------------
def test_constrained_requests_take_the_single_path_and_run_beside_batched_ones(server):  # noqa: F811
    from gist_memory.server.openai import chat_job
    from gist_memory.server.schemas import ChatCompletionRequest

    svc = server.app.state.gist
    assert svc.batching
    jobs = {name: chat_job(svc, ChatCompletionRequest(model="gist-memory", messages=MSGS, **extra)) for name, extra in [
        ("plain", {}), ("tools", {"tools": TOOLS}), ("json", {"response_format": {"type": "json_object"}})]}
    assert svc.batcher.accepts(jobs["plain"].gen)
    assert not svc.batcher.accepts(jobs["tools"].gen) and not svc.batcher.accepts(jobs["json"].gen)

    bodies = [{"messages": [{"role": "user", "content": f"{q} ({i})"}], "max_tokens": 64, **extra}
              for i, q in enumerate(["Who built it?", "How high?", "When?"])
              for extra in ({}, {"tools": TOOLS, "tool_choice": "required"},
                            {"response_format": {"type": "json_schema", "json_schema": {"schema": ANSWER}}})]

    def ask(body):  # noqa: ANN001, ANN202
        status, res = server.request("POST", "/v1/chat/completions", {"model": "gist-memory:default", **body})
        assert status == 200, res
        return res["choices"][0]["message"].get("content"), [
            (c["function"]["name"], c["function"]["arguments"]) for c in res["choices"][0]["message"].get(
                "tool_calls") or []]

    alone = [ask(b) for b in bodies]
    got: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, ask(bodies[i]))) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [got[i] for i in range(len(bodies))] == alone


ERRORS = [
    # (body beyond model + messages, status, param, code)
    ({"tools": [{"type": "function"}]}, 400, "tools", "invalid_value"),
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, 400, "tools", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400, "tools", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, 400, "tools",
     "invalid_value"),
    ({"tools": [ADD, {**ADD, "function": {**ADD["function"], "parameters": {"type": "object"}}}]}, 400, "tools",
     "invalid_value"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice",
     "invalid_value"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, 400, "tool_choice", "invalid_value"),
    ({"tool_choice": "required"}, 400, "tool_choice", "invalid_value"),
    ({"response_format": {"type": "xml"}}, 400, "response_format.type", "unsupported_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}, 400,
     "response_format", "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "object"}}}, 400,
     "response_format.json_schema.schema", "invalid_value"),
    ({"response_format": {"type": "json_object"}, "tools": TOOLS}, 400, "response_format", "unsupported_value"),
    ({"functions": [ADD["function"]]}, 400, "functions", "unsupported_parameter"),
    ({"tools": TOOLS, "tool_choice": "required", "max_tokens": 3}, 400, "max_tokens", "invalid_value"),
    ({"tools": TOOLS, "tool_choice": "required", "max_tokens": 3, "stream": True}, 400, "max_tokens",
     "invalid_value"),
    ({"tools": "add"}, 400, "tools", "invalid_request_body"),
]


@pytest.mark.parametrize("extra, status, param, code", ERRORS)
def test_bad_tools_and_schemas_are_openai_error_objects(server, extra, status, param, code):  # noqa: F811
    got, res = server.request("POST", "/v1/chat/completions", {"model": "gist-memory", "messages": MSGS, **extra})
    assert got == status, res
    assert set(res) == {"error"} and res["error"]["type"] == "invalid_request_error" and res["error"]["message"]
    assert (res["error"]["param"], res["error"]["code"]) == (param, code), res


def test_bad_tool_histories_are_refused(server):  # noqa: F811
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    cases = [
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]}],
         "messages", "invalid_value"),  # the last message is the assistant's call, not its result
        ([{"role": "function", "name": "add", "content": "3"}], "messages[0].role", "unsupported_value"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"id": "c"}]}],
         "messages.1.tool_calls.0.function", "invalid_request_body"),
    ]
    for msgs, param, code in cases:
        got, res = server.request("POST", "/v1/chat/completions", {"model": "gist-memory", "messages": msgs})
        assert got == 400 and (res["error"]["param"], res["error"]["code"]) == (param, code), res
    ok = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
          {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    got, res = server.request("POST", "/v1/chat/completions", {"model": "gist-memory", "messages": ok,
                                                                "max_tokens": 3})
    assert got == 200 and res["choices"][0]["message"]["role"] == "assistant"


def test_stop_strings_never_cut_a_json_answer(client):  # noqa: F811
    """Stop strings reach the model, which applies them to free text only: `"` and `}` occur in every JSON answer."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    r = client.chat.completions.create(model="gist-memory:default", messages=MSGS, response_format=fmt,
                                       max_tokens=64, stop=['"', "}"])
    jsonschema.validate(json.loads(r.choices[0].message.content), ANSWER)
    plain = client.chat.completions.create(model="gist-memory:default", messages=MSGS, max_tokens=24, stop=["e"])
    assert "e" not in (plain.choices[0].message.content or "")  # ... and still cut free text
