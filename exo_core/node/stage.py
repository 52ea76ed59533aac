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

Failures stay with their request: every step is checked by the engine (`check_step`) before it
joins a batch, so a malformed one fails alone; NaN logits fail their request with a clear
error; an exception in a background task is logged and fails its request. A long step (a
prompt) runs in slices of `STEP_SLICE` positions, each slice its own forward with other
requests' steps between them, so a prefill shows progress; a middle stage sends each slice on
as soon as it is computed (a chunk, `more` set on all but the last), so the next stage computes
chunk k while this one computes chunk k+1 (pipelined prefill). While a request's step waits or
computes, and the engine is not stuck, its health says QUEUED (busy, not failed). An engine
that spends more than `step_timeout` on one forward is stuck: the stage reports it as failed to
the origin of every request it holds, which re-plans without this node. A worker that dies
does the same.
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
from exo_core.errors import OUT_OF_MEMORY, EngineError, ErrorCode
from exo_core.models.cards import ModelCard
from exo_core.models.shard import Shard
from exo_core.node.constraints import Constraint, ConstraintError, tokenizer_for
from exo_core.node.messages import (
    POSITION_MISMATCH,
    PeerClient,
    PeerUnavailable,
    RequestState,
    StageFailure,
    StepMessage,
    TokenMessage,
)
from exo_core.node.prefix_cache import KeptCaches
from exo_core.node.sampling import sample

log = structlog.get_logger("exo.node")

TOMBSTONE_S = 300.0
MAX_TOMBSTONES = 10_000
# Positions per forward of a long step: a 5,000-token prompt is 20 forwards, each one progress.
STEP_SLICE = 256
# Steps waiting for the engine (each live request has at most one): beyond this, refused.
MAX_QUEUED_STEPS = 4096
# A request whose origin has sent nothing for max(2 x step_timeout, this) and that is not
# computing here is freed (its origin died or dropped this node).
MIN_IDLE_S = 60.0


@dataclass
class _StageRequest:
    """What a stage remembers of a request between steps (the last stage's token history)."""

    attempt: int
    generated: list[int] = field(default_factory=list)
    positions: int = 0  # positions queued into this stage's cache so far
    last_seen: float = field(default_factory=time.monotonic)
    constraint: asyncio.Task[Constraint] | None = None  # last stage: the grammar sampling follows
    pending: int = 0  # steps of it waiting for the engine or computing now


@dataclass
class _Work:
    """A step for the engine worker; `done` of its positions are computed already (a long
    step runs in slices, each sent on by itself)."""

    msg: StepMessage
    done: int = 0

    def slice(self) -> tuple[np.ndarray | None, np.ndarray | None, int]:
        """The next slice's tokens, hidden states and start position."""
        msg, end = self.msg, self.done + STEP_SLICE
        tokens = msg.tokens[self.done : end] if msg.tokens is not None else None
        hidden = msg.hidden[self.done : end] if msg.hidden is not None else None
        return tokens, hidden, msg.start_pos + self.done


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
        self._work: asyncio.Queue[_Work] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.kept = KeptCaches(engine)  # finished requests' caches, kept for prefix reuse
        self._forward_since: float | None = None  # when the running forward started
        self._computing: list[StepMessage] = []  # its steps
        self.broken: str | None = None  # why the engine worker stopped, if it did

    async def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._engine_worker(), name="exo-engine-worker")
            self._worker.add_done_callback(self._worker_ended)
            self._spawn(self._expire_idle_requests())
            self._spawn(self._watch_engine())

    async def stop(self) -> None:
        if self._worker is not None:
            worker, self._worker = self._worker, None
            worker.remove_done_callback(self._worker_ended)
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a death is logged already
                await worker
        for task in list(self._background):
            task.cancel()

    @property
    def request_count(self) -> int:
        """Requests this stage holds a cache (or a queued step) for."""
        return len(self._requests)

    @property
    def stuck_for(self) -> float:
        """Seconds the running forward has taken (0 when the engine is idle)."""
        since = self._forward_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def healthy(self) -> bool:
        """The engine worker runs and is not stuck in one forward for more than `step_timeout`."""
        return self.broken is None and self.stuck_for <= self.step_timeout

    # ---- steps in ----------------------------------------------------------------------------

    async def receive_step(self, msg: StepMessage) -> None:
        """A step addressed to this stage: queue it for the engine worker."""
        tomb = self._released.get(msg.request_id)
        if tomb is not None and msg.attempt <= tomb[0]:
            return  # the origin already let go of this attempt
        known = self._requests.get(msg.request_id)
        if known is not None and known.attempt > msg.attempt:
            return  # stale
        refusal = self._refusal()
        if refusal is not None:
            self._spawn(self._report(msg, StageFailure(msg.request_id, msg.attempt, self.node_id, refusal)))
            return
        if msg.card is not None:
            self.learn_card(msg.card)
        if known is None or known.attempt < msg.attempt:
            if known is not None:
                await self.engine.release(f"{msg.request_id}#{known.attempt}")
            known = self._requests[msg.request_id] = _StageRequest(msg.attempt, list(msg.replayed))
            if msg.reuse_from and msg.start_pos > 0:
                if await self.kept.start_from(msg.reuse_from, msg.cache_key, msg.start_pos):
                    known.positions = msg.start_pos
                if self._requests.get(msg.request_id) is not known:  # released meanwhile
                    await self.engine.release(msg.cache_key)
                    return
            if msg.constraint is not None and msg.stage_index == len(msg.plan) - 1:
                known.constraint = asyncio.create_task(self._constraint(msg, msg.constraint))
                known.constraint.add_done_callback(_retrieve)
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
                        f"stage {msg.stage_index} on {self.node_id} {POSITION_MISMATCH} "
                        f"{known.positions}, got {msg.start_pos}",
                        ErrorCode.POSITION_MISMATCH,
                    ),
                )
            )
            return
        known.positions += msg.length
        known.last_seen = time.monotonic()
        known.pending += 1
        await self.start()
        self._work.put_nowait(_Work(msg))

    def learn_card(self, card: ModelCard, via: str = "first step") -> None:
        """A hub model's card that came with a plan's first step: registered under its id
        (this node never saw the id, or knew it under no card), so the shard loads as for a
        model the node was started with (peers first, then the hub). A card this node already
        has for the id is kept."""
        if card.id not in self.models:
            self.models[card.id] = card
            log.info(
                "model card from the origin",
                model=card.id,
                layers=card.n_layers,
                sources=dict(card.sources),
                via=via,
            )

    def _no_card(self, model_id: str) -> str:
        return (
            f"this node has no model card for {model_id} (it was not started with it, and no card "
            "came with the plan: only hub models, hf.co/..., travel to nodes that lack them)"
        )

    def _refusal(self) -> str | None:
        """Why this stage takes no new steps now (None: it takes them)."""
        if self.broken is not None:
            return f"{self.node_id}: its engine worker stopped ({self.broken})"
        if not self.healthy:
            return f"{self.node_id}: its engine has made no progress for {self.stuck_for:.0f} s"
        if self._work.qsize() >= MAX_QUEUED_STEPS:
            return f"{self.node_id}: {MAX_QUEUED_STEPS} steps already wait for its engine"
        return None

    async def _constraint(self, msg: StepMessage, grammar: str) -> Constraint:
        """The grammar's matcher over the model's tokenizer (built on a thread: it reads files)."""
        card = self.models.get(msg.stage.shard.model_id)
        if card is None:
            raise ConstraintError(self._no_card(msg.stage.shard.model_id))
        tokenizer = await asyncio.to_thread(tokenizer_for, card)
        return await asyncio.to_thread(Constraint, grammar, tokenizer, msg.replayed)

    async def _free(self, cache_key: str, known: _StageRequest, keep: bool) -> None:
        """A request ended here: keep a finished one's cache for prefix reuse when the engine can."""
        if known.constraint is not None:
            known.constraint.cancel()
        if keep and self.kept.enabled and known.positions > 0 and not known.pending:
            await self.kept.keep(cache_key)
        else:
            await self.engine.release(cache_key)

    async def release(self, request_id: str, up_to_attempt: int | None = None, keep: bool = False) -> None:
        """Free this stage's cache for a request (attempts up to `up_to_attempt`, default all);
        `keep`: the request finished, keep the cache for prefix reuse (when the engine can)."""
        known = self._requests.get(request_id)
        if up_to_attempt is None:
            up_to_attempt = known.attempt if known is not None else 0
        if known is not None and known.attempt <= up_to_attempt:
            del self._requests[request_id]
            await self._free(f"{request_id}#{known.attempt}", known, keep)
        self._bury(request_id, up_to_attempt)

    def request_state(self, request_id: str, attempt: int) -> RequestState:
        """This stage's state of one attempt of a request (QUEUED: waiting its turn in the engine)."""
        known = self._requests.get(request_id)
        if known is not None and known.attempt == attempt:
            if self.broken is not None:
                return RequestState.RELEASED  # it will never run here: the origin re-plans
            busy = known.pending > 0 and self.healthy  # waiting for or in a forward that progresses
            return (
                RequestState.QUEUED
                if busy or self.engine.queued(f"{request_id}#{attempt}")
                else RequestState.ACTIVE
            )
        tomb = self._released.get(request_id)
        if tomb is not None and tomb[0] >= attempt:
            return RequestState.RELEASED
        return RequestState.UNKNOWN

    async def _expire_idle_requests(self) -> None:
        """Free stage caches whose origin went silent (it died, or dropped this node)."""
        while True:
            idle_after = max(2 * self.step_timeout, MIN_IDLE_S)
            await asyncio.sleep(min(idle_after / 4, 30.0))
            now = time.monotonic()
            for request_id, known in list(self._requests.items()):
                if known.pending == 0 and now - known.last_seen > idle_after:  # not while it computes
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
            batch = self._one_per_request(batch)
            try:
                await self._run_batch(batch)
            except Exception as exc:  # a bug: fail these requests, keep serving the others
                log.exception("engine worker failed a batch")
                for work in batch:
                    await self._send_exception(work.msg, exc)

    def _one_per_request(self, batch: list[_Work]) -> list[_Work]:
        """At most one step per request in a batch: the one that starts earliest (the chunks of a
        long step arrive one after another); the others go back in the queue, in order."""
        first: dict[str, _Work] = {}
        for work in batch:
            held = first.get(work.msg.request_id)
            if held is None or work.msg.start_pos + work.done < held.msg.start_pos + held.done:
                first[work.msg.request_id] = work
        chosen = {id(work) for work in first.values()}
        for work in batch:
            if id(work) not in chosen:
                self._work.put_nowait(work)
        return [work for work in batch if id(work) in chosen]

    async def _run_batch(self, batch: list[_Work]) -> None:
        live = []
        for work in batch:
            if self._is_current(work.msg):
                live.append(work)
            else:
                self._step_done(work.msg)
        for shard, group in itertools.groupby(
            sorted(live, key=lambda w: _shard_key(w.msg)), key=lambda w: w.msg.stage.shard
        ):
            if self.engine.concurrent_steps:
                for work in group:
                    self._spawn(self._run_group(shard, [work]), work.msg)
            else:
                await self._run_group(shard, list(group))

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        """The worker ends only when cancelled; anything else is a bug the cluster must route around."""
        if task.cancelled():
            return
        exc = task.exception()
        self.broken = _error_text(exc) if exc is not None else "it returned"
        log.error("engine worker stopped; failing every request on this stage", error=self.broken)
        for request_id, known in list(self._requests.items()):
            failure = StageFailure(
                request_id, known.attempt, self.node_id, f"engine worker stopped: {self.broken}"
            )
            self._spawn(self._report_to_origins(request_id, failure))

    async def _watch_engine(self) -> None:
        """Report the requests of a forward that runs past `step_timeout` (a hung engine) as failed."""
        reported: float | None = None
        while True:
            await asyncio.sleep(max(0.05, min(self.step_timeout / 4, 2.0)))
            since = self._forward_since
            if since is None or since == reported or self.healthy:
                continue
            reported = since
            reason = f"{self.node_id}: its engine has made no progress for {self.stuck_for:.0f} s"
            log.error("engine stuck; failing its requests over", seconds=round(self.stuck_for, 1))
            stuck = [*self._computing, *(w.msg for w in _drain(self._work))]
            for msg in stuck:
                failure = StageFailure(msg.request_id, msg.attempt, self.node_id, reason)
                self._requests.pop(msg.request_id, None)
                self._bury(msg.request_id, msg.attempt)
                self._spawn(self._report(msg, failure))

    def _is_current(self, msg: StepMessage) -> bool:
        known = self._requests.get(msg.request_id)
        return known is not None and known.attempt == msg.attempt

    def _step_done(self, msg: StepMessage) -> None:
        known = self._requests.get(msg.request_id)
        if known is not None and known.attempt == msg.attempt and known.pending > 0:
            known.pending -= 1

    async def _run_group(self, shard: Shard, group: list[_Work]) -> None:
        card = self.models.get(shard.model_id)
        try:
            if card is None:
                raise EngineError(self._no_card(shard.model_id))
            await self.engine.load(shard, card)
        except Exception as exc:
            log.exception("engine failed to load", shard=str(shard))
            for work in group:
                await self._send_error(work.msg, _error_text(exc), _error_code(exc))
            return
        # Each step is checked alone first: a malformed one fails its own request, not the batch.
        runnable: list[tuple[_Work, StageInput]] = []
        for work in group:
            item = self._stage_input(work)
            try:
                self.engine.check_step(shard, item)
            except Exception as exc:
                log.warning("step refused", request=work.msg.request_id, error=_error_text(exc))
                await self._send_exception(work.msg, exc)
                continue
            runnable.append((work, item))
        if not runnable:
            return
        # One forward at a time is watched; steps that wait on a server each (concurrent_steps)
        # may wait their turn there as long as it takes.
        watched = not self.engine.concurrent_steps
        if watched:
            self._computing = [w.msg for w, _ in runnable]
            self._forward_since = time.monotonic()
        try:
            outputs = await self.engine.forward_batch(shard, [item for _, item in runnable])
        except Exception as exc:
            log.exception("engine failed", shard=str(shard))
            for work, _ in runnable:
                await self._send_exception(work.msg, exc)
            return
        finally:
            if watched:
                self._forward_since, self._computing = None, []
        for (work, item), out in zip(runnable, outputs, strict=True):
            work.done += item.length
            known = self._requests.get(work.msg.request_id)
            if known is not None:
                known.last_seen = time.monotonic()  # a slice done: alive, whatever the origin says
            more = work.done < work.msg.length
            if more:  # more slices to go: back in the queue, behind the others
                self._work.put_nowait(work)
            elif work.done == item.length:  # a step in one slice goes on as it came
                self._spawn(self._after_forward(work.msg, out), work.msg)
                continue
            if more and shard.is_last:
                continue  # its cache is filled; only the step's last position is sampled
            # Pipelined prefill: each slice of a long step goes on as a chunk of its own as soon
            # as it is computed, so the next stage works on it while this one computes the next
            # (and no message grows with the prompt).
            chunk = replace(
                work.msg,
                start_pos=item.start_pos,
                tokens=item.tokens,
                hidden=item.hidden,
                more=more or work.msg.more,
            )
            self._spawn(self._after_forward(chunk, out, last_chunk=not more), work.msg)

    def _stage_input(self, work: _Work) -> StageInput:
        """The engine's view of (the next slice of) a step; a text engine also gets the request."""
        msg = work.msg
        if self.engine.works_on_text:  # whole requests: never sliced
            work.done = 0
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
        tokens, hidden, start_pos = work.slice()
        return StageInput(msg.cache_key, tokens, hidden, start_pos)

    def _spawn(self, coro: Any, msg: StepMessage | None = None) -> None:
        """Run `coro` in the background; an exception is logged and (with `msg`) fails that request."""
        task = asyncio.create_task(self._guarded(coro, msg))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _guarded(self, coro: Any, msg: StepMessage | None) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("background task failed", request=msg.request_id if msg else None)
            if msg is not None:
                with contextlib.suppress(Exception):
                    await self._send_exception(msg, exc)

    # ---- steps and tokens out ----------------------------------------------------------------

    async def _after_forward(self, msg: StepMessage, out: StageOutput, last_chunk: bool = True) -> None:
        if last_chunk:  # the received step is done (a slice before its last is not)
            self._step_done(msg)
        if not self._is_current(msg):
            # Released while we computed: the forward may have re-created the cache it freed.
            self.kept.discard(msg.cache_key)
            await self.engine.release(msg.cache_key)
            return
        if msg.more and msg.stage_index + 1 == len(msg.plan):
            return  # a chunk of a long step: cached; the step's last chunk is the one sampled
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
        if out.token is not None and known.constraint is not None:
            await self._send_error(
                msg,
                f"{self.engine.name} samples by itself and cannot follow a response format or tool choice",
            )
            return
        if out.token is not None:
            sampled_token, logprob, top = out.token, None, ()
        elif out.logits is not None:
            if np.isnan(out.logits).any():
                await self._send_error(
                    msg,
                    f"{self.engine.name} on {self.node_id} produced NaN logits for this request "
                    "(a numerical fault in the model or engine)",
                )
                return
            try:
                constraint = await known.constraint if known.constraint is not None else None
                allowed = constraint.allowed() if constraint is not None else None
                s = sample(out.logits, msg.sampling, known.generated, msg.step, allowed)
                if constraint is not None:
                    constraint.consume(s.token)
            except (ConstraintError, ValueError) as exc:
                await self._send_error(msg, f"the response format cannot be followed: {exc}")
                return
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
            constraint=None,
            reuse_from="",
            card=None,
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

    async def _report_to_origins(self, request_id: str, failure: StageFailure) -> None:
        """Tell a request's origin this stage failed (the origin is found from a queued step)."""
        for work in _drain(self._work, keep=True):
            if work.msg.request_id == request_id:
                await self._report(work.msg, failure)
                return

    async def _send_exception(self, msg: StepMessage, exc: BaseException) -> None:
        """`_send_error` for an exception raised here: its text, naming this node, and its code."""
        await self._send_error(msg, f"{self.node_id}: {_error_text(exc)}", _error_code(exc))

    async def _send_error(self, msg: StepMessage, error: str, code: str | None = None) -> None:
        self._step_done(msg)
        token_msg = TokenMessage(msg.request_id, msg.attempt, msg.step, error=error, code=code)
        try:
            await self._client_for(msg.origin).send_token(token_msg)
        except PeerUnavailable:
            log.warning("origin unreachable", request=msg.request_id)
        await self.release(msg.request_id, msg.attempt)


def _drain(queue: asyncio.Queue[_Work], keep: bool = False) -> list[_Work]:
    """What waits in the queue now (taken out, unless `keep`)."""
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    if keep:
        for item in items:
            queue.put_nowait(item)
    return items


def _shard_key(msg: StepMessage) -> tuple:
    s = msg.stage.shard
    return (s.model_id, s.start_layer, s.end_layer)


def _error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _error_code(exc: BaseException) -> str | None:
    """The kind of failure an exception is, sent beside its message (the origin acts on it).

    An `EngineError` says it in its `code`; one without a code whose message says a cache was
    refused for memory (engines written before codes) is taken for out_of_memory."""
    if not isinstance(exc, EngineError):
        return None
    if exc.code is not None:
        return str(exc.code)
    return ErrorCode.OUT_OF_MEMORY if OUT_OF_MEMORY in str(exc) else None


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a background task's failure as seen (the step that needs it reports it)."""
    if not task.cancelled():
        task.exception()
