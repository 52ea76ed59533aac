"""The prefix cache across requests: the origin's index, and two nodes over real gRPC that reuse a
chat's earlier turns on both stages."""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import openai
import pytest
from core_helpers import api_node_config

from exo_core.api.testing import BackgroundNode, request
from exo_core.engines.dummy import DUMMY_ANSWER
from exo_core.models.shard import Shard
from exo_core.models.tokenizer import load_tokenizer
from exo_core.node.generate import TextRequest, Usage
from exo_core.node.partitioning import PlanStage
from exo_core.node.prefix_cache import PrefixIndex, common_prefix
from exo_core.plugins import registry
from exo_core.runtime import NodeConfig, Runtime
from exo_core.testing import engine_checks
from exo_core.testing.cluster import NodeSpec, free_ports, write_peers_file

pytestmark = pytest.mark.timeout(60)

PLAN = (PlanStage("a", Shard("m", 0, 14, 30)), PlanStage("b", Shard("m", 15, 29, 30)))
OTHER = (PlanStage("a", Shard("m", 0, 29, 30)),)


def test_index_finds_the_longest_shared_prefix_on_the_same_plan():
    index = PrefixIndex(min_reuse=4)
    index.add("r1#0", PLAN, list(range(10)))
    index.add("r2#0", PLAN, [*range(6), 99, 98])
    index.add("r3#0", OTHER, list(range(20)))
    prompt = np.arange(30)
    assert index.find(PLAN, prompt) == ("r1#0", 10)
    assert index.find(OTHER, prompt) == ("r3#0", 20)
    assert index.find(PLAN, np.arange(10)) == ("r1#0", 9)  # one position is left to compute
    assert index.find(PLAN, np.asarray([7, 7, 7, 7, 7])) == ("", 0)
    assert index.find(PLAN, np.arange(3)) == ("", 0)  # shorter than min_reuse
    assert common_prefix(np.arange(5), np.asarray([0, 1, 9])) == 2


def test_index_is_bounded_and_a_refused_plan_is_forgotten():
    index = PrefixIndex(max_entries=2, min_reuse=1)
    for i in range(3):
        index.add(f"r{i}#0", PLAN, [i, 1, 2, 3])
    assert len(index) == 2 and index.find(PLAN, np.asarray([0, 1, 2, 3, 4])) == ("", 0)  # r0 went
    index.refused(PLAN)
    assert len(index) == 0
    index.add("r9#0", PLAN, [1, 2, 3])
    assert len(index) == 0  # not indexed for a while after a stage lacked a prefix
    index.add("r9#0", OTHER, [1, 2, 3])
    assert len(index) == 1


@contextlib.asynccontextmanager
async def two_nodes(tmp_path):
    ports = free_ports(2)
    specs = [NodeSpec(nid, port, 0) for nid, port in zip(["a", "b"], ports, strict=True)]
    path = write_peers_file(tmp_path / "peers.json", specs)
    started: list[Runtime] = []
    try:
        for spec in specs:
            rt = Runtime(
                NodeConfig(
                    engine="dummy",
                    node_id=spec.node_id,
                    node_host="127.0.0.1",
                    node_port=spec.node_port,
                    discovery="manual",
                    discovery_config_path=str(path),
                    frontends=(),
                    cluster_secret="prefix",
                )
            )
            await rt.start()
            started.append(rt)
        a, b = started
        deadline = time.monotonic() + 10
        while set(a.node.peers) != {"b"} or set(b.node.peers) != {"a"}:
            assert time.monotonic() < deadline, "the nodes did not find each other"
            await asyncio.sleep(0.05)
        yield a, b
    finally:
        for rt in started:
            await rt.stop()


async def turn(rt: Runtime, messages: list[dict], **fields) -> tuple[str, Usage]:
    usage = Usage()
    prepared = rt.generator.prepare(TextRequest(model=rt.default_model, messages=messages, **fields))
    text = "".join([c.text async for c in rt.generator.stream(prepared, usage)])
    return text, usage


def live(rt: Runtime) -> list[str]:
    """Caches the engine holds that are not kept for reuse."""
    return [k for k in rt.node.engine.caches if k not in rt.node.stage.kept]


async def test_a_chat_reuses_its_earlier_turns_on_every_stage(tmp_path):
    async with two_nodes(tmp_path) as (a, b):
        assert [s.node_id for s in a.node.make_plan(a.default_model)] == ["a", "b"]
        messages = [{"role": "user", "content": "Tell me about the weather in Paris today."}]
        text, usage = await turn(a, messages)
        assert text == DUMMY_ANSWER and usage.cached_tokens == 0
        await asyncio.sleep(0.2)  # b's release travels in the background
        assert len(a.node.stage.kept) == 1 and len(b.node.stage.kept) == 1
        copies = b.node.engine.cached_requests()
        for question in ["And tomorrow?", "And the day after?"]:
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": question}]
            text, usage = await turn(a, messages)
            assert text == DUMMY_ANSWER
            # The earlier turns came from the cache: only the new turn was prefilled.
            assert usage.cached_tokens > usage.prompt_tokens - 30, (usage.cached_tokens, usage.prompt_tokens)
        await asyncio.sleep(0.2)
        assert b.node.engine.cached_requests() == copies + 2  # each turn started from a kept cache
        assert a.node.origin.replans_total == 0
        assert not live(a) and not live(b)


async def test_a_stage_that_evicted_the_prefix_reruns_from_scratch(tmp_path):
    async with two_nodes(tmp_path) as (a, b):
        messages = [{"role": "user", "content": "Tell me about the weather in Paris today."}]
        text, _ = await turn(a, messages)
        await asyncio.sleep(0.2)
        await b.node.stage.kept.clear()  # b evicts everything
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "And tomorrow?"}]
        text, usage = await turn(a, messages)
        assert text == DUMMY_ANSWER
        assert usage.cached_tokens == 0
        assert a.node.origin.replans_total == 0  # not a stage failure: the same nodes ran it again


async def test_cancelled_requests_are_freed_not_kept(tmp_path):
    async with two_nodes(tmp_path) as (a, b):
        prepared = a.generator.prepare(
            TextRequest(model=a.default_model, messages=[{"role": "user", "content": "Hi"}])
        )
        stream = a.generator.stream(prepared)
        await anext(stream)
        await stream.aclose()  # the client went away
        deadline = time.monotonic() + 5
        while live(a) or live(b):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert len(a.node.stage.kept) == 0 and len(b.node.stage.kept) == 0


@pytest.mark.parametrize("engine_name", ["dummy", "tinygrad"])
async def test_engines_copy_prefixes_exactly(engine_name):
    reg = registry()
    if engine_name not in reg.engines or not reg.engines[engine_name].available()[0]:
        pytest.skip(f"{engine_name} is not installed")
    engine = reg.engines[engine_name]({})
    card = reg.models["smollm2-135m"]
    prompt = load_tokenizer(card).encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    try:
        await engine_checks.check_copy_prefix(engine, card, prompt, rtol=1e-5, atol=1e-5)
    finally:
        await engine.close()


def test_usage_and_metrics_count_cached_tokens():
    config = api_node_config("pc")
    with BackgroundNode(config) as server, openai.OpenAI(base_url=f"{server.url}/v1", api_key="x") as client:
        messages = [{"role": "user", "content": "Tell me about the weather in Paris today."}]
        first = client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        messages += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And tomorrow?"},
        ]
        stream = client.chat.completions.create(
            model="smollm2-135m", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        usage = [chunk.usage for chunk in stream if chunk.usage][-1]
        assert usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
        metrics = request("GET", f"{server.url}/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith("exo_cached_prompt_tokens_total"))
        assert float(line.split()[-1]) == usage.prompt_tokens_details.cached_tokens
