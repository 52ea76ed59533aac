"""Helpers for tests that run exo nodes bridged to an RKLLAMA server (used by this plugin's tests)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

from exo_core.models.cards import ModelCard
from exo_core.node.generate import TextRequest, Usage
from exo_core.node.sampling import SamplingParams
from exo_core.plugins import Registry, registry
from exo_core.runtime import NodeConfig, Runtime

# Fast enough that the suite stays short, slow enough that streaming is visible.
FAST = {"tokens_per_second": 500.0, "first_token_ms": 20.0}

CONVERSATION = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "Bonjour ! Qu'est-ce qu'un NPU ?"},
    {"role": "assistant", "content": "Un processeur pour réseaux de neurones."},
    {"role": "user", "content": "Et le RK3588, 日本語で?"},
]

_node_ids = itertools.count()


def registry_with(*cards: ModelCard) -> Registry:
    """The installed plugins' registry plus extra model cards (for models only a test has)."""
    base = registry()
    return dataclasses.replace(base, models={**base.models, **{c.id: c for c in cards}})


@contextlib.asynccontextmanager
async def rkllm_runtime(
    url: str, reg: Registry | None = None, *, step_timeout: float = 120.0, **options: Any
) -> AsyncIterator[Runtime]:
    """A single exo node whose rkllm engine talks to `url` (no API frontend, no discovery)."""
    config = NodeConfig(
        step_timeout=step_timeout,
        engine="rkllm",
        engine_options={"rkllm_server": url, **options},
        discovery="none",
        api_host="127.0.0.1",
        api_port=0,
        frontends=(),
        node_id=f"rkllm-test-{next(_node_ids)}",
    )
    async with Runtime(config, reg) as runtime:
        yield runtime


@dataclasses.dataclass
class Answer:
    text: str
    finish_reason: str | None
    usage: Usage
    chunks: list[str]


async def chat(
    runtime: Runtime,
    messages: list[dict[str, Any]] | None = None,
    *,
    model: str = "smollm2-135m",
    prompt: str | None = None,
    max_tokens: int | None = None,
    sampling: SamplingParams | None = None,
    on_chunk: Callable[[str], None] | None = None,
) -> Answer:
    """Run one request through the node's Generator (the path the API uses)."""
    assert runtime.generator is not None
    request = TextRequest(
        model=runtime.registry.models[model],
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        sampling=sampling or SamplingParams(),
    )
    prepared = runtime.generator.prepare(request)
    usage = Usage()
    chunks: list[str] = []
    finish = None
    async for chunk in runtime.generator.stream(prepared, usage):
        chunks.append(chunk.text)
        if on_chunk is not None:
            on_chunk(chunk.text)
        finish = chunk.finish_reason
    return Answer("".join(chunks), finish, usage, chunks)
