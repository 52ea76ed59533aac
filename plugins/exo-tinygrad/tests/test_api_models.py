"""`/v1/models` tells the truth about a tinygrad node: `loaded` once the engine holds the weights."""

from __future__ import annotations

import asyncio
import json
import urllib.request

from exo_core.testing import api_url, chat, node


def _models(url: str) -> dict[str, dict]:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as reply:
        return {m["id"]: m for m in json.loads(reply.read())["data"]}


async def test_v1_models_reports_loaded_once_the_tinygrad_engine_holds_the_model():
    async with node(engine="tinygrad", api=True, max_context=256) as runtime:
        url = api_url(runtime)
        before = await asyncio.to_thread(_models, url)
        assert before["smollm2-135m"]["loaded"] is False
        assert before["smollm2-135m"]["downloaded"] is True
        answer = await chat(runtime, [{"role": "user", "content": "Hi"}], max_tokens=2)
        assert answer.usage.completion_tokens == 2
        after = await asyncio.to_thread(_models, url)
        assert after["smollm2-135m"]["loaded"] is True
        assert runtime.node.engine.loaded_shards  # what the API read
