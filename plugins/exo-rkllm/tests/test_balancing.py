"""Several rkllm nodes in one process, wired with direct calls (the node's peer protocol without
gRPC): requests spread over the boards by core's balancer, and a request whose node is lost
mid-answer is replayed on another and goes on where it stopped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from exo_rkllm.fake_server import FakeRKLLAMA, fake_answer
from rkllm_helpers import rkllm_runtime

from exo_core import Runtime
from exo_core.testing import chat
from exo_core.testing.direct import connect, unplug


@contextlib.asynccontextmanager
async def cluster(servers: list[FakeRKLLAMA]) -> AsyncIterator[list[Runtime]]:
    async with contextlib.AsyncExitStack() as stack:
        runtimes = [await stack.enter_async_context(rkllm_runtime(s.url)) for s in servers]
        connect(runtimes)
        yield runtimes


async def test_six_requests_spread_over_three_boards(dialect):
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(
                FakeRKLLAMA(dialect=dialect, tokens_per_second=200, first_token_ms=20)
            )
            for _ in range(3)
        ]
        runtimes = await stack.enter_async_context(cluster(servers))
        questions = [[{"role": "user", "content": f"question {i}"}] for i in range(6)]
        answers = await asyncio.gather(*(chat(runtimes[0], q) for q in questions))
    for question, answer in zip(questions, answers, strict=True):
        assert answer.text == fake_answer(question) and answer.finish_reason == "stop"
    assert [s.state.generations for s in servers] == [2, 2, 2]
    assert all(s.state.max_concurrent == 1 for s in servers)


async def test_a_request_whose_board_is_lost_is_replayed_and_goes_on(dialect):
    question = [{"role": "user", "content": "tell me something long, with accents: été, 東京"}]
    expected = fake_answer(question, repeat=2)
    async with contextlib.AsyncExitStack() as stack:
        origin_server = await stack.enter_async_context(
            FakeRKLLAMA(dialect=dialect, tokens_per_second=400, first_token_ms=10, answer_repeat=2)
        )
        lost_server = await stack.enter_async_context(
            FakeRKLLAMA(dialect=dialect, tokens_per_second=60, first_token_ms=10, answer_repeat=2)
        )
        origin, lost = await stack.enter_async_context(cluster([origin_server, lost_server]))
        served = list(origin.node.info().models)
        origin.node.set_served_models(["not-this-one"])  # the first attempt goes to the other board
        streamed: list[str] = []

        def on_chunk(text: str) -> None:
            streamed.append(text)
            if len(streamed) == 12:
                # Mid-answer, that board drops out of the cluster; the origin serves it now.
                origin.node.set_served_models(served)
                unplug(origin, lost, "test: board unplugged")

        answer = await chat(origin, question, on_chunk=on_chunk)
    assert answer.text == expected  # no gap, no repeat
    assert len(lost_server.generation_requests()) == 1
    replayed = origin_server.generation_requests()
    assert (
        len(replayed) == 1
        and replayed[0].body["messages"] == lost_server.generation_requests()[0].body["messages"]
    )
