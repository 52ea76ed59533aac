"""Ollama's API at /api/* against the official `ollama` client, on a real node on 127.0.0.1."""

from __future__ import annotations

import json

import ollama
import pytest
from core_helpers import api_node_config

from exo_core.api.testing import BackgroundNode, request
from exo_core.engines.dummy import DUMMY_ANSWER

MODEL = "smollm2-135m"
HI = [{"role": "user", "content": "Hi!"}]


@pytest.fixture(scope="module")
def server():
    config = api_node_config(
        "test",
        engine_options={"dummy_delay_ms": 1},
    )
    with BackgroundNode(config) as node:
        yield node


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=30)


def test_chat_streams_ndjson(client):
    parts = list(client.chat(model=MODEL, messages=HI, stream=True, options={"temperature": 0}))
    assert "".join(p.message.content for p in parts) == DUMMY_ANSWER
    assert all(not p.done for p in parts[:-1])
    last = parts[-1]
    assert last.done and last.done_reason == "stop"
    assert last.prompt_eval_count > 0 and last.eval_count > 0
    assert last.eval_duration >= 0 and last.total_duration > 0


def test_chat_whole(client):
    out = client.chat(model=MODEL + ":latest", messages=HI, stream=False, options={"temperature": 0})
    assert out.message.role == "assistant"
    assert out.message.content == DUMMY_ANSWER
    assert out.done and out.done_reason == "stop"


def test_chat_num_predict_and_keep_alive(client):
    out = client.chat(
        model=MODEL, messages=HI, stream=False, options={"temperature": 0, "num_predict": 3}, keep_alive="5m"
    )
    assert out.done_reason == "length"
    assert out.eval_count == 3


def test_chat_stop_option(client):
    out = client.chat(model=MODEL, messages=HI, stream=False, options={"temperature": 0, "stop": ["dummy"]})
    assert out.message.content == DUMMY_ANSWER.split("dummy")[0]


def test_generate(client):
    out = client.generate(model=MODEL, prompt="Hi!", system="Be brief.", stream=False, options={"seed": 1})
    assert out.response and out.done
    parts = list(client.generate(model=MODEL, prompt="Hi!", stream=True, options={"temperature": 0}))
    assert "".join(p.response for p in parts) == DUMMY_ANSWER
    raw = client.generate(model=MODEL, prompt="Once upon", raw=True, stream=False, options={"temperature": 0})
    assert raw.response == DUMMY_ANSWER


def test_generate_empty_prompt_loads(client):
    out = client.generate(model=MODEL, prompt="")
    assert out.done and out.done_reason == "load"


def test_tags_show_ps_version(client, server):
    tags = client.list()
    names = [m.model for m in tags.models]
    assert names[0] == MODEL + ":latest"
    assert tags.models[0].details.format == "gguf"
    assert tags.models[0].size > 0
    shown = client.show(MODEL)
    assert "completion" in shown.capabilities
    assert "im_start" in shown.template
    assert shown.modelinfo["llama.block_count"] == 30
    client.chat(model=MODEL, messages=HI, stream=False)
    running = client.ps()
    assert [m.model for m in running.models] == [MODEL + ":latest"]
    version = request("GET", f"{server.url}/api/version")
    assert version.status == 200 and version.json()["version"]


def test_errors_in_ollama_shape(client, server):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="no-such-model", messages=HI, stream=False)
    assert err.value.status_code == 404
    assert "no-such-model" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=MODEL, messages=HI, stream=False, options={"mirostat": 2})
    assert err.value.status_code == 400 and "mirostat" in err.value.error
    reply = request("POST", f"{server.url}/api/chat", content=b"{not json")
    assert reply.status == 400 and set(reply.json()) == {"error"}
    reply = request("POST", f"{server.url}/api/embed", json_body={"model": MODEL, "input": "x"})
    assert reply.status == 404 and "embeddings" in reply.json()["error"]
    reply = request(
        "POST", f"{server.url}/api/generate", json_body={"model": MODEL, "prompt": "x", "context": [1, 2]}
    )
    assert reply.status == 400 and "context" in reply.json()["error"]


def test_stream_is_ndjson_over_http(server):
    reply = request("POST", f"{server.url}/api/chat", json_body={"model": MODEL, "messages": HI})
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert lines[-1]["done"] is True and all(not line["done"] for line in lines[:-1])
