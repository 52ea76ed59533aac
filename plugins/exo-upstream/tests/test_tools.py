"""Tool calls from an upstream server, and an upstream that goes silent.

A small aiohttp server stands in for an OpenAI-compatible upstream that returns tool calls
(llama.cpp's server needs a special chat format for them): it streams each call in fragments,
as OpenAI does, and records the bodies it was sent. exo runs in this process with its real
API; the client is the official `openai` package (and plain HTTP for Ollama's /api/chat and
/metrics). The model, `toolbot`, has no card and no tokenizer here: tools must work without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from exo_upstream.engine import UpstreamEngine

from exo_core import ConfigError, ToolCall
from exo_core.testing import Cluster, api_url, node

MODEL = "toolbot"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
        },
    },
]
ASK = [{"role": "user", "content": "Weather and time in Paris?"}]
# (index, id, name, arguments piece) as the stand-in streams them
FRAGMENTS = [
    (0, "call_w1", "get_weather", ""),
    (0, None, None, '{"ci'),
    (0, None, None, 'ty": "Par'),
    (0, None, None, 'is"}'),
    (1, "call_t2", "get_time", '{"tz"'),
    (1, None, None, ': "CET"}'),
]
USAGE = {"prompt_tokens": 31, "completion_tokens": 17, "total_tokens": 48}


@dataclass
class StandIn:
    """What the stand-in does and what it was sent."""

    mode: str = "tools"  # tools | text | stall | silent | malformed
    wait: float = 0.0  # seconds before it answers at all (queued behind other requests)
    text: str = "It is sunny in Paris."
    bodies: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    model: str = MODEL  # the id it lists


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {"id": "x", "object": "chat.completion.chunk", "model": MODEL, "choices": choices, **extra}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


@contextlib.asynccontextmanager
async def stand_in(server: StandIn) -> AsyncIterator[StandIn]:
    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": server.model, "object": "model"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        server.bodies.append(body)
        if server.wait:  # a serial server busy with another request: nothing yet
            await asyncio.sleep(server.wait)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if server.mode == "silent":
            await asyncio.sleep(3600)
        await response.write(_chunk({"role": "assistant", "content": ""}))
        answers_tool = body["messages"][-1]["role"] == "tool"
        if server.mode == "malformed":
            await response.write(_chunk({"tool_calls": [{"index": 0, "function": "get_weather"}]}))
        elif server.mode == "tools" and not answers_tool:
            for index, call_id, name, piece in FRAGMENTS:
                fragment: dict[str, Any] = {"index": index, "function": {"arguments": piece}}
                if call_id:
                    fragment.update(id=call_id, type="function")
                    fragment["function"]["name"] = name
                await response.write(_chunk({"tool_calls": [fragment]}))
                await asyncio.sleep(0.01)
            await response.write(_chunk({}, "tool_calls"))
        else:
            words = re.findall(r"\S+\s*", server.text)
            for i, word in enumerate(words):
                await response.write(_chunk({"content": word}))
                if server.mode == "stall" and i == 1:
                    await asyncio.sleep(3600)  # accepted, started, then silent
                await asyncio.sleep(0.01)
            await response.write(_chunk({}, "stop"))
        await response.write(_chunk(None, usage=USAGE))
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def exo(*servers: StandIn, **options: Any) -> AsyncIterator[str]:
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(stand_in(server))
        engine_options = {"upstream": tuple(s.url for s in servers), **options}
        runtime = await stack.enter_async_context(node("upstream", api=True, engine_options=engine_options))
        yield api_url(runtime)


def openai_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _expected_calls() -> list[tuple[str, str, dict[str, Any]]]:
    return [("call_w1", "get_weather", {"city": "Paris"}), ("call_t2", "get_time", {"tz": "CET"})]


async def test_tool_calls_streamed_in_fragments_reach_the_openai_client_streamed_and_whole():
    upstream = StandIn()
    async with exo(upstream) as url, openai_client(url) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        calls = choice.message.tool_calls or []
        got = [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls]
        assert got == _expected_calls()
        assert reply.usage is not None and reply.usage.completion_tokens == 17

        stream = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto", stream=True
        )
        parts: dict[int, dict[str, str]] = {}
        finish = None
        async for chunk in stream:
            for delta_call in chunk.choices[0].delta.tool_calls or ():
                part = parts.setdefault(delta_call.index, {"id": "", "name": "", "arguments": ""})
                part["id"] += delta_call.id or ""
                part["name"] += delta_call.function.name or "" if delta_call.function else ""
                part["arguments"] += (delta_call.function.arguments or "") if delta_call.function else ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls"
        got = [(p["id"], p["name"], json.loads(p["arguments"])) for _, p in sorted(parts.items())]
        assert got == _expected_calls()
    # the tools went to the server as the client sent them
    assert upstream.bodies[0]["tools"] == TOOLS
    assert upstream.bodies[1]["tool_choice"] == "auto" and upstream.bodies[1]["parallel_tool_calls"] is True


async def test_tools_of_a_model_with_a_local_card_served_only_upstream_skip_its_template():
    """smollm2-135m has a card and a tokenizer here, but only an upstream serves it: its chat
    template (which renders no tools) is not asked, the server is."""
    upstream = StandIn(model="smollm2-135m")
    async with exo(upstream) as url, openai_client(url) as client:
        reply = await client.chat.completions.create(
            model="smollm2-135m", messages=ASK, tools=TOOLS, tool_choice="required"
        )
    calls = reply.choices[0].message.tool_calls or []
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == _expected_calls()
    assert upstream.bodies[0]["tool_choice"] == "required"


async def test_a_tool_result_round_trip_reaches_the_upstream_intact():
    upstream = StandIn()
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_w1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_t2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_w1", "content": '{"sky": "sunny"}'},
        {"role": "tool", "tool_call_id": "call_t2", "content": "14:00"},
    ]
    async with exo(upstream) as url, openai_client(url) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
    assert reply.choices[0].message.content == "It is sunny in Paris."
    assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls
    sent = upstream.bodies[0]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    assert sent[1]["tool_calls"] == history[1]["tool_calls"]  # arguments as JSON text again
    assert sent[2] == history[2] and sent[3] == history[3]


async def test_ollama_chat_gets_the_upstream_tool_calls():
    upstream = StandIn()
    async with exo(upstream) as url, aiohttp.ClientSession() as http:
        body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "stream": False}
        async with http.post(url + "/api/chat", json=body) as resp:
            assert resp.status == 200, await resp.text()
            whole = await resp.json()
        async with http.post(url + "/api/chat", json={**body, "stream": True}) as resp:
            lines = [json.loads(line) for line in (await resp.text()).splitlines() if line]
    expected = [{"function": {"name": n, "arguments": a}} for _, n, a in _expected_calls()]
    assert whole["message"]["tool_calls"] == expected
    assert whole["done"] and whole["done_reason"] == "stop" and whole["eval_count"] == 17
    assert lines[-1]["done"] and lines[-1]["message"]["tool_calls"] == expected


async def test_completion_tokens_of_upstream_answers_are_on_metrics():
    upstream = StandIn(mode="text")
    async with exo(upstream) as url, openai_client(url) as client:
        await client.chat.completions.create(model=MODEL, messages=ASK)
        stream = await client.chat.completions.create(model=MODEL, messages=ASK, stream=True)
        async for _ in stream:
            pass
        async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
            metrics = await resp.text()
    completion = re.search(rf'^exo_completion_tokens_total{{model="{MODEL}"}} (\S+)$', metrics, re.M)
    prompt = re.search(rf'^exo_prompt_tokens_total{{model="{MODEL}"}} (\S+)$', metrics, re.M)
    assert completion and float(completion.group(1)) == 2 * USAGE["completion_tokens"]
    assert prompt and float(prompt.group(1)) == 2 * USAGE["prompt_tokens"]


async def test_a_malformed_tool_call_is_a_clear_error():
    async with exo(StandIn(mode="malformed")) as url, openai_client(url) as client:
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    assert err.value.status_code == 502
    assert "malformed tool call" in err.value.message and "not an object" in err.value.message


async def test_an_upstream_silent_mid_answer_fails_over_and_a_queued_one_is_waited_for():
    stalls, answers = StandIn(mode="stall"), StandIn(mode="text")
    async with exo(stalls, answers, upstream_idle_timeout=0.5) as url, openai_client(url) as client:
        start = time.monotonic()
        stream = await client.chat.completions.create(model=MODEL, messages=ASK, stream=True, temperature=0)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "It is sunny in Paris."  # the stalled replica's two words, then the rest
        assert time.monotonic() - start < 10
        assert len(stalls.bodies) == 1 and len(answers.bodies) == 1
    # queued 1.5 s before its first byte, idle limit 0.5 s: waited for, not failed over
    queued = StandIn(mode="text", wait=1.5)
    async with exo(queued, upstream_idle_timeout=0.5) as url, openai_client(url) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=ASK)
    assert reply.choices[0].message.content == "It is sunny in Paris." and len(queued.bodies) == 1


async def test_an_answer_that_never_starts_is_bounded_by_the_first_byte_limit():
    silent = StandIn(mode="silent")
    async with exo(silent, upstream_first_byte_timeout=0.5) as url, openai_client(url) as client:
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(model=MODEL, messages=ASK)
    assert "did not start its answer within 0.5 s" in err.value.message


def test_timeouts_must_be_positive_and_fragments_assemble():
    with pytest.raises(ConfigError, match="upstream-idle-timeout"):
        UpstreamEngine({"upstream": ("http://h:1",), "upstream_idle_timeout": 0})
    from exo_upstream.engine import _CallAssembler

    calls = _CallAssembler("http://h:1")
    # a server that leaves out index: a new id starts a new call
    calls.feed([{"id": "a", "function": {"name": "f", "arguments": '{"x"'}}])
    calls.feed([{"function": {"arguments": ": 1}"}}])
    calls.feed([{"id": "b", "function": {"name": "g", "arguments": {"y": 2}}}])
    assert calls.whole() == (ToolCall("a", "f", '{"x": 1}'), ToolCall("b", "g", '{"y": 2}'))


@contextlib.contextmanager
def stand_in_thread(server: StandIn) -> Iterator[StandIn]:
    """The stand-in on its own event loop in a thread (for `exo run` processes to reach)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cm = stand_in(server)
    asyncio.run_coroutine_threadsafe(cm.__aenter__(), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(cm.__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def test_a_node_reports_how_many_servers_serve_each_model():
    async with (
        stand_in(StandIn()) as one,
        stand_in(StandIn()) as two,
        stand_in(StandIn(model="other")) as three,
        node("upstream", engine_options={"upstream": (one.url, two.url, three.url)}) as runtime,
    ):
        info = runtime.node.info()
    assert dict(info.servers) == {MODEL: 2, "other": 1}
    assert info.servers_for(MODEL) == 2 and info.servers_for("unknown") == 1


def test_a_node_fronting_two_servers_counts_as_two_queues(tmp_path):
    """Six requests at once from node b: node a fronts two servers, b one; a takes four."""
    with contextlib.ExitStack() as stack:
        a1, a2, b1 = (stack.enter_context(stand_in_thread(StandIn(mode="text", wait=2.0))) for _ in range(3))
        cluster = stack.enter_context(
            Cluster.manual(
                ["a", "b"],
                tmp=tmp_path,
                engine="upstream",
                per_node_args={
                    "a": ["--upstream", a1.url, "--upstream", a2.url],
                    "b": ["--upstream", b1.url],
                },
                env={"HF_HUB_OFFLINE": "1"},
            )
        )
        deadline = time.monotonic() + 30
        while '"servers": {"toolbot": 2}' not in json.dumps(
            cluster.get("b", "/v1/topology?model=toolbot")[1]
        ):
            assert time.monotonic() < deadline, cluster.get("b", "/v1/topology?model=toolbot")
            time.sleep(0.2)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: cluster.chat("b", ASK, model=MODEL), range(6)))
    assert all(answer == "It is sunny in Paris." for answer in answers)
    assert (len(a1.bodies), len(a2.bodies), len(b1.bodies)) == (2, 2, 2)


def test_tool_calls_cross_the_peer_link(tmp_path):
    """Node b (no upstream of its own for the model) asks node a's upstream over gRPC."""
    with (
        stand_in_thread(StandIn()) as upstream,
        Cluster.manual(
            ["a", "b"],
            tmp=tmp_path,
            per_node_args={"a": ["--engine", "upstream", "--upstream", upstream.url]},
            env={"HF_HUB_OFFLINE": "1"},
        ) as cluster,
    ):
        deadline = time.monotonic() + 30
        while MODEL not in json.dumps(cluster.get("b", "/v1/models")[1]):
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.2)
        c = openai.OpenAI(base_url=cluster.nodes["b"].url + "/v1", api_key="unused", max_retries=0)
        reply = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
        stream = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=True)
        streamed = [call for chunk in stream for call in (chunk.choices[0].delta.tool_calls or ())]
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == _expected_calls()
    assert [(c.index, c.id, c.function and c.function.name) for c in streamed] == [
        (0, "call_w1", "get_weather"),
        (1, "call_t2", "get_time"),
    ]
    assert len(upstream.bodies) == 2
