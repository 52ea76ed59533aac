"""One engine holds several shards at once: a request keeps its cache while a new layer range and
a second model card load and run next to it (a peer joining mid-answer; two models served)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from exo_core.testing import engine_checks


async def test_a_request_keeps_its_cache_while_other_shards_load(engine, card, reference):
    prompts = [case["prompt_ids"] for case in reference["greedy"][:2]]
    copy = dataclasses.replace(card, id="smollm2-copy", aliases=())  # the same GGUF, another card
    await engine_checks.check_shards_side_by_side(
        engine, card, prompts, split=15, steps=4, other=copy, rtol=1e-3, atol=1e-3
    )


async def test_a_cache_that_does_not_fit_in_memory_is_refused_before_anything_runs(engine, card, monkeypatch):
    from exo_tinygrad import engine as engine_module

    from exo_core import EngineError, ErrorCode, Shard, StageInput

    shard = Shard.whole(card.id, card.n_layers)
    monkeypatch.setattr(engine_module, "MEMORY_HEADROOM", 1 << 50)  # as if memory were full
    with pytest.raises(EngineError, match="not enough free memory for a KV cache") as refused:
        await engine.forward(shard, StageInput("too-big", tokens=np.arange(1, 9)))
    assert refused.value.code == ErrorCode.OUT_OF_MEMORY  # the cluster answers 503 from the code
    assert engine.cached_requests() == 0


async def test_a_step_at_another_position_than_its_cache_is_refused(engine, card, reference):
    prompt = reference["greedy"][0]["prompt_ids"]
    await engine_checks.check_start_pos_is_enforced(engine, card, prompt, rtol=1e-3, atol=1e-3)


# ---- overlapping shards share their layers (issue 11) ---------------------------------------


def _part_ids(engine, shard) -> list[int]:
    return [id(p) for p in engine._runners[shard].model.weight_parts()]


async def test_overlapping_shards_share_layers_and_read_only_the_missing_ones(
    tmp_path, tiny_gguf, tiny_card, monkeypatch
):
    """0-0, then 0-1 next to it, then 1-1: each load reads only the tensors no held shard has,
    the engine's weight bytes grow by exactly the new parts, and unloading a shard frees only
    what no other shard uses; every shard keeps answering as it did."""
    from exo_tinygrad import loader
    from exo_tinygrad.engine import TinygradEngine

    from exo_core import Shard

    card = tiny_card(tiny_gguf(tmp_path / "tiny.gguf", seed=3))
    read: list[str] = []
    take = loader.Tensors.take
    monkeypatch.setattr(loader.Tensors, "take", lambda self, name: (read.append(name), take(self, name))[1])
    first, whole, last = Shard(card.id, 0, 0, 2), Shard.whole(card.id, 2), Shard(card.id, 1, 1, 2)
    engine = TinygradEngine({"max_context": None})
    try:
        await engine.load(first, card)
        assert {n.split(".")[1] for n in read} == {"0"}
        first_bytes = engine.weight_bytes()

        read.clear()
        await engine.load(whole, card)
        assert read and not any(n.startswith("blk.0.") for n in read), read  # layer 0 is not read again
        assert _part_ids(engine, whole)[0] == _part_ids(engine, first)[0]  # the same block object
        new_bytes = sum(p.nbytes for p in engine._runners[whole].model.weight_parts()[1:])  # block 1, head
        assert engine.weight_bytes() == first_bytes + new_bytes

        read.clear()
        await engine.load(last, card)
        assert read == []  # everything it needs is held
        assert engine.weight_bytes() == engine._runners[whole].model.weight_bytes()
        expected = await engine_checks.greedy([(engine, whole)], [5, 6, 7, 8], 3, "whole")
        chained = await engine_checks.greedy([(engine, first), (engine, last)], [5, 6, 7, 8], 3, "chain")
        engine_checks._same_run(expected, chained, "0-0 then 1-1 against 0-1", 1e-4, 1e-4)

        await engine.unload(whole)  # its layers stay: the two other shards hold them
        assert engine.weight_bytes() == first_bytes + new_bytes
        again = await engine_checks.greedy([(engine, first), (engine, last)], [5, 6, 7, 8], 3, "again")
        engine_checks._same_run(expected, again, "after unloading 0-1", 1e-4, 1e-4)
        await engine.unload(last)
        assert engine.weight_bytes() == first_bytes
        read.clear()
        await engine.load(last, card)  # read again: nothing held it any more
        assert read and all(not n.startswith("blk.0.") for n in read)
        redo = await engine_checks.greedy([(engine, first), (engine, last)], [5, 6, 7, 8], 3, "redo")
        engine_checks._same_run(expected, redo, "0-0 then a reloaded 1-1", 1e-4, 1e-4)
    finally:
        await engine.close()


async def test_overlapping_shards_of_the_embedded_model_share_their_layers(card, reference):
    """Layers 0-14, then 0-29 and 15-29 of the real model in one engine: the weights grow only by
    layers 15-29 and the head; 0-29 answers as llama.cpp, 0-14 chained to 15-29 as 0-29, and
    both keep doing so when the other is unloaded."""
    from exo_tinygrad.engine import TinygradEngine

    from exo_core import Shard

    case = reference["greedy"][0]
    first, whole, second = Shard(card.id, 0, 14, 30), Shard.whole(card.id, 30), Shard(card.id, 15, 29, 30)
    engine = TinygradEngine({"max_context": None})
    try:
        await engine.load(first, card)
        first_bytes = engine.weight_bytes()
        await engine.load(whole, card)
        await engine.load(second, card)
        assert _part_ids(engine, whole)[:15] == _part_ids(engine, first)
        assert _part_ids(engine, whole)[15:] == _part_ids(engine, second)
        whole_bytes = engine._runners[whole].model.weight_bytes()
        assert engine.weight_bytes() == whole_bytes  # three shards, one copy of each layer
        assert engine.weight_bytes() - first_bytes == engine._runners[second].model.weight_bytes()

        run = await engine_checks.greedy([(engine, whole)], case["prompt_ids"], 4, "whole")
        assert run.tokens == case["completion_ids"][:4]
        await engine.unload(whole)
        assert engine.weight_bytes() == whole_bytes  # 0-14 and 15-29 hold every layer still
        chained = await engine_checks.greedy(
            [(engine, first), (engine, second)], case["prompt_ids"], 4, "chain"
        )
        engine_checks._same_run(run, chained, "0-14 then 15-29 against 0-29", 1e-3, 1e-3)
        await engine.unload(second)
        assert engine.weight_bytes() == first_bytes
    finally:
        await engine.close()
