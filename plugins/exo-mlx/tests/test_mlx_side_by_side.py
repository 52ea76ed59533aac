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
