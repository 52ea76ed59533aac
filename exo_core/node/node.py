"""The node: origin of the requests it receives, and a stage of the plans it is part of.

Request flow (DESIGN.md): the origin picks a plan (ordered stages of node + shard) and sends
the prompt to stage 0; each stage runs its shard and forwards hidden states to the next; the
last stage samples, sends the token to the origin and the next step to stage 0. The plan
travels in every step message, so no node has to agree on a global partition first. When a
stage fails, the origin re-plans without it and replays prompt + tokens so far under a new
attempt number; stale messages of an old attempt are dropped.

How a failure is noticed: an RPC to a stage fails or times out (the sender reports it to the
origin), discovery drops a node (`remove_peer`), or the origin, waiting more than
`liveness_interval` for a token, pings the stages of the plan and one is unreachable (at once)
or silent for `liveness_timeout`. A request that makes no progress for `step_timeout` is
replayed. When no plan is left the client gets a `GenerationError`, never a hang.

Releases carry the attempt they free (`up_to_attempt`), so a late release of an abandoned
attempt never frees the replay; a released request leaves a tombstone that drops its late
steps, so nothing keeps circling the ring after the origin lets go.

Every stage funnels its work through one engine worker that batches the steps waiting at
that moment into one `forward_batch`, so concurrent requests share a read of the weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence, Set
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import structlog

from exo_core.engine import EngineError, InferenceEngine, StageInput, StageOutput
from exo_core.models.cards import ModelCard
from exo_core.models.shard import Shard
from exo_core.node.partitioning import NoPlanError, PlanStage, ring_memory_weighted
from exo_core.node.sampling import SamplingParams, sample
from exo_core.node.topology import DeviceCapabilities, NodeInfo

log = structlog.get_logger("exo.node")


@dataclass
class StepMessage:
    """One step of one request for one stage; carries the plan and what the last stage needs."""

    request_id: str
    attempt: int
    origin: str
    plan: tuple[PlanStage, ...]
    stage_index: int
    sampling: SamplingParams
    max_tokens: int
    eos_token_ids: tuple[int, ...]
    step: int  # tokens generated before this step
    start_pos: int = 0  # positions already in this request's caches (of this attempt)
    tokens: np.ndarray | None = None
    hidden: np.ndarray | None = None
    messages: list[dict[str, Any]] | None = None
    # Tokens generated before this attempt (a replay); the last stage seeds its history with them.
    replayed: tuple[int, ...] = ()
    # The token just sampled, riding along to stage 0 when stage 0 is the origin (saves an RPC).
    deliver: TokenMessage | None = None

    @property
    def stage(self) -> PlanStage:
        return self.plan[self.stage_index]

    @property
    def cache_key(self) -> str:
        return f"{self.request_id}#{self.attempt}"

    @property
    def length(self) -> int:
        """How many new positions this step adds."""
        if self.tokens is not None:
            return int(self.tokens.shape[0])
        if self.hidden is not None:
            return int(self.hidden.shape[0])
        return 0


@dataclass
class TokenMessage:
    """A sampled token (or a stage's error) on its way to the origin."""

    request_id: str
    attempt: int
    step: int
    token: int = -1
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | None
    error: str | None = None


@dataclass
class StageFailure:
    """A stage of a request's plan is gone (an RPC failed, or discovery dropped it)."""

    request_id: str
    attempt: int
    node_id: str
    reason: str


class PeerClient(Protocol):
    """How a node talks to another (gRPC in networking/, direct calls for itself).

    Every method raises `PeerUnavailable` when the peer cannot be reached in time.
    """

    async def send_step(self, msg: StepMessage) -> None: ...

    async def send_token(self, msg: TokenMessage) -> bool:
        """Deliver to the origin; False when the origin no longer runs that request attempt."""
        ...

    async def report_failure(self, failure: StageFailure) -> None: ...
    async def release(self, request_id: str, up_to_attempt: int) -> None: ...

    async def health(self, request_id: str = "", attempt: int = 0) -> str:
        """Liveness; with a request, this node's `request_state` of that attempt."""
        ...


class PeerUnavailable(ConnectionError):
    """A peer could not be reached (raised by PeerClient implementations)."""


class PeerTimeout(PeerUnavailable):
    """A peer did not answer within the call's deadline (it may only be busy)."""


@dataclass
class GenerationRequest:
    """What the origin needs to run one generation."""

    model: ModelCard
    prompt_tokens: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    eos_token_ids: tuple[int, ...] = ()
    messages: list[dict[str, Any]] | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class GeneratedToken:
    token: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None


class GenerationError(RuntimeError):
    """A generation failed; the message is safe to show to the API client."""


@dataclass
class _OriginState:
    request: GenerationRequest
    events: asyncio.Queue[TokenMessage | StageFailure]
    plan: tuple[PlanStage, ...] = ()
    attempt: int = 0
    generated: list[int] = field(default_factory=list)
    excluded: set[str] = field(default_factory=set)
    touched: set[str] = field(default_factory=set)  # nodes that may hold caches for it
    progress_at: float = field(default_factory=time.monotonic)  # last token or (re)start
    silent_since: dict[str, float] = field(default_factory=dict)  # node -> first missed ping


@dataclass
class _StageRequest:
    """What a stage remembers of a request between steps (the last stage's token history)."""

    attempt: int
    generated: list[int] = field(default_factory=list)
    positions: int = 0  # positions queued into this stage's cache so far
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class Peer:
    info: NodeInfo
    client: PeerClient


class Node:
    """One exo node: an engine, its peers, and the request flow between them."""

    def __init__(
        self,
        node_id: str,
        engine: InferenceEngine,
        models: dict[str, ModelCard],
        *,
        capabilities: DeviceCapabilities | None = None,
        partitioner: Callable[[Sequence[NodeInfo], str, int], list[PlanStage]] = ring_memory_weighted,
        address: str = "127.0.0.1",
        port: int = 0,
        step_timeout: float = 120.0,
        max_replans: int = 8,
        liveness_interval: float = 1.0,
        liveness_timeout: float = 10.0,
    ) -> None:
        self.node_id = node_id
        self.engine = engine
        self.models = models
        self.capabilities = capabilities or DeviceCapabilities()
        self.partitioner = partitioner
        self.address = address
        self.port = port
        self.step_timeout = step_timeout
        self.max_replans = max_replans
        self.liveness_interval = liveness_interval
        self.replans_total = 0  # requests re-planned after a stage failed (all time)
        self.liveness_timeout = liveness_timeout
        self.peers: dict[str, Peer] = {}
        # Clients of peers discovery dropped, kept a while so releases still reach them.
        self._departed: OrderedDict[str, PeerClient] = OrderedDict()
        self._origins: dict[str, _OriginState] = {}
        self._stage_requests: dict[str, _StageRequest] = {}
        self._released: OrderedDict[str, tuple[int, float]] = OrderedDict()  # tombstones
        self._work: asyncio.Queue[StepMessage] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._local = _LocalPeer(self)
        self._served_models: tuple[str, ...] = tuple(models)
        self.active_requests = 0
        self._inflight: dict[str, int] = {}  # node id -> this origin's requests planned on it
        self.on_token: list[Callable[[], None]] = []  # metrics hooks
        self.on_peers_changed: list[Callable[[], None]] = []

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._engine_worker(), name="exo-engine-worker")
            self._spawn(self._expire_idle_stage_requests())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for task in list(self._background):
            task.cancel()
        await self.engine.close()

    # ---- topology --------------------------------------------------------------------------

    def info(self) -> NodeInfo:
        return NodeInfo(
            node_id=self.node_id,
            address=self.address,
            port=self.port,
            capabilities=self.capabilities,
            engine=self.engine.name,
            supports_sharding=self.engine.supports_sharding,
            models=self._served_models,
            active_requests=self.active_stage_requests(),
        )

    def set_served_models(self, model_ids: Sequence[str]) -> None:
        self._served_models = tuple(model_ids)

    def add_peer(self, info: NodeInfo, client: PeerClient) -> None:
        if info.node_id == self.node_id:
            raise ValueError("a node is not its own peer")
        is_new = info.node_id not in self.peers
        self.peers[info.node_id] = Peer(info, client)
        if is_new:
            log.info("peer added", peer=info.node_id, address=f"{info.address}:{info.port}")
            self._peers_changed()

    def update_peer_info(self, info: NodeInfo) -> None:
        if info.node_id in self.peers:
            self.peers[info.node_id].info = info

    def remove_peer(self, node_id: str, reason: str = "dropped by discovery") -> None:
        """Forget a peer; requests whose plan uses it are re-planned."""
        peer = self.peers.pop(node_id, None)
        if peer is None:
            return
        self._departed[node_id] = peer.client
        while len(self._departed) > 64:
            self._departed.popitem(last=False)
        log.info("peer removed", peer=node_id, reason=reason)
        for state in self._origins.values():
            if any(stage.node_id == node_id for stage in state.plan):
                state.events.put_nowait(
                    StageFailure(state.request.request_id, state.attempt, node_id, reason)
                )
        self._peers_changed()

    def _peers_changed(self) -> None:
        for callback in self.on_peers_changed:
            callback()

    def cluster(self) -> list[NodeInfo]:
        return [self.info(), *(p.info for p in self.peers.values())]

    def client_for(self, node_id: str) -> PeerClient:
        if node_id == self.node_id:
            return self._local
        peer = self.peers.get(node_id)
        if peer is None:
            raise PeerUnavailable(f"node {node_id} is not in the cluster")
        return peer.client

    # ---- planning --------------------------------------------------------------------------

    def make_plan(self, card: ModelCard, exclude: Set[str] = frozenset()) -> tuple[PlanStage, ...]:
        """Stages for a request: whole-model nodes get one-stage plans, the rest are partitioned."""
        candidates = [
            n for n in self.cluster() if n.node_id not in exclude and (not n.models or card.id in n.models)
        ]
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
        return tuple(self.partitioner(sharding, card.id, card.n_layers))

    def _load_of(self, info: NodeInfo) -> tuple[int, int]:
        """Requests this origin has in flight on the node, then what the node last reported."""
        reported = self.active_stage_requests() if info.node_id == self.node_id else info.active_requests
        return (self._inflight.get(info.node_id, 0), reported)

    def active_stage_requests(self) -> int:
        return len(self._stage_requests)

    # ---- origin ----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GeneratedToken]:
        """Run a request through the cluster, yielding tokens as the last stage samples them.

        Closing the iterator early (client gone, stop string) releases every stage's cache.
        """
        await self.start()
        if request.request_id in self._origins:
            raise GenerationError(f"request id {request.request_id} is already running")
        state = _OriginState(request, asyncio.Queue())
        self._origins[request.request_id] = state
        self.active_requests += 1
        replans = 0
        try:
            await self._start_attempt(state)
            while True:
                try:
                    event = await asyncio.wait_for(state.events.get(), self.liveness_interval)
                except TimeoutError:
                    failure = await self._check_stages(state)
                    if failure is None:
                        continue
                    event = failure
                if event.attempt != state.attempt:
                    continue  # from an attempt already abandoned
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
                    self._release_attempt(state)
                    state.attempt += 1
                    await self._start_attempt(state)
                    continue
                if event.error is not None:
                    raise GenerationError(event.error)
                if event.step != len(state.generated):
                    continue  # a duplicate after a replay
                state.progress_at = time.monotonic()
                state.silent_since.clear()
                state.generated.append(event.token)
                for callback in self.on_token:
                    callback()
                yield GeneratedToken(event.token, event.logprob, event.top_logprobs, event.finish_reason)
                if event.finish_reason is not None:
                    return
        finally:
            self.active_requests -= 1
            self._origins.pop(request.request_id, None)
            await self._release_all(state)

    async def _start_attempt(self, state: _OriginState) -> None:
        request = state.request
        try:
            state.plan = self.make_plan(request.model, state.excluded)
        except NoPlanError as exc:
            raise GenerationError(
                f"{exc} (nodes lost: {', '.join(sorted(state.excluded)) or 'none'})"
            ) from exc
        state.progress_at = time.monotonic()
        state.silent_since.clear()
        state.touched.update(stage.node_id for stage in state.plan)
        for stage in state.plan:
            self._inflight[stage.node_id] = self._inflight.get(stage.node_id, 0) + 1
        tokens = np.asarray([*request.prompt_tokens, *state.generated], dtype=np.int64)
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
            start_pos=0,
            tokens=tokens,
            messages=request.messages,
            replayed=tuple(state.generated),
        )
        first = state.plan[0].node_id
        try:
            await self.client_for(first).send_step(msg)
        except PeerUnavailable as exc:
            state.events.put_nowait(StageFailure(request.request_id, state.attempt, first, str(exc)))

    async def _check_stages(self, state: _OriginState) -> StageFailure | None:
        """No token for a while: ping the plan's stages; a failure when one is gone."""
        rid, attempt = state.request.request_id, state.attempt
        now = time.monotonic()
        remote = [s.node_id for s in state.plan if s.node_id != self.node_id]

        async def ping(node_id: str) -> StageFailure | None:
            try:
                held = await self.client_for(node_id).health(rid, attempt)
            except PeerTimeout as exc:
                first = state.silent_since.setdefault(node_id, now)
                if now - first >= self.liveness_timeout:
                    return StageFailure(rid, attempt, node_id, f"silent for {now - first:.1f} s ({exc})")
                return None
            except PeerUnavailable as exc:
                return StageFailure(rid, attempt, node_id, str(exc))
            state.silent_since.pop(node_id, None)
            if held == QUEUED:  # waiting its turn on a busy engine: healthy, not stuck
                state.progress_at = time.monotonic()
            if held == RELEASED:  # it gave up on the request (e.g. could not reach us)
                return StageFailure(rid, attempt, node_id, f"{node_id} dropped the request")
            return None

        results = await asyncio.gather(*(ping(n) for n in remote))
        failure = next((r for r in results if r is not None), None)
        if failure is not None:
            return failure
        if any(s.node_id == self.node_id for s in state.plan) and self.request_state(rid, attempt) == QUEUED:
            state.progress_at = time.monotonic()
        if time.monotonic() - state.progress_at > self.step_timeout:
            return StageFailure(rid, attempt, "", f"no progress for {self.step_timeout:.0f} s")
        return None

    def _forget_plan(self, state: _OriginState) -> None:
        for stage in state.plan:
            self._inflight[stage.node_id] = self._inflight.get(stage.node_id, 1) - 1
        state.plan = ()

    def _release_attempt(self, state: _OriginState) -> None:
        """Free the abandoned attempt's caches, in the background (a dead node may not answer)."""
        nodes = {s.node_id for s in state.plan}
        self._forget_plan(state)
        self._spawn(self._release_on(state.request.request_id, state.attempt, nodes))

    async def _release_all(self, state: _OriginState) -> None:
        """Free every cache of the request: here at once, on the peers in the background."""
        self._forget_plan(state)
        rid = state.request.request_id
        await self.release(rid, state.attempt)
        self._spawn(self._release_on(rid, state.attempt, state.touched - {self.node_id}))

    async def _release_on(self, request_id: str, up_to_attempt: int, node_ids: Set[str]) -> None:
        async def one(node_id: str) -> None:
            try:
                departed = self._departed.get(node_id) if node_id not in self.peers else None
                client = departed or self.client_for(node_id)
                await client.release(request_id, up_to_attempt)
            except Exception as exc:  # a dead peer holds no cache worth freeing
                log.debug("release failed", peer=node_id, error=str(exc))

        await asyncio.gather(*(one(n) for n in node_ids))

    # ---- messages from peers (or from ourselves) -------------------------------------------

    async def receive_step(self, msg: StepMessage) -> None:
        """A step for this node's stage: queue it for the engine worker."""
        if msg.stage.node_id != self.node_id:
            raise ValueError(f"step for stage {msg.stage_index} is addressed to {msg.stage.node_id}")
        if msg.deliver is not None and not await self.receive_token(msg.deliver):
            await self.release(msg.request_id, msg.attempt)  # the origin (this node) let go
            return
        tomb = self._released.get(msg.request_id)
        if tomb is not None and msg.attempt <= tomb[0]:
            return  # the origin already let go of this attempt
        known = self._stage_requests.get(msg.request_id)
        if known is not None and known.attempt > msg.attempt:
            return  # stale
        if known is None or known.attempt < msg.attempt:
            if known is not None:
                await self.engine.release(f"{msg.request_id}#{known.attempt}")
            known = self._stage_requests[msg.request_id] = _StageRequest(msg.attempt, list(msg.replayed))
        if msg.start_pos != known.positions:
            # This stage lost (or never had) the request's cache, e.g. it restarted: the origin
            # must replay from scratch.
            self._stage_requests.pop(msg.request_id, None)
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

    async def receive_token(self, msg: TokenMessage) -> bool:
        """A token for a request this node is the origin of; False when it is no longer wanted."""
        state = self._origins.get(msg.request_id)
        if state is None or msg.attempt < state.attempt:
            return False
        state.events.put_nowait(msg)
        return True

    async def receive_failure(self, failure: StageFailure) -> None:
        state = self._origins.get(failure.request_id)
        if state is not None:
            state.events.put_nowait(failure)

    async def release(self, request_id: str, up_to_attempt: int | None = None) -> None:
        """Free this node's cache for a request (attempts up to `up_to_attempt`, default all)."""
        known = self._stage_requests.get(request_id)
        if up_to_attempt is None:
            up_to_attempt = known.attempt if known is not None else 0
        if known is not None and known.attempt <= up_to_attempt:
            del self._stage_requests[request_id]
            await self.engine.release(f"{request_id}#{known.attempt}")
        self._bury(request_id, up_to_attempt)

    async def _expire_idle_stage_requests(self) -> None:
        """Free stage caches whose origin went silent (it died, or dropped this node)."""
        idle_after = max(2 * self.step_timeout, 60.0)
        while True:
            await asyncio.sleep(min(idle_after / 4, 30.0))
            now = time.monotonic()
            for request_id, known in list(self._stage_requests.items()):
                if now - known.last_seen > idle_after:
                    log.info("releasing an abandoned request", request=request_id)
                    await self.release(request_id, known.attempt)

    def request_state(self, request_id: str, attempt: int) -> str:
        """ACTIVE, QUEUED (waiting its turn in the engine), RELEASED or UNKNOWN: this node's
        stage of one attempt of a request."""
        known = self._stage_requests.get(request_id)
        if known is not None and known.attempt == attempt:
            return QUEUED if self.engine.queued(f"{request_id}#{attempt}") else ACTIVE
        tomb = self._released.get(request_id)
        if tomb is not None and tomb[0] >= attempt:
            return RELEASED
        return UNKNOWN

    def _bury(self, request_id: str, attempt: int) -> None:
        now = time.monotonic()
        previous = self._released.pop(request_id, None)
        self._released[request_id] = (max(attempt, previous[0] if previous else attempt), now)
        while self._released:
            oldest_id, (_, at) = next(iter(self._released.items()))
            if now - at < TOMBSTONE_S and len(self._released) <= MAX_TOMBSTONES:
                break
            del self._released[oldest_id]

    # ---- the engine worker -----------------------------------------------------------------

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
        known = self._stage_requests.get(msg.request_id)
        return known is not None and known.attempt == msg.attempt

    async def _run_group(self, shard: Shard, group: list[StepMessage]) -> None:
        try:
            card = self.models.get(shard.model_id)
            if card is None:
                raise EngineError(f"this node has no model card for {shard.model_id}")
            await self.engine.load(shard, card)
            inputs = [
                StageInput(
                    m.cache_key,
                    m.tokens,
                    m.hidden,
                    m.messages,
                    m.sampling,
                    max_tokens=m.max_tokens,
                    replayed=len(m.replayed),
                )
                for m in group
            ]
            outputs = await self.engine.forward_batch(shard, inputs)
        except Exception as exc:
            log.exception("engine failed", shard=str(shard))
            for msg in group:
                await self._send_error(msg, _error_text(exc))
            return
        for msg, out in zip(group, outputs, strict=True):
            self._spawn(self._after_forward(msg, out))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
        known = self._stage_requests[msg.request_id]
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
            wanted = await self.client_for(msg.origin).send_token(token_msg)
        except PeerUnavailable as exc:
            log.warning("origin unreachable; dropping request", request=msg.request_id, error=str(exc))
            wanted = False
        if not wanted:
            await self.release(msg.request_id, msg.attempt)

    async def _forward_to(self, msg: StepMessage) -> None:
        target = msg.stage.node_id
        try:
            await self.client_for(target).send_step(msg)
        except PeerUnavailable as exc:
            await self._report(msg, StageFailure(msg.request_id, msg.attempt, target, _error_text(exc)))

    async def _report(self, msg: StepMessage, failure: StageFailure) -> None:
        try:
            await self.client_for(msg.origin).report_failure(failure)
        except PeerUnavailable:
            log.warning("origin unreachable; dropping request", request=msg.request_id)
            await self.release(msg.request_id, msg.attempt)

    async def _send_error(self, msg: StepMessage, error: str) -> None:
        token_msg = TokenMessage(msg.request_id, msg.attempt, msg.step, error=error)
        try:
            await self.client_for(msg.origin).send_token(token_msg)
        except PeerUnavailable:
            log.warning("origin unreachable", request=msg.request_id)
        await self.release(msg.request_id, msg.attempt)


TOMBSTONE_S = 300.0
MAX_TOMBSTONES = 10_000

# Node.request_state values
UNKNOWN, ACTIVE, QUEUED, RELEASED = "unknown", "active", "queued", "released"


def _shard_key(msg: StepMessage) -> tuple:
    s = msg.stage.shard
    return (s.model_id, s.start_layer, s.end_layer)


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text


class _LocalPeer:
    """This node talking to itself: direct calls, no serialisation."""

    def __init__(self, node: Node) -> None:
        self._node = node

    async def send_step(self, msg: StepMessage) -> None:
        await self._node.receive_step(msg)

    async def send_token(self, msg: TokenMessage) -> bool:
        return await self._node.receive_token(msg)

    async def report_failure(self, failure: StageFailure) -> None:
        await self._node.receive_failure(failure)

    async def release(self, request_id: str, up_to_attempt: int) -> None:
        await self._node.release(request_id, up_to_attempt)

    async def health(self, request_id: str = "", attempt: int = 0) -> str:
        return self._node.request_state(request_id, attempt) if request_id else UNKNOWN
