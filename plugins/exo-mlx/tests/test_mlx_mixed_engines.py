"""Mixed engines: MLX and tinygrad each run half of the model and hand hidden states across.

Hidden states cross as float32 numpy [T, hidden], the engine-neutral wire type, so one half
on MLX and the other on tinygrad must give the one-node greedy answer (llama.cpp's).
"""

from __future__ import annotations

import asyncio

import pytest

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


def load_tinygrad(kit, cls, card, start: int, end: int):
    engine = cls({"max_context": None})

    async def load():
        await engine.load(kit.shard_of(card, start, end), card)

    asyncio.run(load())
    return engine


@pytest.mark.parametrize("mlx_first", [True, False], ids=["mlx-then-tinygrad", "tinygrad-then-mlx"])
def test_half_on_mlx_half_on_tinygrad_gives_one_node_answer(kit, tinygrad_class, card, reference, mlx_first):
    if mlx_first:
        first, second = kit.load_engine(card, 0, 14), load_tinygrad(kit, tinygrad_class, card, 15, 29)
    else:
        first, second = load_tinygrad(kit, tinygrad_class, card, 0, 14), kit.load_engine(card, 15, 29)
    stages = [(first, kit.shard_of(card, 0, 14)), (second, kit.shard_of(card, 15, 29))]
    chat = reference["greedy"][0]
    try:
        assert asyncio.run(kit.greedy(stages, chat["prompt_ids"])) == kit.expected_answer(chat)
    finally:
        for engine, _ in stages:
            asyncio.run(engine.close())
