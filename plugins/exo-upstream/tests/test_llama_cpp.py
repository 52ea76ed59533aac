"""Two real llama.cpp servers as the upstreams of a two-node exo cluster (`exo run` processes,
manual discovery), asked through exo's API with the official `openai` client."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from upstream_helpers import llama_server, needs_llama

from exo_core.testing import Cluster

pytestmark = needs_llama

QUESTION = [{"role": "user", "content": "Name three colours, then count to twenty."}]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(c: openai.OpenAI, max_tokens: int = 48, stream: bool = False) -> str:
    if not stream:
        reply = c.chat.completions.create(
            model="smollm2-135m", messages=QUESTION, temperature=0, max_tokens=max_tokens
        )
        return reply.choices[0].message.content or ""
    parts = []
    for chunk in c.chat.completions.create(
        model="smollm2-135m", messages=QUESTION, temperature=0, max_tokens=max_tokens, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upstreams")
    with llama_server(tmp) as one, llama_server(tmp) as two:
        with Cluster.manual(
            ["a", "b"],
            tmp=tmp,
            engine="upstream",
            per_node_args={"a": ["--upstream", one.url], "b": ["--upstream", two.url]},
            env={"HF_HUB_OFFLINE": "1"},
        ) as cluster:
            yield cluster, one, two


def test_the_upstreams_greedy_answer_through_exo_streamed_and_whole(setup):
    cluster, one, _ = setup
    direct = greedy(client(one.url))
    assert direct
    exo = client(cluster.nodes["a"].url)
    assert greedy(exo) == direct
    assert greedy(exo, stream=True) == direct
    reply = exo.chat.completions.create(model="smollm2-135m", messages=QUESTION, temperature=0, max_tokens=8)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens > 10  # the server's counts


def test_six_concurrent_requests_spread_over_both_upstreams(setup):
    cluster, one, two = setup
    before = one.requests(), two.requests()
    exo = client(cluster.nodes["a"].url)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: greedy(exo, max_tokens=16), range(6)))
    assert len(set(answers)) == 1 and answers[0]
    spread = one.requests() - before[0], two.requests() - before[1]
    assert sum(spread) == 6 and min(spread) >= 2, spread


def test_an_unknown_model_and_a_bad_field_are_openai_errors(setup):
    cluster, _, _ = setup
    exo = client(cluster.nodes["b"].url)
    with pytest.raises(openai.NotFoundError):
        exo.chat.completions.create(model="no-such-model", messages=QUESTION)


def test_an_upstream_killed_mid_stream_is_finished_on_the_other(tmp_path):
    with llama_server(tmp_path) as one, llama_server(tmp_path) as two:
        reference = greedy(client(one.url), max_tokens=64)
        with Cluster.manual(
            ["a", "b"],
            tmp=tmp_path,
            engine="upstream",
            per_node_args={"a": ["--upstream", one.url], "b": ["--upstream", two.url]},
        ) as cluster:
            before = one.requests(), two.requests()
            stream = client(cluster.nodes["a"].url).chat.completions.create(
                model="smollm2-135m", messages=QUESTION, temperature=0, max_tokens=64, stream=True
            )
            parts: list[str] = []
            killed = None
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                if killed is None and len(parts) == 5:
                    serving = one if one.requests() > before[0] else two
                    serving.kill()
                    killed = serving
            assert killed is not None
            other = two if killed is one else one
            assert other.requests() > (before[1] if other is two else before[0])
            # Killed mid-answer, finished on the other upstream: the same greedy text.
            assert "".join(parts) == reference
            time.sleep(0)


def test_a_layer_sharded_ring_and_an_upstream_serve_one_endpoint_together(tmp_path):
    # Node a holds the model's layers (the dummy engine: a fixed answer); node b forwards to a
    # llama.cpp server. Requests to a are balanced over both: each answer is one or the other.
    dummy_answer = "Hello from the exo dummy engine. This is a deterministic answer."
    with llama_server(tmp_path) as server:
        reference = greedy(client(server.url), max_tokens=24)
        with Cluster.manual(
            ["a", "b"],
            tmp=tmp_path,
            engine="dummy",
            extra_args=["--dummy-delay-ms", "20"],
            per_node_args={"b": ["--engine", "upstream", "--upstream", server.url]},
        ) as cluster:
            exo = client(cluster.nodes["a"].url)
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda _: greedy(exo, max_tokens=24), range(4)))
    assert set(answers) == {dummy_answer, reference}, answers


def test_a_model_no_card_describes_is_served_under_the_upstreams_id_from_any_node(tmp_path):
    with llama_server(tmp_path, alias="house-model-q4") as server:
        direct = client(server.url).chat.completions.create(
            model="house-model-q4", messages=QUESTION, temperature=0, max_tokens=16
        )
        with Cluster.manual(
            ["a", "b"],
            tmp=tmp_path,
            engine="dummy",
            per_node_args={"b": ["--engine", "upstream", "--upstream", server.url]},
        ) as cluster:
            deadline = time.monotonic() + 30
            exo = client(cluster.nodes["a"].url)  # a knows no such card: it learnt it from b
            while "house-model-q4" not in {m.id for m in exo.models.list().data}:
                assert time.monotonic() < deadline, cluster.logs()
                time.sleep(0.5)
            reply = exo.chat.completions.create(
                model="house-model-q4", messages=QUESTION, temperature=0, max_tokens=16
            )
    assert reply.choices[0].message.content == direct.choices[0].message.content
    assert reply.model == "house-model-q4"
