"""Through exo's OpenAI-compatible API with the official `openai` client, against the stand-in."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator

import openai
import pytest
from exo_rkllm.fake_server import FakeRKLLAMA, Fault, fake_answer
from rkllm_helpers import CONVERSATION, FAST

from exo_core.testing import api_url, node


@contextlib.asynccontextmanager
async def api_for(url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with node("rkllm", api=True, engine_options={"rkllm_server": url}) as runtime:
        client = openai.AsyncOpenAI(base_url=api_url(runtime) + "/v1", api_key="unused", max_retries=0)
        async with client:
            yield client


async def stream_chat(client: openai.AsyncOpenAI, messages, received: list[str] | None = None, **kw) -> str:
    received = [] if received is None else received
    stream = await client.chat.completions.create(model="smollm2-135m", messages=messages, stream=True, **kw)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received.append(chunk.choices[0].delta.content)
    return "".join(received)


async def test_streamed_chat_through_the_api(server):
    async with api_for(server.url) as client:
        text = await stream_chat(client, CONVERSATION)
        models = {m.id for m in (await client.models.list()).data}
    (request,) = server.generation_requests()
    sent = request.body["messages"]
    assert text.encode() == fake_answer(sent).encode()
    if server.config.dialect == "fork":
        assert sent[0] == {
            "role": "user",
            "content": "You answer in one sentence.\n\n" + CONVERSATION[1]["content"],
        }
    else:
        assert sent == CONVERSATION
    assert {"smollm2-135m", "qwen-2.5-1.5b", "tinyllama-1.1b"} <= models


async def test_whole_chat_through_the_api_with_usage(server):
    async with api_for(server.url) as client:
        reply = await client.chat.completions.create(model="smollm2-135m", messages=CONVERSATION[1:2])
    assert reply.choices[0].message.content == fake_answer(CONVERSATION[1:2])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 10 and reply.usage.prompt_tokens > 5


async def test_first_token_through_the_api_comes_with_the_servers_first_fragment(dialect):
    async with (
        FakeRKLLAMA(dialect=dialect, tokens_per_second=40, first_token_ms=150) as server,
        api_for(server.url) as client,
    ):
        await stream_chat(client, [{"role": "user", "content": "warm up"}], max_tokens=2)
        started = time.perf_counter()
        stream = await client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        first = None
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
        whole = time.perf_counter() - started
    assert first is not None and 0.15 <= first < 0.4 and first < whole / 3


MID_STREAM = [
    ("fork", Fault("cut", after=4), "cut the answer short"),
    ("fork", Fault("garbage", after=4), "not JSON"),
    ("upstream", Fault("cut_mid", after=4), "cut the answer short"),
    ("upstream", Fault("abort", after=4), "aborted the generation"),
]


@pytest.mark.parametrize(
    ("dialect", "fault", "message"), MID_STREAM, ids=[f"{d}-{f.kind}" for d, f, _ in MID_STREAM]
)
async def test_a_failure_mid_stream_is_an_sse_error_event(dialect, fault, message):
    async with (
        FakeRKLLAMA(dialect=dialect, abort_timeout_s=0.2, **FAST) as server,
        api_for(server.url) as client,
    ):
        server.faults.append(fault)
        received: list[str] = []
        with pytest.raises(openai.APIError) as err:
            await stream_chat(client, [{"role": "user", "content": "hi"}], received)
    assert message in str(err.value.message)
    assert err.value.body["type"] == "server_error"
    text = "".join(received)
    assert text and fake_answer([{"role": "user", "content": "hi"}]).startswith(text)


BEFORE_FIRST_TOKEN = [
    ("fork", Fault("http500"), "500 Internal Server Error"),
    ("fork", Fault("load_failure"), "loading model 'SmolLM2-135M-Instruct' failed"),
    ("upstream", Fault("http4xx", status=400, message="model busy (injected)"), "model busy (injected)"),
    ("upstream", Fault("abort_text"), "Aborted inference by Timeout"),
]


@pytest.mark.parametrize(
    ("dialect", "fault", "message"),
    BEFORE_FIRST_TOKEN,
    ids=[f"{d}-{f.kind}" for d, f, _ in BEFORE_FIRST_TOKEN],
)
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_a_failure_before_any_token_is_an_http_error(dialect, fault, message, stream):
    async with (
        FakeRKLLAMA(dialect=dialect, abort_timeout_s=0.1, **FAST) as server,
        api_for(server.url) as client,
    ):
        server.faults.append(fault)
        with pytest.raises(openai.APIStatusError) as err:
            if stream:
                await stream_chat(client, [{"role": "user", "content": "hi"}])
            else:
                await client.chat.completions.create(
                    model="smollm2-135m", messages=[{"role": "user", "content": "hi"}]
                )
    assert err.value.status_code == 500
    assert message in err.value.message and server.url in err.value.message


async def test_a_server_that_is_down_is_an_http_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with api_for(url) as client:
        with pytest.raises(openai.InternalServerError, match="cannot reach the RKLLAMA server"):
            await client.chat.completions.create(
                model="smollm2-135m", messages=[{"role": "user", "content": "hi"}]
            )
