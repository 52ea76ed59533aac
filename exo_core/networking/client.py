"""The gRPC side of PeerClient: one channel per peer (TLS with the cluster key), a deadline on every call."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any

import grpc

from exo_core.engine import ReplicaUnavailable, TextDelta, TextGeneration, UpstreamError
from exo_core.networking import wire
from exo_core.networking.auth import ClusterAuth
from exo_core.networking.generated import node_service_pb2 as pb
from exo_core.networking.generated import node_service_pb2_grpc as pb_grpc
from exo_core.networking.link import MAX_MESSAGE_BYTES, LinkSender
from exo_core.node.messages import (
    PeerTimeout,
    PeerUnavailable,
    RequestState,
    StageFailure,
    StepMessage,
    TokenMessage,
)
from exo_core.node.topology import NodeInfo

_STATES = {
    pb.REQUEST_ACTIVE: RequestState.ACTIVE,
    pb.REQUEST_QUEUED: RequestState.QUEUED,
    pb.REQUEST_RELEASED: RequestState.RELEASED,
    pb.REQUEST_UNKNOWN: RequestState.UNKNOWN,
}

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_http_proxy", 0),  # peers are on the LAN; never route them through a proxy
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


def grpc_target(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class GrpcPeerClient:
    """Talks to one peer's node service. Every failure becomes `PeerUnavailable` (or `PeerTimeout`)."""

    def __init__(
        self,
        node_id: str,
        address: str,
        port: int,
        *,
        own_id: str = "",
        auth: ClusterAuth | None = None,
        call_timeout: float = 10.0,
        health_timeout: float = 1.0,
        on_lost_step: Callable[[str, StageFailure], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.port = port
        self.target = grpc_target(address, port)
        self.own_id = own_id
        self.call_timeout = call_timeout
        self.health_timeout = health_timeout
        # Steps are posted (no acknowledgement) when someone takes their losses: called with the
        # step's origin and the failure it must hear of, when the peer refuses the step or the
        # link breaks right after it. Without it, every step waits for its acknowledgement.
        self.on_lost_step = on_lost_step
        self._auth = auth
        if auth is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(
                self.target, auth.channel_credentials(), options=CHANNEL_OPTIONS + auth.channel_options
            )
        self._stub = pb_grpc.NodeServiceStub(self._channel)
        self._link = LinkSender(
            self._channel,
            f"{node_id} at {self.target}",
            host=address,
            port_source=self._link_port,
            tls=auth.ssl_context(server=False) if auth is not None else None,
        )

    def __repr__(self) -> str:
        return f"GrpcPeerClient({self.node_id}@{self.target})"

    @property
    def channel(self) -> grpc.aio.Channel:
        """The peer's channel, shared with other services on its server (file transfer)."""
        return self._channel

    async def _call(self, name: str, request: Any, timeout: float) -> Any:
        method = getattr(self._stub, name)
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            text = f"{self.node_id} at {self.target}: {name}: {exc.code().name}: {exc.details()}"
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise PeerTimeout(text) from None
            raise PeerUnavailable(text) from None

    # ---- PeerClient ----------------------------------------------------------------------------

    # Steps, tokens, failures, releases and health checks travel on the link (one connection).

    async def send_step(self, msg: StepMessage) -> None:
        on_lost_step = self.on_lost_step
        if on_lost_step is None:
            await self._link.send("step", wire.step_to_pb(msg), self.call_timeout)
            return
        origin, request_id, attempt, target = msg.origin, msg.request_id, msg.attempt, self.node_id

        def lost(reason: str) -> None:  # keeps the step's identity, not its tensors
            on_lost_step(origin, StageFailure(request_id, attempt, target, reason))

        await self._link.post("step", wire.step_to_pb(msg), self.call_timeout, msg.cache_key, lost)

    async def send_token(self, msg: TokenMessage) -> bool:
        reply = await self._link.send("token", wire.token_to_pb(msg), self.call_timeout)
        return bool(reply.wanted)

    async def report_failure(self, failure: StageFailure) -> None:
        await self._link.send("failure", wire.failure_to_pb(failure), self.call_timeout)

    async def release(self, request_id: str, up_to_attempt: int, keep: bool = False) -> None:
        request = pb.ReleaseRequest(request_id=request_id, up_to_attempt=up_to_attempt, keep=keep)
        await self._link.send("release", request, self.call_timeout)

    async def health(self, request_id: str = "", attempt: int = 0) -> RequestState:
        """Raises unless the peer answers in time as the node we think it is; with a request id,
        returns the peer's state of that attempt (a `RequestState`)."""
        request = pb.HealthRequest(request_id=request_id, attempt=attempt)
        reply = (await self._link.send("health", request, self.health_timeout)).health
        if not reply.ok:
            raise PeerUnavailable(f"{self.node_id} at {self.target} reports it is not healthy")
        if self.node_id and reply.node_id != self.node_id:
            raise PeerUnavailable(f"{self.target} is node {reply.node_id}, not {self.node_id}")
        return _STATES.get(reply.request_state, RequestState.UNKNOWN)

    async def generate_text(self, request: TextGeneration, delivered: str = "") -> AsyncGenerator[TextDelta]:
        """A whole request on the peer's text engine, streamed back. No deadline (an answer takes
        as long as it takes); a peer that dies is noticed by the channel's keepalive pings.

        Not on the link, on purpose: it is one call per whole answer (not per token), so the
        link's per-message cost does not matter here. As a gRPC stream of its own it gets
        HTTP/2's per-stream flow control, so a client that reads an answer slowly holds back
        that answer only, never the steps and tokens on the link, and cancelling it (the client
        left) is a stream reset the server sees at once.
        """
        name = "GenerateText"
        # (getattr: per-call metadata exists only while the cluster secret is signed per call)
        sign = getattr(self._auth, "metadata", None)
        metadata = sign(f"/exo.node.v1.NodeService/{name}", self.own_id) if sign else None
        call = self._stub.GenerateText(wire.text_request_to_pb(request, delivered), metadata=metadata)
        try:
            async for reply in call:
                if reply.error:
                    if reply.unavailable:
                        raise ReplicaUnavailable(reply.error)
                    raise UpstreamError(reply.error, reply.status or 500)
                yield wire.delta_from_pb(reply)
        except grpc.aio.AioRpcError as exc:
            raise PeerUnavailable(
                f"{self.node_id} at {self.target}: {name}: {exc.code().name}: {exc.details()}"
            ) from None
        finally:
            call.cancel()

    # ---- discovery -----------------------------------------------------------------------------

    async def node_info(self) -> NodeInfo:
        reply = await self._call("GetNodeInfo", pb.NodeInfoRequest(), self.call_timeout)
        self._link.peer_link_port(reply.link_port)
        return wire.node_info_from_pb(reply)

    async def _link_port(self) -> int:
        """The peer's link port (0: it has no link listener), asked before the link connects."""
        return (await self.node_info()).link_port

    async def close(self) -> None:
        await self._link.close()
        await self._channel.close()
