"""In-process clusters for tests: nodes of one process wired to each other with direct calls.

`async with connected(runtimes)` makes every node a peer of every other without gRPC (the
node's peer protocol, called directly), and `unplug(origin, lost)` makes a node vanish from
another's point of view mid-request, as a pulled cable would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from exo_core.node.messages import PeerUnavailable, StageFailure, StepMessage, TokenMessage
from exo_core.node.node import Node
from exo_core.runtime import Runtime

__all__ = ["DirectPeer", "connect", "unplug"]


class DirectPeer:
    """Another node in this process, called directly (a PeerClient); `gone` makes it unreachable."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.gone = False

    def _check(self) -> None:
        if self.gone:
            raise PeerUnavailable(f"{self.node.node_id} is gone")

    async def send_step(self, msg: StepMessage) -> None:
        self._check()
        await self.node.receive_step(msg)

    async def send_token(self, msg: TokenMessage) -> bool:
        self._check()
        return await self.node.receive_token(msg)

    async def report_failure(self, failure: StageFailure) -> None:
        self._check()
        await self.node.receive_failure(failure)

    async def release(self, request_id: str, up_to_attempt: int, keep: bool = False) -> None:
        self._check()
        await self.node.release(request_id, up_to_attempt, keep=keep)

    async def health(self, request_id: str = "", attempt: int = 0) -> Any:
        self._check()
        return self.node.request_state(request_id, attempt)

    async def generate_text(self, request: Any, delivered: str = "") -> AsyncIterator[Any]:
        self._check()
        async for delta in self.node.serve_text(request, delivered):
            yield delta

    def __getattr__(self, name: str) -> Any:
        # Calls this kit does not know yet go straight to the node, as the gRPC server would.
        self._check()
        return getattr(self.node, name)


def connect(runtimes: Sequence[Runtime]) -> None:
    """Make every started runtime's node a peer of every other's (direct calls, no gRPC)."""
    for a in runtimes:
        for b in runtimes:
            if a is not b:
                assert a.node is not None and b.node is not None, "start the runtimes first"
                a.node.add_peer(b.node.info(), DirectPeer(b.node))


def unplug(origin: Runtime, lost: Runtime, reason: str = "test: unplugged") -> None:
    """`lost` vanishes for `origin`: calls to it fail and discovery drops it."""
    assert origin.node is not None and lost.node is not None
    peer = origin.node.peers[lost.node.node_id]
    client = peer.client
    if isinstance(client, DirectPeer):
        client.gone = True
    origin.node.remove_peer(lost.node.node_id, reason)
