"""Text generation on one node with the dummy engine: the path the API and `exo run --prompt` share."""

import pytest

from exo_core.engines.dummy import DUMMY_ANSWER
from exo_core.node.generate import ContextLengthError, StopMatcher, TextRequest, Usage
from exo_core.node.sampling import SamplingParams
from exo_core.runtime import NodeConfig, Runtime


@pytest.fixture
async def runtime():
    rt = Runtime(NodeConfig(engine="dummy", discovery="none", frontends=(), node_id="t", max_context=512))
    async with rt:
        yield rt


async def collect(rt, **kw):
    req = TextRequest(model=rt.default_model, **kw)
    usage = Usage()
    chunks = [c async for c in rt.generator.stream(rt.generator.prepare(req), usage)]
    return "".join(c.text for c in chunks), chunks[-1].finish_reason, usage


async def test_greedy_answer_and_usage(runtime):
    text, finish, usage = await collect(runtime, messages=[{"role": "user", "content": "Hi"}])
    assert text == DUMMY_ANSWER
    assert finish == "stop"
    assert (
        usage.completion_tokens
        == len(
            runtime.generator.prepare(
                TextRequest(model=runtime.default_model, prompt=DUMMY_ANSWER)
            ).prompt_tokens
        )
        + 1
    )  # + EOS
    # released: a finished request's cache is only kept for prefix reuse
    assert all(key in runtime.node.stage.kept for key in runtime.node.engine.caches)


async def test_max_tokens_gives_length(runtime):
    text, finish, usage = await collect(runtime, prompt="x", max_tokens=3)
    assert finish == "length" and usage.completion_tokens == 3
    assert DUMMY_ANSWER.startswith(text)


async def test_stop_string_is_cut_and_not_emitted(runtime):
    text, finish, _ = await collect(runtime, prompt="x", stop=["dummy engine"])
    assert text == "Hello from the exo " and finish == "stop"


async def test_seeded_sampling_repeats(runtime):
    params = SamplingParams(temperature=1.0, seed=7)
    a, _, _ = await collect(runtime, prompt="x", sampling=params, max_tokens=12)
    b, _, _ = await collect(runtime, prompt="x", sampling=params, max_tokens=12)
    assert a == b


async def test_context_length(runtime):
    with pytest.raises(ContextLengthError):
        runtime.generator.prepare(TextRequest(model=runtime.default_model, prompt="word " * 600))
    with pytest.raises(ContextLengthError):
        runtime.generator.prepare(TextRequest(model=runtime.default_model, prompt="x", max_tokens=100_000))


def test_stop_matcher_holds_back_split_stop():
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("O") == ("", False)
    assert m.feed("P more") == ("", True)
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("ay") == ("STay", False)
    assert m.flush() == ""
