"""The node: its peers, and the two roles it plays in the request flow.

A node is the origin (`origin.py`) of the requests its callers give it, and a stage
(`stage.py`) of the plans that use it. It keeps the peer table both talk through, routes each
peer message to the role it is for, and describes itself to the cluster (`info`). What the
nodes send each other is in `messages.py`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence, Set
from dataclasses import dataclass

import structlog

from exo_core.engine import InferenceEngine, TextDelta, TextEngine, TextGeneration
from exo_core.errors import EngineError
from exo_core.models.cards import ModelCard
from exo_core.node.messages import (
    GeneratedToken,
    GenerationRequest,
    PeerClient,
    PeerUnavailable,
    RequestState,
    StageFailure,
    StepMessage,
    TokenMessage,
)
from exo_core.node.origin import Origin
from exo_core.node.partitioning import Partitioner, PlanStage, ring_memory_weighted
from exo_core.node.replicas import ReplicaSet
from exo_core.node.stage import Stage
from exo_core.node.topology import DeviceCapabilities, NodeInfo

log = structlog.get_logger("exo.node")


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
        partitioner: Partitioner = ring_memory_weighted,
        address: str = "127.0.0.1",
        port: int = 0,
        step_timeout: float = 120.0,
        max_replans: int = 8,
        liveness_interval: float = 1.0,
        liveness_timeout: float = 10.0,
        hub_formats: Sequence[str] | None = None,
    ) -> None:
        self.node_id = node_id
        self.engine = engine
        self.models = models
        self.capabilities = capabilities or DeviceCapabilities()
        self.address = address
        self.port = port
        self.link_port = 0  # the link's own listener, once the peer server runs it
        self.peers: dict[str, Peer] = {}
        self._served_models: tuple[str, ...] = tuple(models)
        # Hub models (hf.co/...) in these formats: this node holds their layers though it was not
        # started with them (the card comes with the plan); default: what a sharding engine loads.
        self.hub_formats: tuple[str, ...] = (
            tuple(hub_formats) if hub_formats is not None else default_hub_formats(engine)
        )
        self._local = _LocalPeer(self)
        self.stage = Stage(node_id, engine, models, self.client_for, step_timeout=step_timeout)
        # A text engine serves whole requests over its servers (replicas), not steps.
        self.replicas = ReplicaSet(engine) if isinstance(engine, TextEngine) else None
        self.origin = Origin(
            node_id,
            self.cluster,
            self.client_for,
            partitioner=partitioner,
            step_timeout=step_timeout,
            max_replans=max_replans,
            liveness_interval=liveness_interval,
            liveness_timeout=liveness_timeout,
        )
        self.origin.held_shards = lambda: self.engine.loaded_shards

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the stage's engine worker (a first step starts it too: an origin needs none)."""
        await self.stage.start()
        if self.replicas is not None:
            await self.replicas.start()

    async def stop(self) -> None:
        await self.stage.stop()
        if self.replicas is not None:
            await self.replicas.stop()
        await self.origin.stop()
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
            servers=self._servers(),
            hub_formats=self.hub_formats,
            link_port=self.link_port,
        )

    def _servers(self) -> tuple[tuple[str, int], ...]:
        """How many servers the text engine fronts for each model it serves (each is a queue)."""
        if self.replicas is None:
            return ()
        engine = self.replicas.engine
        out = []
        for model_id in self._served_models:
            card = self.models.get(model_id)
            if card is not None:
                out.append((model_id, len(engine.replicas(card))))
        return tuple(out)

    def set_served_models(self, model_ids: Sequence[str]) -> None:
        self._served_models = tuple(model_ids)

    def add_peer(self, info: NodeInfo, client: PeerClient) -> None:
        if info.node_id == self.node_id:
            raise ValueError("a node is not its own peer")
        is_new = info.node_id not in self.peers
        self.peers[info.node_id] = Peer(info, client)
        self._learn_models(info)
        if is_new:
            log.info("peer added", peer=info.node_id, address=f"{info.address}:{info.port}")

    def update_peer_info(self, info: NodeInfo) -> None:
        if info.node_id in self.peers:
            self.peers[info.node_id].info = info
            self._learn_models(info)

    def _learn_models(self, info: NodeInfo) -> None:
        """Models a whole-request peer found on its servers (an upstream's own ids): this node
        knows no card for them, but can send their requests there."""
        if info.supports_sharding:
            return
        for model_id in info.models:
            if model_id not in self.models:
                self.models[model_id] = ModelCard(model_id, model_id, 1)

    def remove_peer(self, node_id: str, reason: str = "dropped by discovery") -> None:
        """Forget a peer; requests whose plan uses it are re-planned."""
        peer = self.peers.pop(node_id, None)
        if peer is None:
            return
        log.info("peer removed", peer=node_id, reason=reason)
        self.origin.peer_removed(node_id, peer.client, reason)

    def cluster(self) -> list[NodeInfo]:
        return [self.info(), *(p.info for p in self.peers.values())]

    def client_for(self, node_id: str) -> PeerClient:
        if node_id == self.node_id:
            return self._local
        peer = self.peers.get(node_id)
        if peer is None:
            raise PeerUnavailable(f"node {node_id} is not in the cluster")
        return peer.client

    # ---- as the origin -----------------------------------------------------------------------

    def make_plan(self, card: ModelCard, exclude: Set[str] = frozenset()) -> tuple[PlanStage, ...]:
        """Stages for a request: whole-model nodes get one-stage plans, the rest are partitioned."""
        return self.origin.make_plan(card, exclude)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GeneratedToken]:
        """Run a request through the cluster, yielding tokens as the last stage samples them.

        Closing the iterator early (client gone, stop string) releases every stage's cache.
        """
        return self.origin.generate(request)

    @property
    def active_requests(self) -> int:
        """Requests this node is the origin of, generating now."""
        return self.origin.active_requests

    # ---- messages from peers (or from ourselves) -------------------------------------------

    async def receive_step(self, msg: StepMessage) -> None:
        """A step for this node's stage, maybe carrying a token for this node as the origin."""
        if msg.stage.node_id != self.node_id:
            raise ValueError(f"step for stage {msg.stage_index} is addressed to {msg.stage.node_id}")
        if msg.deliver is not None and not await self.origin.receive_token(msg.deliver):
            await self.stage.release(msg.request_id, msg.attempt)  # the origin (this node) let go
            return
        await self.stage.receive_step(msg)

    async def receive_token(self, msg: TokenMessage) -> bool:
        """A token for a request this node is the origin of; False when it is no longer wanted."""
        return await self.origin.receive_token(msg)

    async def receive_failure(self, failure: StageFailure) -> None:
        await self.origin.receive_failure(failure)

    async def release(self, request_id: str, up_to_attempt: int | None = None, keep: bool = False) -> None:
        """Free this node's cache for a request (attempts up to `up_to_attempt`, default all);
        `keep`: the request finished, keep its cache for prefix reuse."""
        await self.stage.release(request_id, up_to_attempt, keep=keep)

    def request_state(self, request_id: str, attempt: int) -> RequestState:
        """ACTIVE, QUEUED (waiting its turn in the engine), RELEASED or UNKNOWN: this node's
        stage of one attempt of a request."""
        return self.stage.request_state(request_id, attempt)

    def active_stage_requests(self) -> int:
        whole = self.replicas.inflight if self.replicas is not None else 0
        return self.stage.request_count + whole

    def serve_text(self, request: TextGeneration, delivered: str = "") -> AsyncGenerator[TextDelta]:
        """A whole request on this node's text engine, balanced over its servers (from any origin)."""
        if self.replicas is None:
            raise EngineError(
                f"node {self.node_id} runs {self.engine.name}, which does not serve whole requests"
            )
        return self.replicas.generate(request, delivered)


HUB_FORMATS = ("gguf", "safetensors")  # the source kinds of cards made from the hub (hub_cards)


def default_hub_formats(engine: InferenceEngine) -> tuple[str, ...]:
    """The hub formats a node takes models in without being started with them: those its engine
    loads, when it holds layers (a whole-request engine on text serves only what its servers offer)."""
    if not engine.supports_sharding or isinstance(engine, TextEngine):
        return ()
    return tuple(k for k in HUB_FORMATS if k in type(engine).source_kinds)


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

    async def release(self, request_id: str, up_to_attempt: int, keep: bool = False) -> None:
        await self._node.release(request_id, up_to_attempt, keep=keep)

    async def health(self, request_id: str = "", attempt: int = 0) -> RequestState:
        return self._node.request_state(request_id, attempt) if request_id else RequestState.UNKNOWN

    def generate_text(self, request: TextGeneration, delivered: str = "") -> AsyncIterator[TextDelta]:
        return self._node.serve_text(request, delivered)
