"""Reusable checks of the engine contract, for any tensor InferenceEngine (one that shards and caches).

The whole suite, as one parametrised pytest test (what `docs/plugins.md` describes)::

    import pytest
    from exo_core.testing import engine_checks

    @pytest.fixture
    def subject():
        return engine_checks.Subject(make_engine=MyEngine, model=CARD, prompts=[[1, 2, 3], [4, 5, 6, 7, 8]])

    @pytest.mark.parametrize("check", engine_checks.CHECKS)
    async def test_engine_contract(subject, check):
        await engine_checks.run(check, subject)

Or single checks on engines a plugin's fixtures already loaded (loading can cost seconds)::

    async def test_shards_chain(whole_engine, first_half, second_half, card, prompt):
        await engine_checks.check_shards_chain(whole_engine, first_half, second_half, card, prompt, split=15)

Each check drives the engine only through the `InferenceEngine` interface (load, forward,
forward_batch, release, loaded_shards, cached_requests, copy_prefix), gives every step its `start_pos`,
decodes greedily from the last stage's logits, raises AssertionError with a readable message on
a mismatch, and releases every request it made. Request ids are unique per call, so checks can
share engines. Text engines (`works_on_text`) sample themselves and are not covered.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from exo_core.engine import InferenceEngine, StageInput, StageOutput
from exo_core.errors import EngineError
from exo_core.models.cards import ModelCard
from exo_core.models.shard import Shard

_ids = itertools.count()

Stages = Sequence[tuple[InferenceEngine, Shard]]


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


def _tokens(tokens: Sequence[int]) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64)


async def _step(stages: Stages, request_id: str, tokens: Sequence[int], start_pos: int) -> np.ndarray:
    """Run new tokens (at positions start_pos..) through a chain of stages; the last stage's logits."""
    item = StageInput(request_id, tokens=_tokens(tokens), start_pos=start_pos)
    for engine, shard in stages[:-1]:
        out = await engine.forward(shard, item)
        hidden = _hidden(out, len(tokens), f"{engine.name} {shard}")
        item = StageInput(request_id, hidden=hidden, start_pos=start_pos)
    engine, shard = stages[-1]
    return _logits(await engine.forward(shard, item), f"{engine.name} {shard}")


async def greedy(stages: Stages, prompt: Sequence[int], steps: int, tag: str = "greedy") -> Run:
    """Prefill `prompt`, then decode `steps` tokens greedily, through a chain of (engine, shard)."""
    request_id = _request_id(tag)
    run = Run()
    try:
        new, pos = list(prompt), 0
        for _ in range(steps):
            logits = await _step(stages, request_id, new, pos)
            pos += len(new)
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


def _whole(model: ModelCard, shard: Shard | None) -> Shard:
    return shard or Shard.whole(model.id, model.n_layers)


async def check_loaded_shards(
    engine: InferenceEngine, model: ModelCard, *, shard: Shard | None = None
) -> None:
    """After `load(shard)` the engine reports the shard in `loaded_shards`; loading it again
    changes nothing (load is idempotent)."""
    shard = _whole(model, shard)
    await engine.load(shard, model)
    held = tuple(engine.loaded_shards)
    assert shard in held, f"loaded_shards is {held} after load({shard})"
    await engine.load(shard, model)
    again = tuple(engine.loaded_shards)
    assert again == held, f"loading {shard} a second time changed loaded_shards from {held} to {again}"


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
    shard = _whole(model, shard)
    await engine.load(shard, model)
    stages = [(engine, shard)]
    alone = [await greedy(stages, p, steps, "alone") for p in prompts]
    ids = [_request_id("interleaved") for _ in prompts]
    runs = [Run() for _ in prompts]
    new = [list(p) for p in prompts]
    pos = [0 for _ in prompts]
    try:
        for _ in range(steps):
            for k, request_id in enumerate(ids):
                logits = await _step(stages, request_id, new[k], pos[k])
                pos[k] += len(new[k])
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
    shard = _whole(model, shard)
    await engine.load(shard, model)
    stages = [(engine, shard)]
    single = [await greedy(stages, p, steps, "single") for p in prompts]
    ids = [_request_id("batched") for _ in prompts]
    runs = [Run() for _ in prompts]
    pos = [len(p) for p in prompts]
    try:
        for k, request_id in enumerate(ids):  # prefill one by one
            logits = await _step(stages, request_id, prompts[k], 0)
            runs[k].logits.append(logits)
            runs[k].tokens.append(int(np.argmax(logits)))
        for _ in range(steps - 1):
            items = [
                StageInput(rid, tokens=_tokens([r.tokens[-1]]), start_pos=p)
                for rid, r, p in zip(ids, runs, pos, strict=True)
            ]
            outs = await engine.forward_batch(shard, items)
            assert len(outs) == len(items), (
                f"forward_batch returned {len(outs)} outputs for {len(items)} steps"
            )
            for k, out in enumerate(outs):
                logits = _logits(out, f"{engine.name} batched request {k}")
                runs[k].logits.append(logits)
                runs[k].tokens.append(int(np.argmax(logits)))
                pos[k] += 1
    finally:
        for request_id in ids:
            await engine.release(request_id)
    for k, (a, b) in enumerate(zip(single, runs, strict=True)):
        _same_run(a, b, f"request {k} batched vs single", rtol, atol)
    return runs


async def check_batch_mixes_prefill_and_decode(
    engine: InferenceEngine,
    model: ModelCard,
    prompts: Sequence[Sequence[int]],
    *,
    shard: Shard | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-3,
) -> None:
    """One `forward_batch` may hold a decode step of one request and the whole prompt of another
    (the node batches whatever is waiting); each gets the logits it would get alone."""
    assert len(prompts) >= 2, "check_batch_mixes_prefill_and_decode needs two prompts"
    shard = _whole(model, shard)
    await engine.load(shard, model)
    stages = [(engine, shard)]
    a_prompt, b_prompt = prompts[0], prompts[1]
    a_alone = await greedy(stages, a_prompt, 2, "mixed-alone")
    b_alone = await greedy(stages, b_prompt, 1, "mixed-alone")
    a, b = _request_id("mixed"), _request_id("mixed")
    try:
        await _step(stages, a, a_prompt, 0)
        items = [
            StageInput(a, tokens=_tokens([a_alone.tokens[0]]), start_pos=len(a_prompt)),
            StageInput(b, tokens=_tokens(b_prompt), start_pos=0),
        ]
        outs = await engine.forward_batch(shard, items)
        assert len(outs) == 2, f"forward_batch returned {len(outs)} outputs for 2 steps"
        a_logits = _logits(outs[0], f"{engine.name} decode beside a prefill")
        b_logits = _logits(outs[1], f"{engine.name} prefill beside a decode")
    finally:
        await engine.release(a)
        await engine.release(b)
    np.testing.assert_allclose(
        a_logits, a_alone.logits[1], rtol=rtol, atol=atol, err_msg="a decode batched with a prefill differs"
    )
    np.testing.assert_allclose(
        b_logits, b_alone.logits[0], rtol=rtol, atol=atol, err_msg="a prefill batched with a decode differs"
    )


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
    time, not a continuation); releasing an unknown id is not an error; `cached_requests()`
    counts the request while it holds a cache and not after its release."""
    shard = _whole(model, shard)
    await engine.load(shard, model)
    stages = [(engine, shard)]
    request_id = _request_id("release")
    before = engine.cached_requests()
    first = await _step(stages, request_id, prompt, 0)
    assert engine.cached_requests() == before + 1, (
        f"cached_requests() is {engine.cached_requests()} after one request, expected {before + 1}"
    )
    await engine.release(request_id)
    assert engine.cached_requests() == before, (
        f"cached_requests() is {engine.cached_requests()} after release, expected {before}"
    )
    again = await _step(stages, request_id, prompt, 0)
    await engine.release(request_id)
    np.testing.assert_allclose(
        again,
        first,
        rtol=rtol,
        atol=atol,
        err_msg="the same prompt after release gave other logits: the cache was kept",
    )
    await engine.release("engine-check-never-used")  # must not raise


async def check_cached_requests(
    engine: InferenceEngine,
    model: ModelCard,
    prompts: Sequence[Sequence[int]],
    *,
    shard: Shard | None = None,
) -> None:
    """`cached_requests()` goes up by one for each request that ran a step, stays put while a
    request goes on, and comes back down as each is released."""
    shard = _whole(model, shard)
    await engine.load(shard, model)
    stages = [(engine, shard)]
    before = engine.cached_requests()
    ids = [_request_id("count") for _ in prompts]
    try:
        for k, (request_id, prompt) in enumerate(zip(ids, prompts, strict=True)):
            logits = await _step(stages, request_id, prompt, 0)
            await _step(stages, request_id, [int(np.argmax(logits))], len(prompt))
            count = engine.cached_requests()
            assert count == before + k + 1, (
                f"cached_requests() is {count} with {k + 1} requests running, expected {before + k + 1}"
            )
    finally:
        for k, request_id in enumerate(ids):
            await engine.release(request_id)
            left = len(ids) - k - 1
            count = engine.cached_requests()
            assert count == before + left, (
                f"cached_requests() is {count} after releasing {k + 1} of {len(ids)}, expected {before + left}"
            )


async def check_shards_side_by_side(
    engine: InferenceEngine,
    model: ModelCard,
    prompts: Sequence[Sequence[int]],
    split: int,
    *,
    steps: int = 4,
    other: ModelCard | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> None:
    """A request running on the whole model keeps its cache while the same engine loads layers
    0..split-1 (and, with `other`, a second model card) and runs a request there: what a node
    does when a peer joins mid-answer, or when it serves two models. The first request's greedy
    tokens and logits equal its run alone, and the engine holds every shard."""
    whole = _whole(model, None)
    first_half = Shard(model.id, 0, split - 1, model.n_layers)
    await engine.load(whole, model)
    expected = await greedy([(engine, whole)], prompts[0], steps, "side-by-side-alone")
    running, newcomer = _request_id("side-by-side"), _request_id("newcomer")
    extra = [(first_half, model)] + ([(_whole(other, None), other)] if other is not None else [])
    run = Run()
    try:
        new, pos = list(prompts[0]), 0
        for step in range(steps):
            logits = await _step([(engine, whole)], running, new, pos)
            pos += len(new)
            run.logits.append(logits)
            run.tokens.append(int(np.argmax(logits)))
            new = [run.tokens[-1]]
            if step == 0:  # mid-answer: other shards arrive and run requests of their own
                for shard, card in extra:
                    await engine.load(shard, card)
                    await engine.forward(shard, StageInput(newcomer, tokens=_tokens(prompts[1])))
                    await engine.release(newcomer)
        held = set(engine.loaded_shards)
        wanted = {whole, *(shard for shard, _ in extra)}
        assert wanted <= held, (
            f"loaded_shards is {sorted(map(str, held))}, expected {sorted(map(str, wanted))}"
        )
    finally:
        await engine.release(running)
        await engine.release(newcomer)
    _same_run(expected, run, "a request while other shards loaded and ran next to it", rtol, atol)


async def check_start_pos_is_enforced(
    engine: InferenceEngine,
    model: ModelCard,
    prompt: Sequence[int],
    *,
    shard: Shard | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> None:
    """A step whose `start_pos` is not where the request's cache is raises `EngineError` (both
    ahead and behind) and changes nothing: the right step afterwards gives the logits it would
    have given anyway."""
    shard = _whole(model, shard)
    await engine.load(shard, model)
    stages = [(engine, shard)]
    expected = await greedy(stages, prompt, 2, "positions-alone")
    request_id = _request_id("positions")
    n = len(prompt)
    try:
        await _step(stages, request_id, prompt, 0)
        for wrong in (n + 3, n - 1):
            try:
                await _step(stages, request_id, [expected.tokens[0]], wrong)
            except EngineError:
                pass
            else:
                raise AssertionError(
                    f"a step at start_pos={wrong} was accepted while the request's cache holds {n} "
                    "positions; raise EngineError naming both"
                )
        logits = await _step(stages, request_id, [expected.tokens[0]], n)
    finally:
        await engine.release(request_id)
    np.testing.assert_allclose(
        logits,
        expected.logits[1],
        rtol=rtol,
        atol=atol,
        err_msg="a refused step at a wrong start_pos changed the request's cache",
    )


async def check_copy_prefix(
    engine: InferenceEngine,
    model: ModelCard,
    prompt: Sequence[int],
    *,
    shard: Shard | None = None,
    steps: int = 3,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> None:
    """An engine that `reuses_prefixes`: a cache started by `copy_prefix` from another request's
    first positions continues exactly as a cache filled from scratch; the source is unchanged;
    copying more positions than the source holds raises `EngineError`. (Others: nothing to check.)"""
    if not engine.reuses_prefixes:
        return
    shard = _whole(model, shard)
    await engine.load(shard, model)
    stages = [(engine, shard)]
    expected = await greedy(stages, prompt, steps, "prefix-alone")
    source, copy, too_long = (
        _request_id("prefix-source"),
        _request_id("prefix-copy"),
        _request_id("prefix-long"),
    )
    keep = max(len(prompt) - 2, 1)
    try:
        await _step(stages, source, prompt, 0)
        try:
            await engine.copy_prefix(source, too_long, len(prompt) + 1)
        except EngineError:
            pass
        else:
            raise AssertionError(
                f"copy_prefix of {len(prompt) + 1} positions from a cache of {len(prompt)} was accepted; "
                "raise EngineError"
            )
        await engine.copy_prefix(source, copy, keep)
        run, new, pos = Run(), list(prompt[keep:]), keep
        for _ in range(steps):
            logits = await _step(stages, copy, new, pos)
            pos += len(new)
            run.logits.append(logits)
            run.tokens.append(int(np.argmax(logits)))
            new = [run.tokens[-1]]
        _same_run(run, expected, "a cache started from a copied prefix", rtol, atol)
        logits = await _step(stages, source, [expected.tokens[0]], len(prompt))
        np.testing.assert_allclose(
            logits, expected.logits[1], rtol=rtol, atol=atol, err_msg="copy_prefix changed the source cache"
        )
    finally:
        for request_id in (source, copy, too_long):
            await engine.release(request_id)


# ---- the suite ------------------------------------------------------------------------------


@dataclass
class Subject:
    """An engine under test: how to make one, the model it runs, and prompts (token ids) for it.

    `make_engine()` returns a fresh, unloaded engine (the class itself will do, or a lambda
    passing options); the suite loads what each check needs and closes every engine it made.
    Give at least two prompts of different lengths. `split` is the first layer of the second
    shard in the shards check (default: half the layers).
    """

    make_engine: Callable[[], InferenceEngine]
    model: ModelCard
    prompts: Sequence[Sequence[int]]
    split: int | None = None
    steps: int = 4
    rtol: float = 1e-3
    atol: float = 1e-3


async def _suite_loaded_shards(s: Subject, engines: list[InferenceEngine]) -> None:
    engine = _made(s, engines)
    await check_loaded_shards(engine, s.model)
    if s.model.n_layers >= 2:  # a later shard of another engine holds only that shard
        part = Shard(s.model.id, s.model.n_layers - 1, s.model.n_layers - 1, s.model.n_layers)
        await check_loaded_shards(_made(s, engines), s.model, shard=part)


async def _suite_shards_chain(s: Subject, engines: list[InferenceEngine]) -> None:
    if s.model.n_layers < 2:
        return  # nothing to cut
    split = s.split if s.split is not None else s.model.n_layers // 2
    whole, first, second = _made(s, engines), _made(s, engines), _made(s, engines)
    await check_shards_chain(
        whole, first, second, s.model, s.prompts[0], split, steps=s.steps, rtol=s.rtol, atol=s.atol
    )


async def _suite_interleaved(s: Subject, engines: list[InferenceEngine]) -> None:
    await check_interleaved_equals_alone(
        _made(s, engines), s.model, s.prompts, steps=s.steps, rtol=s.rtol, atol=s.atol
    )


async def _suite_batch(s: Subject, engines: list[InferenceEngine]) -> None:
    await check_batch_equals_single(
        _made(s, engines), s.model, s.prompts, steps=s.steps, rtol=s.rtol, atol=s.atol
    )


async def _suite_mixed_batch(s: Subject, engines: list[InferenceEngine]) -> None:
    await check_batch_mixes_prefill_and_decode(
        _made(s, engines), s.model, s.prompts, rtol=s.rtol, atol=s.atol
    )


async def _suite_release(s: Subject, engines: list[InferenceEngine]) -> None:
    await check_release_frees_cache(_made(s, engines), s.model, s.prompts[0])


async def _suite_cached_requests(s: Subject, engines: list[InferenceEngine]) -> None:
    await check_cached_requests(_made(s, engines), s.model, s.prompts)


async def _suite_start_pos(s: Subject, engines: list[InferenceEngine]) -> None:
    await check_start_pos_is_enforced(_made(s, engines), s.model, s.prompts[0], rtol=s.rtol, atol=s.atol)


async def _suite_copy_prefix(s: Subject, engines: list[InferenceEngine]) -> None:
    await check_copy_prefix(_made(s, engines), s.model, s.prompts[1], rtol=s.rtol, atol=s.atol)


def _made(s: Subject, engines: list[InferenceEngine]) -> InferenceEngine:
    engine = s.make_engine()
    assert isinstance(engine, InferenceEngine), f"make_engine() returned {engine!r}, not an InferenceEngine"
    engines.append(engine)
    return engine


_SUITE: dict[str, Callable[[Subject, list[InferenceEngine]], Awaitable[None]]] = {
    "loaded_shards": _suite_loaded_shards,
    "shards_chain": _suite_shards_chain,
    "interleaved_equals_alone": _suite_interleaved,
    "batch_equals_single": _suite_batch,
    "batch_mixes_prefill_and_decode": _suite_mixed_batch,
    "release_frees_cache": _suite_release,
    "cached_requests": _suite_cached_requests,
    "start_pos_is_enforced": _suite_start_pos,
    "copy_prefix": _suite_copy_prefix,
}

# The names of the suite's checks, for `@pytest.mark.parametrize("check", engine_checks.CHECKS)`.
CHECKS: tuple[str, ...] = tuple(_SUITE)


async def run(check: str, subject: Subject) -> None:
    """Run one check of the suite (a name from `CHECKS`) on fresh engines, closing them after."""
    try:
        suite_check = _SUITE[check]
    except KeyError:
        raise ValueError(f"no engine check {check!r}; the checks are: {', '.join(CHECKS)}") from None
    assert len(subject.prompts) >= 2, "give the Subject at least two prompts (of different lengths)"
    engines: list[InferenceEngine] = []
    try:
        await suite_check(subject, engines)
    finally:
        for engine in engines:
            await engine.close()


async def run_all(subject: Subject) -> None:
    """Every check of the suite, one after another (the first failure stops it)."""
    for check in CHECKS:
        await run(check, subject)
