"""Every server failure reaches the caller as an error with the server's message — never as an
empty or truncated answer that looks finished."""

from __future__ import annotations

import socket

import pytest
from exo_rkllm.fake_server import FakeRKLLAMA, Fault, fake_answer
from rkllm_helpers import FAST, rkllm_runtime

from exo_core import GenerationError
from exo_core.testing import chat

QUESTION = [{"role": "user", "content": "Une question, s'il vous plaît"}]
EXPECTED = fake_answer(QUESTION)

BOTH = [
    (Fault("http500"), "HTTP 500): 500 Internal Server Error"),
    (Fault("http4xx", status=429, message="too many requests (injected)"), "too many requests (injected)"),
    (Fault("cut", after=3), "cut the answer short"),
    (Fault("cut_mid", after=3), "cut the answer short"),
    (Fault("garbage", after=2), "not JSON"),
]
FORK_ONLY = [(Fault("load_failure"), "loading model 'SmolLM2-135M-Instruct' failed (HTTP 500)")]
UPSTREAM_ONLY = [
    (Fault("load_failure"), "Failed to load model 'SmolLM2-135M-Instruct'"),
    (Fault("abort", after=3), "aborted the generation"),
    (Fault("abort_text", after=3), "Aborted inference by Timeout (0 seconds). Try again."),
]
CASES = [("fork", f, m) for f, m in BOTH + FORK_ONLY] + [("upstream", f, m) for f, m in BOTH + UPSTREAM_ONLY]


@pytest.mark.parametrize(("dialect", "fault", "message"), CASES, ids=[f"{d}-{f.kind}" for d, f, _ in CASES])
async def test_an_injected_fault_is_an_error_with_the_servers_message(dialect, fault, message):
    async with (
        FakeRKLLAMA(dialect=dialect, abort_timeout_s=0.2, **FAST) as server,
        rkllm_runtime(server.url) as runtime,
    ):
        server.faults.append(Fault(**{**fault.__dict__, "times": 1}))
        streamed: list[str] = []
        with pytest.raises(GenerationError) as err:
            await chat(runtime, QUESTION, on_chunk=streamed.append)
        assert message in str(err.value)
        assert server.url in str(err.value)
        # What did arrive is the start of the real answer, and no more.
        assert EXPECTED.startswith("".join(streamed))
        assert len("".join(streamed)) < len(EXPECTED)
        # The bridge is not left stuck: the next request is answered in full.
        again = await chat(runtime, QUESTION)
        assert again.text == EXPECTED and again.finish_reason == "stop"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_server_that_is_down_is_a_clear_error():
    url = f"http://127.0.0.1:{_closed_port()}"
    async with rkllm_runtime(url) as runtime:
        with pytest.raises(GenerationError) as err:
            await chat(runtime, QUESTION)
    message = str(err.value)
    assert f"cannot reach the RKLLAMA server at {url}" in message
    assert "--rkllm-server" in message and "RKLLM_SERVER_HOST" in message


async def test_a_server_that_goes_away_between_requests_is_an_error_then_recovers(dialect):
    server = FakeRKLLAMA(dialect=dialect, **FAST)
    url = await server.start()
    port = int(url.rsplit(":", 1)[1])
    async with rkllm_runtime(url) as runtime:
        assert (await chat(runtime, QUESTION)).text == EXPECTED
        await server.stop()
        with pytest.raises(GenerationError, match="cannot reach the RKLLAMA server"):
            await chat(runtime, QUESTION)
        # Back on the same port, possibly as the other dialect: probed again.
        other = "upstream" if dialect == "fork" else "fork"
        async with FakeRKLLAMA(dialect=other, **FAST) as back:
            await back.stop()
            await back.start(port=port)
            assert (await chat(runtime, QUESTION)).text == EXPECTED
            assert back.generation_requests()
