"""Constrained decoding: JSON schemas and tool calls enforced token by token with a grammar (llguidance).

    from gist_memory.model.constrained import parse_json, parse_tool_calls

    text = model.generate("Name a city.", schema={"type": "object", "properties": {"city": {"type": "string"}},
                                                  "required": ["city"]})
    parse_json(text)                                  # {'city': '...'}: always parses, always validates

    text = model.generate("Weather in Paris?", tools=[{"type": "function", "function": {
        "name": "get_weather", "description": "...", "parameters": {...}}}], tool_choice="auto")
    content, calls = parse_tool_calls(text)           # calls: [ToolCall(id, name, arguments)]

A small model cannot be trusted to write valid JSON by itself, so the decode loop asks the grammar engine, before
each token, which tokens keep the output a prefix of some valid output and masks out the rest (`GrammarGuide`).
Whatever is sampled, the result parses and validates against its schema.

Wire format of tool calls (what the grammar lets the model write, and what `parse_tool_calls` reads):

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>
    <tool_call>{"name": "...", "arguments": {...}}</tool_call>        (more calls: one per line, if parallel)

`tool_choice`: "none" (free text, no grammar), "auto" (free text that never contains `<tool_call>`, or tool calls
from the first character on: the output starts with the marker exactly when it is tool calls), "any"/"required"
(one or more tool calls), or a tool's name (exactly one call of that tool).

The token budget: the output must be complete within `max_new_tokens`. Before each token the guide checks that a
short completion of the output (closing the open string, array or object with the fewest tokens the grammar
allows, found greedily) still fits in what is left; when the sampled token would leave no room for it, the guide
writes the completion's next token instead. So an answer cut by the budget is closed early, not cut: a long
string ends sooner, the JSON still parses. A schema whose shortest output does not fit raises a ValueError before
anything runs. End-of-sequence is allowed only where the grammar accepts.

Objects that list `properties` and say nothing about `additionalProperties` are closed (no extra keys): a subset of
what the schema accepts, so every output still validates, and tools never get arguments they do not declare.

The engine is llguidance (see docs/structured_output.md for its comparison with xgrammar); it is imported when a
constraint is first compiled, never at `import gist_memory`.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_CHOICES = ("none", "auto", "any", "required")
JSON_SEPARATORS = (", ", ": ")
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_\-.]{1,64}$")
_MAX_CLOSURE = 1024  # the longest completion the guide looks for (tokens)
_ANNOTATIONS = {"title", "description", "examples", "$comment", "default"}  # schema keys that accept anything
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}  # name -> schema


# ---- schemas ---------------------------------------------------------------------------------------
def json_schema_of(schema: Any) -> dict[str, Any]:
    """A JSON schema (dict) from a JSON-schema dict, a Pydantic model class or a TypedDict (or dataclass).

    Raises:
        ValueError: Not one of those, or a dict that is not a valid JSON schema.
    """
    if isinstance(schema, Mapping):
        out = copy.deepcopy(dict(schema))
        _check_schema(out)
        return out
    if isinstance(schema, type):
        try:
            from pydantic import BaseModel, TypeAdapter
        except ImportError as e:  # pragma: no cover - pydantic ships with the server extras
            raise ValueError("a class as schema needs pydantic installed; pass a JSON-schema dict instead") from e
        try:
            if issubclass(schema, BaseModel):
                return schema.model_json_schema()
            return TypeAdapter(schema).json_schema()
        except Exception as e:  # noqa: BLE001 - pydantic raises several kinds for unsupported types
            raise ValueError(f"cannot make a JSON schema of {schema.__name__}: {e}") from e
    raise ValueError(
        f"schema must be a JSON-schema dict, a Pydantic model class or a TypedDict, got {type(schema).__name__}"
    )


def _check_schema(schema: dict[str, Any]) -> None:
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - then the grammar engine's own check is the only one
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(f"invalid JSON schema at {where}: {e.message}") from e


def _closed(schema: Any, in_all_of: bool = False) -> Any:
    """`schema` with `additionalProperties: false` on objects that list properties and leave extras open (not
    inside `allOf`, where closing one branch would refuse the other's keys)."""
    if isinstance(schema, list):
        return [_closed(s, in_all_of) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in _SCHEMA_MAPS:
            out[k] = {name: _closed(s) for name, s in v.items()} if isinstance(v, dict) else v
        elif k in ("const", "enum", "default", "examples", "required"):
            out[k] = v
        else:
            out[k] = _closed(v, k == "allOf")
    if ("properties" in out and not in_all_of and "additionalProperties" not in out
            and "patternProperties" not in out and "unevaluatedProperties" not in out):
        out["additionalProperties"] = False
    return out


def _namespaced(schema: dict[str, Any], ns: str) -> dict[str, Any]:
    """`schema` with its local `$ref`s (`#...`) pointing under `#/$defs/<ns>`, where it is placed in a bigger
    schema (a tool's parameters inside the schema of all tool calls)."""

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: (f"#/$defs/{ns}{v[1:]}" if k == "$ref" and isinstance(v, str) and v.startswith("#")
                        else walk(v)) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(schema)


# ---- tools -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tool:
    """One callable tool: its name, description and the JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        """The tool as an OpenAI `tools` entry."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def normalize_tools(tools: Sequence[Any]) -> list[Tool]:
    """Tools given as OpenAI dicts (`{"type": "function", "function": {"name", "description", "parameters"}}`),
    bare function dicts (`{"name", "description", "parameters"}`) or `Tool`s.

    Raises:
        ValueError: A tool that is none of those, a bad name or one naming two different tools (the same tool
            given twice counts once), or parameters that are not a schema.
    """
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of tool dicts, got {type(tools).__name__}")
    out: list[Tool] = []
    for i, t in enumerate(tools):
        if isinstance(t, Tool):
            out.append(t)
            continue
        if not isinstance(t, Mapping):
            raise ValueError(f"tools[{i}] is a {type(t).__name__}; expected an OpenAI tool dict "
                             '({"type": "function", "function": {"name": ..., "parameters": {...}}})')
        fn = t
        if "function" in t:
            if t.get("type", "function") != "function":
                raise ValueError(f"tools[{i}] has type {t.get('type')!r}; only 'function' tools are supported")
            fn = t["function"]
            if not isinstance(fn, Mapping):
                raise ValueError(f"tools[{i}]['function'] must be a dict")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise ValueError(f"tools[{i}] has name {name!r}; names are 1-64 of A-Z a-z 0-9 _ - .")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        params = json_schema_of(params)
        if params.get("type", "object") != "object":
            raise ValueError(f"tool {name!r}: parameters must be an object schema, got type {params.get('type')!r}")
        out.append(Tool(name=name, description=str(fn.get("description") or ""), parameters=params))
    seen: dict[str, Tool] = {}
    for t in out:  # the same tool given twice (e.g. a Pydantic class and its schema) counts once
        if t.name in seen and _shape(seen[t.name].parameters) != _shape(t.parameters):
            raise ValueError(f"tool names must be unique; {t.name!r} names two different tools")
        seen.setdefault(t.name, t)
    return list(seen.values())


def _shape(schema: Any) -> Any:
    """`schema` without annotations (titles, descriptions, ...): what it accepts, for comparing two schemas."""
    if isinstance(schema, list):
        return [_shape(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    return {k: ({n: _shape(x) for n, x in v.items()} if k in _SCHEMA_MAPS and isinstance(v, dict) else
                v if k in ("const", "enum", "required") else _shape(v))
            for k, v in schema.items() if k not in _ANNOTATIONS}


def normalize_tool_choice(tool_choice: Any, tools: Sequence[Tool]) -> str:
    """`none`, `auto`, `required` or a tool's name, from what OpenAI and LangChain accept.

    Accepted: None (auto when there are tools), "none", "auto", "any"/"required" (-> "required"), True
    (-> "required"), a tool's name, `{"type": "function", "function": {"name": ...}}` or `{"name": ...}`.

    Raises:
        ValueError: An unknown choice or a name that is not among the tools.
    """
    names = [t.name for t in tools]
    if tool_choice is None:
        return "auto" if tools else "none"
    if tool_choice is True:
        tool_choice = "required"
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function", tool_choice)
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str):
            raise ValueError(f"tool_choice {dict(tool_choice)!r} names no function")
        tool_choice = name
        if name in TOOL_CHOICES and name not in names:
            raise ValueError(f"tool_choice names a function {name!r}, but no tool has that name; tools: {names}")
    if not isinstance(tool_choice, str):
        raise ValueError(f"tool_choice must be a str or a dict, got {type(tool_choice).__name__}")
    if tool_choice == "any":
        tool_choice = "required"
    if tool_choice in ("none", "auto", "required"):
        if tool_choice != "none" and not tools:
            raise ValueError(f"tool_choice={tool_choice!r} needs tools")
        return tool_choice
    if tool_choice not in names:
        raise ValueError(f"tool_choice {tool_choice!r} is not one of the tools {names} "
                         f"(nor one of {list(TOOL_CHOICES)})")
    return tool_choice


def _call_schema(tool: Tool) -> tuple[dict[str, Any], str]:
    """The schema of one call of `tool` and the `$defs` name its parameters go under."""
    ns = f"tool_{tool.name}"
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": {"$ref": f"#/$defs/{ns}"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }, ns


def tool_calls_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    """The JSON schema of one call of any of `tools`: `{"name": <const>, "arguments": <its parameters>}`."""
    branches, defs = [], {}
    for t in tools:
        branch, ns = _call_schema(t)
        branches.append(branch)
        defs[ns] = _namespaced(_closed(t.parameters), ns)
    return {"anyOf": branches, "$defs": defs} if len(branches) > 1 else {**branches[0], "$defs": defs}


# ---- the constraint --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Constraint:
    """What one generation must produce, compiled to a grammar by `build_constraint`.

    Attributes:
        kind: "json" (a JSON value of `schema`) or "tools" (tool calls, or free text when `tool_choice` is "auto").
        grammar: The llguidance grammar (a JSON string).
        schema: The JSON schema of a "json" constraint.
        tools: The tools of a "tools" constraint.
        tool_choice: "auto", "required" or a tool's name.
        parallel_tool_calls: Whether several calls may follow one another.
    """

    kind: str
    grammar: str
    schema: Optional[dict[str, Any]] = None
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    instructions: str = field(default="", compare=False)

    def allows_stop(self, text: str) -> bool:
        """Whether a stop string may cut `text` here: only in the free text of an "auto" tool choice."""
        if self.kind != "tools" or self.tool_choice != "auto":
            return False
        return not (text.startswith(TOOL_CALL_OPEN) or TOOL_CALL_OPEN.startswith(text))

    def parse(self, text: str) -> Any:
        """The generated `text` read back: the JSON value, or `(content, [ToolCall, ...])` for tools."""
        if self.kind == "json":
            return parse_json(text, self.schema)
        return parse_tool_calls(text, self.tools)


def build_constraint(schema: Any = None, tools: Optional[Sequence[Any]] = None, tool_choice: Any = None,
                     parallel_tool_calls: bool = True) -> Optional[Constraint]:
    """The constraint of a generation call, or None when it is free text.

    Args:
        schema: A JSON-schema dict, a Pydantic model class or a TypedDict: the output is one JSON value of it.
        tools: OpenAI-style tool dicts (see `normalize_tools`).
        tool_choice: "auto" (default with tools), "none", "any"/"required", or a tool's name.
        parallel_tool_calls: Let the model write several calls (one per line); False: exactly one.

    Raises:
        ValueError: schema and tools together, tool_choice without tools, an unknown tool name, an invalid schema.
    """
    if schema is not None and tools:
        raise ValueError("pass either schema= (a structured answer) or tools= (tool calls), not both")
    if schema is not None:
        if tool_choice not in (None, "none"):
            raise ValueError("tool_choice needs tools=, not schema=")
        js = json_schema_of(schema)
        grammar = _json_grammar(_closed(js))
        return Constraint(kind="json", grammar=grammar, schema=js, instructions=schema_instructions(js))
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ValueError(f"tool_choice={tool_choice!r} needs tools=")
        return None
    norm = normalize_tools(tools)
    choice = normalize_tool_choice(tool_choice, norm)
    if choice == "none":
        return None
    chosen = norm if choice in ("auto", "required") else [t for t in norm if t.name == choice]
    many = bool(parallel_tool_calls) and choice in ("auto", "required")
    call = {**tool_calls_schema(chosen), "x-guidance": _json_options()}
    lark = [
        "start: TEXT | calls" if choice == "auto" else "start: calls",
        # free text never contains the marker, so an output is tool calls exactly when it starts with one
        f"TEXT: /(?s:.*)/ & ~/(?s:.*){TOOL_CALL_OPEN}(?s:.*)/" if choice == "auto" else "",
        'calls: call ("\\n" call)*' if many else "calls: call",
        f'call: "{TOOL_CALL_OPEN}" call_json "{TOOL_CALL_CLOSE}"',
        f"call_json: %json {json.dumps(call, ensure_ascii=False)}",
    ]
    return Constraint(kind="tools", grammar=_lark_grammar("\n".join(x for x in lark if x)), tools=tuple(norm),
                      tool_choice=choice, parallel_tool_calls=many, instructions=tools_instructions(norm, choice, many))


def _llguidance() -> Any:
    """The llguidance module, or an ImportError saying how to get it."""
    try:
        import llguidance
    except ImportError as e:
        raise ImportError("constrained decoding (schema= / tools=) needs the PyPI package llguidance: "
                          "pip install llguidance") from e
    return llguidance


def _json_options() -> dict[str, Any]:
    return {"whitespace_flexible": False, "item_separator": JSON_SEPARATORS[0], "key_separator": JSON_SEPARATORS[1]}


def _json_grammar(schema: dict[str, Any]) -> str:
    try:
        return _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=_json_options())
    except ValueError as e:
        raise ValueError(f"invalid JSON schema: {e}") from e


def _lark_grammar(lark: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(lark)


# ---- instructions (the system prompt of a constrained call) ------------------------------------------
def schema_instructions(schema: dict[str, Any]) -> str:
    """What the model is told when its answer must be JSON of `schema` (appended to the system prompt)."""
    return ("Answer with a single JSON value that matches this JSON schema, and nothing else:\n"
            + json.dumps(schema, ensure_ascii=False))


def tools_instructions(tools: Sequence[Tool], tool_choice: str = "auto", parallel: bool = True) -> str:
    """What the model is told about `tools` (appended to the system prompt): each tool, its parameters and how a
    call of it is written."""
    shown = [t for t in tools if tool_choice in ("auto", "required") or t.name == tool_choice]
    lines = ["You can call these tools:"]
    for t in shown:
        props = t.parameters.get("properties") or {}
        args = ", ".join(f'"{k}": <{v.get("type", "value") if isinstance(v, dict) else "value"}>' for k, v in props.items())
        lines.append(f"- {t.name}: {t.description}" if t.description else f"- {t.name}")
        lines.append(f"  parameters (JSON schema): {json.dumps(t.parameters, ensure_ascii=False)}")
        lines.append(f'  call: {TOOL_CALL_OPEN}{{"name": "{t.name}", "arguments": {{{args}}}}}{TOOL_CALL_CLOSE}')
    lines.append("Fill in the arguments from the conversation.")
    if tool_choice == "auto":
        lines.append("To call a tool, reply with its call and nothing else"
                     + (" (several calls: one per line)." if parallel else ".")
                     + " Otherwise answer in plain text.")
    elif tool_choice == "required":
        lines.append("Reply with tool calls only, one per line." if parallel else "Reply with one tool call only.")
    else:
        lines.append(f"Reply with a call of {tool_choice} only.")
    lines.append("A tool's result comes back in a user message that starts with <tool_response>.")
    return "\n".join(lines)


def with_instructions(prompt: Any, system_prompt: Optional[str], constraint: Optional[Constraint]
                      ) -> tuple[Any, Optional[str]]:
    """`(prompt, system_prompt)` with the constraint's instructions appended to the system prompt (to the
    conversation's own system message when it has one)."""
    if constraint is None or not constraint.instructions:
        return prompt, system_prompt
    extra = constraint.instructions
    if (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], Mapping)
            and prompt[0].get("role") == "system" and not system_prompt):
        first = dict(prompt[0])
        first["content"] = f"{first.get('content') or ''}\n\n{extra}".strip()
        return [first, *prompt[1:]], system_prompt
    return prompt, (f"{system_prompt}\n\n{extra}" if system_prompt else extra)


# ---- reading outputs back --------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolCall:
    """One parsed tool call: a fresh id, the tool's name and its arguments (a dict)."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        """The call as an OpenAI `tool_calls` entry (arguments as a JSON string)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def parse_json(text: str, schema: Optional[Mapping[str, Any]] = None) -> Any:
    """`text` as JSON, validated against `schema` when given (and jsonschema is installed).

    Raises:
        ValueError: Not JSON, or JSON that the schema refuses.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e}): {text[:200]!r}") from e
    if schema is not None:
        _validate(value, schema)
    return value


def _validate(value: Any, schema: Mapping[str, Any]) -> None:
    try:
        import jsonschema
    except ImportError:  # pragma: no cover
        return
    try:
        jsonschema.validate(value, dict(schema))
    except jsonschema.ValidationError as e:
        raise ValueError(f"JSON does not match the schema: {e.message}") from e


def parse_tool_calls(text: str, tools: Optional[Sequence[Tool]] = None) -> tuple[str, list[ToolCall]]:
    """`(content, calls)` of a generated text: the text itself and no calls when it does not start with
    `<tool_call>`; otherwise "" and the calls (each `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
    one per line).

    Args:
        text: What the model wrote.
        tools: When given, each call's name must be one of them and its arguments must validate.

    Raises:
        ValueError: Text that starts with `<tool_call>` but is not a sequence of well-formed calls.
    """
    if not text.startswith(TOOL_CALL_OPEN):
        return text, []
    by_name = {t.name: t for t in tools} if tools is not None else None
    dec = json.JSONDecoder()
    calls: list[ToolCall] = []
    pos = 0
    while pos < len(text):
        if not text.startswith(TOOL_CALL_OPEN, pos):
            raise ValueError(f"expected {TOOL_CALL_OPEN} at character {pos}: {text[pos:pos + 40]!r}")
        pos += len(TOOL_CALL_OPEN)
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"tool call {len(calls)} is not JSON: {e}") from e
        if not text.startswith(TOOL_CALL_CLOSE, pos):
            raise ValueError(f"tool call {len(calls)} is not closed by {TOOL_CALL_CLOSE}")
        pos += len(TOOL_CALL_CLOSE)
        if (not isinstance(obj, dict) or not isinstance(obj.get("name"), str)
                or not isinstance(obj.get("arguments"), dict)):
            raise ValueError(f'tool call {len(calls)} must be {{"name": str, "arguments": object}}, got {obj!r:.120}')
        if by_name is not None:
            tool = by_name.get(obj["name"])
            if tool is None:
                raise ValueError(f"tool call {len(calls)} names {obj['name']!r}, not one of {list(by_name)}")
            _validate(obj["arguments"], tool.parameters)
        calls.append(ToolCall(name=obj["name"], arguments=obj["arguments"]))
        while pos < len(text) and text[pos] in "\n":
            pos += 1
    return "", calls


def format_tool_calls(calls: Sequence[Any]) -> str:
    """Tool calls written as the model writes them (for an assistant message in a conversation's history).

    `calls`: `ToolCall`s, OpenAI `tool_calls` entries, or `{"name", "args"|"arguments"}` dicts (LangChain).
    """
    out = []
    for c in calls:
        if isinstance(c, ToolCall):
            name, args = c.name, c.arguments
        elif isinstance(c, Mapping):
            fn = c.get("function", c)
            name = fn.get("name")
            args = fn.get("arguments", fn.get("args", {}))
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    pass
        else:
            raise ValueError(f"cannot write a tool call from a {type(c).__name__}")
        body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
        out.append(f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}")
    return "\n".join(out)


def format_tool_result(content: str, name: Optional[str] = None) -> str:
    """A tool's result as the model reads it (a user message): `<tool_response>` ... `</tool_response>`."""
    head = f'<tool_response name="{name}">' if name else "<tool_response>"
    return f"{head}\n{content}\n</tool_response>"


# ---- the guide: masks and the token budget in the decode loop ---------------------------------------
_TOKENIZERS: OrderedDict[tuple, Any] = OrderedDict()
_MATCHERS: OrderedDict[tuple, Any] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer: Any, eos: Sequence[int], n_vocab: int) -> Any:
    """The llguidance token table of a HF fast tokenizer (built once per tokenizer, eos set and vocab size)."""
    key = (id(tokenizer), tuple(sorted(eos)), n_vocab)
    with _CACHE_LOCK:
        hit = _TOKENIZERS.get(key)
        if hit is not None and hit[0] is tokenizer:
            _TOKENIZERS.move_to_end(key)
            return hit[1]
    llguidance = _llguidance()

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"constrained decoding needs a fast (Rust) tokenizer; got {type(tokenizer).__name__}")
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    n_tok = backend.get_vocab_size(with_added_tokens=True)
    lt = llguidance.LLTokenizer(backend.to_str(), n_vocab=max(n_tok, n_vocab), eos_token=sorted(eos))
    import torch

    # bytes per token (special tokens and end-of-sequence never close anything: counted as huge)
    lengths = torch.tensor([len(lt.decode_bytes([i])) if not lt.is_special_token(i) and i not in eos else 1 << 30
                            for i in range(lt.vocab_size)], dtype=torch.int64)
    singles: dict[bytes, int] = {}
    for i in torch.nonzero(lengths == 1).flatten().tolist():
        singles.setdefault(lt.decode_bytes([i]), i)
    with _CACHE_LOCK:
        _TOKENIZERS[key] = (tokenizer, (lt, lengths, singles))
        while len(_TOKENIZERS) > 8:
            _TOKENIZERS.popitem(last=False)
    return lt, lengths, singles


def _matcher(lt: Any, grammar: str) -> Any:
    """A fresh matcher of `grammar` (a compiled prototype is cached per token table and grammar)."""
    LLMatcher = _llguidance().LLMatcher  # noqa: N806 - the engine's class
    key = (id(lt), grammar)
    with _CACHE_LOCK:
        proto = _MATCHERS.get(key)
        if proto is not None:
            _MATCHERS.move_to_end(key)
    if proto is None:
        is_error, msgs = LLMatcher.validate_grammar_with_warnings(grammar, lt)
        if is_error:
            raise ValueError(f"the grammar engine refused this schema: {msgs[0] if msgs else 'unknown error'}")
        proto = LLMatcher(lt, grammar, log_level=0)
        if proto.is_error():
            raise ValueError(f"the grammar engine refused this schema: {proto.get_error()}")
        with _CACHE_LOCK:
            _MATCHERS[key] = proto
            while len(_MATCHERS) > 64:
                _MATCHERS.popitem(last=False)
    with _CACHE_LOCK:  # one copy at a time: the prototype is shared by every thread
        return proto.deep_copy()


class _JsonLex:
    """Whether the bytes written so far end inside a JSON string (and right after a backslash in one)."""

    __slots__ = ("in_string", "escape")

    def __init__(self, in_string: bool = False, escape: bool = False) -> None:
        self.in_string, self.escape = in_string, escape

    def copy(self) -> _JsonLex:
        return _JsonLex(self.in_string, self.escape)

    def feed(self, data: bytes) -> None:
        for b in data:
            if self.escape:
                self.escape = False
            elif self.in_string and b == 0x5C:  # backslash
                self.escape = True
            elif b == 0x22:  # quote
                self.in_string = not self.in_string


# the closing order: inside a string end it; outside close what is open, then the shortest values
_PREFS_ESCAPE = [b"n", b'"', b"\\", b"u", b"0"]
_PREFS_STRING = [b'"', b"a", b"0", b" ", b"-"]
_PREFS_OUTSIDE = [b"}", b"]", b'"', b"0", b"f", b"n", b"t", b"[", b"{", b",", b":"] + [bytes([c]) for c in b"123456789-."]


class GrammarGuide:
    """The decode loop's side of a constraint: a mask of the allowed tokens before each one, and the budget.

    Use (one guide per generation; not thread-safe, cheap to make):

        guide = GrammarGuide(constraint, tokenizer, eos_ids, n_vocab, max_new_tokens)   # ValueError if it cannot fit
        for _ in range(max_new_tokens):
            logits[~guide.allowed(len(logits))] = -inf      # (V,) before sampling; end-of-sequence only if complete
            sampled = sample(logits)
            if sampled in eos_ids: break
            token = guide.advance(sampled)                 # the token to emit (may differ: see below)
            if token is None: break                        # complete, and no room for more
            emit(token)
            if guide.done: break                           # nothing but end-of-sequence may follow

    `advance` returns the sampled token unless it would leave too few tokens to complete the output, in which
    case it returns the next token of the completion the guide found (see the module docstring).
    `GistModel.grammar_guide(constraint, max_new_tokens)` makes one for a model's tokenizer and vocabulary.
    """

    def __init__(self, constraint: Constraint, tokenizer: Any, eos_ids: Sequence[int], n_vocab: int,
                 max_new_tokens: int) -> None:
        import torch

        self.constraint = constraint
        self.lt, self._lengths, self._singles = _ll_tokenizer(tokenizer, eos_ids, n_vocab)
        self.eos = set(int(e) for e in eos_ids)
        self.matcher = _matcher(self.lt, constraint.grammar)
        self.n_vocab = n_vocab
        self.left = int(max_new_tokens)
        self._words = (self.lt.vocab_size + 31) // 32
        self._mask = torch.zeros(self._words, dtype=torch.int32)
        self._shifts = torch.arange(32, dtype=torch.int32)
        self._lex = _JsonLex()
        self._bytes: dict[int, bytes] = {}
        self.forced = 0  # tokens the budget made the guide write instead of the sampled ones
        self._closure = self._close(self.left)
        if self._closure is None:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} is too small for this {constraint.kind} constraint: its shortest "
                f"output needs more tokens; raise max_new_tokens"
            )

    # -- state --
    @property
    def done(self) -> bool:
        """True when nothing but end-of-sequence may follow (the output is complete)."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """True when the output so far is a complete, valid output."""
        return self.matcher.is_accepting()

    def _token_bytes(self, t: int) -> bytes:
        b = self._bytes.get(t)
        if b is None:
            b = self._bytes[t] = self.lt.decode_bytes([t])
        return b

    def _fill(self) -> Any:
        self.matcher.unsafe_compute_mask_ptr(self._mask.data_ptr(), self._words * 4)
        if self.matcher.is_error():
            raise RuntimeError(f"grammar engine error: {self.matcher.get_error()}")
        return self._mask

    def allowed(self, n: Optional[int] = None) -> Any:
        """Bool tensor (n,) of the tokens allowed next (n: the logits' size, default the model's vocabulary)."""
        return self._unpack(self._fill(), self.n_vocab if n is None else n)

    def _unpack(self, mask: Any, n: int) -> Any:
        import torch

        bits = ((mask.unsqueeze(1) >> self._shifts) & 1).reshape(-1).bool()  # (words * 32,)
        out = torch.zeros(n, dtype=torch.bool)
        k = min(n, bits.numel())
        out[:k] = bits[:k]
        return out

    # -- the budget --
    def _pick_closing(self, lex: _JsonLex) -> Optional[int]:
        """The next token of a short completion from the matcher's state (None: nothing allowed)."""
        ff = self.matcher.compute_ff_tokens()
        if ff:
            return int(ff[0])
        mask = self._fill()

        def ok(t: int) -> bool:
            return bool((int(mask[t >> 5]) >> (t & 31)) & 1) and t not in self.eos

        prefs = _PREFS_ESCAPE if lex.escape else _PREFS_STRING if lex.in_string else _PREFS_OUTSIDE
        for p in prefs:
            t = self._singles.get(p)
            if t is not None and ok(t):
                return t
        lengths = self._lengths.masked_fill(~self._unpack(mask, len(self._lengths)), 1 << 30)
        best = int(lengths.argmin())
        return best if int(lengths[best]) < (1 << 30) else None

    def _close(self, limit: int) -> Optional[list[int]]:
        """A completion of the output from here in at most `limit` tokens (greedy), or None; the matcher is left
        where it was."""
        limit = min(limit, _MAX_CLOSURE)
        taken: list[int] = []
        lex = self._lex.copy()
        try:
            while not self.matcher.is_accepting():
                if len(taken) >= limit:
                    return None
                t = self._pick_closing(lex)
                if t is None or not self.matcher.consume_token(t):
                    return None
                taken.append(t)
                lex.feed(self._token_bytes(t))
            return taken
        finally:
            if taken:
                self.matcher.rollback(len(taken))

    def _consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} is not allowed here (pick from `allowed()`): {self.matcher.get_error()}")
        self._lex.feed(self._token_bytes(token))

    def advance(self, token: int) -> Optional[int]:
        """Consume the sampled `token` (one the mask allowed) and return it; or, when it would leave too few tokens
        to complete the output, consume and return the completion's next token instead (None when the output is
        complete already: end it here)."""
        token = int(token)
        self.left -= 1
        if self._closure and token == self._closure[0]:
            self._consume(token)
            self._closure = self._closure[1:]
            return token
        lex_before = self._lex.copy()
        self._consume(token)
        closure = self._close(self.left)
        if closure is not None:
            self._closure = closure
            return token
        self.matcher.rollback(1)  # no room left to finish after this token: follow the completion instead
        self._lex = lex_before
        self.forced += 1
        if not self._closure:
            self.left += 1
            return None
        token, self._closure = self._closure[0], self._closure[1:]
        self._consume(token)
        return token
