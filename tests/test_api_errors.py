"""Bad input to the API: each is a 4xx with a message that says what to fix, and the server goes on."""

from __future__ import annotations

import json

import pytest
from core_helpers import api_node_config

from exo_core.api.protocol import MAX_BODY_BYTES
from exo_core.api.testing import BackgroundNode, Reply, request
from exo_core.engines.dummy import DUMMY_ANSWER
from exo_core.models.tokenizer import load_tokenizer

MODEL = "smollm2-135m"
HI = [{"role": "user", "content": "Hi!"}]


@pytest.fixture(scope="module")
def server():
    config = api_node_config("test-errors")
    with BackgroundNode(config) as node:
        yield node


class Http:
    def __init__(self, base: str) -> None:
        self.base = base

    def post(self, path: str, json=None, content: bytes | None = None, headers=None) -> Reply:
        return request("POST", self.base + path, json_body=json, content=content, headers=headers)

    def get(self, path: str) -> Reply:
        return request("GET", self.base + path)


@pytest.fixture(scope="module")
def http(server):
    return Http(server.url)


def chat(**fields):
    return {"model": MODEL, "messages": HI, **fields}


BAD_CHAT = [
    # (body, status, param, words in the message)
    (chat(temperature="hot"), 400, "temperature", "must be a number"),
    (chat(temperature=-1), 400, "temperature", "at least"),
    (chat(top_p=1.5), 400, "top_p", "at most"),
    (chat(max_tokens="10"), 400, "max_tokens", "must be an integer"),
    (chat(max_tokens=-5), 400, "max_tokens", "at least 1"),
    (chat(max_tokens=0), 400, "max_tokens", "at least 1"),
    (chat(max_tokens=10**30), 400, "max_tokens", "at most"),
    (chat(max_tokens=10**9), 400, "max_tokens", "context length"),
    (chat(max_tokens=True), 400, "max_tokens", "must be an integer"),
    (chat(max_tokens=5, max_completion_tokens=6), 400, "max_completion_tokens", "disagree"),
    (chat(n=0), 400, "n", "at least 1"),
    (chat(n=1000), 400, "n", "at most"),
    (chat(stream="yes"), 400, "stream", "true or false"),
    (chat(stop=5), 400, "stop", "string or an array"),
    (chat(stop=["a"] * 50), 400, "stop", "at most"),
    (chat(seed="abc"), 400, "seed", "integer"),
    (chat(presence_penalty=3), 400, "presence_penalty", "at most"),
    (chat(top_logprobs=50, logprobs=True), 400, "top_logprobs", "at most"),
    (chat(stream_options={"include_usage": True}), 400, "stream_options", "only allowed when stream"),
    (chat(stream=True, stream_options={"include_usage": "yes"}), 400, "stream_options", "true or false"),
    (chat(stream=True, stream_options={"chunk_size": 3}), 400, "stream_options", "not supported"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "no tool support"),
    (
        chat(tools=[{"type": "function", "function": {"name": "a b"}}]),
        400,
        "tools[0].function.name",
        "letters",
    ),
    (chat(tools=[{"type": "function"}]), 400, "tools[0].function", "must be an object"),
    (chat(tool_choice="required"), 400, "tool_choice", "needs tools"),
    (
        chat(
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        400,
        "tool_choice",
        "not in tools",
    ),
    (chat(logit_bias={"50256": -100}), 400, "logit_bias", "not supported"),
    (chat(response_format={"type": "json_schema"}), 400, "response_format.json_schema", "with a name"),
    (chat(response_format={"type": "xml"}), 400, "response_format.type", "json_schema"),
    (
        chat(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}
        ),
        400,
        "response_format",
        "cannot be followed",
    ),
    (chat(store=True), 400, "store", "does not store"),
    (chat(frobnicate=1), 400, "frobnicate", "Unrecognized request argument"),
    (chat(model=None), 400, "model", "model is required"),
    (chat(model=42), 400, "model", "must be a string"),
    ({"model": MODEL}, 400, "messages", "messages is required"),
    (chat(messages=[]), 400, "messages", "at least one message"),
    (chat(messages="hi"), 400, "messages", "must be an array"),
    (chat(messages=["hi"]), 400, "messages[0]", "must be an object"),
    (chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role", "must be one of"),
    (chat(messages=[{"content": "hi"}]), 400, "messages[0].role", "must be one of"),
    (chat(messages=[{"role": "tool", "content": "42"}]), 400, "messages[0].tool_call_id", "required"),
    (chat(messages=[{"role": "function", "content": "42"}]), 400, "messages[0]", "use 'tool'"),
    (chat(messages=[{"role": "user"}]), 400, "messages[0].content", "is required"),
    (chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", "string or an array"),
    (
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "messages[0].content[0].type",
        "only text parts",
    ),
    (chat(messages=[{"role": "user", "content": "hi", "name": "bob"}]), 400, "messages[0].name", "names"),
    (chat(model="no-such-model"), 404, "model", "does not exist"),
]


@pytest.mark.parametrize(("body", "status", "param", "words"), BAD_CHAT)
def test_bad_chat_request(http, body, status, param, words):
    response = http.post("/v1/chat/completions", json=body)
    assert response.status == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]
    assert error["type"] in ("invalid_request_error", "not_found_error")


BAD_COMPLETIONS = [
    ({"model": MODEL}, "prompt", "prompt is required"),
    ({"model": MODEL, "prompt": [1, 2, 3]}, "prompt", "token ids is not supported"),
    ({"model": MODEL, "prompt": []}, "prompt", "non-empty array"),
    ({"model": MODEL, "prompt": "x", "suffix": "y"}, "suffix", "not supported"),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, "best_of", "use n"),
    ({"model": MODEL, "prompt": "x", "logprobs": 9}, "logprobs", "at most 5"),
    ({"model": MODEL, "prompt": "x", "echo": True, "logprobs": 1}, "echo", "not supported"),
    ({"model": MODEL, "prompt": ["a"] * 10, "n": 2}, "n", "at most"),
    ({"model": MODEL, "prompt": "x", "messages": HI}, "messages", "Unrecognized"),
]


@pytest.mark.parametrize(("body", "param", "words"), BAD_COMPLETIONS)
def test_bad_completion_request(http, body, param, words):
    response = http.post("/v1/completions", json=body)
    assert response.status == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "body is empty"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_malformed_body(http, raw, words):
    response = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert words in response.json()["error"]["message"]


def test_body_too_large(http):
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * (10 * 1024 * 1024)}])).encode()
    assert len(big) > MAX_BODY_BYTES
    response = http.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    assert response.status == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large"
    assert str(MAX_BODY_BYTES) in error["message"]


def test_unknown_route_and_method(http):
    missing = http.get("/v1/nothing-here")
    assert missing.status == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    assert "/v1/chat/completions" in missing.json()["error"]["message"]
    wrong = http.get("/v1/chat/completions")
    assert wrong.status == 405
    assert "use POST" in wrong.json()["error"]["message"]


def test_server_keeps_serving_after_bad_input(http):
    for body, *_ in BAD_CHAT[:5]:
        http.post("/v1/chat/completions", json=body)
    http.post("/v1/chat/completions", content=b"{oops")
    response = http.post("/v1/chat/completions", json=chat(temperature=0))
    assert response.status == 200
    assert response.json()["choices"][0]["message"]["content"] == DUMMY_ANSWER


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": [], "tool_choice": "none", "parallel_tool_calls": True},
        {"response_format": {"type": "text"}, "modalities": ["text"]},
        {"logit_bias": {}, "store": False, "metadata": None, "service_tier": "auto"},
        {"stream": True, "stream_options": {"include_usage": False, "include_obfuscation": False}},
        {"messages": [{"role": "developer", "content": "Be brief."}, *HI]},
        {"messages": [{"role": "assistant", "content": "Hi", "refusal": None, "tool_calls": []}, *HI]},
        {"top_k": -1, "user": "bob", "safety_identifier": "hash"},
    ],
)
def test_fields_that_ask_for_nothing_are_accepted(http, fields):
    response = http.post("/v1/chat/completions", json=chat(temperature=0, **fields))
    assert response.status == 200, response.text
    assert DUMMY_ANSWER in response.text or "Hello" in response.text


def test_developer_role_is_a_system_turn(http, server):
    tokenizer = load_tokenizer(server.runtime.default_model)
    body = chat(messages=[{"role": "developer", "content": "Be brief."}, *HI], max_tokens=1)
    usage = http.post("/v1/chat/completions", json=body).json()["usage"]
    assert usage["prompt_tokens"] == len(
        tokenizer.encode_chat([{"role": "system", "content": "Be brief."}, *HI])
    )
