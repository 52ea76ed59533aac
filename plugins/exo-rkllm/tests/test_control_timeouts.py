"""A server that accepts a control call and never answers it costs that call its timeout, not the
board: the generation lock is let go, and the next request gets the same clear error."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web
from exo_rkllm.client import RKLLAMAClient, RKLLAMAUnavailable


@pytest.fixture
async def hung_server():
    """A real HTTP server on loopback whose every route accepts the request and never answers."""

    async def hang(request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hang)
    runner = web.AppRunner(app, shutdown_timeout=0.5)  # its handlers never end: do not wait 60 s for them
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_a_hung_control_call_times_out_and_does_not_hold_the_lock(hung_server):
    client = RKLLAMAClient(hung_server, control_timeout=0.3)
    try:
        for _ in range(2):  # the second request is not stuck behind the first
            started = time.monotonic()
            with pytest.raises(RKLLAMAUnavailable, match="did not answer GET /api/version within"):
                async for _ in client.generate("model", [{"role": "user", "content": "hi"}]):
                    pass
            assert time.monotonic() - started < 3
            assert not client.busy
    finally:
        await client.close()
