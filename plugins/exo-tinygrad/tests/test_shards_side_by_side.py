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

    from exo_core import EngineError, Shard, StageInput

    shard = Shard.whole(card.id, card.n_layers)
    monkeypatch.setattr(engine_module, "MEMORY_HEADROOM", 1 << 50)  # as if memory were full
    with pytest.raises(EngineError, match="not enough free memory for a KV cache"):
        await engine.forward(shard, StageInput("too-big", tokens=np.arange(1, 9)))
    assert engine.cached_requests() == 0


async def test_a_step_at_another_position_than_its_cache_is_refused(engine, card, reference):
    prompt = reference["greedy"][0]["prompt_ids"]
    await engine_checks.check_start_pos_is_enforced(engine, card, prompt, rtol=1e-3, atol=1e-3)
