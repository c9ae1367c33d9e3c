"""GistLLM's structured output and tool calling (#15) on a tiny random model: a model that knows nothing of JSON is
the worst case, so every answer below parsing and validating is the grammar's doing. Known passages are still read
from their states. One test at the end runs the bundled SmolLM2 (slow)."""

import asyncio
import json
from typing import Literal, Optional

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from llama_index.llms.gist_memory import GistLLM
from pydantic import BaseModel, Field

QA = PromptTemplate("Context:\n{context_str}\n\nQuestion: {query_str}\nAnswer: ")
SAMPLED = [{"do_sample": True, "temperature": t, "seed": s} for t, s in ((1.0, 0), (1.5, 1), (2.0, 2), (1.2, 3))]


class Place(BaseModel):
    city: str
    country: Optional[str] = None


class Curator(BaseModel):
    """Who became curator, and when."""

    name: str = Field(description="The curator's full name.")
    year: int
    role: Literal["curator", "director", "archivist"]
    places: list[Place] = Field(default_factory=list, max_length=2)


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def weather(city: str, unit: Literal["C", "F"] = "C") -> str:
    """The weather in a city."""
    return f"sunny in {city}, 21 {unit}"


TOOLS = [FunctionTool.from_defaults(add), FunctionTool.from_defaults(weather)]
BY_NAME = {t.metadata.name: t for t in TOOLS}


@pytest.fixture
def llm(li_tiny_model, registry):
    return GistLLM(model=li_tiny_model, registry=registry, max_new_tokens=128)


def _valid_call(sel) -> None:  # noqa: ANN001 - a ToolSelection
    tool = BY_NAME[sel.tool_name]  # KeyError: a tool that does not exist
    tool.metadata.fn_schema.model_validate(sel.tool_kwargs)  # ValidationError: arguments that do not fit
    assert sel.tool_id.startswith("call_")


# ---- structured output ------------------------------------------------------------------------------------
def test_structured_predict_always_validates_and_reads_states(llm, registry, li_tiny_model, passages):
    keys = registry.add_texts(passages[:2])
    ctx = "\n\n".join(passages[:2])
    got = llm.structured_predict(Curator, QA, context_str=ctx, query_str="Who became curator?")
    assert isinstance(got, Curator)
    g = llm.last_gist_usage
    assert g["context"] == "gist" and g["state_keys"] == keys  # the passages were read from their states
    # exactly the core's constrained answer over the same states
    rest = registry.splice(QA.format(context_str=ctx, query_str="Who became curator?")).text
    want = li_tiny_model.generate(rest, states=registry.states(keys), schema=Curator, max_new_tokens=128)
    assert got == Curator.model_validate_json(want)
    # sampled hot from a random model, and on tight budgets: still valid every time
    for kw in SAMPLED + [{"max_new_tokens": 40}, {"max_new_tokens": 64, "do_sample": True, "temperature": 2.0,
                                                   "seed": 9}]:
        out = llm.structured_predict(Curator, QA, llm_kwargs=kw, context_str=ctx, query_str="Who?")
        assert isinstance(out, Curator) and len(out.places) <= 2, kw
        assert llm.last_gist_usage["passages"] == 2


def test_structured_async_streaming_and_structured_llm_agree(llm, registry, passages):
    registry.add_texts(passages[:1])
    args = {"context_str": passages[0], "query_str": "Who became curator?"}
    whole = llm.structured_predict(Curator, QA, **args)

    parts = list(llm.stream_structured_predict(Curator, QA, **args))
    assert parts[-1] == whole and isinstance(parts[-1], Curator)
    assert len(parts) > 2 and not isinstance(parts[0], Curator)  # partial objects (fields so far) came first
    assert all(a != b for a, b in zip(parts, parts[1:]))  # each one new

    async def run():  # noqa: ANN202
        a = await llm.astructured_predict(Curator, QA, **args)
        s = [p async for p in await llm.astream_structured_predict(Curator, QA, **args)]
        return a, s

    a, s = asyncio.run(run())
    assert a == whole and s[-1] == whole

    sllm = llm.as_structured_llm(Curator)
    r = sllm.chat([ChatMessage(role=MessageRole.USER, content=QA.format(**args))])
    assert isinstance(r.raw, Curator) and Curator.model_validate_json(r.message.content) == r.raw
    assert llm.last_gist_usage["passages"] == 1


def test_query_engine_with_output_cls_reads_states(llm, registry, passages):
    from llama_index.core.base.response.schema import PydanticResponse
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore, TextNode

    keys = registry.add_texts(passages[:2])

    class Fixed(BaseRetriever):
        def _retrieve(self, query_bundle):  # noqa: ANN001, ANN202
            return [NodeWithScore(node=TextNode(text=t), score=1.0) for t in passages[:2]]

    for mode in ("compact", "tree_summarize"):
        resp = RetrieverQueryEngine.from_args(Fixed(), llm=llm, output_cls=Curator, response_mode=mode).query(
            "Who became curator, and when?")
        assert isinstance(resp, PydanticResponse) and isinstance(resp.response, Curator), mode
        g = llm.last_gist_usage
        assert g["context"] == "gist" and sorted(g["state_keys"]) == sorted(keys), mode


def test_function_program_mode_goes_through_the_tool_grammar(li_tiny_model, registry, passages):
    from llama_index.core.types import PydanticProgramMode

    registry.add_texts(passages[:1])
    llm = GistLLM(model=li_tiny_model, registry=registry, max_new_tokens=160,
                  pydantic_program_mode=PydanticProgramMode.FUNCTION)
    for kw in SAMPLED[:2]:
        out = llm.structured_predict(Curator, QA, llm_kwargs=kw, context_str=passages[0], query_str="Who?")
        assert isinstance(out, Curator)
        assert llm.last_gist_usage["passages"] == 1


# ---- tools ------------------------------------------------------------------------------------------------
def test_function_calling_metadata(llm):
    from llama_index.core.llms.function_calling import FunctionCallingLLM

    assert isinstance(llm, FunctionCallingLLM) and llm.metadata.is_function_calling_model


def test_chat_with_tools_gives_valid_calls_for_every_choice(llm):
    for kw in [{}] + SAMPLED:
        r = llm.chat_with_tools(TOOLS, user_msg="What is 2 + 3?", tool_required=True, **kw)
        calls = llm.get_tool_calls_from_response(r)
        assert len(calls) == 1, kw  # allow_parallel_tool_calls=False: exactly one
        for c in calls:
            _valid_call(c)
        oai = r.message.additional_kwargs["tool_calls"]
        assert [(o["id"], o["function"]["name"], json.loads(o["function"]["arguments"])) for o in oai] == [
            (c.tool_id, c.tool_name, c.tool_kwargs) for c in calls]
        assert not r.message.content  # calls only, no text

        many = llm.chat_with_tools(TOOLS, user_msg="Weather in Oslo and 2 + 3?", tool_required=True,
                                   allow_parallel_tool_calls=True, **kw)
        for c in llm.get_tool_calls_from_response(many):
            _valid_call(c)

        named = llm.chat_with_tools(TOOLS, user_msg="Weather?", tool_choice="weather", **kw)
        (c,) = llm.get_tool_calls_from_response(named)
        assert c.tool_name == "weather" and c.tool_kwargs.get("unit", "C") in ("C", "F")
        _valid_call(c)

    auto = llm.chat_with_tools(TOOLS, user_msg="Hello there.")  # greedy: the random model writes text
    assert auto.message.content and "<tool_call>" not in auto.message.content
    assert llm.get_tool_calls_from_response(auto, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="tool_required=True"):
        llm.get_tool_calls_from_response(auto)
    none = llm.chat_with_tools(TOOLS, user_msg="Hello there.", tool_choice="none")
    assert not [b for b in none.message.blocks if isinstance(b, ToolCallBlock)]


def test_predict_and_call_returns_the_tool_output(llm, li_tiny_model, registry):
    out = llm.predict_and_call(TOOLS, user_msg="What is 2 + 3?", tool_required=True)
    (src,) = out.sources
    assert not src.is_error and src.tool_name in BY_NAME
    assert out.response == str(BY_NAME[src.tool_name](**src.raw_input["kwargs"]).content)

    with pytest.raises(ValueError, match="tool_required=True"):  # "auto" and a model that answers in text
        llm.predict_and_call(TOOLS, user_msg="What is 2 + 3?")
    eager = GistLLM(model=li_tiny_model, registry=registry, max_new_tokens=128, first_tool_choice="required")
    out = eager.predict_and_call(TOOLS, user_msg="What is 2 + 3?")
    assert len(out.sources) == 1 and not out.sources[0].is_error

    async def run():  # noqa: ANN202
        return await llm.apredict_and_call(TOOLS, user_msg="What is 2 + 3?", tool_required=True)

    a = asyncio.run(run())
    assert a.response == llm.predict_and_call(TOOLS, user_msg="What is 2 + 3?", tool_required=True).response


def test_streamed_tool_calls_arrive_whole_in_the_last_response(llm):
    whole = llm.chat_with_tools(TOOLS, user_msg="What is 2 + 3?", tool_required=True)
    chunks = list(llm.stream_chat_with_tools(TOOLS, user_msg="What is 2 + 3?", tool_required=True))
    assert all("<tool" not in (c.delta or "") and "<tool" not in (c.message.content or "") for c in chunks)
    assert "gist" in chunks[-1].additional_kwargs
    strip = [(c.tool_name, c.tool_kwargs) for c in llm.get_tool_calls_from_response(whole)]
    assert [(c.tool_name, c.tool_kwargs) for c in llm.get_tool_calls_from_response(chunks[-1])] == strip

    text = llm.chat_with_tools(TOOLS, user_msg="Hello there.").message.content  # auto, text: streamed as usual
    pieces = list(llm.stream_chat_with_tools(TOOLS, user_msg="Hello there."))
    assert "".join(p.delta or "" for p in pieces) == text == pieces[-1].message.content and len(pieces) > 2


def test_tool_history_reaches_the_model_in_its_own_format(llm, li_tiny_model, registry, passages, monkeypatch):
    registry.add_texts(passages[:1])
    seen = []
    inner = li_tiny_model.stream

    def spy(prompt, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append((prompt, kwargs))
        return inner(prompt, *args, **kwargs)

    monkeypatch.setattr(li_tiny_model, "stream", spy)
    history = [
        ChatMessage(role=MessageRole.USER, content="Context:\n" + passages[0] + "\nWhat is 2 + 3?"),
        ChatMessage(role=MessageRole.ASSISTANT, blocks=[
            ToolCallBlock(tool_call_id="call_1", tool_name="add", tool_kwargs={"a": 2, "b": 3})]),
        ChatMessage(role=MessageRole.TOOL, content="5", additional_kwargs={"tool_call_id": "call_1"}),
        ChatMessage(role=MessageRole.ASSISTANT, content="It is 5.", additional_kwargs={"tool_calls": [
            {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]}),
        ChatMessage(role=MessageRole.TOOL, content="sunny", additional_kwargs={"name": "weather"}),
    ]
    eager = GistLLM(model=li_tiny_model, registry=registry, max_new_tokens=128, first_tool_choice="required")
    r = eager.chat_with_tools(TOOLS, chat_history=list(history))
    prompt, kwargs = seen[-1]
    assert prompt == [
        {"role": "user", "content": "Context:\n\nWhat is 2 + 3?"},  # the passage is read from its state
        {"role": "assistant", "content": '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'},
        {"role": "user", "content": '<tool_response name="add">\n5\n</tool_response>'},
        {"role": "assistant",
         "content": 'It is 5.\n<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'},
        {"role": "user", "content": '<tool_response name="weather">\nsunny\n</tool_response>'},
    ]
    assert len(kwargs["states"]) == 1 and r.additional_kwargs["gist"]["passages"] == 1
    assert kwargs["tool_choice"] == "auto"  # a tool result follows the user's message: first_tool_choice is spent
    eager.chat_with_tools(TOOLS, chat_history=history[:1])
    assert seen[-1][1]["tool_choice"] == "required"


def test_function_agent_calls_a_tool_and_answers(li_tiny_model, registry):
    from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult

    llm = GistLLM(model=li_tiny_model, registry=registry, max_new_tokens=96, first_tool_choice="required")
    agent = FunctionAgent(tools=TOOLS, llm=llm, system_prompt="Use the tools.")

    async def run():  # noqa: ANN202
        handler = agent.run("What is 2 + 3?")
        results = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
        return results, await handler

    results, final = asyncio.run(run())
    assert len(results) == 1 and results[0].tool_name in BY_NAME and not results[0].tool_output.is_error
    assert isinstance(str(final), str) and llm.last_gist_usage["prompt_tokens"] > 0


def test_bad_tool_input_is_refused_when_the_call_is_made(llm):
    with pytest.raises(ValueError, match="nope"):
        llm.chat_with_tools(TOOLS, user_msg="x", tool_choice="nope")
    with pytest.raises(ValueError, match="nope"):
        list(llm.stream_chat_with_tools(TOOLS, user_msg="x", tool_choice="nope"))
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.chat_with_tools(TOOLS, user_msg="x", tool_required=True, max_new_tokens=3)


# ---- the bundled model ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_model_predict_and_call_and_structured_predict():
    from llama_index.llms.gist_memory import GistRegistry

    from gist_memory import GistConfig, GistModel

    model = GistModel.from_base(None, GistConfig(compressor="pool+anchors", target_ratio=4), device="cpu")
    registry = GistRegistry(model)
    doc = "Maren Voss became the chief curator of the Tallin archive in 1912. She catalogued 4,000 maps."
    registry.add_texts([doc])
    llm = GistLLM(model=model, registry=registry, max_new_tokens=40)

    out = llm.predict_and_call(TOOLS, user_msg="What is 17 + 25? Use the add tool.", tool_required=True)
    (src,) = out.sources
    assert not src.is_error and src.tool_name in BY_NAME
    assert out.response == str(BY_NAME[src.tool_name](**src.raw_input["kwargs"]).content)

    class Fact(BaseModel):
        name: str
        year: int

    got = llm.structured_predict(Fact, QA, context_str=doc, query_str="Who became chief curator, and in which year?")
    assert isinstance(got, Fact)
    assert llm.last_gist_usage["context"] == "gist" and llm.last_gist_usage["passages"] == 1
