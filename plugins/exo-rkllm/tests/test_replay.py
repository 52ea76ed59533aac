"""A replay (the same request again, with the text already delivered) continues the answer where
it stopped, even inside a multi-byte character; a server that answers differently fails it.

Core does the skipping (`exo_core/node/replicas.py`): the bridge asks the server for the whole
answer again, and the node drops what the client already has.
"""

from __future__ import annotations

import pytest
from exo_rkllm.fake_server import fake_answer
from rkllm_helpers import rkllm_runtime

from exo_core import EngineError, TextGeneration
from exo_core.testing import model_card

QUESTION = [{"role": "user", "content": "emoji, s'il vous plaît"}]


async def answer(runtime, delivered: str = "") -> str:
    request = TextGeneration("req", model_card("smollm2-135m"), messages=QUESTION)
    return "".join([d.text async for d in runtime.node.serve_text(request, delivered)])


@pytest.mark.parametrize("cut", ["mid-character", "after-a-word"])
async def test_a_replay_goes_on_where_the_first_attempt_stopped(server, cut):
    whole = fake_answer(QUESTION)
    at = (
        whole.index("👩") + 1 if cut == "mid-character" else whole.index("déterministe") + len("déterministe")
    )
    async with rkllm_runtime(server.url) as runtime:
        rest = await answer(runtime, delivered=whole[:at])
    assert whole[:at] + rest == whole
    assert len(server.generation_requests()) == 1


async def test_a_replay_that_answers_differently_is_an_error(server):
    async with rkllm_runtime(server.url) as runtime:
        first = await answer(runtime)
        server.config.answer = "A different answer this time."  # sampled, not greedy
        with pytest.raises(EngineError, match="answered differently from the first time"):
            await answer(runtime, delivered=first[:20])
