"""The rkllm engine through exo's node and Generator, against the stand-in in both dialects."""

from __future__ import annotations

import asyncio
import time

import pytest
from exo_rkllm.fake_server import FakeRKLLAMA, fake_answer
from rkllm_helpers import CONVERSATION, FAST, rkllm_runtime

from exo_core import GenerationError, ModelCard, SamplingParams
from exo_core.testing import Answer, chat


def sent_messages(server: FakeRKLLAMA) -> list[dict]:
    (request,) = server.generation_requests()
    return request.body["messages"]


async def test_conversation_reaches_the_server_by_each_dialects_rules(server):
    async with rkllm_runtime(server.url) as runtime:
        answer = await chat(runtime, CONVERSATION)
    if server.config.dialect == "fork":
        # The fork adds its own system turn: ours is folded into the first user turn.
        assert sent_messages(server) == [
            {"role": "user", "content": "You answer in one sentence.\n\nBonjour ! Qu'est-ce qu'un NPU ?"},
            CONVERSATION[2],
            CONVERSATION[3],
        ]
        # ("/" is core's health check of the board)
        assert [r.path for r in server.requests if r.path != "/"] == [
            "/api/version",
            "/models",
            "/current_model",
            "/load_model",
            "/generate",
        ]
        assert server.requests_to("/generate")[0].body["stream"] is True
    else:
        assert sent_messages(server) == CONVERSATION
        body = server.requests_to("/api/chat")[0].body
        assert body["model"] == "SmolLM2-135M-Instruct" and body["stream"] is True
    assert answer.text == fake_answer(sent_messages(server))
    assert answer.finish_reason == "stop"


async def test_streamed_text_equals_the_servers_text_byte_for_byte(server):
    # Every object reaches the bridge in two reads cut inside a multi-byte character.
    assert server.config.split_writes and not server.config.ensure_ascii
    async with rkllm_runtime(server.url) as runtime:
        answer = await chat(runtime, [{"role": "user", "content": "Émojis 🚀 et accents, s'il vous plaît"}])
    expected = fake_answer(sent_messages(server))
    assert any(ord(c) > 0xFFFF for c in expected) and "日本語" in expected
    assert answer.text.encode("utf-8") == expected.encode("utf-8")
    assert len(answer.chunks) > 10  # streamed, not one lump at the end
    # The token ids decode back to the same text: the usage counts what was streamed.
    assert answer.usage.completion_tokens >= len(expected.encode("utf-8")) // 8


async def test_first_token_arrives_with_the_servers_first_fragment(dialect):
    # 40 tokens/s: the whole answer takes about 0.9 s, its first piece 150 ms.
    async with (
        FakeRKLLAMA(dialect=dialect, tokens_per_second=40, first_token_ms=150) as server,
        rkllm_runtime(server.url) as runtime,
    ):
        await chat(runtime, [{"role": "user", "content": "warm up"}], max_tokens=2)
        started = time.perf_counter()
        arrivals: list[float] = []
        answer = await chat(
            runtime,
            [{"role": "user", "content": "hello"}],
            on_chunk=lambda _: arrivals.append(time.perf_counter() - started),
        )
    whole = arrivals[-1]
    assert answer.usage.first_token_s is not None
    assert 0.15 <= answer.usage.first_token_s < 0.15 + 0.25  # generous: the host is shared
    assert whole > 0.7 and answer.usage.first_token_s < whole / 3


async def test_multi_turn_answers_are_independent_per_request(server):
    async with rkllm_runtime(server.url) as runtime:
        one = await chat(runtime, [{"role": "user", "content": "first question"}])
        two = await chat(runtime, [{"role": "user", "content": "second question"}])
    assert "«first question»" in one.text and "«second question»" in two.text
    # The server is stateless: the whole conversation goes every time.
    assert len(server.generation_requests()) == 2


async def test_requests_on_one_server_queue_and_never_interleave(server):
    async with rkllm_runtime(server.url) as runtime:
        questions = [f"question {i}" for i in range(4)]
        answers = await asyncio.gather(*(chat(runtime, [{"role": "user", "content": q}]) for q in questions))
    for question, answer in zip(questions, answers, strict=True):
        assert answer.text == fake_answer([{"role": "user", "content": question}])
    assert server.state.max_concurrent == 1
    assert server.state.generations == 4


async def test_waiting_in_the_queue_longer_than_the_step_timeout_is_not_a_failure(dialect):
    # Real boards stream ~8 tok/s: a request behind a few long answers waits minutes. Time
    # spent queued is not "no progress", so it is not re-planned (which would lose its turn).
    async with (
        FakeRKLLAMA(dialect=dialect, tokens_per_second=25, first_token_ms=20) as server,
        rkllm_runtime(server.url, step_timeout=0.5) as runtime,
    ):
        questions = ["first in line", "second in line"]
        started = time.perf_counter()
        answers = await asyncio.gather(*(chat(runtime, [{"role": "user", "content": q}]) for q in questions))
        waited = time.perf_counter() - started
        assert runtime.node.origin.replans_total == 0
    for question, answer in zip(questions, answers, strict=True):
        assert answer.text == fake_answer([{"role": "user", "content": question}])
    assert waited > 2 * 0.5 + 0.5  # the second one really queued past the step timeout
    assert server.state.generations == 2  # and was never replayed


async def test_a_queued_request_does_not_hold_up_the_running_one(dialect):
    async with (
        FakeRKLLAMA(dialect=dialect, tokens_per_second=100, first_token_ms=20) as server,
        rkllm_runtime(server.url) as runtime,
    ):
        arrivals: dict[str, list[float]] = {"a": [], "b": []}
        started = time.perf_counter()

        async def run(name: str) -> Answer:
            return await chat(
                runtime,
                [{"role": "user", "content": name}],
                on_chunk=lambda _: arrivals[name].append(time.perf_counter() - started),
            )

        await asyncio.gather(run("a"), run("b"))
    first_done, second_first = arrivals["a"][-1], arrivals["b"][0]
    # a streams while b waits its turn: a's text keeps arriving before b's first token.
    assert arrivals["a"][len(arrivals["a"]) // 2] < second_first
    assert first_done <= second_first + 0.05


async def test_stopping_early_cancels_the_servers_stream(server):
    async with rkllm_runtime(server.url) as runtime:
        answer = await chat(runtime, [{"role": "user", "content": "long"}], max_tokens=3)
        assert answer.finish_reason == "length"
        engine = runtime.node.engine
        for _ in range(100):
            if server.state.active == 0:
                break
            await asyncio.sleep(0.01)
        assert server.state.active == 0  # the HTTP stream was closed, the server is free
        assert engine.active_streams == 0  # and the token cache freed
        # The server takes the next request at once.
        again = await chat(runtime, [{"role": "user", "content": "next"}])
        assert again.finish_reason == "stop"


async def test_sampling_and_max_tokens_reach_upstream_as_options():
    async with FakeRKLLAMA(dialect="upstream", **FAST) as server, rkllm_runtime(server.url) as runtime:
        sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=1234)
        await chat(runtime, [{"role": "user", "content": "hi"}], max_tokens=64, sampling=sampling)
    options = server.requests_to("/api/chat")[0].body["options"]
    assert options == {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 1234, "num_predict": 64}


async def test_a_plain_completion_becomes_one_user_turn(server):
    async with rkllm_runtime(server.url) as runtime:
        answer = await chat(runtime, prompt="Complete this: 2 + 2 =")
    assert sent_messages(server) == [{"role": "user", "content": "Complete this: 2 + 2 ="}]
    assert answer.text == fake_answer(sent_messages(server))


# ---- models --------------------------------------------------------------------------------------

ALT = ModelCard(
    "smollm2-135m-alt",
    "SmolLM2 135M under another folder",
    30,
    {"gguf": "embedded", "rkllm": "SmolLM2-Alt"},
)


async def test_switching_models_unloads_and_loads(dialect):
    models = ("SmolLM2-135M-Instruct", "SmolLM2-Alt")
    async with (
        FakeRKLLAMA(dialect=dialect, models=models, **FAST) as server,
        rkllm_runtime(server.url, [ALT]) as runtime,
    ):
        for model in ("smollm2-135m", "smollm2-135m-alt", "smollm2-135m"):
            answer = await chat(runtime, [{"role": "user", "content": model}], model=model)
            assert answer.text == fake_answer([{"role": "user", "content": model}])
    if dialect == "fork":
        switches = [(r.path, r.body) for r in server.requests if r.path in ("/load_model", "/unload_model")]
        assert switches == [
            ("/load_model", {"model_name": "SmolLM2-135M-Instruct"}),
            ("/unload_model", None),
            ("/load_model", {"model_name": "SmolLM2-Alt"}),
            ("/unload_model", None),
            ("/load_model", {"model_name": "SmolLM2-135M-Instruct"}),
        ]
    else:
        assert [r.body["model"] for r in server.requests_to("/api/chat")] == [
            "SmolLM2-135M-Instruct",
            "SmolLM2-Alt",
            "SmolLM2-135M-Instruct",
        ]
        assert sorted(server.state.loaded) == sorted(models)


async def test_model_dir_override_maps_a_model_to_another_folder(dialect):
    async with (
        FakeRKLLAMA(dialect=dialect, models=("my-smollm",), **FAST) as server,
        rkllm_runtime(server.url, rkllm_model_dir=("smollm2-135m=my-smollm",)) as runtime,
    ):
        answer = await chat(runtime, [{"role": "user", "content": "hi"}])
    assert answer.finish_reason == "stop"
    body = server.generation_requests()[0].body
    if dialect == "upstream":
        assert body["model"] == "my-smollm"
    else:
        assert server.requests_to("/load_model")[0].body == {"model_name": "my-smollm"}


async def test_a_missing_model_folder_is_a_clear_error(dialect):
    async with (
        FakeRKLLAMA(dialect=dialect, models=("Qwen2.5-1.5B",), **FAST) as server,
        rkllm_runtime(server.url) as runtime,
    ):
        with pytest.raises(GenerationError) as err:
            await chat(runtime, [{"role": "user", "content": "hi"}])
    message = str(err.value)
    assert "no model folder 'SmolLM2-135M-Instruct'" in message
    assert "Qwen2.5-1.5B" in message and "--rkllm-model-dir smollm2-135m=FOLDER" in message
    assert server.generation_requests() == []


async def test_a_fork_folder_without_modelfile_fails_to_load(tmp_path):
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    (tmp_path / "SmolLM2-135M-Instruct" / "smollm2.rkllm").write_bytes(b"")
    async with (
        FakeRKLLAMA(dialect="fork", models_dir=tmp_path, **FAST) as server,
        rkllm_runtime(server.url) as runtime,
    ):
        with pytest.raises(GenerationError, match="Modelfile not found in 'SmolLM2-135M-Instruct'"):
            await chat(runtime, [{"role": "user", "content": "hi"}])


async def test_a_model_whose_tokenizer_is_not_here_is_answered_with_the_servers_counts(server):
    # The server tokenizes: this node needs no tokenizer, and usage is what the server counted.
    card = ModelCard(
        "rk-test-model",
        "A model whose tokenizer is not here",
        24,
        {"rkllm": "SmolLM2-135M-Instruct"},
        tokenizer="exo-test-org/no-such-tokenizer",
    )
    question = [{"role": "user", "content": "hi"}]
    async with rkllm_runtime(server.url, [card]) as runtime:
        answer = await chat(runtime, question, model=card.id)
    assert answer.text == fake_answer(question) and answer.finish_reason == "stop"
    pieces = len(server.generation_requests()) and answer.usage.completion_tokens
    assert pieces > 10 and answer.usage.prompt_tokens > 0
