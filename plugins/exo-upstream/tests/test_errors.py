"""Upstream errors reach the client as OpenAI errors: a 500 page, a body that is not an event
stream, a stream of garbage, a refusal that keeps its 4xx (small aiohttp servers playing a broken
upstream), and the settings the engine reads."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import openai
import pytest
from aiohttp import web
from exo_upstream.engine import UpstreamEngine, api_key_for, context_of, parse_upstreams

from exo_core import ConfigError, SamplingParams, TextGeneration
from exo_core.testing import api_url, model_card, node

MODELS = {"object": "list", "data": [{"id": "smollm2-135m", "object": "model", "max_model_len": 2048}]}


@contextlib.asynccontextmanager
async def broken_upstream(kind: str) -> AsyncIterator[str]:
    async def models(_: web.Request) -> web.Response:
        return web.json_response(MODELS)

    async def chat(request: web.Request) -> web.StreamResponse:
        if kind == "500":
            return web.Response(status=500, text="<html><h1>Internal Server Error</h1></html>")
        if kind == "400":
            return web.json_response(
                {"error": {"message": "max_tokens is too large", "type": "x"}}, status=400
            )
        if kind == "json":
            return web.json_response({"choices": []})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n')
        await response.write(b"data: {not json at all\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("kind", "status", "message"),
    [
        ("500", 502, "Internal Server Error"),
        ("400", 400, "max_tokens is too large"),
        ("json", 502, "not an event stream"),
        ("garbage", 502, "not JSON"),
    ],
)
async def test_an_upstream_failure_is_an_openai_error(kind, status, message):
    async with (
        broken_upstream(kind) as url,
        node("upstream", api=True, engine_options={"upstream": (url,)}) as runtime,
    ):
        client = openai.AsyncOpenAI(base_url=api_url(runtime) + "/v1", api_key="unused", max_retries=0)
        async with client:
            with pytest.raises(openai.APIError) as err:
                await client.chat.completions.create(
                    model="smollm2-135m", messages=[{"role": "user", "content": "hi"}]
                )
    if kind == "garbage":  # after some text: an SSE error event, not a status
        assert message in str(err.value.message)
    else:
        assert isinstance(err.value, openai.APIStatusError) and err.value.status_code == status
        assert message in err.value.message and url in err.value.message


def test_upstream_settings_parse_and_reject_nonsense():
    env = {"EXO_UPSTREAM_API_KEY": "all", "EXO_UPSTREAM_API_KEY_GPU_BOX_8000": "mine"}
    ups = parse_upstreams(["gpu-box:8000/v1=llama-70b", "https://api.example.com"], env)
    assert [(u.url, u.model, u.api_key) for u in ups] == [
        ("http://gpu-box:8000", "llama-70b", "mine"),
        ("https://api.example.com", None, "all"),
    ]
    assert api_key_for("http://x:1", {}) is None
    with pytest.raises(ConfigError, match="URL=MODEL"):
        parse_upstreams(["http://x="])
    assert context_of({"id": "m", "max_model_len": 4096}) == 4096
    assert context_of({"id": "m", "meta": {"n_ctx_train": 8192}}) == 8192
    assert context_of({"id": "m"}) is None


def test_every_field_the_upstream_takes_is_forwarded():
    engine = UpstreamEngine({"upstream": ("http://h:1",)})
    request = TextGeneration(
        "r",
        model_card("smollm2-135m"),
        messages=[{"role": "user", "content": "hi"}],
        sampling=SamplingParams(temperature=0.5, top_p=0.9, top_k=40, seed=7, presence_penalty=0.1),
        max_tokens=32,
        stop=("\n\n",),
        extra={
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "response_format": {"type": "json_object"},
        },
    )
    path, body = engine.request_body(request, "upstream-id")
    assert path == "/v1/chat/completions"
    assert body == {
        "model": "upstream-id",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 7,
        "presence_penalty": 0.1,
        "max_tokens": 32,
        "stop": ["\n\n"],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "response_format": {"type": "json_object"},
    }
