"""The OpenAI-compatible routes of `gist_memory.server` (`/v1/chat/completions`, `/v1/completions`, `/v1/models`),
driven by the real client libraries (openai, LangChain's ChatOpenAI, LlamaIndex's OpenAILike) against a uvicorn
server on 127.0.0.1 with the tiny random model: answers from memory states, usage fields, streaming, parameter
mapping, OpenAI error objects, and concurrent clients getting the answers they would get alone.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from tests.test_web_app import Server

openai = pytest.importorskip("openai", reason="the openai client is not installed (requirements-extra)")

PASSAGES = [
    ("velmora", "The Velmora lighthouse was built in 1887 by the engineer Ada Lindqvist. Its lamp stands 42 metres "
                "above the sea."),
    ("station", "The Prythwaite weather station sits at an altitude of 4,301 metres. It was founded in 1931 by "
                "Henrik Sollum."),
    ("tram", "The Zorbluth tram depot opened in 1902. Its trams were painted green and copper."),
    ("bridge", "The Orvik bridge opened in 1911 and crosses the Skarholm strait in three spans."),
]
QUESTION = "Who built the Velmora lighthouse?"


@pytest.fixture(scope="module")
def tiny(tiny_base_dir, tmp_path_factory):
    """The tiny random model with its weight matrices scaled 8x: its answers depend on the prompt and the states
    (the plain tiny model answers every prompt alike), so comparing answers means something."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gist_memory import GistConfig, GistModel

    sharp = tmp_path_factory.mktemp("sharp-tiny")
    lm = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    lm.save_pretrained(sharp)
    AutoTokenizer.from_pretrained(tiny_base_dir).save_pretrained(sharp)
    return GistModel.from_base(str(sharp), GistConfig(compressor="pool+anchors", target_ratio=4), device="cpu")


@pytest.fixture(scope="module")
def memories(tiny):
    from gist_memory.store import GistMemory
    from gist_memory.store.testing import HashingEmbedder

    main = GistMemory(tiny, None, embedder=HashingEmbedder())
    main.add_texts([t for _, t in PASSAGES], metadatas=[{"title": n} for n, _ in PASSAGES],
                   ids=[n for n, _ in PASSAGES], show_progress=False)
    notes = GistMemory(tiny, None, embedder=HashingEmbedder())
    notes.add_texts(["The Quillon mill burned in 1790 and was rebuilt in stone."], ids=["mill"], show_progress=False)
    yield main, notes
    main.close()
    notes.close()


@pytest.fixture(scope="module")
def server(tiny, memories):
    from gist_memory.server import create_app

    main, notes = memories
    s = Server(create_app(tiny, main, k=2, max_new_tokens=6, memories={"notes": notes}))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)


def post(server, path, body, raw=False):  # noqa: ANN001, ANN201
    """(status, parsed JSON) of a POST with a JSON body (or raw bytes)."""
    return server.request("POST", path, body if not raw else body, {"Content-Type": "application/json"})


# ---- models --------------------------------------------------------------------------------------------------
def test_models_list_the_plain_model_and_each_memory(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["gist-memory", "gist-memory:default", "gist-memory:notes"]
    assert client.models.retrieve("gist-memory:notes").id == "gist-memory:notes"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


# ---- answers from memory -------------------------------------------------------------------------------------
def test_chat_reads_memory_states_and_reports_usage(client, server, tiny, memories):
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    plain = client.chat.completions.create(model="gist-memory", messages=msgs, max_tokens=5)
    u = plain.usage
    assert plain.object == "chat.completion" and isinstance(plain.choices[0].message.content, str)
    assert u.completion_tokens <= 5 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.model_extra["passages"] == 0 and u.model_extra["prompt_raw_tokens"] == u.prompt_tokens
    assert u.model_extra["state_positions"] == 0 and plain.model_extra["sources"] == []

    res = client.chat.completions.create(model="gist-memory:default", messages=msgs, max_tokens=5)
    u, extra = res.usage, res.usage.model_extra
    sources = res.model_extra["sources"]
    assert [s["id"] for s in sources][0] == "velmora" and len(sources) == 2  # k=2, the server's default
    assert extra["passages"] == 2 and 0 < extra["state_positions"] < extra["state_raw_tokens"]
    # the prompt as read is shorter than the same prompt with the passages pasted as raw text
    assert extra["prompt_raw_tokens"] - u.prompt_tokens == extra["state_raw_tokens"] - extra["state_positions"]
    assert extra["compression_ratio"] == round(extra["state_raw_tokens"] / extra["state_positions"], 3)

    # the answer is the model's answer from those passages' states
    main, _ = memories
    hits = [main.get(s["id"]) for s in sources]
    want = tiny.generate(msgs, states=main.states_for(hits), max_new_tokens=5)
    assert res.choices[0].message.content == want

    # the memory named by an extra body field, k per request
    res2 = client.chat.completions.create(model="gist-memory", messages=msgs, max_tokens=5,
                                          extra_body={"memory": "notes", "k": 1})
    assert [s["id"] for s in res2.model_extra["sources"]] == ["mill"] and res2.usage.model_extra["passages"] == 1


def test_streaming_chat_equals_the_whole_answer(client):
    msgs = [{"role": "user", "content": "When did the Orvik bridge open?"}]
    whole = client.chat.completions.create(model="gist-memory:default", messages=msgs, max_tokens=6)
    chunks = list(client.chat.completions.create(model="gist-memory:default", messages=msgs, max_tokens=6,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.model_extra["state_raw_tokens"] == whole.usage.model_extra["state_raw_tokens"]
    # without include_usage no usage chunk
    plain = list(client.chat.completions.create(model="gist-memory", messages=msgs, max_tokens=3, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_plain_and_streamed(client):
    res = client.completions.create(model="gist-memory:default", prompt="Where is the weather station?",
                                    max_tokens=5)
    assert res.object == "text_completion" and isinstance(res.choices[0].text, str)
    assert res.usage.model_extra["passages"] == 2 and res.usage.completion_tokens <= 5
    parts = list(client.completions.create(model="gist-memory:default", prompt="Where is the weather station?",
                                           max_tokens=5, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == res.choices[0].text


def test_generation_parameters_map_onto_generate(client):
    msgs = [{"role": "user", "content": "Tell me about the tram depot."}]
    long = client.chat.completions.create(model="gist-memory", messages=msgs, max_tokens=12)
    text = long.choices[0].message.content
    if long.usage.completion_tokens == 12:
        assert long.choices[0].finish_reason == "length"
    short = client.chat.completions.create(model="gist-memory", messages=msgs, max_tokens=2)
    assert short.usage.completion_tokens <= 2 and text.startswith(short.choices[0].message.content)
    assert len(text) >= 6
    # a stop string taken from the greedy answer cuts it there, and is not included
    stop = text[3:5]
    cut = client.chat.completions.create(model="gist-memory", messages=msgs, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="gist-memory", messages=msgs, max_tokens=12, stop=stop,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index(stop)]
    # sampling: same seed, same answer
    a, b = (client.chat.completions.create(model="gist-memory", messages=msgs, max_tokens=8, temperature=1.2,
                                           top_p=0.95, seed=7).choices[0].message.content for _ in range(2))
    assert a == b


def test_stop_filter_holds_back_a_stop_string_split_over_pieces():
    from gist_memory.server.service import StopFilter

    f = StopFilter(["\nUser"])
    assert [f.feed(p) for p in ("Hello", "\n", "Us", "er: hi")] == ["Hello", "", "", ""]
    assert f.stopped and f.flush() == ""
    f = StopFilter(["\nUser"])
    assert f.feed("a\nU") == "a" and f.feed("p") == "\nUp" and f.flush() == ""
    f = StopFilter(["END"])
    assert f.feed("xEN") == "x" and f.flush() == "EN"


# ---- errors --------------------------------------------------------------------------------------------------
ERRORS = [
    # (method, path, body, status, param, code)
    ("POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
     400, "model", "model_not_found"),
    ("POST", "/v1/chat/completions", {"model": "gist-memory:nope", "messages": [{"role": "user", "content": "hi"}]},
     400, "model", "model_not_found"),
    ("POST", "/v1/chat/completions", {"model": "gist-memory", "memory": "nope",
                                      "messages": [{"role": "user", "content": "hi"}]}, 400, "memory",
     "model_not_found"),
    ("POST", "/v1/chat/completions", {"model": "gist-memory", "n": 2, "messages": [{"role": "user", "content": "x"}]},
     400, "n", "unsupported_value"),
    ("POST", "/v1/chat/completions", {"model": "gist-memory", "max_tokens": 0,
                                      "messages": [{"role": "user", "content": "x"}]}, 400, "max_tokens",
     "invalid_value"),
    ("POST", "/v1/chat/completions", {"model": "gist-memory", "temperature": 5,
                                      "messages": [{"role": "user", "content": "x"}]}, 400, "temperature",
     "invalid_request_body"),
    ("POST", "/v1/chat/completions", {"model": "gist-memory"}, 400, "messages", "invalid_request_body"),
    ("POST", "/v1/chat/completions", {"model": "gist-memory", "messages": []}, 400, "messages", "invalid_value"),
    ("POST", "/v1/chat/completions", {"model": "gist-memory", "messages": [{"role": "function", "content": "x"}]},
     400, "messages[0].role", "unsupported_value"),
    ("POST", "/v1/chat/completions", {"model": "gist-memory", "messages": [{"role": "assistant", "content": "x"}]},
     400, "messages", "invalid_value"),
    ("POST", "/v1/chat/completions", {"model": "gist-memory", "tools": [{"type": "function"}],
                                      "messages": [{"role": "user", "content": "x"}]}, 400, "tools",
     "invalid_value"),
    ("POST", "/v1/chat/completions", {"model": "gist-memory", "k": 99,
                                      "messages": [{"role": "user", "content": "x"}]}, 400, "k", "invalid_value"),
    ("POST", "/v1/chat/completions", {"model": "gist-memory", "stop": ["a", "b", "c", "d", "e"],
                                      "messages": [{"role": "user", "content": "x"}]}, 400, "stop", "invalid_value"),
    ("POST", "/v1/chat/completions", {"model": "gist-memory", "filter": "title=x",
                                      "messages": [{"role": "user", "content": "x"}]}, 400, "filter",
     "invalid_request_body"),
    ("POST", "/v1/chat/completions", {"model": "gist-memory", "stream": True,
                                      "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages[0].content", "unsupported_value"),
    ("POST", "/v1/completions", {"model": "gist-memory", "prompt": [1, 2, 3]}, 400, "prompt", "unsupported_value"),
    ("POST", "/v1/completions", {"model": "gist-memory", "prompt": "x", "echo": True}, 400, "echo",
     "unsupported_parameter"),
    ("POST", "/v1/completions", {"model": "gist-memory", "prompt": "  "}, 400, "prompt", "invalid_value"),
    ("POST", "/v1/nothing-here", {"model": "gist-memory"}, 404, None, "unknown_url"),
    ("GET", "/v1/chat/completions", None, 405, None, "method_not_allowed"),
]


@pytest.mark.parametrize("method, path, body, status, param, code", ERRORS)
def test_bad_requests_get_openai_error_objects(server, method, path, body, status, param, code):
    got, res = server.request(method, path, body)
    assert got == status, res
    assert set(res) == {"error"} and set(res["error"]) == {"message", "type", "param", "code"}, res
    assert res["error"]["message"] and res["error"]["type"] == "invalid_request_error"
    assert (res["error"]["param"], res["error"]["code"]) == (param, code), res


def test_malformed_json_is_a_400_and_the_server_keeps_serving(server, client):
    got, res = server.request("POST", "/v1/chat/completions", b"{not json", {"Content-Type": "application/json"})
    assert got == 400 and res["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 400 and e.value.code == "model_not_found"
    ok = client.chat.completions.create(model="gist-memory", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=2)
    assert ok.choices[0].message.role == "assistant"


def test_web_api_errors_keep_their_own_shape(server):
    got, res = server.request("GET", "/api/nothing-here")
    assert got == 404 and isinstance(res["error"], str)


# ---- frameworks ----------------------------------------------------------------------------------------------
def test_langchain_chat_openai(server, client):
    lc = pytest.importorskip("langchain_openai", reason="langchain-openai is not installed (requirements-extra)")
    chat = lc.ChatOpenAI(base_url=server.url + "/v1", api_key="not-needed", model="gist-memory:default",
                         max_tokens=5, temperature=0, max_retries=0)
    msg = chat.invoke([("system", "Answer briefly."), ("human", QUESTION)])
    want = client.chat.completions.create(model="gist-memory:default", max_tokens=5, temperature=0, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}])
    assert msg.content == want.choices[0].message.content
    usage = msg.response_metadata["token_usage"]
    assert usage["passages"] == 2 and usage["prompt_raw_tokens"] > usage["prompt_tokens"]
    assert msg.usage_metadata["input_tokens"] == usage["prompt_tokens"]
    streamed = "".join(c.content for c in chat.stream([("system", "Answer briefly."), ("human", QUESTION)]))
    assert streamed == msg.content


def test_llama_index_openai_like(server, client):
    oai_like = pytest.importorskip("llama_index.llms.openai_like",
                                   reason="llama-index-llms-openai-like is not installed (requirements-extra)")
    from llama_index.core.llms import ChatMessage

    chat_llm = oai_like.OpenAILike(model="gist-memory:default", api_base=server.url + "/v1", api_key="not-needed",
                                   is_chat_model=True, max_tokens=5, temperature=0, max_retries=0)
    res = chat_llm.chat([ChatMessage(role="user", content=QUESTION)])
    want = client.chat.completions.create(model="gist-memory:default", max_tokens=5,
                                          messages=[{"role": "user", "content": QUESTION}])
    assert res.message.content == want.choices[0].message.content
    assert "".join(r.delta for r in chat_llm.stream_chat([ChatMessage(role="user", content=QUESTION)])) \
        == res.message.content

    llm = oai_like.OpenAILike(model="gist-memory:default", api_base=server.url + "/v1", api_key="not-needed",
                              max_tokens=5, temperature=0, max_retries=0)  # completions route
    done = llm.complete("Where is the weather station?")
    want = client.completions.create(model="gist-memory:default", prompt="Where is the weather station?",
                                     max_tokens=5)
    assert done.text == want.choices[0].text
    assert "".join(r.delta for r in llm.stream_complete("Where is the weather station?")) == done.text


# ---- concurrency ---------------------------------------------------------------------------------------------
def test_concurrent_clients_get_the_answers_they_get_alone(server):
    questions = [f"{q} ({i})" for i, q in enumerate(
        ["Who built the Velmora lighthouse?", "How high is the weather station?", "When did the tram depot open?",
         "What does the Orvik bridge cross?"] * 2)]

    def ask(q: str, stream: bool) -> str:
        body = {"model": "gist-memory:default", "messages": [{"role": "user", "content": q}], "max_tokens": 6,
                "stream": stream}
        req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=300) as r:
            raw = r.read().decode()
        if not stream:
            return json.loads(raw)["choices"][0]["message"]["content"]
        out = []
        for line in raw.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ch = json.loads(line[6:])
                out += [c["delta"].get("content") or "" for c in ch["choices"]]
        return "".join(out)

    alone = {q: ask(q, False) for q in questions}
    assert len(set(alone.values())) > 2  # different questions, different answers: a mix-up would show
    got: dict[tuple[str, bool], str] = {}
    errors: list[BaseException] = []

    def worker(q: str, stream: bool) -> None:
        try:
            got[(q, stream)] = ask(q, stream)
        except (urllib.error.URLError, OSError, ValueError) as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(q, s)) for q in questions for s in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(got) == 2 * len(questions)
    assert all(got[(q, s)] == alone[q] for q, s in got)


def test_a_client_that_leaves_mid_stream_frees_the_model(server, tiny):
    import http.client
    import time
    from urllib.parse import urlparse

    from gist_memory.server.openai import MAX_TOKENS

    svc = server.app.state.gist
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = {"model": "gist-memory", "messages": [{"role": "user", "content": "Go on and on."}],
            "max_tokens": MAX_TOKENS, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.close()  # the client goes away after the first event
    conn.close()
    deadline = time.time() + 60
    time.sleep(0.05)
    while time.time() < deadline and svc.answers_in_flight:  # the decoding thread runs until it sees the close
        time.sleep(0.05)
    assert svc.answers_in_flight == 0
    assert svc.last_answer.usage["new_tokens"] < MAX_TOKENS  # decoding stopped early
    ok = post(server, "/v1/chat/completions", {"model": "gist-memory", "max_tokens": 2,
                                               "messages": [{"role": "user", "content": "still there?"}]})
    assert ok[0] == 200


def test_a_body_over_the_limit_is_a_413_error_object(tiny):
    from gist_memory.server import create_app
    from gist_memory.store import GistMemory
    from gist_memory.store.testing import HashingEmbedder

    # a small limit (4 KiB uploads: 72 KiB bodies), so the refused body still fits the socket buffers
    s = Server(create_app(tiny, GistMemory(tiny, None, embedder=HashingEmbedder()), max_upload_bytes=4096))
    try:
        big = {"model": "gist-memory", "messages": [{"role": "user", "content": "x" * 100_000}]}
        got, res = post(s, "/v1/chat/completions", big)
        assert got == 413 and res["error"]["type"] == "invalid_request_error" and "too large" in res["error"]["message"]
    finally:
        s.stop()
