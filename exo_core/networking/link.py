"""The link: one connection from this node to each peer it sends to, for steps, tokens,
failures, releases and health checks, instead of a unary call per message.

The link has its own listener (`LinkServer`, on `--link-port`, announced as the node's
`link_port`): each message is a frame, a 4-byte big-endian length and a `LinkMessage`
(link.proto), on a TCP socket under the same mutual TLS as the gRPC port (a certificate of the
cluster's CA on both sides; plaintext with --insecure). A frame is read and handled on the
event loop itself: gRPC's asyncio API hands every message over from a completion-queue thread
of its own, a thread wake-up per message that cost ~0.1 ms on a quiet machine and up to
several ms on a busy one (`bench/bench_link.py`), on the path of every token. When the link
port cannot be reached (a firewall that lets only `--node-port` through), or the peer runs no
listener (`EXO_LINK=grpc`), the link is a `NodeLink` stream on the gRPC channel instead: the
same messages, in the same order, a little slower.

A message goes out as soon as it is written (TCP's flow control, or HTTP/2's, holds a writer
back when the peer reads slower than we send); the peer handles messages in the order they
arrive and acknowledges each, with what the unary call would have returned. A sender waits for
its own acknowledgement only, never for the messages before it. When the connection breaks,
every message still waiting fails with `PeerUnavailable` (the origin re-plans, as for a failed
call) and the next message opens a new one.

Steps, one per hop per token, are *posted* (`LinkSender.post`): the sender returns once the
message is written and the peer answers only when it refuses one. A refusal, or the connection
breaking within `POSTED_WINDOW_S` of a posted message (its fate unknown), calls the message's
`on_lost` (the client reports the step failed to its origin, as a failed call did); a break
calls it once per request (`key`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from google.protobuf.message import DecodeError

from exo_core.networking import wire
from exo_core.networking.auth import TLS_NAME
from exo_core.networking.generated import link_pb2 as lpb
from exo_core.networking.generated import link_pb2_grpc as lpb_grpc
from exo_core.networking.generated import node_service_pb2 as pb
from exo_core.node.messages import PeerTimeout, PeerUnavailable, RequestState

if TYPE_CHECKING:
    from exo_core.node.node import Node

log = structlog.get_logger("exo.peers")

# The largest legal message, with room to spare: a step's hidden states cross a hop one slice
# (node.stage.STEP_SLICE = 256 positions) at a time, 16 MiB at the widest Llama (16,384 x 4
# bytes); a prompt's token ids go to stage 0 in slices too (a whole-request engine gets them
# whole: 8 MiB at a million tokens); the request's messages are at most the API's 4 MiB body.
# Anything larger is refused before it is read into memory.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_HEADER = 4  # bytes of a frame's length
_READ_BUFFER = 1 << 20
CONNECT_S = 3.0  # connecting (and the TLS handshake) to a link port, before the gRPC fallback

_STATES = {
    RequestState.ACTIVE: pb.REQUEST_ACTIVE,
    RequestState.QUEUED: pb.REQUEST_QUEUED,
    RequestState.RELEASED: pb.REQUEST_RELEASED,
    RequestState.UNKNOWN: pb.REQUEST_UNKNOWN,
}
# A posted message whose connection breaks within this many seconds of its write counts as lost
# (later, the peer has long handled it: a live request has posted newer ones since).
POSTED_WINDOW_S = 5.0


def sockets_enabled() -> bool:
    """False with `EXO_LINK=grpc`: no link listener, and links always go over gRPC."""
    return os.environ.get("EXO_LINK", "").strip().lower() != "grpc"


class _Broken(Exception):
    """The connection under a link ended; the text says how."""


# ---- frames on a socket -------------------------------------------------------------------------


def _frame(msg: lpb.LinkMessage) -> bytes:
    """`msg` as one frame, for one write: two would be two TLS records, maybe two segments,
    waking the peer twice."""
    data = msg.SerializeToString()
    return len(data).to_bytes(_HEADER, "big") + data


async def _read_frame(reader: asyncio.StreamReader) -> lpb.LinkMessage | None:
    """The next message, or None when the peer closed the connection between two."""
    try:
        head = await reader.readexactly(_HEADER)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise _Broken("the connection ended inside a message") from None
        return None
    except OSError as exc:  # reset, TLS alert, keepalive timeout
        raise _Broken(_describe_os_error(exc)) from None
    size = int.from_bytes(head, "big")
    if size > MAX_MESSAGE_BYTES:
        raise _Broken(f"a message of {size} bytes (at most {MAX_MESSAGE_BYTES})")
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise _Broken("the connection ended inside a message") from None
    except OSError as exc:  # reset, TLS alert, keepalive timeout
        raise _Broken(_describe_os_error(exc)) from None
    try:
        return lpb.LinkMessage.FromString(body)
    except DecodeError:
        raise _Broken("not a link message") from None


def _describe_os_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _tune(writer: asyncio.StreamWriter) -> None:
    """No delay for small messages; keepalive probes, so a vanished host ends the connection."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2)


class _SocketStream:
    """The link over a socket of its own: frames both ways."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, tls: ssl.SSLContext | None) -> _SocketStream:
        async with asyncio.timeout(CONNECT_S):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls, server_hostname=TLS_NAME if tls else None, limit=_READ_BUFFER
            )
        _tune(writer)
        return cls(reader, writer)

    async def write(self, msg: lpb.LinkMessage) -> None:
        try:
            self._writer.write(_frame(msg))
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a closed transport
            raise _Broken(_describe_os_error(exc)) from None

    async def read(self) -> lpb.LinkMessage | None:
        return await _read_frame(self._reader)

    def close(self) -> None:
        self._writer.close()


class _GrpcStream:
    """The link as a NodeLink stream on the peer's gRPC channel (when its link port is out of reach)."""

    def __init__(self, stub: lpb_grpc.NodeLinkStub) -> None:
        self._call: Any = stub.Link()

    async def write(self, msg: lpb.LinkMessage) -> None:
        try:
            await self._call.write(msg)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            raise _Broken(_grpc_reason(exc)) from None

    async def read(self) -> lpb.LinkMessage | None:
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise _Broken(_grpc_reason(exc)) from None
        return None if msg is grpc.aio.EOF else msg

    def close(self) -> None:
        self._call.cancel()


def _grpc_reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return "the link closed"


_Stream = _SocketStream | _GrpcStream


# ---- the sending end ------------------------------------------------------------------------------


class LinkSender:
    """This node's end of its link to one peer: sends messages, matches their acknowledgements.

    `host` and `port_source` (an awaitable giving the peer's link port, 0 for none) let it use
    the peer's link listener; `tls` is the client side of the cluster's mutual TLS (None with
    --insecure). Without a host, or with `EXO_LINK=grpc`, it uses the NodeLink stream on `channel`.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        describe: str,
        *,
        host: str | None = None,
        port_source: Callable[[], Awaitable[int]] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._stub = lpb_grpc.NodeLinkStub(channel)
        self._describe = describe  # "node-id at host:port", for errors
        self._host = host if sockets_enabled() else None
        self._port_source = port_source
        self._tls = tls
        self._port: int | None = None  # the peer's link port; None: ask before the next connection
        self._unreachable_port = 0  # a link port that could not be reached: gRPC until it changes
        self._stream: _Stream | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[lpb.LinkAck]] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._closed = False
        # Posted messages that may still be refused or lost: id -> (written at, key, on_lost),
        # in the order written.
        self._posted: dict[int, tuple[float, str, Callable[[str], None]]] = {}

    @property
    def transport(self) -> str:
        """What the link runs on now: "socket", "grpc", or "" (not connected)."""
        if self._stream is None:
            return ""
        return "socket" if isinstance(self._stream, _SocketStream) else "grpc"

    def peer_link_port(self, port: int) -> None:
        """The peer announced its link port (its node info): used from the next connection on."""
        self._port = port

    async def post(
        self, kind: str, body: Any, timeout: float, key: str, on_lost: Callable[[str], None]
    ) -> None:
        """Send one message without waiting for an acknowledgement; returns once it is written
        (at most `timeout` s). Later, `on_lost(reason)` is called if the peer refuses it, or if
        the connection breaks soon after (see the module docstring)."""
        if self._closed:
            raise PeerUnavailable(f"{self._describe}: link closed")
        msg_id = next(self._ids)
        msg = lpb.LinkMessage(id=msg_id, posted=True, **{kind: body})
        try:
            async with asyncio.timeout(timeout):
                if not await self._write(msg):
                    raise PeerUnavailable(f"{self._describe}: {kind}: the link closed")
        except TimeoutError:
            raise PeerTimeout(f"{self._describe}: {kind}: not written within {timeout:g} s") from None
        now = time.monotonic()
        self._posted[msg_id] = (now, key, on_lost)
        while True:  # forget those older than the window, oldest first
            oldest = next(iter(self._posted))
            if now - self._posted[oldest][0] < POSTED_WINDOW_S:
                break
            del self._posted[oldest]

    def _lost(self, msg_id: int, reason: str) -> None:
        """A posted message was refused: tell its sender's `on_lost`."""
        entry = self._posted.pop(msg_id, None)
        if entry is None:
            log.warning("a posted message was refused", peer=self._describe, reason=reason)
            return
        entry[2](reason)

    async def send(self, kind: str, body: Any, timeout: float) -> lpb.LinkAck:
        """Send one message and wait (at most `timeout` s) for its acknowledgement."""
        if self._closed:
            raise PeerUnavailable(f"{self._describe}: link closed")
        msg_id = next(self._ids)
        msg = lpb.LinkMessage(id=msg_id, **{kind: body})
        ack: asyncio.Future[lpb.LinkAck] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = ack
        try:
            async with asyncio.timeout(timeout):
                await self._write(msg)  # if the connection ended under us, the break fails `ack`
                reply = await ack
        except TimeoutError:
            raise PeerTimeout(f"{self._describe}: {kind}: no answer within {timeout:g} s") from None
        finally:
            self._pending.pop(msg_id, None)
        if reply.error:
            raise PeerUnavailable(f"{self._describe}: {kind}: {reply.error}")
        return reply

    async def _write(self, msg: lpb.LinkMessage) -> bool:
        """Write `msg` (connecting first if need be); False if the connection ended under us
        (it is then marked broken, which fails what waits on it)."""
        async with self._write_lock:
            stream = self._stream or await self._open()
            try:
                await stream.write(msg)
            except _Broken as exc:
                self._broken(stream, str(exc))
                return False
        return True

    async def _open(self) -> _Stream:
        stream = await self._connect()
        if self._closed:  # closed while connecting
            stream.close()
            raise PeerUnavailable(f"{self._describe}: link closed")
        self._stream = stream
        self._reader = asyncio.get_running_loop().create_task(self._read(stream))
        return stream

    async def _connect(self) -> _Stream:
        """The peer's link listener if it has one we can reach, else a stream on the channel."""
        if self._host is None or self._port_source is None:
            return _GrpcStream(self._stub)
        if self._port is None:
            self._port = await self._port_source()  # PeerUnavailable (a stranger, say) goes up
        port = self._port
        if port and port != self._unreachable_port:
            try:
                return await _SocketStream.connect(self._host, port, self._tls)
            except ssl.SSLError as exc:
                raise PeerUnavailable(
                    f"{self._describe}: TLS handshake on link port {port} failed: {exc.reason or exc}"
                ) from None
            except (OSError, TimeoutError) as exc:
                self._unreachable_port = port
                log.warning(
                    f"cannot reach the link port {self._host}:{port} of {self._describe} "
                    f"({_describe_os_error(exc) or 'no answer'}); the link goes over its node port "
                    "(gRPC, slower): let --link-port through the firewall",
                    peer=self._describe,
                )
        return _GrpcStream(self._stub)

    async def _read(self, stream: _Stream) -> None:
        try:
            while True:
                msg = await stream.read()
                if msg is None:
                    self._broken(stream, "the link closed")
                    return
                ack = self._pending.get(msg.id)
                if ack is not None and not ack.done():
                    ack.set_result(msg.ack)
                elif msg.ack.error:
                    self._lost(msg.id, f"{self._describe}: {msg.ack.error}")
        except _Broken as exc:
            self._broken(stream, str(exc))
        except asyncio.CancelledError:
            self._broken(stream, "the link closed")
            raise
        except Exception as exc:  # a bug: the link must not hang on it
            log.exception("the link's reader failed", peer=self._describe)
            self._broken(stream, f"the link's reader failed: {exc!r}")

    def _broken(self, stream: _Stream, reason: str) -> None:
        """The connection is gone: fail what waits on it; the next message opens a new one."""
        if self._stream is not stream:
            return
        self._stream = None
        if isinstance(stream, _SocketStream):
            self._port = None  # the peer may have restarted on another port: ask again
        error = PeerUnavailable(f"{self._describe}: {reason}")
        for ack in self._pending.values():
            if not ack.done():
                ack.set_exception(error)
        now = time.monotonic()
        latest = {key: on_lost for at, key, on_lost in self._posted.values() if now - at < POSTED_WINDOW_S}
        self._posted.clear()
        for on_lost in latest.values():
            with contextlib.suppress(Exception):
                on_lost(str(error))
        with contextlib.suppress(Exception):
            stream.close()

    async def close(self) -> None:
        self._closed = True
        self._posted.clear()  # closed on purpose (the peer left the cluster): nothing to report
        stream, reader = self._stream, self._reader
        if stream is not None:
            self._broken(stream, "the link closed")
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


# ---- the receiving end ----------------------------------------------------------------------------


async def _handle(node: Node, msg: lpb.LinkMessage, peer: str) -> lpb.LinkAck:
    """Hand one message to the node; its acknowledgement (an error when refused)."""
    try:
        return await _dispatch(node, msg)
    except wire.WireError as exc:
        log.warning("refused peer message", peer=peer, reason=str(exc))
        return lpb.LinkAck(error=f"malformed {msg.WhichOneof('body')}: {exc}")


async def _dispatch(node: Node, msg: lpb.LinkMessage) -> lpb.LinkAck:
    kind = msg.WhichOneof("body")
    if kind == "step":
        step = wire.step_from_pb(msg.step)
        if step.stage.node_id != node.node_id:
            return lpb.LinkAck(
                error=f"stage {step.stage_index} of this plan is {step.stage.node_id}, not {node.node_id}"
            )
        await node.receive_step(step)
        return lpb.LinkAck()
    if kind == "token":
        return lpb.LinkAck(wanted=await node.receive_token(wire.token_from_pb(msg.token)))
    if kind == "failure":
        await node.receive_failure(wire.failure_from_pb(msg.failure))
        return lpb.LinkAck()
    if kind == "release":
        keep = getattr(msg.release, "keep", False)  # (a prefix cache may keep what it frees)
        await node.release(
            msg.release.request_id, msg.release.up_to_attempt, **({"keep": True} if keep else {})
        )
        return lpb.LinkAck()
    if kind == "health":
        state = pb.REQUEST_UNKNOWN
        if msg.health.request_id:
            state = _STATES[node.request_state(msg.health.request_id, msg.health.attempt)]
        return lpb.LinkAck(health=pb.HealthReply(ok=True, node_id=node.node_id, request_state=state))
    return lpb.LinkAck(error=f"unknown link message {kind!r} (is this node older than its peer?)")


class LinkServicer(lpb_grpc.NodeLinkServicer):
    """The peer's end of a link over gRPC: hands each message to the node, in order."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def Link(
        self, request_iterator: AsyncIterator[lpb.LinkMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[lpb.LinkMessage]:
        async for msg in request_iterator:
            ack = await _handle(self.node, msg, context.peer())
            if msg.posted and not ack.error:
                continue  # a posted message is answered only when refused
            yield lpb.LinkMessage(id=msg.id, ack=ack)


class LinkServer:
    """The link listener: each connection's frames handed to the node in order, acknowledged."""

    def __init__(self, node: Node, tls: ssl.SSLContext | None) -> None:
        self.node = node
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port); returns the port. OSError when it cannot."""
        self._server = await asyncio.start_server(
            self._serve,
            host or None,
            port,
            ssl=self._tls,
            ssl_handshake_timeout=10 if self._tls else None,
            limit=_READ_BUFFER,
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        _tune(writer)
        peer = str(writer.get_extra_info("peername"))
        try:
            while True:
                try:
                    msg = await _read_frame(reader)
                except _Broken as exc:
                    log.warning("closed a peer's link", peer=peer, reason=str(exc))
                    return
                if msg is None:
                    return
                ack = await _handle(self.node, msg, peer)
                if msg.posted and not ack.error:
                    continue
                writer.write(_frame(lpb.LinkMessage(id=msg.id, ack=ack)))
                await writer.drain()
        except (OSError, RuntimeError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):  # peers see the end at once, as when the process dies
            writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2)
