"""The cluster stays right while it changes (in one process, real gRPC on 127.0.0.1, dummy engine).

A peer joining mid-answer, two models on one node, a malformed step in a batch, NaN logits, a
stage that hangs without dying, a single node that hangs, and a prompt whose prefill takes
longer than --step-timeout. The dummy engine checks positions like a real engine, so a lost
cache is an error here, not wrong text.
"""

import asyncio
import contextlib
import dataclasses
import time

import numpy as np
import pytest
from core_helpers import manual_runtimes as runtimes
from core_helpers import until

from exo_core.engine import StageInput, StageOutput
from exo_core.engines.dummy import DUMMY_ANSWER, DummyEngine
from exo_core.errors import EngineError
from exo_core.models.shard import Shard
from exo_core.node.generate import TextRequest
from exo_core.node.messages import GenerationError, StepMessage, TokenMessage
from exo_core.node.node import Node
from exo_core.node.partitioning import PlanStage
from exo_core.node.sampling import SamplingParams
from exo_core.node.topology import NodeInfo
from exo_core.plugins import registry
from exo_core.testing import engine_checks
from exo_core.testing.cluster import write_peers_file

CHAT = [{"role": "user", "content": "Say hello."}]

pytestmark = pytest.mark.timeout(60)


async def chat(rt, messages=CHAT, model=None, max_tokens=None):
    request = TextRequest(model=model or rt.default_model, messages=messages, max_tokens=max_tokens)
    prepared = rt.generator.prepare(request)
    return "".join([c.text async for c in rt.generator.stream(prepared)])


def set_step_timeout(rt, seconds):
    rt.node.origin.step_timeout = seconds
    rt.node.stage.step_timeout = seconds


# ---- topology changes mid-answer --------------------------------------------------------------


async def test_a_peer_joining_mid_answer_leaves_the_running_answer_alone(tmp_path):
    """a streams alone; b joins; a new request gets a two-node plan while the first goes on."""
    async with runtimes(tmp_path, ["a", "b"], listed=["a"], delay_ms=40) as (rts, specs, path):
        a = rts["a"]
        card = a.default_model
        first = a.generator.stream(a.generator.prepare(TextRequest(model=card, messages=CHAT)))
        pieces = [(await anext(first)).text for _ in range(3)]
        write_peers_file(path, [specs["a"], specs["b"]])
        await until(lambda: set(a.node.peers) == {"b"})
        assert [s.node_id for s in a.node.make_plan(card)] == ["a", "b"]
        second = asyncio.create_task(chat(a))
        pieces += [c.text async for c in first]
        assert "".join(pieces) == DUMMY_ANSWER
        assert await second == DUMMY_ANSWER
        held = set(a.node.engine.loaded_shards)
        assert {Shard.whole(card.id, card.n_layers), Shard(card.id, 0, 14, 30)} <= held
        await until(lambda: not a.node.active_stage_requests() and not rts["b"].node.active_stage_requests())


async def test_two_models_at_once_on_one_node(tmp_path):
    reg = registry()
    card = reg.models["smollm2-135m"]
    copy = dataclasses.replace(card, id="smollm2-copy", name="the same GGUF again", aliases=())
    reg = dataclasses.replace(reg, models={**reg.models, copy.id: copy})
    async with runtimes(tmp_path, ["a"], delay_ms=20, reg=reg) as (rts, _specs, _path):
        a = rts["a"]
        answers = await asyncio.gather(chat(a, model=card), chat(a, model=copy), chat(a, model=card))
        assert answers == [DUMMY_ANSWER] * 3
        assert {s.model_id for s in a.node.engine.loaded_shards} == {card.id, copy.id}


# ---- failures isolated per request ------------------------------------------------------------


class _Recorder:
    """A peer standing in for the origin of crafted steps: it records what it is sent."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[TokenMessage]] = {}
        self.failures: list = []

    async def send_step(self, msg) -> None:
        raise AssertionError("no step goes to the origin in these plans")

    async def send_token(self, msg: TokenMessage) -> bool:
        self.tokens.setdefault(msg.request_id, []).append(msg)
        return True

    async def report_failure(self, failure) -> None:
        self.failures.append(failure)

    async def release(self, request_id, up_to_attempt) -> None:
        return None

    async def health(self, request_id="", attempt=0):
        raise AssertionError("not used")


@contextlib.asynccontextmanager
async def lone_stage(engine):
    """A node whose stage runs steps sent by a recording origin "o"."""
    node = Node("s", engine, dict(registry().models))
    recorder = _Recorder()
    node.add_peer(NodeInfo(node_id="o", address="127.0.0.1", port=1), recorder)
    await node.start()
    try:
        yield node, recorder
    finally:
        await node.stop()


def step(node, rid, tokens, max_tokens=3, **fields):
    card = node.models["smollm2-135m"]
    shard = Shard.whole(card.id, card.n_layers)
    return StepMessage(
        request_id=rid,
        attempt=0,
        origin="o",
        plan=(PlanStage("s", shard),),
        stage_index=0,
        sampling=SamplingParams(),
        max_tokens=max_tokens,
        eos_token_ids=(),
        step=0,
        tokens=tokens,
        **fields,
    )


async def _run_batch_with(node, recorder, bad):
    """A good request and a bad step queued together, so they meet in one batch."""
    await node.engine.load(step(node, "x", None).stage.shard, node.models["smollm2-135m"])
    await node.receive_step(step(node, "good", np.array([1, 2, 3], dtype=np.int64)))
    await node.receive_step(bad)
    await until(lambda: len(recorder.tokens.get("good", [])) == 3 and recorder.tokens.get(bad.request_id))
    good = recorder.tokens["good"]
    assert [t.error for t in good] == [None] * 3 and good[-1].finish_reason == "length"
    (error,) = recorder.tokens[bad.request_id]
    await node.release("good")  # what the origin does when the answer ends
    await until(lambda: node.active_stage_requests() == 0)
    return error.error


@pytest.mark.parametrize(
    "bad_tokens, hidden, expected",
    [
        (np.array([], dtype=np.int64), None, "at least one position"),
        (np.array([1.5, 2.5]), None, "1-D integer array"),
        (None, np.zeros((2, 3), dtype=np.float32), "hidden states must be float"),
    ],
    ids=["zero-length", "float-token-ids", "wrong-width"],
)
async def test_a_malformed_step_fails_only_its_own_request(bad_tokens, hidden, expected):
    async with lone_stage(DummyEngine({"dummy_delay_ms": 5})) as (node, recorder):
        bad = dataclasses.replace(step(node, "bad", bad_tokens), hidden=hidden)
        assert expected in await _run_batch_with(node, recorder, bad)


async def test_a_step_at_the_wrong_position_fails_naming_both():
    async with lone_stage(DummyEngine()) as (node, _recorder):
        card = node.models["smollm2-135m"]
        engine = node.engine
        shard = Shard.whole(card.id, card.n_layers)
        await engine.load(shard, card)
        await engine.forward(shard, StageInput("r", tokens=np.array([1, 2, 3]), start_pos=0))
        with pytest.raises(EngineError, match="starts at position 5, but its cache holds 3 positions"):
            await engine.forward(shard, StageInput("r", tokens=np.array([4]), start_pos=5))
        out = await engine.forward(shard, StageInput("r", tokens=np.array([4]), start_pos=3))
        assert out.logits is not None


class NaNEngine(DummyEngine):
    """The dummy engine, but requests whose id starts with "nan" get NaN logits (a numerical fault)."""

    async def forward_batch(self, shard, items):
        outs = await super().forward_batch(shard, items)
        return [
            StageOutput(logits=np.full_like(o.logits, np.nan)) if i.request_id.startswith("nan") else o
            for i, o in zip(items, outs, strict=True)
        ]


async def test_nan_logits_fail_that_request_with_a_clear_error():
    async with lone_stage(NaNEngine({"dummy_delay_ms": 5})) as (node, recorder):
        error = await _run_batch_with(node, recorder, step(node, "nan-bad", np.array([5], dtype=np.int64)))
        assert "NaN logits" in error


# ---- no silent stalls -------------------------------------------------------------------------


async def test_a_stage_that_hangs_without_dying_is_left_out_of_the_replay(tmp_path):
    async with runtimes(tmp_path, ["a", "b"], delay_ms=10) as (rts, _specs, _path):
        a, b = rts["a"], rts["b"]
        await until(lambda: set(a.node.peers) == {"b"} and set(b.node.peers) == {"a"})
        for rt in (a, b):
            set_step_timeout(rt, 1.0)
        b.node.engine.hang_after = b.node.engine.forwards + 2  # b answers health, computes nothing
        started = time.monotonic()
        assert await chat(a) == DUMMY_ANSWER
        assert time.monotonic() - started < 10
        assert 1 <= a.node.origin.replans_total <= 2  # b's own report, or a's timer first
        assert not b.node.stage.healthy


async def test_a_hung_lone_node_gives_the_client_an_error_within_its_deadline(tmp_path):
    async with runtimes(tmp_path, ["a"]) as (rts, _specs, _path):
        a = rts["a"]
        set_step_timeout(a, 0.5)
        a.node.engine.hang_after = 0
        started = time.monotonic()
        with pytest.raises(GenerationError, match="made no progress"):
            await chat(a)
        assert time.monotonic() - started < 5


async def test_a_prefill_longer_than_the_step_timeout_is_progress_not_a_failure(tmp_path, monkeypatch):
    """A prompt of ~2,600 tokens is 11 slices of 0.15 s: 1.6 s of prefill, step timeout 0.5 s,
    and requests idle for 1 s are freed (but not while they compute)."""
    from exo_core.node import stage as stage_module

    monkeypatch.setattr(stage_module, "MIN_IDLE_S", 1.0)
    async with runtimes(tmp_path, ["a", "b"], delay_ms=300, step_timeout=0.5) as (rts, _specs, _path):
        a = rts["a"]
        await until(lambda: set(a.node.peers) == {"b"})
        long = [{"role": "user", "content": "one two three four " * 600}]
        assert await chat(a, long, max_tokens=2) == DUMMY_ANSWER[: len(await chat(a, max_tokens=2))]
        assert a.node.origin.replans_total == 0


async def test_the_dummy_engine_holds_shards_side_by_side():
    card = registry().models["smollm2-135m"]
    copy = dataclasses.replace(card, id="smollm2-copy", aliases=())
    engine = DummyEngine()
    await engine_checks.check_shards_side_by_side(engine, card, [[1, 2, 3], [4, 5]], split=15, other=copy)


class _BrokenOrigin(_Recorder):
    """An origin whose token handler has a bug: it raises on error tokens (not PeerUnavailable)."""

    async def send_token(self, msg: TokenMessage) -> bool:
        if msg.error is not None:
            raise RuntimeError("a bug in the origin's token handler")
        return await super().send_token(msg)


class _FailingEngine(DummyEngine):
    async def forward_batch(self, shard, items):
        if any(i.request_id.startswith("boom") for i in items):
            raise RuntimeError("engine bug")
        return await super().forward_batch(shard, items)


async def test_a_dead_engine_worker_is_not_silent():
    """The worker dies (an exception escaped even its error handling): health says so, the
    requests it held and every new step are reported failed, so origins re-plan elsewhere."""
    node = Node("s", _FailingEngine(), dict(registry().models))
    origin = _BrokenOrigin()
    node.add_peer(NodeInfo(node_id="o", address="127.0.0.1", port=1), origin)
    await node.start()
    try:
        held = step(node, "held", np.array([1, 2], dtype=np.int64), max_tokens=1)
        await node.receive_step(held)
        await until(lambda: origin.tokens.get("held"))
        await node.receive_step(step(node, "boom", np.array([3], dtype=np.int64)))
        await until(lambda: node.stage.broken is not None)
        assert not node.stage.healthy
        assert node.request_state("held", 0).value == "released"
        await node.receive_step(step(node, "late", np.array([4], dtype=np.int64)))
        await until(lambda: any(f.request_id == "late" for f in origin.failures))
        assert all(f.node_id == "s" for f in origin.failures)
    finally:
        await node.stop()


async def test_healthcheck_says_unhealthy_while_the_engine_is_stuck():
    import aiohttp

    from exo_core.testing import node as test_node
    from exo_core.testing.inprocess import api_url

    async with test_node("dummy", api=True, engine_options={"dummy_hang_after": 0}) as rt:
        set_step_timeout(rt, 0.3)
        stuck = asyncio.create_task(chat(rt))
        await until(lambda: rt.node.stage.stuck_for > 0.3)
        async with aiohttp.ClientSession() as http:
            async with http.get(api_url(rt) + "/healthcheck") as resp:
                body = await resp.json()
        assert resp.status == 503 and body["status"] == "unhealthy", body
        assert "no progress" in body["problem"]
        with pytest.raises(GenerationError):
            await stuck


async def test_the_engine_queue_is_bounded(monkeypatch):
    from exo_core.node import stage as stage_module

    monkeypatch.setattr(stage_module, "MAX_QUEUED_STEPS", 2)
    async with lone_stage(DummyEngine({"dummy_hang_after": 0})) as (node, recorder):
        for rid in ("r1", "r2", "r3", "r4"):
            await node.receive_step(step(node, rid, np.array([1], dtype=np.int64)))
            await asyncio.sleep(0.05)  # r1 reaches the (hung) engine, r2 and r3 wait
        await until(lambda: [f.request_id for f in recorder.failures] == ["r4"])
        assert "steps already wait" in recorder.failures[0].reason


async def test_every_request_has_an_overall_deadline(tmp_path):
    """b takes steps and never answers, yet stays healthy: re-plans alone would go on for
    max_replans x step_timeout; the request's stall deadline ends it first."""
    async with runtimes(tmp_path, ["a", "b"]) as (rts, _specs, _path):
        a, b = rts["a"], rts["b"]
        await until(lambda: set(a.node.peers) == {"b"})
        origin = a.node.origin
        origin.step_timeout, origin.max_replans, origin.stall_timeout = 0.3, 1000, 2.0

        async def swallow(msg):
            return None

        b.node.receive_step = swallow
        started = time.monotonic()
        with pytest.raises(GenerationError, match=r"no progress for .* giving up"):
            await chat(a)
        assert time.monotonic() - started < 5


class _GarbageEngine(DummyEngine):
    """Requests whose id starts with "junk" get logits that are not numbers (a broken engine)."""

    async def forward_batch(self, shard, items):
        outs = await super().forward_batch(shard, items)
        return [
            StageOutput(logits=np.array(["?"] * 4)) if i.request_id.startswith("junk") else o
            for i, o in zip(items, outs, strict=True)
        ]


async def test_an_exception_after_the_forward_fails_its_request_instead_of_vanishing():
    async with lone_stage(_GarbageEngine({"dummy_delay_ms": 5})) as (node, recorder):
        error = await _run_batch_with(node, recorder, step(node, "junk", np.array([5], dtype=np.int64)))
        assert error.startswith("s: ")
