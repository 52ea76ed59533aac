"""Reusable checks of the engine contract, for any InferenceEngine that shards and caches.

A plugin's tests load engines once (fixtures) and call these async checks with them::

    from exo_core.testing import engine_checks

    async def test_shards_chain(whole_engine, first_half, second_half, card, prompt):
        await engine_checks.check_shards_chain(whole_engine, first_half, second_half, card, prompt, split=15)

Each check drives the engine only through the `InferenceEngine` interface (load, forward,
forward_batch, release), decodes greedily from the last stage's logits, raises
AssertionError with a readable message on a mismatch, and releases every request it made.
Request ids are unique per call, so checks can share engines.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from exo_core.engine import InferenceEngine, StageInput, StageOutput
from exo_core.models.cards import ModelCard
from exo_core.models.shard import Shard

_ids = itertools.count()


def _request_id(tag: str) -> str:
    return f"engine-check-{tag}-{next(_ids)}"


@dataclass
class Run:
    """What a greedy run produced: the tokens and the logits before each of them."""

    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)


def _logits(out: StageOutput, where: str) -> np.ndarray:
    assert out.logits is not None, f"{where}: the last stage returned no logits"
    logits = np.asarray(out.logits, dtype=np.float32)
    assert logits.ndim == 1, f"{where}: logits have shape {logits.shape}, expected [vocab]"
    assert np.isfinite(logits).all(), f"{where}: logits are not all finite"
    return logits


def _hidden(out: StageOutput, length: int, where: str) -> np.ndarray:
    assert out.hidden is not None, f"{where}: a stage before the last returned no hidden states"
    hidden = out.hidden
    assert hidden.dtype == np.float32, f"{where}: hidden states are {hidden.dtype}, expected float32"
    assert hidden.ndim == 2 and hidden.shape[0] == length, (
        f"{where}: hidden states have shape {hidden.shape}, expected [{length}, hidden]"
    )
    return hidden


async def _step(
    stages: Sequence[tuple[InferenceEngine, Shard]], request_id: str, tokens: Sequence[int]
) -> np.ndarray:
    """Run new tokens through a chain of stages; the last stage's logits."""
    item = StageInput(request_id, tokens=np.asarray(tokens, dtype=np.int64))
    for engine, shard in stages[:-1]:
        out = await engine.forward(shard, item)
        item = StageInput(request_id, hidden=_hidden(out, len(tokens), f"{engine.name} {shard}"))
    engine, shard = stages[-1]
    return _logits(await engine.forward(shard, item), f"{engine.name} {shard}")


async def greedy(
    stages: Sequence[tuple[InferenceEngine, Shard]], prompt: Sequence[int], steps: int, tag: str = "greedy"
) -> Run:
    """Prefill `prompt`, then decode `steps` tokens greedily, through a chain of (engine, shard)."""
    request_id = _request_id(tag)
    run = Run()
    try:
        new = list(prompt)
        for _ in range(steps):
            logits = await _step(stages, request_id, new)
            run.logits.append(logits)
            run.tokens.append(int(np.argmax(logits)))
            new = [run.tokens[-1]]
    finally:
        for engine, _ in stages:
            await engine.release(request_id)
    return run


def _same_run(a: Run, b: Run, what: str, rtol: float, atol: float) -> None:
    assert a.tokens == b.tokens, f"{what}: greedy tokens differ: {a.tokens} != {b.tokens}"
    for i, (x, y) in enumerate(zip(a.logits, b.logits, strict=True)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"{what}: logits of step {i} differ")


async def check_shards_chain(
    whole: InferenceEngine,
    first: InferenceEngine,
    second: InferenceEngine,
    model: ModelCard,
    prompt: Sequence[int],
    split: int,
    *,
    steps: int = 4,
    rtol: float = 1e-3,
    atol: float = 1e-3,
) -> Run:
    """Layers 0..split-1 on `first` then split..n-1 on `second` (hidden states passed as numpy
    arrays) give the same logits and greedy tokens as the whole model on `whole`."""
    n = model.n_layers
    whole_shard, head, tail = (
        Shard.whole(model.id, n),
        Shard(model.id, 0, split - 1, n),
        Shard(model.id, split, n - 1, n),
    )
    await whole.load(whole_shard, model)
    await first.load(head, model)
    await second.load(tail, model)
    alone = await greedy([(whole, whole_shard)], prompt, steps, "whole")
    chained = await greedy([(first, head), (second, tail)], prompt, steps, "chained")
    _same_run(alone, chained, f"shards {head} + {tail} vs {whole_shard}", rtol, atol)
    return chained


async def check_interleaved_equals_alone(
    engine: InferenceEngine,
    model: ModelCard,
    prompts: Sequence[Sequence[int]],
    *,
    steps: int = 4,
    shard: Shard | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-3,
) -> list[Run]:
    """Requests whose steps alternate (A prefill, B prefill, A step, B step, ...) give the same
    tokens and logits as each request run alone: caches never mix."""
    shard = shard or Shard.whole(model.id, model.n_layers)
    await engine.load(shard, model)
    stages = [(engine, shard)]
    alone = [await greedy(stages, p, steps, "alone") for p in prompts]
    ids = [_request_id("interleaved") for _ in prompts]
    runs = [Run() for _ in prompts]
    new = [list(p) for p in prompts]
    try:
        for _ in range(steps):
            for k, request_id in enumerate(ids):
                logits = await _step(stages, request_id, new[k])
                runs[k].logits.append(logits)
                runs[k].tokens.append(int(np.argmax(logits)))
                new[k] = [runs[k].tokens[-1]]
    finally:
        for request_id in ids:
            await engine.release(request_id)
    for k, (a, b) in enumerate(zip(alone, runs, strict=True)):
        _same_run(a, b, f"request {k} interleaved vs alone", rtol, atol)
    return runs


async def check_batch_equals_single(
    engine: InferenceEngine,
    model: ModelCard,
    prompts: Sequence[Sequence[int]],
    *,
    steps: int = 4,
    shard: Shard | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-3,
) -> list[Run]:
    """Decode steps of several requests sent as one `forward_batch` give the same logits and
    tokens as the same requests decoded one `forward` at a time (prompts of different lengths,
    so the batched requests sit at different positions)."""
    shard = shard or Shard.whole(model.id, model.n_layers)
    await engine.load(shard, model)
    stages = [(engine, shard)]
    single = [await greedy(stages, p, steps, "single") for p in prompts]
    ids = [_request_id("batched") for _ in prompts]
    runs = [Run() for _ in prompts]
    try:
        for k, request_id in enumerate(ids):  # prefill one by one
            logits = await _step(stages, request_id, prompts[k])
            runs[k].logits.append(logits)
            runs[k].tokens.append(int(np.argmax(logits)))
        for _ in range(steps - 1):
            items = [
                StageInput(rid, tokens=np.asarray([r.tokens[-1]], np.int64))
                for rid, r in zip(ids, runs, strict=True)
            ]
            outs = await engine.forward_batch(shard, items)
            assert len(outs) == len(items), (
                f"forward_batch returned {len(outs)} outputs for {len(items)} steps"
            )
            for k, out in enumerate(outs):
                logits = _logits(out, f"{engine.name} batched request {k}")
                runs[k].logits.append(logits)
                runs[k].tokens.append(int(np.argmax(logits)))
    finally:
        for request_id in ids:
            await engine.release(request_id)
    for k, (a, b) in enumerate(zip(single, runs, strict=True)):
        _same_run(a, b, f"request {k} batched vs single", rtol, atol)
    return runs


async def check_release_frees_cache(
    engine: InferenceEngine,
    model: ModelCard,
    prompt: Sequence[int],
    *,
    shard: Shard | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> None:
    """After `release`, the request id starts from an empty cache (same logits as the first
    time, not a continuation); releasing an unknown id is not an error. Engines that report
    `cached_requests()` must count one fewer after the release."""
    shard = shard or Shard.whole(model.id, model.n_layers)
    await engine.load(shard, model)
    stages = [(engine, shard)]
    request_id = _request_id("release")
    count = getattr(engine, "cached_requests", None)
    before: int = count() if count else 0
    first = await _step(stages, request_id, prompt)
    if count:
        assert count() == before + 1, (
            f"cached_requests() is {count()} after one request, expected {before + 1}"
        )
    await engine.release(request_id)
    if count:
        assert count() == before, f"cached_requests() is {count()} after release, expected {before}"
    again = await _step(stages, request_id, prompt)
    await engine.release(request_id)
    np.testing.assert_allclose(
        again,
        first,
        rtol=rtol,
        atol=atol,
        err_msg="the same prompt after release gave other logits: the cache was kept",
    )
    await engine.release("engine-check-never-used")  # must not raise
