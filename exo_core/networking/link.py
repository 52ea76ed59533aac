"""The link: one bidirectional gRPC stream from this node to a peer for steps, tokens, failures,
releases and health checks, instead of a unary call per message.

A message goes out as soon as it is written (HTTP/2 flow control holds a writer back when the
peer reads slower than we send); the peer handles messages in the order they arrive and
acknowledges each, with what the unary call would have returned. A sender waits for its own
acknowledgement only, never for the messages before it. When the stream breaks, every message
still waiting fails with `PeerUnavailable` (the origin re-plans, as for a failed call) and the
next message opens a new stream on the same channel, which reconnects by itself.

Steps, one per hop per token, are *posted* (`LinkSender.post`): the sender returns once the
message is written and the peer answers only when it refuses one. A refusal, or the stream
breaking within `POSTED_WINDOW_S` of a posted message (its fate unknown), calls the message's
`on_lost` (the client reports the step failed to its origin, as a failed call did); a break
calls it once per request (`key`). This halves the messages and the gRPC completions per hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from exo_core.networking import wire
from exo_core.networking.generated import link_pb2 as lpb
from exo_core.networking.generated import link_pb2_grpc as lpb_grpc
from exo_core.networking.generated import node_service_pb2 as pb
from exo_core.node.messages import PeerTimeout, PeerUnavailable, RequestState

if TYPE_CHECKING:
    from exo_core.node.node import Node

log = structlog.get_logger("exo.peers")

_STATES = {
    RequestState.ACTIVE: pb.REQUEST_ACTIVE,
    RequestState.QUEUED: pb.REQUEST_QUEUED,
    RequestState.RELEASED: pb.REQUEST_RELEASED,
    RequestState.UNKNOWN: pb.REQUEST_UNKNOWN,
}
# A posted message whose stream breaks within this many seconds of its write counts as lost
# (later, the peer has long handled it: a live request has posted newer ones since).
POSTED_WINDOW_S = 5.0


class LinkSender:
    """This node's end of its link to one peer: sends messages, matches their acknowledgements."""

    def __init__(self, channel: grpc.aio.Channel, describe: str) -> None:
        self._stub = lpb_grpc.NodeLinkStub(channel)
        self._describe = describe  # "node-id at host:port", for errors
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[lpb.LinkAck]] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._closed = False
        # Posted messages that may still be refused or lost: id -> (written at, key, on_lost),
        # in the order written.
        self._posted: dict[int, tuple[float, str, Callable[[str], None]]] = {}

    async def post(
        self, kind: str, body: Any, timeout: float, key: str, on_lost: Callable[[str], None]
    ) -> None:
        """Send one message without waiting for an acknowledgement; returns once it is written
        (at most `timeout` s). Later, `on_lost(reason)` is called if the peer refuses it, or if
        the stream breaks soon after (see the module docstring)."""
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
                await self._write(msg)  # if the stream ended under us, the break fails `ack`
                reply = await ack
        except TimeoutError:
            raise PeerTimeout(f"{self._describe}: {kind}: no answer within {timeout:g} s") from None
        finally:
            self._pending.pop(msg_id, None)
        if reply.error:
            raise PeerUnavailable(f"{self._describe}: {kind}: {reply.error}")
        return reply

    async def _write(self, msg: lpb.LinkMessage) -> bool:
        """Write `msg` on the stream (opened if need be); False if the stream ended under us
        (it is then marked broken, which fails what waits on it)."""
        async with self._write_lock:
            call = self._open()
            try:
                await call.write(msg)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
                self._broken(call, exc)
                return False
        return True

    def _open(self) -> Any:
        if self._call is None:
            self._call = self._stub.Link()
            self._reader = asyncio.get_running_loop().create_task(self._read(self._call))
        return self._call

    async def _read(self, call: Any) -> None:
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    self._broken(call, None)
                    return
                ack = self._pending.get(msg.id)
                if ack is not None and not ack.done():
                    ack.set_result(msg.ack)
                elif msg.ack.error:
                    self._lost(msg.id, f"{self._describe}: {msg.ack.error}")
        except grpc.aio.AioRpcError as exc:
            self._broken(call, exc)
        except asyncio.CancelledError:
            self._broken(call, None)
            raise

    def _broken(self, call: Any, exc: BaseException | None) -> None:
        """The stream is gone: fail what waits on it; the next message opens a new one."""
        if self._call is not call:
            return
        self._call = None
        if isinstance(exc, grpc.aio.AioRpcError):
            reason = f"{exc.code().name}: {exc.details()}"
        else:
            reason = "the link closed"
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
            call.cancel()

    async def close(self) -> None:
        self._closed = True
        self._posted.clear()  # closed on purpose (the peer left the cluster): nothing to report
        call, reader = self._call, self._reader
        if call is not None:
            self._broken(call, None)
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


class LinkServicer(lpb_grpc.NodeLinkServicer):
    """The peer's end: hands each message to the node, in order, and acknowledges it."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def Link(
        self, request_iterator: AsyncIterator[lpb.LinkMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[lpb.LinkMessage]:
        async for msg in request_iterator:
            try:
                ack = await self._handle(msg)
            except wire.WireError as exc:
                log.warning("refused peer message", peer=context.peer(), reason=str(exc))
                ack = lpb.LinkAck(error=f"malformed {msg.WhichOneof('body')}: {exc}")
            if msg.posted and not ack.error:
                continue  # a posted message is answered only when refused
            yield lpb.LinkMessage(id=msg.id, ack=ack)

    async def _handle(self, msg: lpb.LinkMessage) -> lpb.LinkAck:
        kind = msg.WhichOneof("body")
        node = self.node
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
