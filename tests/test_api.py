"""The OpenAI-compatible API against the official `openai` client, on a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest
from core_helpers import api_node_config

from exo_core.api.testing import BackgroundNode, connect, request
from exo_core.engines.dummy import DUMMY_ANSWER
from exo_core.models.tokenizer import load_tokenizer
from exo_core.node.messages import GenerationError
from exo_core.node.partitioning import NoPlanError
from exo_core.runtime import NodeConfig

MODEL = "smollm2-135m"
HI = [{"role": "user", "content": "Hi!"}]


def node_config(**overrides) -> NodeConfig:
    return api_node_config(**{"node_id": "test", "engine_options": {"dummy_delay_ms": 1}, **overrides})


@pytest.fixture(scope="module")
def server():
    with BackgroundNode(node_config()) as node:
        yield node


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(server):
    return load_tokenizer(server.runtime.default_model)


@pytest.fixture(scope="module")
def answer_ids(tokenizer):
    return tokenizer.encode(DUMMY_ANSWER)


def stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# ---- chat and completions ----------------------------------------------------------------------


def test_chat_completion(client, tokenizer, answer_ids):
    out = client.chat.completions.create(model=MODEL, messages=HI, temperature=0)
    choice = out.choices[0]
    assert out.object == "chat.completion"
    assert out.model == MODEL
    assert choice.message.role == "assistant"
    assert choice.message.content == DUMMY_ANSWER
    assert choice.finish_reason == "stop"
    assert out.usage.prompt_tokens == len(tokenizer.encode_chat(HI))
    assert out.usage.completion_tokens == len(answer_ids) + 1  # the answer, then end-of-turn
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_stream(client):
    stream = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, stream=True)
    text, chunks = stream_text(stream)
    assert text == DUMMY_ANSWER
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    assert all(c.usage is None for c in chunks)
    assert len({c.id for c in chunks}) == 1


def test_completions(client, tokenizer, answer_ids):
    out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert out.object == "text_completion"
    assert out.choices[0].text == tokenizer.decode(answer_ids[:5])
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5
    assert out.usage.prompt_tokens == len(tokenizer.encode("Once upon a time"))


def test_completions_stream_and_echo(client, tokenizer, answer_ids):
    stream = client.completions.create(
        model=MODEL, prompt="Say:", max_tokens=100, temperature=0, stream=True, echo=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == "Say:" + DUMMY_ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_several_prompts(client, tokenizer, answer_ids):
    out = client.completions.create(
        model=MODEL, prompt=["One", "Two three"], max_tokens=3, temperature=0, n=2
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert {c.text for c in out.choices} == {tokenizer.decode(answer_ids[:3])}
    assert out.usage.prompt_tokens == len(tokenizer.encode("One")) + len(tokenizer.encode("Two three"))
    assert out.usage.completion_tokens == 12


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_gives_length(client, tokenizer, answer_ids, stream, field):
    kwargs = {field: 4}
    out = client.chat.completions.create(
        model=MODEL,
        messages=HI,
        temperature=0,
        stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
        **kwargs,
    )
    if stream:
        text, chunks = stream_text(out)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
    else:
        text, finish, usage = out.choices[0].message.content, [out.choices[0].finish_reason], out.usage
    assert finish == ["length"]
    assert usage.completion_tokens == 4
    assert text == tokenizer.decode(answer_ids[:4])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (" dummy", "Hello from the exo"),  # a whole token
        ("xo du", "Hello from the e"),  # split over three tokens: " ex", "o", " dummy"
        (["nothing", "engine."], "Hello from the exo dummy "),  # the earliest of several
    ],
)
def test_stop_cuts_and_is_not_emitted(client, stream, stop, expected):
    out = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, stop=stop, stream=stream)
    if stream:
        text, chunks = stream_text(out)
        assert chunks[-1].choices[0].finish_reason == "stop"
    else:
        text = out.choices[0].message.content
        assert out.choices[0].finish_reason == "stop"
    assert text == expected


def test_stop_on_completions(client):
    out = client.completions.create(model=MODEL, prompt="x", stop="exo", temperature=0, max_tokens=50)
    assert out.choices[0].text == "Hello from the "
    assert out.choices[0].finish_reason == "stop"


def test_same_seed_same_text(client):
    def sample(seed: int) -> str:
        out = client.chat.completions.create(
            model=MODEL, messages=HI, temperature=1, seed=seed, max_tokens=12
        )
        return out.choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert len({sample(s) for s in range(8)}) > 1  # temperature 1 does sample


def test_n_choices(client):
    out = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.message.content == DUMMY_ANSWER for c in out.choices)
    single = client.chat.completions.create(model=MODEL, messages=HI, temperature=0)
    assert out.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert out.usage.completion_tokens == 2 * single.usage.completion_tokens


def test_n_choices_stream_with_seed(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=HI, temperature=1, seed=3, n=2, max_tokens=10, stream=True
    )
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert set(finishes) == {0, 1}
    whole = client.chat.completions.create(
        model=MODEL, messages=HI, temperature=1, seed=3, n=2, max_tokens=10
    )
    assert [c.message.content for c in whole.choices] == [texts[0], texts[1]]


def test_include_usage(client, tokenizer, answer_ids):
    stream = client.chat.completions.create(
        model=MODEL, messages=HI, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    *body, last = chunks
    assert last.choices == []
    assert last.usage.completion_tokens == len(answer_ids) + 1
    assert last.usage.prompt_tokens == len(tokenizer.encode_chat(HI))
    assert all(c.usage is None for c in body)


def test_multi_turn(client, tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": DUMMY_ANSWER},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "again?"}]},
    ]
    out = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    rendered = [
        *messages[:3],
        {"role": "user", "content": "And\nagain?"},
    ]
    assert out.usage.prompt_tokens == len(tokenizer.encode_chat(rendered))
    assert out.choices[0].message.content == DUMMY_ANSWER


def test_chat_logprobs(client, answer_ids):
    out = client.chat.completions.create(
        model=MODEL, messages=HI, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == len(answer_ids)  # the end-of-turn token is not part of the answer
    assert "".join(t.token for t in content) == DUMMY_ANSWER
    assert bytes(b for t in content for b in t.bytes).decode() == DUMMY_ANSWER
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the best


def test_chat_logprobs_stream(client, answer_ids):
    stream = client.chat.completions.create(
        model=MODEL, messages=HI, temperature=0, logprobs=True, stream=True
    )
    entries = [
        e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert "".join(e.token for e in entries) == DUMMY_ANSWER
    assert all(e.top_logprobs == [] for e in entries)


def test_completion_logprobs(client, tokenizer, answer_ids):
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    assert len(lp.token_logprobs) == 4
    assert all(len(alts) == 2 for alts in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    assert lp.text_offset[1] == len(lp.tokens[0])


@pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty"])
def test_penalties_are_applied(client, field):
    # The dummy answer ends with a second "."; a penalty of 2 on tokens already said makes the
    # end of turn (the runner-up there) win instead.
    out = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, **{field: 2.0})
    assert out.choices[0].message.content == DUMMY_ANSWER[:-1]
    assert out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("cut", [{"extra_body": {"top_k": 1}}, {"top_p": 0.0}])
def test_top_k_and_top_p_narrow_sampling(client, cut):
    for seed in range(3):
        out = client.chat.completions.create(model=MODEL, messages=HI, temperature=1, seed=seed, **cut)
        assert out.choices[0].message.content == DUMMY_ANSWER  # only the likeliest token is left


def test_user_field_is_accepted(client):
    out = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=2, user="alice")
    assert out.choices[0].finish_reason == "length"


# ---- models, topology, health, metrics -----------------------------------------------------------


def test_models(client):
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    models = {m.id: m for m in client.models.list()}
    assert MODEL in models
    first = next(iter(models))
    assert first == MODEL  # the default model comes first
    card = models[MODEL].model_dump()
    assert card["loaded"] is True
    assert card["downloaded"] is True
    assert card["nodes"] == ["test"]
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve("SmolLM2-135M-Instruct").id == MODEL  # an alias
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"


def test_topology_and_health(server):
    topo = request("GET", f"{server.url}/v1/topology").json()
    assert topo["model"] == MODEL
    [node] = topo["nodes"]
    assert node["node_id"] == "test" and node["self"] is True
    assert node["engine"] == "dummy"
    assert node["shard"] == {"model_id": MODEL, "start_layer": 0, "end_layer": 29, "n_layers": 30}
    assert topo["plan"] == [{"node_id": "test", "shard": node["shard"]}]
    other = request("GET", f"{server.url}/v1/topology?model=llama-3.2-1b").json()
    assert other["nodes"][0]["shard"]["n_layers"] == 16
    health = request("GET", f"{server.url}/healthcheck").json()
    assert health["status"] == "ok" and health["node_id"] == "test"


def test_metrics(client, server):
    client.chat.completions.create(model=MODEL, messages=HI, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HI)
    text = request("GET", f"{server.url}/metrics").text
    assert 'exo_api_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'exo_api_requests_total{endpoint="/v1/chat/completions",status="404"}' in text
    assert 'exo_api_errors_total{endpoint="/v1/chat/completions",type="not_found_error"}' in text
    assert 'exo_completion_tokens_total{model="smollm2-135m"}' in text
    assert 'exo_prompt_tokens_total{model="smollm2-135m"}' in text
    assert 'exo_time_to_first_token_seconds_count{model="smollm2-135m"}' in text
    assert 'exo_decode_tokens_per_second_count{model="smollm2-135m"}' in text
    assert "exo_api_active_requests 0.0" in text
    assert "exo_replans_total 0.0" in text  # read from the node: no stage failed


def test_web_page_and_cors(server):
    page = request("GET", server.url + "/")
    assert page.status == 200 and 'id="model"' in page.text
    for asset in ("chat.js", "chat.css"):
        assert request("GET", f"{server.url}/static/{asset}").status == 200
    # the built-in page is same-origin: its requests carry the API's own origin
    own = request("GET", f"{server.url}/v1/models", headers={"Origin": server.url})
    assert own.status == 200
    # any other site's page is refused (no --cors-origin), preflight or not
    pre = request(
        "OPTIONS",
        f"{server.url}/v1/chat/completions",
        headers={"Origin": "http://elsewhere", "Access-Control-Request-Method": "POST"},
    )
    assert pre.status == 403 and "Access-Control-Allow-Origin" not in pre.headers
    simple = request(
        "POST",
        f"{server.url}/v1/chat/completions",
        headers={"Origin": "http://elsewhere", "Content-Type": "text/plain"},
        content=b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}]}',
    )
    assert simple.status == 403
    assert "--cors-origin http://elsewhere" in simple.json()["error"]["message"]


def test_cors_origin_lets_that_site_in():
    with BackgroundNode(node_config(cors_origins=("http://app.test:3000",))) as node:
        pre = request(
            "OPTIONS",
            f"{node.url}/v1/chat/completions",
            headers={"Origin": "http://app.test:3000", "Access-Control-Request-Method": "POST"},
        )
        assert pre.status == 204
        assert pre.headers["Access-Control-Allow-Origin"] == "http://app.test:3000"
        assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
        reply = request("GET", f"{node.url}/v1/models", headers={"Origin": "http://app.test:3000"})
        assert reply.status == 200 and reply.headers["Access-Control-Allow-Origin"] == "http://app.test:3000"
        other = request("GET", f"{node.url}/v1/models", headers={"Origin": "http://app.test:4000"})
        assert other.status == 403


# ---- errors through the client -------------------------------------------------------------------


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-17", messages=HI)
    assert err.value.code == "model_not_found"
    assert err.value.param == "model"
    assert MODEL in err.value.message  # says what it can serve


def test_bad_request_names_the_field(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HI, temperature=5)
    assert err.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HI, logit_bias={"50256": -100})
    assert err.value.param == "logit_bias"
    assert err.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HI, top_logprobs=2)
    assert err.value.param == "top_logprobs"


def test_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=100_000)
    assert err.value.code == "context_length_exceeded"
    assert err.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi " * 9000)
    assert err.value.code == "context_length_exceeded"
    assert err.value.param == "prompt"


def test_api_key():
    with BackgroundNode(node_config(api_key="sesame", node_id="keyed")) as keyed:
        with (
            openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", max_retries=0) as c,
            pytest.raises(openai.AuthenticationError) as err,
        ):
            c.chat.completions.create(model=MODEL, messages=HI)
        assert err.value.code == "invalid_api_key"
        missing = request(
            "POST", f"{keyed.url}/v1/chat/completions", json_body={"model": MODEL, "messages": HI}
        )
        assert missing.status == 401
        assert "Authorization: Bearer" in missing.json()["error"]["message"]
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert request("GET", f"{keyed.url}/metrics").status == 401
        assert request("GET", f"{keyed.url}/healthcheck").status == 200
        assert request("GET", f"{keyed.url}/").status == 200
        with openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sesame", max_retries=0) as c:
            out = c.chat.completions.create(model=MODEL, messages=HI, temperature=0)
        assert out.choices[0].message.content == DUMMY_ANSWER


def test_no_node_can_serve_is_503(client, server):
    node = server.runtime.node

    def no_plan(card, exclude=frozenset()):
        raise NoPlanError(f"no node in the cluster can serve {card.id} right now")

    node.make_plan = no_plan
    try:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as err:
                client.chat.completions.create(model=MODEL, messages=HI, stream=stream)
            assert err.value.status_code == 503
            assert "no node" in err.value.message
    finally:
        del node.make_plan
    assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1).choices


def test_model_without_files_here_is_503(client):
    # The dummy engine serves any card, but this node has no tokenizer for llama-3.2-1b.
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="llama-3.2-1b", messages=HI, stream=stream)
        assert err.value.status_code == 503
        assert err.value.code == "model_not_available"


def test_failure_midway_is_an_error_event(client, server):
    node = server.runtime.node
    real_generate = node.generate

    async def failing(request):
        count = 0
        async for token in real_generate(request):
            yield token
            count += 1
            if count == 3:
                raise GenerationError("stage on node 'far' crashed")

    node.generate = failing
    try:
        stream = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, stream=True)
        text = ""
        with pytest.raises(openai.APIError) as err:
            for chunk in stream:
                text += chunk.choices[0].delta.content or ""
        assert "crashed" in err.value.message
        assert DUMMY_ANSWER.startswith(text) and text
        raw = request(
            "POST",
            f"{server.url}/v1/chat/completions",
            json_body={"model": MODEL, "messages": HI, "stream": True, "temperature": 0},
        )
        assert raw.status == 200
        frames = [line for line in raw.text.split("\n\n") if line]
        assert '"error":' in frames[-2] and frames[-1] == "data: [DONE]"
    finally:
        del node.generate


# ---- load and disconnects ------------------------------------------------------------------------


def test_concurrent_streams(server):
    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"question {i}"}], temperature=0, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as c:
            return await asyncio.gather(*(one(c, i) for i in range(8)))

    engine = server.runtime.node.engine
    engine.delay_s = 0.01  # long enough that all eight are in flight together
    try:
        texts = asyncio.run(main())
    finally:
        engine.delay_s = 0.001
    assert texts == [DUMMY_ANSWER] * 8


def _wait_until(predicate, timeout: float) -> float:
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.01)
    return time.perf_counter() - start


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_caches(server, stream):
    node = server.runtime.node
    engine = node.engine
    engine.delay_s = 0.2  # 16 tokens take ~3 s: a disconnect must not wait for the end
    body = {"model": MODEL, "messages": HI, "temperature": 0, "stream": stream}
    try:
        conn = connect(server.url, timeout=5.0 if stream else 0.7)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode())
        if stream:
            response = conn.getresponse()
            assert response.read(7) == b"data: {"  # the first token is out
            assert len(engine.caches) > len(node.stage.kept), "generation should be running"
        else:
            with pytest.raises(TimeoutError):
                conn.getresponse()  # the answer needs ~3 s
            assert len(engine.caches) > len(node.stage.kept)
        conn.close()  # the client goes away
        # Freed, not kept for prefix reuse: only finished requests' caches are kept.
        took = _wait_until(
            lambda: all(k in node.stage.kept for k in engine.caches) and node.active_requests == 0,
            timeout=1.0,
        )
    finally:
        engine.delay_s = 0.001
    assert took < 1.0
    assert server.frontend.app is not None
    metrics = request("GET", f"{server.url}/metrics").text
    assert "exo_api_active_requests 0.0" in metrics
    assert 'exo_api_requests_total{endpoint="/v1/chat/completions",status="499"}' in metrics
