"""A node's stage of the plans it is part of: run each step of a request on the engine and pass it on.

Steps wait in one queue; one engine worker batches the steps waiting at that moment into one
`forward_batch`, so concurrent requests share a read of the weights. After the forward a middle
stage sends the hidden states to the next stage; the last stage samples, sends the token to the
origin and the next step to stage 0 (in one message when stage 0 is the origin).

A stage remembers of each request only its attempt, its cache positions and (last stage) its
token history. A step of an older attempt is dropped; one of a newer attempt frees the older
attempt's cache. A released request leaves a tombstone that drops its late steps, so nothing
keeps circling the ring after the origin lets go; requests whose origin went silent are freed
after a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import structlog

from exo_core.engine import InferenceEngine, StageInput, StageOutput, TextStageInput
from exo_core.errors import EngineError
from exo_core.models.cards import ModelCard
from exo_core.models.shard import Shard
from exo_core.node.messages import (
    PeerClient,
    PeerUnavailable,
    RequestState,
    StageFailure,
    StepMessage,
    TokenMessage,
)
from exo_core.node.sampling import sample

log = structlog.get_logger("exo.node")

TOMBSTONE_S = 300.0
MAX_TOMBSTONES = 10_000


@dataclass
class _StageRequest:
    """What a stage remembers of a request between steps (the last stage's token history)."""

    attempt: int
    generated: list[int] = field(default_factory=list)
    positions: int = 0  # positions queued into this stage's cache so far
    last_seen: float = field(default_factory=time.monotonic)


class Stage:
    """This node's part of every plan that uses it: steps in, engine, steps or tokens out."""

    def __init__(
        self,
        node_id: str,
        engine: InferenceEngine,
        models: dict[str, ModelCard],
        client_for: Callable[[str], PeerClient],
        *,
        step_timeout: float = 120.0,
    ) -> None:
        self.node_id = node_id
        self.engine = engine
        self.models = models
        self.step_timeout = step_timeout
        self._client_for = client_for
        self._requests: dict[str, _StageRequest] = {}
        self._released: OrderedDict[str, tuple[int, float]] = OrderedDict()  # tombstones
        self._work: asyncio.Queue[StepMessage] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._engine_worker(), name="exo-engine-worker")
            self._spawn(self._expire_idle_requests())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for task in list(self._background):
            task.cancel()

    @property
    def request_count(self) -> int:
        """Requests this stage holds a cache (or a queued step) for."""
        return len(self._requests)

    # ---- steps in ----------------------------------------------------------------------------

    async def receive_step(self, msg: StepMessage) -> None:
        """A step addressed to this stage: queue it for the engine worker."""
        tomb = self._released.get(msg.request_id)
        if tomb is not None and msg.attempt <= tomb[0]:
            return  # the origin already let go of this attempt
        known = self._requests.get(msg.request_id)
        if known is not None and known.attempt > msg.attempt:
            return  # stale
        if known is None or known.attempt < msg.attempt:
            if known is not None:
                await self.engine.release(f"{msg.request_id}#{known.attempt}")
            known = self._requests[msg.request_id] = _StageRequest(msg.attempt, list(msg.replayed))
        if msg.start_pos != known.positions:
            # This stage lost (or never had) the request's cache, e.g. it restarted: the origin
            # must replay from scratch.
            self._requests.pop(msg.request_id, None)
            await self.engine.release(msg.cache_key)
            self._spawn(
                self._report(
                    msg,
                    StageFailure(
                        msg.request_id,
                        msg.attempt,
                        self.node_id,
                        f"stage {msg.stage_index} on {self.node_id} expected position "
                        f"{known.positions}, got {msg.start_pos}",
                    ),
                )
            )
            return
        known.positions += msg.length
        known.last_seen = time.monotonic()
        await self.start()
        self._work.put_nowait(msg)

    async def release(self, request_id: str, up_to_attempt: int | None = None) -> None:
        """Free this stage's cache for a request (attempts up to `up_to_attempt`, default all)."""
        known = self._requests.get(request_id)
        if up_to_attempt is None:
            up_to_attempt = known.attempt if known is not None else 0
        if known is not None and known.attempt <= up_to_attempt:
            del self._requests[request_id]
            await self.engine.release(f"{request_id}#{known.attempt}")
        self._bury(request_id, up_to_attempt)

    def request_state(self, request_id: str, attempt: int) -> RequestState:
        """This stage's state of one attempt of a request (QUEUED: waiting its turn in the engine)."""
        known = self._requests.get(request_id)
        if known is not None and known.attempt == attempt:
            return (
                RequestState.QUEUED if self.engine.queued(f"{request_id}#{attempt}") else RequestState.ACTIVE
            )
        tomb = self._released.get(request_id)
        if tomb is not None and tomb[0] >= attempt:
            return RequestState.RELEASED
        return RequestState.UNKNOWN

    async def _expire_idle_requests(self) -> None:
        """Free stage caches whose origin went silent (it died, or dropped this node)."""
        idle_after = max(2 * self.step_timeout, 60.0)
        while True:
            await asyncio.sleep(min(idle_after / 4, 30.0))
            now = time.monotonic()
            for request_id, known in list(self._requests.items()):
                if now - known.last_seen > idle_after:
                    log.info("releasing an abandoned request", request=request_id)
                    await self.release(request_id, known.attempt)

    def _bury(self, request_id: str, attempt: int) -> None:
        now = time.monotonic()
        previous = self._released.pop(request_id, None)
        self._released[request_id] = (max(attempt, previous[0] if previous else attempt), now)
        while self._released:
            oldest_id, (_, at) = next(iter(self._released.items()))
            if now - at < TOMBSTONE_S and len(self._released) <= MAX_TOMBSTONES:
                break
            del self._released[oldest_id]

    # ---- the engine worker -------------------------------------------------------------------

    async def _engine_worker(self) -> None:
        while True:
            batch = [await self._work.get()]
            while not self._work.empty():
                batch.append(self._work.get_nowait())
            live = [m for m in batch if self._is_current(m)]
            for shard, group in itertools.groupby(
                sorted(live, key=lambda m: _shard_key(m)), key=lambda m: m.stage.shard
            ):
                if self.engine.concurrent_steps:
                    for msg in group:
                        self._spawn(self._run_group(shard, [msg]))
                else:
                    await self._run_group(shard, list(group))

    def _is_current(self, msg: StepMessage) -> bool:
        known = self._requests.get(msg.request_id)
        return known is not None and known.attempt == msg.attempt

    async def _run_group(self, shard: Shard, group: list[StepMessage]) -> None:
        try:
            card = self.models.get(shard.model_id)
            if card is None:
                raise EngineError(f"this node has no model card for {shard.model_id}")
            await self.engine.load(shard, card)
            outputs = await self.engine.forward_batch(shard, [self._stage_input(m) for m in group])
        except Exception as exc:
            log.exception("engine failed", shard=str(shard))
            for msg in group:
                await self._send_error(msg, _error_text(exc))
            return
        for msg, out in zip(group, outputs, strict=True):
            self._spawn(self._after_forward(msg, out))

    def _stage_input(self, msg: StepMessage) -> StageInput:
        """The engine's view of a step; a text engine also gets the request itself."""
        if self.engine.works_on_text:
            return TextStageInput(
                msg.cache_key,
                msg.tokens,
                msg.hidden,
                msg.start_pos,
                messages=msg.messages,
                sampling=msg.sampling,
                max_tokens=msg.max_tokens,
                replayed=len(msg.replayed),
            )
        return StageInput(msg.cache_key, msg.tokens, msg.hidden, msg.start_pos)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- steps and tokens out ----------------------------------------------------------------

    async def _after_forward(self, msg: StepMessage, out: StageOutput) -> None:
        if not self._is_current(msg):
            # Released while we computed: the forward may have re-created the cache it freed.
            await self.engine.release(msg.cache_key)
            return
        if msg.stage_index + 1 < len(msg.plan):
            if out.hidden is None:
                await self._send_error(msg, f"{self.engine.name} returned no hidden states")
                return
            nxt = replace(
                msg,
                stage_index=msg.stage_index + 1,
                tokens=None,
                hidden=out.hidden,
                messages=None,
                deliver=None,
            )
            await self._forward_to(nxt)
            return
        await self._finish_step(msg, out)

    async def _finish_step(self, msg: StepMessage, out: StageOutput) -> None:
        """The last stage: sample the token, send it to the origin and the next step to stage 0."""
        known = self._requests[msg.request_id]
        top: tuple[tuple[int, float], ...]
        if out.token is not None:
            sampled_token, logprob, top = out.token, None, ()
        elif out.logits is not None:
            s = sample(out.logits, msg.sampling, known.generated, msg.step)
            sampled_token, logprob, top = s.token, s.logprob, s.top
        else:
            await self._send_error(msg, f"{self.engine.name} returned neither logits nor a token")
            return
        known.generated.append(sampled_token)
        finish = None
        if sampled_token in msg.eos_token_ids:
            finish = "stop"
        elif msg.step + 1 >= msg.max_tokens:
            finish = "length"
        token_msg = TokenMessage(msg.request_id, msg.attempt, msg.step, sampled_token, logprob, top, finish)
        if finish is not None:
            await self._deliver(msg, token_msg)
            return
        nxt = replace(
            msg,
            stage_index=0,
            step=msg.step + 1,
            start_pos=msg.start_pos + msg.length,
            tokens=np.asarray([sampled_token], dtype=np.int64),
            hidden=None,
            messages=None,
            replayed=(),
            deliver=None,
        )
        if nxt.stage.node_id == msg.origin:
            await self._forward_to(replace(nxt, deliver=token_msg))  # one message does both
            return
        # The token to the origin and the next step to stage 0 go out together: the ring does
        # not wait for the origin's acknowledgement.
        await asyncio.gather(self._deliver(msg, token_msg), self._forward_to(nxt))

    async def _deliver(self, msg: StepMessage, token_msg: TokenMessage) -> None:
        try:
            wanted = await self._client_for(msg.origin).send_token(token_msg)
        except PeerUnavailable as exc:
            log.warning("origin unreachable; dropping request", request=msg.request_id, error=str(exc))
            wanted = False
        if not wanted:
            await self.release(msg.request_id, msg.attempt)

    async def _forward_to(self, msg: StepMessage) -> None:
        target = msg.stage.node_id
        try:
            await self._client_for(target).send_step(msg)
        except PeerUnavailable as exc:
            await self._report(msg, StageFailure(msg.request_id, msg.attempt, target, _error_text(exc)))

    async def _report(self, msg: StepMessage, failure: StageFailure) -> None:
        try:
            await self._client_for(msg.origin).report_failure(failure)
        except PeerUnavailable:
            log.warning("origin unreachable; dropping request", request=msg.request_id)
            await self.release(msg.request_id, msg.attempt)

    async def _send_error(self, msg: StepMessage, error: str) -> None:
        token_msg = TokenMessage(msg.request_id, msg.attempt, msg.step, error=error)
        try:
            await self._client_for(msg.origin).send_token(token_msg)
        except PeerUnavailable:
            log.warning("origin unreachable", request=msg.request_id)
        await self.release(msg.request_id, msg.attempt)


def _shard_key(msg: StepMessage) -> tuple:
    s = msg.stage.shard
    return (s.model_id, s.start_layer, s.end_layer)


def _error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
