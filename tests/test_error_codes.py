"""Failures the cluster acts on travel as codes beside their message: the origin answers 503 to a
cache refused for memory, and reruns a request whose stage lost its prefix, by the code alone
(whatever the message says). Real nodes in this process, real gRPC on 127.0.0.1, dummy engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import aiohttp
import pytest

from exo_core.engines.dummy import DummyEngine
from exo_core.errors import EngineError, ErrorCode
from exo_core.networking import wire
from exo_core.node.messages import StageFailure, TokenMessage
from exo_core.plugins import registry
from exo_core.runtime import NodeConfig, Runtime
from exo_core.testing import node
from exo_core.testing.cluster import NodeSpec, free_ports, write_peers_file
from exo_core.testing.inprocess import api_url

pytestmark = pytest.mark.timeout(60)

BODY = {
    "model": "smollm2-135m",
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 6,
    "temperature": 0,
}
# Says nothing the origin could recognise: only the code tells it this is a memory refusal.
PLAIN = "the accelerator said no (E_ALLOC 0x2)"


def test_engine_error_keeps_its_one_argument_form_and_takes_a_code():
    plain = EngineError("bad file")
    assert str(plain) == "bad file" and plain.code is None
    coded = EngineError(PLAIN, code="out_of_memory")
    assert str(coded) == PLAIN and coded.code is ErrorCode.OUT_OF_MEMORY
    assert EngineError("x", code=ErrorCode.POSITION_MISMATCH).code == "position_mismatch"
    assert EngineError("x", code="a_plugin_code").code == "a_plugin_code"  # unknown codes pass through


def test_codes_cross_the_wire():
    token = TokenMessage("r", 2, 5, error=PLAIN, code=ErrorCode.OUT_OF_MEMORY)
    assert wire.token_from_pb(wire.token_to_pb(token)) == token
    failure = StageFailure("r", 1, "b", "lost it", ErrorCode.POSITION_MISMATCH)
    assert wire.failure_from_pb(wire.failure_to_pb(failure)) == failure
    assert wire.failure_from_pb(wire.failure_to_pb(StageFailure("r", 1, "b", "gone"))).code is None


class _CodedFullEngine(DummyEngine):
    """Refuses every cache for memory with a message that does not say so; the code does."""

    name = "coded-full"

    def check_step(self, shard, item):
        super().check_step(shard, item)
        raise EngineError(PLAIN, code=ErrorCode.OUT_OF_MEMORY)


class _OtherFailureEngine(DummyEngine):
    """Fails every step with no code: the origin answers 500."""

    name = "other-failure"

    def check_step(self, shard, item):
        super().check_step(shard, item)
        raise EngineError(PLAIN)


async def _post(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(url + "/v1/chat/completions", json=BODY) as resp:
        return resp.status, await resp.json()


async def test_the_code_not_the_text_makes_a_memory_refusal_a_503():
    async with node(_CodedFullEngine, api=True) as runtime:
        status, body = await _post(api_url(runtime))
    assert status == 503, body
    assert body["error"]["code"] == "insufficient_memory"
    assert PLAIN in body["error"]["message"]


async def test_an_engine_error_without_a_code_is_a_500():
    async with node(_OtherFailureEngine, api=True) as runtime:
        status, body = await _post(api_url(runtime))
    assert status == 500, body
    assert PLAIN in body["error"]["message"]


async def test_a_remote_stage_s_memory_refusal_crosses_the_network_as_a_code(tmp_path):
    """Node b (the last stage) refuses for memory; a, the origin, hears it over gRPC: 503."""
    reg = registry()
    reg = dataclasses.replace(reg, engines={**reg.engines, _CodedFullEngine.name: _CodedFullEngine})
    ports = free_ports(2)
    specs = [NodeSpec(nid, port, 0) for nid, port in zip("ab", ports, strict=True)]
    path = write_peers_file(tmp_path / "peers.json", specs)
    started: list[Runtime] = []
    try:
        for spec, engine in zip(specs, ["dummy", _CodedFullEngine.name], strict=True):
            rt = Runtime(
                NodeConfig(
                    engine=engine,
                    node_id=spec.node_id,
                    node_host="127.0.0.1",
                    node_port=spec.node_port,
                    discovery="manual",
                    discovery_config_path=str(path),
                    api_host="127.0.0.1",
                    api_port=0,
                    frontends=None if spec.node_id == "a" else (),
                    cluster_secret="codes",
                ),
                reg,
            )
            await rt.start()
            started.append(rt)
        a, b = started
        deadline = time.monotonic() + 10
        while set(a.node.peers) != {"b"} or set(b.node.peers) != {"a"}:
            assert time.monotonic() < deadline, "the nodes did not find each other"
            await asyncio.sleep(0.05)
        assert [s.node_id for s in a.node.make_plan(a.default_model)] == ["a", "b"]
        status, body = await _post(api_url(a))
        assert status == 503, body
        assert body["error"]["code"] == "insufficient_memory"
        assert PLAIN in body["error"]["message"]
        assert a.node.origin.replans_total == 0  # an answer from a live stage, not a lost one
    finally:
        for rt in started:
            await rt.stop()
