"""Whole-request replicas (exo_core/node/replicas.py): shortest expected time, health, and a
stream cut mid-answer continued on another replica with no gap and no repeat.

The engine here is a small real TextEngine whose "servers" are asyncio streams with their own
speeds; the node, its replica set and the origin are exo's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import pytest

from exo_core import (
    EngineError,
    GenerationError,
    ModelCard,
    ReplicaUnavailable,
    TextDelta,
    TextEngine,
    TextGeneration,
)
from exo_core.node.replicas import Balancer, ReplaySkip
from exo_core.testing import chat, node

ANSWER = "Une réponse déterministe, 日本語 et 🚀, mot après mot."
CARD = ModelCard("replica-test", "Replica test model", 4, {"replica-test": "x"}, context_length=512)


class Servers(TextEngine):
    """Two 'servers' answering ANSWER a few characters at a time; either can be told to fail."""

    name = "replica-test"
    source_kinds = ("replica-test",)

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.delay = {"fast": 0.002, "slow": 0.02}
        self.cut_after: dict[str, int] = {}  # replica -> pieces before it drops the stream
        self.down: set[str] = set()
        self.answers: dict[str, str] = {}
        self.served: dict[str, int] = {"fast": 0, "slow": 0}

    def replicas(self, model: ModelCard | None = None) -> Sequence[str]:
        return ("fast", "slow")

    async def check_replica(self, replica: str) -> None:
        if replica in self.down:
            raise ReplicaUnavailable(f"{replica} is down")

    async def generate(self, request: TextGeneration, replica: str) -> AsyncGenerator[TextDelta]:
        if replica in self.down:
            raise ReplicaUnavailable(f"{replica} is down")
        self.served[replica] += 1
        text = self.answers.get(replica, ANSWER)
        pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
        for n, piece in enumerate(pieces):
            if self.cut_after.get(replica) == n:
                self.down.add(replica)
                raise ReplicaUnavailable(f"{replica} cut the answer short")
            await asyncio.sleep(self.delay[replica])
            yield TextDelta(piece)
        yield TextDelta("", "stop", 7, len(pieces))


async def test_a_stream_cut_mid_answer_goes_on_on_the_other_replica_without_a_gap():
    async with node(Servers, models=[CARD], model=CARD.id) as runtime:
        engine = runtime.node.engine
        engine.delay = {"fast": 0.002, "slow": 0.002}
        engine.cut_after["fast"] = 5
        chunks: list[str] = []
        answer = await chat(runtime, [{"role": "user", "content": "hi"}], on_chunk=chunks.append)
        assert answer.text == ANSWER and answer.finish_reason == "stop"
        assert engine.served == {"fast": 1, "slow": 1}
        assert runtime.node.replicas.balancer.of("fast").down_reason == "fast cut the answer short"
        # Back up: a health check returns it to the rotation.
        engine.down.clear()
        assert await runtime.node.replicas.check("fast")
        assert runtime.node.replicas.balancer.of("fast").up


async def test_usage_is_the_servers_and_stop_strings_cut_the_text():
    async with node(Servers, models=[CARD], model=CARD.id) as runtime:
        answer = await chat(runtime, [{"role": "user", "content": "hi"}])
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (7, -(-len(ANSWER) // 3))
        cut = await chat(runtime, [{"role": "user", "content": "hi"}], stop=["日本"])
        assert cut.text == ANSWER[: ANSWER.index("日本")] and cut.finish_reason == "stop"


async def test_a_replica_that_answers_differently_on_replay_is_an_error():
    async with node(Servers, models=[CARD], model=CARD.id) as runtime:
        engine = runtime.node.engine
        engine.cut_after["fast"] = 4
        engine.answers["slow"] = "Something else entirely."
        with pytest.raises(GenerationError, match="answered differently"):
            await chat(runtime, [{"role": "user", "content": "hi"}])


async def test_every_replica_down_is_a_clear_error():
    async with node(Servers, models=[CARD], model=CARD.id) as runtime:
        runtime.node.engine.down.update({"fast", "slow"})
        with pytest.raises(GenerationError) as err:
            await chat(runtime, [{"role": "user", "content": "hi"}])
    assert "fast is down" in str(err.value) and "slow is down" in str(err.value)


async def test_the_faster_replica_takes_more_of_a_steady_load():
    async with node(Servers, models=[CARD], model=CARD.id) as runtime:
        engine = runtime.node.engine
        for _ in range(2):  # measure both
            await asyncio.gather(*(chat(runtime, [{"role": "user", "content": "x"}]) for _ in range(2)))
        before = dict(engine.served)
        await asyncio.gather(*(chat(runtime, [{"role": "user", "content": str(i)}]) for i in range(12)))
        fast, slow = engine.served["fast"] - before["fast"], engine.served["slow"] - before["slow"]
    assert fast + slow == 12 and fast >= 2 * slow, (fast, slow)


def test_expected_time_is_queue_depth_times_measured_speed():
    balancer = Balancer()
    fast, slow = balancer.of("fast"), balancer.of("slow")
    fast.decode_tps, slow.decode_tps = 40.0, 10.0
    fast.first_s = slow.first_s = 0.1
    assert balancer.pick(["slow", "fast"]) == "fast"
    fast.inflight = 3  # 4 x (0.1 + 128/40) = 13.2 s against 1 x (0.1 + 128/10) = 12.9 s
    assert balancer.pick(["slow", "fast"]) == "slow"
    assert balancer.pick(["slow", "fast"], {"slow": 5, "fast": 0}.__getitem__) == "fast"  # reported load
    balancer.mark_down("slow", "gone")
    assert balancer.pick(["slow"]) is None


def test_a_replica_with_two_servers_counts_its_queue_per_server():
    balancer = Balancer()
    for key in ("one", "two"):
        balancer.of(key).decode_tps, balancer.of(key).first_s = 20.0, 0.1
    depth = {"one": 1, "two": 1}.__getitem__
    width = {"one": 1, "two": 2}.__getitem__
    assert balancer.expected_s("two", 1, servers=2) == balancer.expected_s("two", 0)
    assert balancer.pick(["one", "two"], depth) == "one"  # as one queue each: a tie, order decides
    assert balancer.pick(["one", "two"], depth, width) == "two"  # "two" has a server free
    balancer.of("one").inflight, balancer.of("two").inflight = 0, 1
    assert balancer.pick(["two", "one"], servers=width) == "one"  # a tie: fewer in flight per server


def test_replay_skip_drops_exactly_the_delivered_text():
    skip = ReplaySkip("Bonjour, ça")
    assert skip.feed("Bon") == "" and skip.feed("jour, ç") == "" and skip.feed("a va ?") == " va ?"
    skip.finish()
    with pytest.raises(EngineError, match="answered differently"):
        ReplaySkip("Bonjour").feed("Bonsoir")
    with pytest.raises(EngineError, match="answered differently"):
        short = ReplaySkip("Bonjour")
        short.feed("Bon")
        short.finish()
