"""The gRPC node service: receives steps, tokens, failures and releases for the local node."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
import structlog

from exo_core.engine import ReplicaUnavailable
from exo_core.errors import EngineError
from exo_core.networking import file_transfer, wire
from exo_core.networking.auth import ClusterAuth
from exo_core.networking.client import CHANNEL_OPTIONS, grpc_target
from exo_core.networking.generated import link_pb2_grpc as lpb_grpc
from exo_core.networking.generated import node_service_pb2 as pb
from exo_core.networking.generated import node_service_pb2_grpc as pb_grpc
from exo_core.networking.link import LinkServer, LinkServicer, sockets_enabled
from exo_core.node.messages import RequestState
from exo_core.node.node import Node

log = structlog.get_logger("exo.peers")

SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),  # a busy --node-port is an error, not a shared port
)


_STATES = {
    RequestState.ACTIVE: pb.REQUEST_ACTIVE,
    RequestState.QUEUED: pb.REQUEST_QUEUED,
    RequestState.RELEASED: pb.REQUEST_RELEASED,
    RequestState.UNKNOWN: pb.REQUEST_UNKNOWN,
}


class NodeServicer(pb_grpc.NodeServiceServicer):
    """Turns RPCs into calls on the node; malformed messages are refused with INVALID_ARGUMENT."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def SendStep(self, request: pb.StepRequest, context: grpc.aio.ServicerContext) -> pb.StepReply:
        try:
            msg = wire.step_from_pb(request)
        except wire.WireError as exc:
            await _refuse(context, f"malformed step: {exc}")
        if msg.stage.node_id != self.node.node_id:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stage {msg.stage_index} of this plan is {msg.stage.node_id}, not {self.node.node_id}",
            )
        await self.node.receive_step(msg)
        return pb.StepReply()

    async def SendToken(self, request: pb.TokenRequest, context: grpc.aio.ServicerContext) -> pb.TokenReply:
        try:
            msg = wire.token_from_pb(request)
        except wire.WireError as exc:
            await _refuse(context, f"malformed token: {exc}")
        return pb.TokenReply(wanted=await self.node.receive_token(msg))

    async def ReportFailure(
        self, request: pb.FailureRequest, context: grpc.aio.ServicerContext
    ) -> pb.FailureReply:
        await self.node.receive_failure(wire.failure_from_pb(request))
        return pb.FailureReply()

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseReply:
        await self.node.release(request.request_id, request.up_to_attempt, keep=request.keep)
        return pb.ReleaseReply()

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthReply:
        state = pb.REQUEST_UNKNOWN
        if request.request_id:
            state = _STATES[self.node.request_state(request.request_id, request.attempt)]
        return pb.HealthReply(ok=True, node_id=self.node.node_id, request_state=state)

    async def GetNodeInfo(
        self, request: pb.NodeInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.NodeInfo:
        return wire.node_info_to_pb(self.node.info())

    async def GenerateText(
        self, request: pb.TextGenerationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TextDeltaReply]:
        """A whole request on this node's text engine; failures travel as the last reply."""
        card = self.node.models.get(request.model_id)
        if card is None:
            yield pb.TextDeltaReply(error=f"node {self.node.node_id} has no model {request.model_id!r}")
            return
        try:
            text_request, delivered = wire.text_request_from_pb(request, card)
        except wire.WireError as exc:
            await _refuse(context, f"malformed text request: {exc}")
        try:
            async with contextlib.aclosing(self.node.serve_text(text_request, delivered)) as deltas:
                async for delta in deltas:
                    yield wire.delta_to_pb(delta)
        except ReplicaUnavailable as exc:
            yield pb.TextDeltaReply(error=str(exc), unavailable=True)
        except EngineError as exc:
            yield pb.TextDeltaReply(error=str(exc), status=getattr(exc, "status", 500))


async def _refuse(context: grpc.aio.ServicerContext, reason: str) -> NoReturn:
    log.warning("refused peer message", peer=context.peer(), reason=reason)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
    raise AssertionError("unreachable: abort raises")


class PeerServerError(OSError):
    """The peer server could not listen where it was asked to."""


async def serve(
    node: Node, host: str = "0.0.0.0", port: int = 0, auth: ClusterAuth | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start the node service on host:port (0 = a free port); returns the server and its port.

    With `auth`, only TLS clients holding a certificate of the cluster's CA get through the
    handshake; without it (--insecure) anyone who reaches the port may call.
    """
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_NodeServiceServicer_to_server(NodeServicer(node), server)
    server.add_generic_rpc_handlers((file_transfer.handler(node),))  # model bytes for peers
    lpb_grpc.add_NodeLinkServicer_to_server(LinkServicer(node), server)
    error: RuntimeError | None = None
    try:
        if auth is None:
            bound = server.add_insecure_port(grpc_target(host, port))
        else:
            bound = server.add_secure_port(grpc_target(host, port), auth.server_credentials())
    except RuntimeError as exc:
        bound, error = 0, exc
    if not bound:
        raise PeerServerError(
            f"cannot listen for peers on {grpc_target(host, port)} ({error or 'address in use?'}); "
            "choose another --node-port or --node-host"
        )
    await server.start()
    return server, bound


class PeerServer:
    """What a node serves its peers: the gRPC node service and the link's own listener."""

    def __init__(self, grpc_server: grpc.aio.Server, link: LinkServer | None) -> None:
        self.grpc = grpc_server
        self.link = link

    async def stop(self, grace: float | None) -> None:
        if self.link is not None:
            await self.link.close()
        await self.grpc.stop(grace)


async def start_peer_server(
    node: Node,
    host: str,
    port: int | None,
    auth: ClusterAuth | None,
    advertise: str | None = None,
    link_port: int | None = None,
) -> PeerServer:
    """Called by the runtime: serve the node service and the link (`link_port`, 0 or None: a
    free port), and tell the node where it is reachable."""
    server, bound = await serve(node, host, port or 0, auth)
    link = None
    if sockets_enabled():
        link = LinkServer(node, auth.ssl_context(server=True) if auth is not None else None)
        try:
            node.link_port = await link.start(host, link_port or 0)
        except OSError as exc:
            await server.stop(0)
            raise PeerServerError(
                f"cannot listen for peer links on {grpc_target(host, link_port or 0)} ({exc.strerror or exc}); "
                "choose another --link-port"
            ) from None
    node.port = bound
    node.address = advertise or advertised_address(host)
    log.info(
        "peer server listening",
        node=node.node_id,
        address=grpc_target(host, bound),
        link_port=node.link_port or None,
        tls=auth is not None,
        cluster_key=auth.fingerprint if auth is not None else None,
    )
    return PeerServer(server, link)


def advertised_address(host: str) -> str:
    """The address peers should use for this node: the bound host, or the best-ranked interface."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    from exo_core.networking.interfaces import ranked_interfaces

    for iface in ranked_interfaces():
        if iface.kind != "loopback":
            return iface.address
    return socket.gethostbyname("localhost")
