"""--max-concurrent-requests: that many generations run, as many more wait, the rest get a 503
with Retry-After at once (a real node with its HTTP API on loopback, dummy engine)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from exo_core.engines.dummy import DUMMY_ANSWER, DummyEngine
from exo_core.errors import EngineError
from exo_core.testing import node
from exo_core.testing.inprocess import api_url

pytestmark = pytest.mark.timeout(60)

BODY = {
    "model": "smollm2-135m",
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 6,
    "temperature": 0,
}


async def test_over_the_limit_waits_then_the_line_is_refused_with_retry_after():
    async with node(
        "dummy", api=True, max_concurrent_requests=1, engine_options={"dummy_delay_ms": 100}
    ) as runtime:
        url = api_url(runtime) + "/v1/chat/completions"
        async with aiohttp.ClientSession() as http:

            async def post() -> tuple[int, dict, dict]:
                async with http.post(url, json=BODY) as resp:
                    return resp.status, dict(resp.headers), json.loads(await resp.read())

            running = asyncio.create_task(post())  # runs
            await asyncio.sleep(0.2)
            waiting = asyncio.create_task(post())  # waits its turn
            await asyncio.sleep(0.2)
            status, headers, body = await post()  # the line (1) is full
            assert status == 503, body
            assert headers["Retry-After"] == "1"
            assert body["error"]["code"] == "too_many_requests"
            assert "--max-concurrent-requests" in body["error"]["message"]
            for task in (running, waiting):
                status, _, body = await task
                assert status == 200, body
                assert DUMMY_ANSWER.startswith(body["choices"][0]["message"]["content"])


class _FullEngine(DummyEngine):
    """The dummy engine on a node whose memory is full: it refuses new caches as real engines do."""

    name = "full"

    def check_step(self, shard, item):
        super().check_step(shard, item)
        raise EngineError(f"request {item.request_id}: not enough free memory for a KV cache of 9 positions")


async def test_a_cache_refused_for_memory_is_a_503_the_client_may_retry():
    async with node(_FullEngine, api=True) as runtime:
        url = api_url(runtime) + "/v1/chat/completions"
        async with aiohttp.ClientSession() as http, http.post(url, json=BODY) as resp:
            body = await resp.json()
        assert resp.status == 503, body
        assert body["error"]["code"] == "insufficient_memory"
        assert "not enough free memory" in body["error"]["message"]
