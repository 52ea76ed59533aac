"""Cluster behaviour with several nodes in one process over real gRPC on 127.0.0.1: the peers file
is re-read, discovery drops re-plan in-flight requests, a lost cluster fails fast, a shared token joins."""

import time

import pytest
from core_helpers import manual_runtimes as runtimes
from core_helpers import until

from exo_core.engines.dummy import DUMMY_ANSWER
from exo_core.networking.manual import PeersFileError, parse_peers_file
from exo_core.node.generate import TextRequest
from exo_core.node.messages import GenerationError
from exo_core.runtime import ConfigError, NodeConfig, Runtime
from exo_core.testing.cluster import write_peers_file

CHAT = [{"role": "user", "content": "Say hello."}]

pytestmark = pytest.mark.timeout(60)


async def chat(rt, max_tokens=None):
    prepared = rt.generator.prepare(TextRequest(model=rt.default_model, messages=CHAT, max_tokens=max_tokens))
    return "".join([c.text async for c in rt.generator.stream(prepared)])


async def test_peers_file_is_re_read_when_it_changes(tmp_path):
    async with runtimes(tmp_path, ["a", "b", "c"], listed=["a", "b"]) as (rts, specs, path):
        await until(lambda: set(rts["a"].node.peers) == {"b"})
        assert set(rts["c"].node.peers) == {"a", "b"}  # c's own file lists a and b
        write_peers_file(path, [specs["a"], specs["b"], specs["c"]])
        await until(lambda: set(rts["a"].node.peers) == {"b", "c"})
        assert [s.node_id for s in rts["a"].node.make_plan(rts["a"].default_model)] == ["a", "b", "c"]
        write_peers_file(path, [specs["a"], specs["c"]])
        await until(lambda: set(rts["a"].node.peers) == {"c"})
        assert await chat(rts["a"]) == DUMMY_ANSWER


async def test_discovery_drop_mid_generation_replans_and_completes(tmp_path):
    async with runtimes(tmp_path, ["a", "b"], delay_ms=150) as (rts, specs, path):
        await until(lambda: set(rts["a"].node.peers) == {"b"})
        a = rts["a"]
        prepared = a.generator.prepare(TextRequest(model=a.default_model, messages=CHAT))
        pieces = []
        async for chunk in a.generator.stream(prepared):
            pieces.append(chunk.text)
            if len(pieces) == 2:
                write_peers_file(path, [specs["a"]])  # b leaves the file: dropped, request re-planned
        assert "".join(pieces) == DUMMY_ANSWER
        assert set(a.node.peers) == set()
        await until(lambda: not rts["b"].node.active_stage_requests())  # the replay released b


async def test_no_plan_left_is_a_clear_error_within_seconds(tmp_path):
    async with runtimes(tmp_path, ["a", "b"], delay_ms=30) as (rts, _specs, _path):
        a = rts["a"]
        a.node.set_served_models(["some-other-model"])  # a cannot run it itself
        await until(lambda: set(a.node.peers) == {"b"})
        prepared = a.generator.prepare(TextRequest(model=a.default_model, messages=CHAT))
        started = None
        with pytest.raises(GenerationError, match="no node in the cluster can serve smollm2-135m"):
            async for _ in a.generator.stream(prepared):
                if started is None:
                    started = time.monotonic()
                    await rts["b"].stop()  # b goes away mid-generation
        assert time.monotonic() - started < 5


async def test_step_timeout_replays_when_a_stage_never_answers(tmp_path):
    async with runtimes(tmp_path, ["a", "b"]) as (rts, _specs, _path):
        a, b = rts["a"], rts["b"]
        await until(lambda: set(a.node.peers) == {"b"})
        a.node.origin.step_timeout = 0.5
        a.node.origin.max_replans = 2

        async def swallow(msg):  # b accepts steps but never computes them
            return None

        b.node.receive_step = swallow
        started = time.monotonic()
        with pytest.raises(GenerationError, match="no progress"):
            await chat(a)
        assert time.monotonic() - started < 5  # max_replans x step_timeout, not forever
        assert a.node.origin.replans_total == 3  # the third failure is one re-plan too many


async def test_same_secret_joins_and_caches_are_released(tmp_path):
    async with runtimes(tmp_path, ["a", "b"], cluster_secret="s3cret") as (rts, _specs, _path):
        await until(lambda: set(rts["a"].node.peers) == {"b"} and set(rts["b"].node.peers) == {"a"})
        assert await chat(rts["b"]) == DUMMY_ANSWER
        # released: what stays is only kept for prefix reuse (the request finished)
        await until(
            lambda: all(k in rt.node.stage.kept for rt in rts.values() for k in rt.node.engine.caches)
        )


def test_peers_file_errors_say_what_to_fix():
    ok = parse_peers_file('{"peers": {"a": {"address": "10.0.0.1", "port": 5000}}}')
    assert ok["a"].port == 5000 and ok["a"].capabilities is None
    for text, match in [
        ("{", "not valid JSON"),
        ('{"nodes": {}}', '"peers" object'),
        ('{"peers": {"a": {"port": 5000}}}', "address"),
        ('{"peers": {"a": {"address": "h", "port": "x"}}}', "port"),
        ('{"peers": {"a": {"address": "h", "port": 70000}}}', "port"),
        ('{"peers": {"a": {"address": "h", "port": 1, "device_capabilities": 3}}}', "device_capabilities"),
    ]:
        with pytest.raises(PeersFileError, match=match):
            parse_peers_file(text)


async def test_manual_discovery_without_a_file_is_a_config_error(tmp_path):
    rt = Runtime(
        NodeConfig(
            engine="dummy",
            node_id="a",
            node_host="127.0.0.1",
            discovery="manual",
            discovery_config_path=str(tmp_path / "missing.json"),
            frontends=(),
        )
    )
    with pytest.raises(ConfigError, match="does not exist"):
        await rt.start()
    await rt.stop()
