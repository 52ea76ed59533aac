"""Mixed engines: MLX and tinygrad each run half of the model and hand hidden states across.

Hidden states cross as float32 numpy [T, hidden], the engine-neutral wire type, so one half
on MLX and the other on tinygrad must give the one-node greedy answer (llama.cpp's).
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import expected_answer, greedy, load_engine, shard_of

from exo_core.plugins import registry


def tinygrad_engine_class():
    cls = registry().engines.get("tinygrad")
    if cls is None:
        pytest.skip("the tinygrad engine is not registered (plugins/exo-tinygrad has no engine yet)")
    ok, reason = cls.available()
    if not ok:
        pytest.skip(f"the tinygrad engine cannot run here: {reason}")
    return cls


@pytest.fixture(scope="module")
def tinygrad_class():
    return tinygrad_engine_class()


def load_tinygrad(cls, card, start: int, end: int):
    engine = cls({"max_context": None})

    async def load():
        await engine.load(shard_of(card, start, end), card)

    asyncio.run(load())
    return engine


@pytest.mark.parametrize("mlx_first", [True, False], ids=["mlx-then-tinygrad", "tinygrad-then-mlx"])
def test_half_on_mlx_half_on_tinygrad_gives_one_node_answer(tinygrad_class, card, reference, mlx_first):
    if mlx_first:
        first, second = load_engine(card, 0, 14), load_tinygrad(tinygrad_class, card, 15, 29)
    else:
        first, second = load_tinygrad(tinygrad_class, card, 0, 14), load_engine(card, 15, 29)
    stages = [(first, shard_of(card, 0, 14)), (second, shard_of(card, 15, 29))]
    chat = reference["greedy"][0]
    try:
        assert asyncio.run(greedy(stages, chat["prompt_ids"])) == expected_answer(chat)
    finally:
        for engine, _ in stages:
            asyncio.run(engine.close())
