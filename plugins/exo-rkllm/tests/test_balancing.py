"""Several rkllm nodes in one process, wired with direct calls (the node's peer protocol without
gRPC): requests spread over the boards by core's balancer, and a request whose node is lost
mid-answer is replayed on another and goes on where it stopped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from exo_rkllm.fake_server import FakeRKLLAMA, fake_answer
from rkllm_helpers import rkllm_runtime

from exo_core import Runtime, TextGeneration
from exo_core.node.messages import PeerUnavailable, StageFailure, StepMessage, TokenMessage
from exo_core.node.node import Node
from exo_core.testing import chat


class DirectPeer:
    """Another node in this process, called directly (a PeerClient)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.gone = False

    def _check(self) -> None:
        if self.gone:
            raise PeerUnavailable(f"{self.node.node_id} is gone")

    async def send_step(self, msg: StepMessage) -> None:
        self._check()
        await self.node.receive_step(msg)

    async def send_token(self, msg: TokenMessage) -> bool:
        self._check()
        return await self.node.receive_token(msg)

    async def report_failure(self, failure: StageFailure) -> None:
        self._check()
        await self.node.receive_failure(failure)

    async def release(self, request_id: str, up_to_attempt: int) -> None:
        self._check()
        await self.node.release(request_id, up_to_attempt)

    async def health(self, request_id: str = "", attempt: int = 0):
        self._check()
        return self.node.request_state(request_id, attempt)

    async def generate_text(self, request: TextGeneration, delivered: str = ""):
        self._check()
        async for delta in self.node.serve_text(request, delivered):
            yield delta


@contextlib.asynccontextmanager
async def cluster(servers: list[FakeRKLLAMA]) -> AsyncIterator[list[Runtime]]:
    async with contextlib.AsyncExitStack() as stack:
        runtimes = [await stack.enter_async_context(rkllm_runtime(s.url)) for s in servers]
        for a in runtimes:
            for b in runtimes:
                if a is not b:
                    a.node.add_peer(b.node.info(), DirectPeer(b.node))
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
                origin.node.peers[lost.node.node_id].client.gone = True
                origin.node.remove_peer(lost.node.node_id, "test: board unplugged")

        answer = await chat(origin, question, on_chunk=on_chunk)
    assert answer.text == expected  # no gap, no repeat
    assert len(lost_server.generation_requests()) == 1
    replayed = origin_server.generation_requests()
    assert (
        len(replayed) == 1
        and replayed[0].body["messages"] == lost_server.generation_requests()[0].body["messages"]
    )
