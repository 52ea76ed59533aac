"""The origin of a request: plan it, start it, watch it, replay it, stream its tokens, release it.

The origin picks a plan (ordered stages of node + shard) and sends the prompt to stage 0; tokens
come back from the last stage and go to the caller of `generate`. The plan travels in every step
message, so no node has to agree on a global partition first. When a stage fails, the origin
re-plans without it and replays prompt + tokens so far under a new attempt number; stale
messages of an old attempt are dropped.

How a failure is noticed: an RPC to a stage fails or times out (the sender reports it to the
origin), discovery drops a node (`peer_removed`), or the origin, waiting more than
`liveness_interval` for a token, pings the stages of the plan and one is unreachable (at once)
or silent for `liveness_timeout`. A request that makes no progress for `step_timeout` is
replayed; a stage that is computing (its health says QUEUED: its step waits for or runs in an
engine that keeps finishing slices) counts as progress, so a long prefill is never mistaken for
a failure, and a stage whose engine hangs reports itself failed and is left out of the replay.
Whatever happens, a request that gets neither a token nor a sign of progress for
`stall_timeout` (default: twice `step_timeout` plus `liveness_timeout`), across all its
re-plans, ends with a `GenerationError`; when no plan is left that happens at once.

A request keeps its plan until it ends or a stage of it fails: a peer that joins, or a new
plan for new requests, never touches it (the engines hold every shard their live requests use).

Releases carry the attempt they free (`up_to_attempt`), so a late release of an abandoned
attempt never frees the replay. The origin talks to every stage through a `PeerClient`, its
own node's stage included.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence, Set
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import structlog

from exo_core.engine import ReplicaUnavailable, TextDelta, TextGeneration, UpstreamError
from exo_core.errors import EngineError, ErrorCode
from exo_core.models.cards import ModelCard
from exo_core.models.hub_cards import is_hub_id
from exo_core.models.shard import Shard
from exo_core.node.messages import (
    GeneratedToken,
    GenerationError,
    GenerationRequest,
    PeerClient,
    PeerTimeout,
    PeerUnavailable,
    RequestState,
    StageFailure,
    StepMessage,
    TokenMessage,
)
from exo_core.node.partitioning import (
    NoPlanError,
    Partitioner,
    PlanStage,
    plan_within_memory,
    ring_memory_weighted,
)
from exo_core.node.prefix_cache import PrefixIndex
from exo_core.node.replicas import Balancer
from exo_core.node.stage import STEP_SLICE
from exo_core.node.topology import NodeInfo

log = structlog.get_logger("exo.node")

MAX_DEPARTED = 64
RING = "ring"  # the layer-sharded nodes, as one candidate beside the whole-request replicas


@dataclass
class _OriginState:
    request: GenerationRequest
    events: asyncio.Queue[TokenMessage | StageFailure]
    plan: tuple[PlanStage, ...] = ()
    attempt: int = 0
    generated: list[int] = field(default_factory=list)
    excluded: set[str] = field(default_factory=set)
    last_failed: str = ""  # the node whose failure started this attempt ("" when none was named)
    touched: set[str] = field(default_factory=set)  # nodes that may hold caches for it
    reused: str = ""  # the kept cache this attempt started from (prefix cache)
    reuse_refused: bool = False  # a stage did not hold it: the next attempts start from scratch
    cached_tokens: int = 0  # prompt positions the first attempt reused
    finished: bool = False  # ended by itself (stop or length): its stages keep its cache
    progress_at: float = field(default_factory=time.monotonic)  # last token or (re)start
    advanced_at: float = field(default_factory=time.monotonic)  # last token or progress, any attempt
    silent_since: dict[str, float] = field(default_factory=dict)  # node -> first missed ping


class Origin:
    """The requests this node received from its callers, from plan to release."""

    def __init__(
        self,
        node_id: str,
        cluster: Callable[[], list[NodeInfo]],
        client_for: Callable[[str], PeerClient],
        *,
        partitioner: Partitioner = ring_memory_weighted,
        step_timeout: float = 120.0,
        max_replans: int = 8,
        liveness_interval: float = 1.0,
        liveness_timeout: float = 10.0,
        stall_timeout: float | None = None,
    ) -> None:
        self.node_id = node_id
        self.partitioner = partitioner
        self.max_context: int | None = None  # --max-context: the KV cache plans are checked for
        # Told of every plan made, to start each named node's downloads before its first step.
        self.on_plan: Callable[[ModelCard, tuple[PlanStage, ...]], None] | None = None
        # The shards this node's engine holds now (the node sets it): a replay prefers them.
        self.held_shards: Callable[[], Sequence[Shard]] = tuple
        self.step_timeout = step_timeout
        self.max_replans = max_replans
        self.liveness_interval = liveness_interval
        self.liveness_timeout = liveness_timeout
        self.stall_timeout = (
            stall_timeout if stall_timeout is not None else 2 * step_timeout + liveness_timeout
        )
        self.replans_total = 0  # re-plans after a stage failed, all requests, all time
        self.inflight: dict[str, int] = {}  # node id -> this origin's requests planned on it
        self._cluster = cluster
        self._client_for = client_for
        self._requests: dict[str, _OriginState] = {}
        # Clients of peers discovery dropped, kept a while so releases still reach them.
        self._departed: OrderedDict[str, PeerClient] = OrderedDict()
        self._background: set[asyncio.Task[Any]] = set()
        self.prefixes = PrefixIndex()  # finished requests whose caches the stages keep
        # Whole-request replicas (node ids) and the ring, by shortest expected time.
        self.balancer = Balancer()
        self._text_requests = 0
        self._text_on: dict[str, set[asyncio.Event]] = {}  # node id -> its text streams' "lost" flags

    @property
    def active_requests(self) -> int:
        """Requests generating now."""
        return len(self._requests) + self._text_requests

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()

    # ---- planning ----------------------------------------------------------------------------

    def make_plan(self, card: ModelCard, exclude: Set[str] = frozenset()) -> tuple[PlanStage, ...]:
        """Stages for a request: whole-model nodes get one-stage plans, the rest are partitioned."""
        candidates = [n for n in self._cluster() if n.node_id not in exclude and holds_layers_of(n, card)]
        if not candidates:
            raise NoPlanError(f"no node in the cluster can serve {card.id} right now")
        whole = [n for n in candidates if not n.supports_sharding]
        sharding = [n for n in candidates if n.supports_sharding]
        if whole and not sharding:
            # Whole-model engines serve whole requests: the least-loaded one takes it.
            pick = min(
                whole,
                key=lambda n: (self._load_of(n), n.node_id != self.node_id, n.node_id),
            )
            return (PlanStage(pick.node_id, Shard.whole(card.id, card.n_layers)),)
        plan = self.partitioner(sharding, card.id, card.n_layers)
        return tuple(plan_within_memory(card, plan, sharding, self.max_context))

    def _load_of(self, info: NodeInfo) -> tuple[int, int]:
        """Requests this origin has in flight on the node, then what the node last reported
        (this node's own info is current: the cluster list is made when asked)."""
        return (self.inflight.get(info.node_id, 0), info.active_requests)

    # ---- whole requests on text ----------------------------------------------------------------

    def whole_nodes(self, card: ModelCard, exclude: Set[str] = frozenset()) -> list[NodeInfo]:
        """Nodes whose engine serves the model whole, on text (`TextEngine`). Such a node must
        list the model: one whose servers offer nothing lists no models, and serves none."""
        return [
            n
            for n in self._cluster()
            if not n.supports_sharding and n.node_id not in exclude and card.id in n.models
        ]

    def text_only(self, card: ModelCard) -> bool:
        """Only whole-request nodes serve the model (no node can hold its layers): its requests
        always go to a server as text, whatever this node's tokenizer could do."""
        return bool(self.whole_nodes(card)) and not any(
            n.supports_sharding and holds_layers_of(n, card) for n in self._cluster()
        )

    def route(self, card: ModelCard, *, ring_ok: bool = True) -> str:
        """`RING`, or the whole-request node with the shortest expected time for one more request.

        The ring competes only when the origin could tokenize the prompt (`ring_ok`) and some
        node can hold layers of the model; with no whole-request node it is always the ring.
        """
        whole = self.whole_nodes(card)
        if not whole:
            return RING
        keys = [n.node_id for n in whole]
        if ring_ok and any(n.supports_sharding and holds_layers_of(n, card) for n in self._cluster()):
            keys.append(RING)
        reported = {n.node_id: n.active_requests for n in whole}
        servers = {n.node_id: n.servers_for(card.id) for n in whole}
        return self.balancer.pick(keys, lambda k: reported.get(k, 0), lambda k: servers.get(k, 1)) or keys[0]

    async def generate_text(
        self, request: TextGeneration, first: str | None = None
    ) -> AsyncGenerator[TextDelta]:
        """A whole request on a whole-request node (`first`, else the best one), streamed; when that
        node cannot finish it, on to another, which skips the text already delivered."""
        tried: set[str] = set()
        reasons: list[str] = []
        delivered = ""
        node_id = first
        self._text_requests += 1
        try:
            while True:
                if node_id is None:
                    candidates = self.whole_nodes(request.model, tried)
                    reported = {n.node_id: n.active_requests for n in candidates}
                    servers = {n.node_id: n.servers_for(request.model.id) for n in candidates}
                    node_id = self.balancer.pick(list(reported), reported.__getitem__, servers.__getitem__)
                    if node_id is None:
                        lost = f" ({'; '.join(reasons)})" if reasons else ""
                        raise GenerationError(f"no node can serve {request.model.id} right now{lost}")
                tried.add(node_id)
                run = self.balancer.run(node_id)
                self.inflight[node_id] = self.inflight.get(node_id, 0) + 1
                lost_it = False
                dropped = asyncio.Event()
                self._text_on.setdefault(node_id, set()).add(dropped)
                try:
                    stream = self._client_for(node_id).generate_text(request, delivered)
                    async with contextlib.aclosing(_until(stream, dropped, node_id)) as deltas:
                        async for delta in deltas:
                            run.saw(delta)
                            delivered += delta.text
                            yield delta
                            if delta.finish_reason is not None:
                                return
                    return
                except (PeerUnavailable, ReplicaUnavailable) as exc:
                    lost_it = True
                    reasons.append(f"{node_id}: {exc}")
                    self.replans_total += 1
                    log.warning(
                        "whole-request node lost; continuing on another",
                        request=request.request_id,
                        node=node_id,
                        delivered=len(delivered),
                        error=str(exc),
                    )
                except UpstreamError as exc:
                    raise GenerationError(str(exc), exc.status, exc.code) from exc
                except EngineError as exc:
                    raise GenerationError(str(exc)) from exc
                finally:
                    run.close(not lost_it)
                    self.inflight[node_id] = self.inflight.get(node_id, 1) - 1
                    self._text_on[node_id].discard(dropped)
                node_id = None
        finally:
            self._text_requests -= 1

    # ---- a request, from start to release ----------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GeneratedToken]:
        """Run a request through the cluster, yielding tokens as the last stage samples them.

        Closing the iterator early (client gone, stop string) releases every stage's cache.
        """
        if request.request_id in self._requests:
            raise GenerationError(f"request id {request.request_id} is already running")
        state = _OriginState(request, asyncio.Queue())
        self._requests[request.request_id] = state
        replans = 0
        try:
            await self._start_attempt(state)
            while True:
                try:
                    event = await asyncio.wait_for(state.events.get(), self.liveness_interval)
                except TimeoutError:
                    failure = await self._check_stages(state)
                    stalled = time.monotonic() - state.advanced_at
                    if stalled > self.stall_timeout:
                        raise GenerationError(
                            f"no progress for {stalled:.0f} s (after {replans} re-plans"
                            f"{': ' + failure.reason if failure is not None else ''}); giving up"
                        ) from None
                    if failure is None:
                        continue
                    event = failure
                if event.attempt != state.attempt:
                    continue  # from an attempt already abandoned
                if (
                    isinstance(event, StageFailure)
                    and state.reused
                    and event.code == ErrorCode.POSITION_MISMATCH
                ):
                    # A stage does not hold the prefix it was sent (evicted, or an engine that
                    # keeps none): run the request again from scratch on the same nodes.
                    log.info("prefix not reused", request=request.request_id, reason=event.reason)
                    self.prefixes.refused(state.plan)
                    state.reuse_refused = True
                    self._release_attempt(state)
                    state.attempt += 1
                    await self._start_attempt(state)
                    continue
                if isinstance(event, StageFailure):
                    replans += 1
                    self.replans_total += 1
                    log.warning(
                        "stage failed; re-planning",
                        request=request.request_id,
                        node=event.node_id,
                        reason=event.reason,
                        generated=len(state.generated),
                    )
                    if replans > self.max_replans:
                        raise GenerationError(
                            f"generation failed after {self.max_replans} re-plans: {event.reason}"
                        )
                    if event.node_id and event.node_id != self.node_id:
                        state.excluded.add(event.node_id)
                    state.last_failed = event.node_id
                    self._release_attempt(state)
                    state.attempt += 1
                    await self._start_attempt(state)
                    continue
                if event.error is not None:
                    # a cache refused for memory is temporary: 503, the client may try again
                    status = 503 if event.code == ErrorCode.OUT_OF_MEMORY else 500
                    raise GenerationError(
                        event.error, status, "insufficient_memory" if status == 503 else None
                    )
                if event.step != len(state.generated):
                    continue  # a duplicate after a replay
                state.progress_at = state.advanced_at = time.monotonic()
                state.silent_since.clear()
                state.generated.append(event.token)
                if event.finish_reason is not None:
                    self._remember_prefix(state)
                yield GeneratedToken(
                    event.token,
                    event.logprob,
                    event.top_logprobs,
                    event.finish_reason,
                    cached_tokens=state.cached_tokens if len(state.generated) == 1 else 0,
                )
                if event.finish_reason is not None:
                    return
        finally:
            self._requests.pop(request.request_id, None)
            await self._release_all(state)

    def _warm_replay(self, card: ModelCard, state: _OriginState) -> tuple[PlanStage, ...]:
        """A replay runs on this node alone when its engine holds the whole model already (it
        answered alone before the cluster grew): no stage has to load layers, which can take
        many seconds, while the client waits. New requests still get the usual plan."""
        whole = Shard.whole(card.id, card.n_layers)
        if state.last_failed == self.node_id or whole not in self.held_shards():
            return state.plan
        if not any(n.node_id == self.node_id and n.supports_sharding for n in self._cluster()):
            return state.plan
        return (PlanStage(self.node_id, whole),)

    async def _start_attempt(self, state: _OriginState) -> None:
        request = state.request
        try:
            state.plan = self.make_plan(request.model, state.excluded)
        except NoPlanError as exc:
            raise GenerationError(
                f"{exc} (nodes lost: {', '.join(sorted(state.excluded)) or 'none'})"
            ) from exc
        if state.attempt > 0:
            state.plan = self._warm_replay(request.model, state)
        if self.on_plan is not None:
            self.on_plan(request.model, state.plan)
        state.progress_at = time.monotonic()
        state.silent_since.clear()
        state.touched.update(stage.node_id for stage in state.plan)
        for stage in state.plan:
            self.inflight[stage.node_id] = self.inflight.get(stage.node_id, 0) + 1
        tokens = np.asarray([*request.prompt_tokens, *state.generated], dtype=np.int64)
        first = state.plan[0].node_id
        # A layer-sharding (tensor) engine takes the prompt in chunks; a whole-request engine in one.
        sliced = self._shards_layers(first)
        chunk = STEP_SLICE if sliced else max(len(tokens), 1)
        state.reused, reused = "", 0
        if not state.reuse_refused:
            state.reused, reused = self.prefixes.find(state.plan, tokens)
        if not state.generated:
            state.cached_tokens = reused
        msg = StepMessage(
            request_id=request.request_id,
            attempt=state.attempt,
            origin=self.node_id,
            plan=state.plan,
            stage_index=0,
            sampling=request.sampling,
            max_tokens=request.max_tokens,
            eos_token_ids=request.eos_token_ids,
            step=len(state.generated),
            start_pos=reused,
            tokens=tokens[reused : reused + chunk],
            messages=None if sliced else request.messages,  # only a text engine reads them
            replayed=tuple(state.generated),
            constraint=request.constraint,
            reuse_from=state.reused,
            more=len(tokens) > reused + chunk,
            # a hub model's card rides along: a stage started without the id takes its layers
            card=request.model if is_hub_id(request.model.id) else None,
        )
        try:
            client = self._client_for(first)
            await client.send_step(msg)
            # The rest of the prompt in chunks of STEP_SLICE ids, as a stage sends hidden states
            # on (no message grows with the prompt); what a stage needs once (the conversation,
            # the replayed tokens, the grammar, the prefix to reuse) came with the first.
            for start in range(reused + chunk, len(tokens), chunk):
                part = replace(
                    msg,
                    start_pos=start,
                    tokens=tokens[start : start + chunk],
                    messages=None,
                    replayed=(),
                    constraint=None,
                    reuse_from="",
                    more=start + chunk < len(tokens),
                    card=None,
                )
                await client.send_step(part)
        except PeerUnavailable as exc:
            state.events.put_nowait(StageFailure(request.request_id, state.attempt, first, str(exc)))

    def _shards_layers(self, node_id: str) -> bool:
        """Whether the node's engine runs layer ranges (a tensor engine: it computes a prompt in
        slices anyway); a whole-request engine on text takes the prompt whole."""
        return any(n.node_id == node_id and n.supports_sharding for n in self._cluster())

    def _remember_prefix(self, state: _OriginState) -> None:
        """A request finished: its stages keep its cache, which holds every token but the last."""
        request = state.request
        fed = [*request.prompt_tokens, *state.generated[:-1]]
        state.finished = True
        self.prefixes.add(f"{request.request_id}#{state.attempt}", state.plan, fed)

    # ---- what the stages say -----------------------------------------------------------------

    async def receive_token(self, msg: TokenMessage) -> bool:
        """A token for a request of this origin; False when it is no longer wanted."""
        state = self._requests.get(msg.request_id)
        if state is None or msg.attempt < state.attempt:
            return False
        state.events.put_nowait(msg)
        return True

    async def receive_failure(self, failure: StageFailure) -> None:
        state = self._requests.get(failure.request_id)
        if state is not None:
            state.events.put_nowait(failure)

    def peer_removed(self, node_id: str, client: PeerClient, reason: str) -> None:
        """Discovery dropped a node: re-plan the requests using it (and keep its client for releases)."""
        self._departed[node_id] = client
        while len(self._departed) > MAX_DEPARTED:
            self._departed.popitem(last=False)
        for lost in self._text_on.get(node_id, ()):
            lost.set()
        for state in self._requests.values():
            if any(stage.node_id == node_id for stage in state.plan):
                state.events.put_nowait(
                    StageFailure(state.request.request_id, state.attempt, node_id, reason)
                )

    async def _check_stages(self, state: _OriginState) -> StageFailure | None:
        """No token for a while: ping the plan's stages; a failure when one is gone."""
        rid, attempt = state.request.request_id, state.attempt
        now = time.monotonic()
        remote = [s.node_id for s in state.plan if s.node_id != self.node_id]

        async def ping(node_id: str) -> StageFailure | None:
            try:
                held = await self._client_for(node_id).health(rid, attempt)
            except PeerTimeout as exc:
                first = state.silent_since.setdefault(node_id, now)
                if now - first >= self.liveness_timeout:
                    return StageFailure(rid, attempt, node_id, f"silent for {now - first:.1f} s ({exc})")
                return None
            except PeerUnavailable as exc:
                return StageFailure(rid, attempt, node_id, str(exc))
            state.silent_since.pop(node_id, None)
            if held == RequestState.QUEUED:  # waiting for or computing in its engine: not stuck
                state.progress_at = state.advanced_at = time.monotonic()
            if held == RequestState.RELEASED:  # it gave up on the request (e.g. could not reach us)
                return StageFailure(rid, attempt, node_id, f"{node_id} dropped the request")
            return None

        results = await asyncio.gather(*(ping(n) for n in remote))
        failure = next((r for r in results if r is not None), None)
        if failure is not None:
            return failure
        if any(s.node_id == self.node_id for s in state.plan):
            here = await self._client_for(self.node_id).health(rid, attempt)
            if here == RequestState.QUEUED:
                state.progress_at = state.advanced_at = time.monotonic()
        if time.monotonic() - state.progress_at > self.step_timeout:
            return StageFailure(rid, attempt, "", f"no progress for {self.step_timeout:.0f} s")
        return None

    # ---- releases ----------------------------------------------------------------------------

    def _forget_plan(self, state: _OriginState) -> None:
        for stage in state.plan:
            self.inflight[stage.node_id] = self.inflight.get(stage.node_id, 1) - 1
        state.plan = ()

    def _release_attempt(self, state: _OriginState) -> None:
        """Free the abandoned attempt's caches, in the background (a dead node may not answer)."""
        nodes = {s.node_id for s in state.plan}
        self._forget_plan(state)
        self._spawn(self._release_on(state.request.request_id, state.attempt, nodes))

    async def _release_all(self, state: _OriginState) -> None:
        """Free every cache of the request: here at once, on the peers in the background.

        A finished request's stages keep its cache for prefix reuse instead."""
        keeping = {s.node_id for s in state.plan} if state.finished else set()
        self._forget_plan(state)
        rid = state.request.request_id
        here = self._client_for(self.node_id)
        if self.node_id in keeping:
            await here.release(rid, state.attempt, keep=True)
        else:
            await here.release(rid, state.attempt)
        self._spawn(self._release_on(rid, state.attempt, state.touched - {self.node_id}, keeping))

    async def _release_on(
        self, request_id: str, up_to_attempt: int, node_ids: Set[str], keeping: Set[str] = frozenset()
    ) -> None:
        async def one(node_id: str) -> None:
            try:
                client = self._release_client(node_id)
                if node_id in keeping:
                    await client.release(request_id, up_to_attempt, keep=True)
                else:
                    await client.release(request_id, up_to_attempt)
            except Exception as exc:  # a dead peer holds no cache worth freeing
                log.debug("release failed", peer=node_id, error=str(exc))

        await asyncio.gather(*(one(n) for n in node_ids))

    def _release_client(self, node_id: str) -> PeerClient:
        """The node's client, or the one it had when discovery dropped it."""
        try:
            return self._client_for(node_id)
        except PeerUnavailable:
            departed = self._departed.get(node_id)
            if departed is None:
                raise
            return departed

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", task=task.get_name(), error=repr(task.exception()))


async def _until(
    stream: AsyncIterator[TextDelta], dropped: asyncio.Event, node_id: str
) -> AsyncGenerator[TextDelta]:
    """The stream's deltas until discovery drops its node (a host that vanished sends nothing)."""
    deltas = cast(AsyncGenerator[TextDelta], stream)
    gone = asyncio.ensure_future(dropped.wait())
    try:
        while True:
            nxt = asyncio.ensure_future(anext(deltas))
            await asyncio.wait((nxt, gone), return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                with contextlib.suppress(BaseException):
                    await nxt
                raise PeerUnavailable(f"{node_id} was dropped from the cluster")
            try:
                delta = nxt.result()
            except StopAsyncIteration:
                return
            yield delta
    finally:
        gone.cancel()
        with contextlib.suppress(BaseException):
            await deltas.aclose()


def holds_layers_of(node: NodeInfo, card: ModelCard) -> bool:
    """Whether a plan may give the node layers (or the whole) of the model: it lists the model,
    or lists none (it takes any), or the model is a hub model (hf.co/...) in a format the
    node's engine loads and the node takes hub models it was not started with (its stage gets
    the card with the plan's first step)."""
    if not node.models or card.id in node.models:
        return True
    return node.supports_sharding and is_hub_id(card.id) and any(k in card.sources for k in node.hub_formats)
