"""The MLX engine on the embedded SmolLM2-135M (Q4_1 GGUF) against llama.cpp's greedy answers."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from exo_core import EngineError, StageInput, load_tokenizer


@pytest.fixture(scope="module")
def whole(kit, card):
    engine = kit.load_engine(card, 0, card.n_layers - 1)
    yield engine, kit.shard_of(card, 0, card.n_layers - 1)
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def halves(kit, card):
    first, second = kit.load_engine(card, 0, 14), kit.load_engine(card, 15, 29)
    yield [(first, kit.shard_of(card, 0, 14)), (second, kit.shard_of(card, 15, 29))]
    for engine in (first, second):
        asyncio.run(engine.close())


@pytest.mark.parametrize("chat_index", [0, 1, 2])
async def test_greedy_answer_equals_llamacpp(kit, whole, card, reference, chat_index):
    chat = reference["greedy"][chat_index]
    prompt = load_tokenizer(card).encode_chat(chat["messages"])
    assert prompt == chat["prompt_ids"]
    assert await kit.greedy([whole], prompt) == kit.expected_answer(chat)
    assert whole[0].cached_requests() == 0  # released


async def test_half_shards_chained_equal_whole_model(kit, whole, halves, reference):
    chat = reference["greedy"][1]
    prompt = np.asarray(chat["prompt_ids"])
    engine, shard = whole
    whole_logits = (await engine.forward(shard, StageInput("w", tokens=prompt))).logits
    await engine.release("w")
    (first, s1), (second, s2) = halves
    hidden = (await first.forward(s1, StageInput("h", tokens=prompt))).hidden
    assert hidden.dtype == np.float32 and hidden.shape == (len(prompt), 576)
    split_logits = (await second.forward(s2, StageInput("h", hidden=hidden))).logits
    await first.release("h")
    await second.release("h")
    np.testing.assert_allclose(split_logits, whole_logits, atol=1e-3)
    assert await kit.greedy(halves, chat["prompt_ids"]) == kit.expected_answer(chat)


async def test_middle_stage_keeps_only_its_layers(kit, card, whole):
    middle = await kit.loaded_engine(card, 10, 19)
    try:
        model = middle._model
        assert model.embedding is None and model.head is None and model.norm is None
        assert len(model.blocks) == 10
        whole_bytes = sum(a.nbytes for a in whole[0]._model.arrays())
        middle_bytes = sum(a.nbytes for a in model.arrays())
        # ten of thirty blocks, no embedding: well under a third of the whole model
        assert middle_bytes < whole_bytes / 3
        with pytest.raises(EngineError, match="hidden states"):
            await middle.forward(kit.shard_of(card, 10, 19), StageInput("m", tokens=np.asarray([1, 2])))
        with pytest.raises(EngineError, match="hidden states"):
            bad = np.zeros((2, 100), dtype=np.float32)
            await middle.forward(kit.shard_of(card, 10, 19), StageInput("m", hidden=bad))
    finally:
        await middle.close()


async def test_batched_decode_equals_one_at_a_time(whole):
    engine, shard = whole
    prompts = {"a": [1, 4093, 198, 19556, 905], "b": [1, 9690, 198, 2683]}
    for rid, ids in prompts.items():
        await engine.forward(shard, StageInput(rid, tokens=np.asarray(ids)))
        await engine.forward(shard, StageInput(rid + "-ref", tokens=np.asarray(ids)))
    batch = [StageInput(rid, tokens=np.asarray([30]), start_pos=len(ids)) for rid, ids in prompts.items()]
    batched = await engine.forward_batch(shard, batch)
    for rid, out in zip(prompts, batched, strict=True):
        start = len(prompts[rid])
        alone = await engine.forward(
            shard, StageInput(rid + "-ref", tokens=np.asarray([30]), start_pos=start)
        )
        np.testing.assert_allclose(out.logits, alone.logits, atol=1e-4)
    for rid in prompts:
        await engine.release(rid)
        await engine.release(rid + "-ref")
    assert engine.cached_requests() == 0


async def test_cache_bounded_by_max_context(kit, card):
    engine = await kit.loaded_engine(card, 0, card.n_layers - 1, max_context=8)
    shard = kit.shard_of(card, 0, card.n_layers - 1)
    try:
        assert engine.context_length() == 8
        await engine.forward(shard, StageInput("r", tokens=np.arange(1, 7)))
        with pytest.raises(EngineError, match="at most 8"):
            await engine.forward(shard, StageInput("r", tokens=np.arange(1, 4), start_pos=6))
        await engine.release("r")
        await engine.release("never-seen")  # no error
        assert engine.cached_requests() == 0
    finally:
        await engine.close()


async def test_compute_does_not_block_the_event_loop(whole):
    engine, shard = whole
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = asyncio.get_running_loop().time()
    await engine.forward(shard, StageInput("slow", tokens=np.arange(1, 17)))
    elapsed = asyncio.get_running_loop().time() - started
    task.cancel()
    await engine.release("slow")
    assert ticks >= elapsed / 0.01 * 0.3, (ticks, elapsed)


async def test_a_step_behind_another_is_reported_queued(whole):
    engine, shard = whole
    running = asyncio.create_task(engine.forward(shard, StageInput("first", tokens=np.arange(1, 17))))
    await asyncio.sleep(0.2)
    waiting = asyncio.create_task(engine.forward(shard, StageInput("second", tokens=np.arange(1, 3))))
    await asyncio.sleep(0.05)
    assert engine.queued("second") and not engine.queued("first")
    await asyncio.gather(running, waiting)
    assert not engine.queued("second")
    await engine.release("first")
    await engine.release("second")


SHORT_PROMPTS = ([1, 4093, 198, 19556, 905], [1, 9690, 198, 2683, 359, 253, 5356])


async def test_engine_contract_checks(whole, card):
    """exo-core's reusable engine checks: release, interleaved requests, batches."""
    engine_checks = pytest.importorskip("exo_core.testing.engine_checks")
    engine, shard = whole
    await engine_checks.check_release_frees_cache(engine, card, SHORT_PROMPTS[0], shard=shard)
    await engine_checks.check_interleaved_equals_alone(engine, card, SHORT_PROMPTS, steps=3, shard=shard)
    await engine_checks.check_batch_equals_single(engine, card, SHORT_PROMPTS, steps=3, shard=shard)
    assert engine.cached_requests() == 0


def test_engine_registered_without_importing_mlx():
    code = (
        "import sys\n"
        "from exo_core.plugins import registry\n"
        "engine = registry().engines['mlx']\n"
        "assert engine.source_kinds == ('gguf', 'safetensors', 'mlx')\n"
        "assert 'mlx' not in sys.modules, 'listing engines imported mlx'\n"
        "print(engine.default_priority())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    expected = 90 if sys.platform == "darwin" else 5
    assert done.stdout.strip() == str(expected)


def test_available_reports_reason(monkeypatch):
    from exo_mlx import engine as module

    assert module.MLXEngine.available() == (True, "")
    module.mlx_status.cache_clear()
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    try:
        ok, reason = module.MLXEngine.available()
        assert not ok and "not installed" in reason
    finally:
        module.mlx_status.cache_clear()
