"""A replay (prompt + tokens so far, under a new attempt) continues the answer where it stopped,
even inside a multi-byte character; a server that answers differently the second time fails it."""

from __future__ import annotations

import numpy as np
import pytest
from exo_rkllm.engine import RKLLMEngine
from exo_rkllm.fake_server import fake_answer

from exo_core import EngineError, Shard, StageInput, TextStageInput, load_tokenizer
from exo_core.testing import model_card

QUESTION = [{"role": "user", "content": "emoji, s'il vous plaît"}]


async def start(engine, key, tokens, replayed=0):
    card = model_card("smollm2-135m")
    shard = Shard.whole(card.id, card.n_layers)
    await engine.load(shard, card)
    item = TextStageInput(key, np.asarray(tokens, dtype=np.int64), messages=QUESTION, replayed=replayed)
    return shard, (await engine.forward(shard, item)).token


async def read_all(engine, shard, key, first, eos) -> list[int]:
    ids = [first]
    while ids[-1] not in eos:
        ids.append((await engine.forward(shard, StageInput(key, np.asarray([ids[-1]])))).token)
    return ids[:-1]


@pytest.mark.parametrize("stop", ["mid-character", "after-a-word"])
async def test_a_replay_goes_on_where_the_first_attempt_stopped(server, stop):
    tokenizer = load_tokenizer(model_card("smollm2-135m"))
    prompt = tokenizer.encode_chat(QUESTION)
    engine = RKLLMEngine({"rkllm_server": server.url})
    try:
        shard, first = await start(engine, "req#0", prompt)
        delivered = [first]
        done = (
            (lambda: tokenizer.decode(delivered).endswith("\ufffd"))
            if stop == "mid-character"
            else (lambda: tokenizer.decode(delivered).endswith("déterministe"))
        )
        while not done():
            delivered.append(
                (await engine.forward(shard, StageInput("req#0", np.asarray([delivered[-1]])))).token
            )
        await engine.release("req#0")  # the node running it is gone
        assert engine.active_streams == 0
        shard, first = await start(engine, "req#1", prompt + delivered, replayed=len(delivered))
        rest = await read_all(engine, shard, "req#1", first, tokenizer.eos_token_ids)
    finally:
        await engine.close()
    assert tokenizer.decode(delivered + rest) == fake_answer(QUESTION)
    assert len(server.generation_requests()) == 2


async def test_a_replay_that_answers_differently_is_an_error(server):
    tokenizer = load_tokenizer(model_card("smollm2-135m"))
    prompt = tokenizer.encode_chat(QUESTION)
    engine = RKLLMEngine({"rkllm_server": server.url})
    try:
        shard, first = await start(engine, "req#0", prompt)
        delivered = [first]
        for _ in range(5):
            delivered.append(
                (await engine.forward(shard, StageInput("req#0", np.asarray([delivered[-1]])))).token
            )
        await engine.release("req#0")
        server.config.answer = "A different answer this time."  # sampled, not greedy
        with pytest.raises(EngineError, match="answered a replayed request differently"):
            await start(engine, "req#1", prompt + delivered, replayed=len(delivered))
    finally:
        await engine.close()
