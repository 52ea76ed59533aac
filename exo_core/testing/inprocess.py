"""A node in the test's own process, and one chat request through it (no subprocess, no peers).

::

    from exo_core.testing import chat, node

    async def test_my_engine_answers():
        async with node(engine="my-engine", engine_options={"my_flag": 3}) as runtime:
            answer = await chat(runtime, [{"role": "user", "content": "Hi"}])
        assert answer.text == "..."

`node()` takes an engine's registered name, or an engine class that is not installed yet (it is
added to the node's registry, so a plugin's tests can run from its source tree). Its other
keywords are `exo run`'s settings (the fields of `exo_core.runtime.NodeConfig`:
`engine_options`, `model`, `max_context`, `step_timeout`, ...). The node has no discovery and
no peer port, and starts no API unless `api=True` (then on 127.0.0.1, a free port:
`api_url(runtime)`). `chat()` runs a request the way the API does (chat template, tokenizer,
the node's token stream, stop strings) and returns the text with its usage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from exo_core.engine import InferenceEngine
from exo_core.models.cards import ModelCard
from exo_core.node.generate import TextRequest, Usage
from exo_core.node.sampling import SamplingParams
from exo_core.plugins import registry
from exo_core.runtime import NodeConfig, Runtime

__all__ = ["Answer", "Usage", "api_url", "chat", "node"]

_node_ids = itertools.count()


@contextlib.asynccontextmanager
async def node(
    engine: str | type[InferenceEngine] | None = None,
    *,
    models: Sequence[ModelCard] = (),
    api: bool = False,
    **settings: Any,
) -> AsyncIterator[Runtime]:
    """A started single node in this process; stopped (engine closed) when the block ends.

    `models` adds model cards only this test knows. `engine=None` picks the default engine of
    this machine, as `exo run` does.
    """
    reg = registry()
    extra_engines: dict[str, type[InferenceEngine]] = {}
    if isinstance(engine, type):
        extra_engines[engine.name] = engine
        engine = engine.name
    if models or extra_engines:
        reg = dataclasses.replace(
            reg,
            engines={**reg.engines, **extra_engines},
            models={**reg.models, **{card.id: card for card in models}},
        )
    config = {
        "engine": engine,
        "discovery": "none",
        "api_host": "127.0.0.1",
        "api_port": 0,
        "frontends": None if api else (),
        "node_id": f"test-node-{next(_node_ids)}",
        **settings,
    }
    known = {f.name for f in dataclasses.fields(NodeConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise TypeError(
            f"node() got unknown settings {unknown}; the settings are: {', '.join(sorted(known))}"
        )
    async with Runtime(NodeConfig(**config), reg) as runtime:
        yield runtime


def api_url(runtime: Runtime) -> str:
    """The base URL of the node's OpenAI-compatible API (start the node with `api=True`)."""
    urls = [f.url for f in runtime.frontends if isinstance(getattr(f, "url", None), str)]
    if not urls:
        raise LookupError("the node serves no API: start it with node(..., api=True)")
    return urls[0]


@dataclasses.dataclass
class Answer:
    """What one request produced: the text, why it ended, token counts, and the streamed pieces."""

    text: str
    finish_reason: str | None
    usage: Usage
    chunks: list[str]


async def chat(
    runtime: Runtime,
    messages: list[dict[str, Any]] | None = None,
    *,
    model: str | None = None,
    prompt: str | None = None,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
    sampling: SamplingParams | None = None,
    on_chunk: Callable[[str], None] | None = None,
) -> Answer:
    """Run one request through the node (the path the API uses); greedy unless `sampling` says.

    Give `messages` (a chat) or `prompt` (a plain completion); `model` defaults to the node's
    default model.
    """
    assert runtime.generator is not None, "the runtime is not started"
    if (messages is None) == (prompt is None):
        raise ValueError("give chat() either messages or prompt")
    card = runtime.registry.models[model] if model else runtime.default_model
    request = TextRequest(
        model=card,
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        stop=stop,
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
