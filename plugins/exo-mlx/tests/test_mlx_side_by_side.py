"""One engine holds several shards at once: a request keeps its cache while a new layer range and
a second model card load and run next to it (a peer joining mid-answer; two models served)."""

from __future__ import annotations

import dataclasses

from exo_core.testing import engine_checks


async def test_a_request_keeps_its_cache_while_other_shards_load(kit, card, reference):
    engine = await kit.loaded_engine(card, 0, card.n_layers - 1)
    try:
        prompts = [case["prompt_ids"] for case in reference["greedy"][:2]]
        copy = dataclasses.replace(card, id="smollm2-copy", aliases=())  # the same GGUF, another card
        await engine_checks.check_shards_side_by_side(
            engine, card, prompts, split=15, steps=4, other=copy, rtol=1e-3, atol=1e-3
        )
    finally:
        await engine.close()


async def test_a_step_at_another_position_than_its_cache_is_refused(kit, card, reference):
    engine = await kit.loaded_engine(card, 0, card.n_layers - 1)
    try:
        prompt = reference["greedy"][0]["prompt_ids"]
        await engine_checks.check_start_pos_is_enforced(engine, card, prompt, rtol=1e-3, atol=1e-3)
    finally:
        await engine.close()


async def test_overlapping_shards_share_their_layers(kit, card, reference, monkeypatch):
    """Layers 0-14, then 0-29 and 15-29 in one engine: one copy of each layer (the weights grow
    only by layers 15-29 and the head; 15-29 reads nothing), 0-29 answers as llama.cpp, 0-14
    chained to 15-29 the same, and unloading a shard frees only what no other shard holds."""
    from exo_mlx import loader

    reads: list[str] = []
    load = loader.mx.load
    monkeypatch.setattr(loader.mx, "load", lambda path, **kw: (reads.append(path), load(path, **kw))[1])
    chat = reference["greedy"][0]
    first, whole, second = kit.shard_of(card, 0, 14), kit.shard_of(card, 0, 29), kit.shard_of(card, 15, 29)
    engine = await kit.loaded_engine(card, 0, 14)
    try:
        first_bytes = engine.weight_bytes()
        await engine.load(whole, card)
        blocks = {s: engine._held[s].model.blocks for s in (first, whole)}
        assert all(a is b for a, b in zip(blocks[first], blocks[whole][:15], strict=True))
        reads.clear()
        await engine.load(second, card)
        assert reads == []  # every part it needs is held
        assert all(a is b for a, b in zip(engine._held[second].model.blocks, blocks[whole][15:], strict=True))
        whole_bytes = engine.weight_bytes()
        # layers 15-29 and the final norm more; the head is the (tied) embedding 0-14 holds
        added = sum(a.nbytes for b in blocks[whole][15:] for a in b.arrays())
        assert whole_bytes == first_bytes + added + engine._held[whole].model.norm.nbytes

        expected = kit.expected_answer(chat, 4)
        assert await kit.greedy([(engine, whole)], chat["prompt_ids"], 4) == expected
        await engine.unload(whole)
        assert engine.weight_bytes() == whole_bytes  # 0-14 and 15-29 still hold every part
        assert await kit.greedy([(engine, first), (engine, second)], chat["prompt_ids"], 4) == expected
        await engine.unload(second)
        assert engine.weight_bytes() == first_bytes
        assert engine.loaded_shards == (first,)
    finally:
        await engine.close()
