"""Peer bookkeeping shared by the discovery modules: verify, add, refresh and drop peers.

A discovery module only *offers* candidates (node id + address); the tracker lets one count
as a peer of the node only after its health RPC answers as that node id, then refreshes its
NodeInfo every `check_interval`. A peer is removed from the node (which re-plans the requests
using it) when it refuses connections twice in a row, when it has been silent for `timeout`,
or when discovery withdraws it (gone from the manual file, no announcement for `timeout`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import structlog

from exo_core.networking.auth import is_handshake_failure
from exo_core.networking.client import GrpcPeerClient
from exo_core.node.messages import PeerTimeout, PeerUnavailable, RequestState, StageFailure
from exo_core.node.topology import DeviceCapabilities

if TYPE_CHECKING:
    from exo_core.node.node import Node

log = structlog.get_logger("exo.discovery")

HARD_FAILURES_TO_DROP = 2


@dataclass
class _Tracked:
    node_id: str
    address: str
    port: int
    client: GrpcPeerClient
    priority: int = 0
    capabilities: DeviceCapabilities | None = None  # as configured (manual file), else reported
    offered_at: float = field(default_factory=time.monotonic)
    healthy_at: float | None = None
    first_silent_at: float | None = None
    hard_failures: int = 0
    added: bool = False
    checking: bool = False
    last_error: str = ""


class PeerTracker:
    """Candidates offered by discovery, checked over gRPC before and while they count as peers."""

    def __init__(
        self,
        node: Node,
        *,
        auth: Any = None,
        rpc_timeout: float = 10.0,
        timeout: float = 30.0,
        check_interval: float = 1.0,
        node_id_filter: Iterable[str] | None = None,
        expire_unoffered: bool = False,
    ) -> None:
        self.node = node
        self.auth = auth
        self.rpc_timeout = rpc_timeout
        self.timeout = timeout
        self.check_interval = check_interval
        self.node_id_filter = set(node_id_filter) if node_id_filter else None
        self.expire_unoffered = expire_unoffered
        self._tracked: dict[str, _Tracked] = {}
        self._task: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()
        self._strangers: set[tuple[str, str]] = set()  # (node id, address) already reported

    # ---- what discovery calls ------------------------------------------------------------------

    def offer(
        self,
        node_id: str,
        address: str,
        port: int,
        *,
        priority: int = 0,
        capabilities: DeviceCapabilities | None = None,
    ) -> None:
        """A candidate peer was seen (announcement) or listed (file)."""
        if node_id == self.node.node_id:
            return
        if self.node_id_filter is not None and node_id not in self.node_id_filter:
            return
        now = time.monotonic()
        tracked = self._tracked.get(node_id)
        if tracked is not None and (tracked.address, tracked.port) == (address, port):
            tracked.offered_at = now
            tracked.capabilities = capabilities
            return
        if tracked is not None and tracked.added and priority <= tracked.priority:
            tracked.offered_at = now  # seen on a worse interface; keep the better address
            return
        if tracked is not None:
            self._forget(tracked, f"now at {address}:{port}")
        tracked = _Tracked(
            node_id, address, port, self._client(node_id, address, port), priority, capabilities
        )
        self._tracked[node_id] = tracked
        log.debug("peer candidate", peer=node_id, address=f"{address}:{port}")
        self._spawn_check(tracked)

    def withdraw(self, node_id: str, reason: str) -> None:
        tracked = self._tracked.get(node_id)
        if tracked is not None:
            self._forget(tracked, reason)

    def known(self) -> set[str]:
        return set(self._tracked)

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="exo-peer-checks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._checks):
            task.cancel()
        for tracked in list(self._tracked.values()):
            self._forget(tracked, "discovery stopped", quiet=True)

    # ---- internals -----------------------------------------------------------------------------

    def _client(self, node_id: str, address: str, port: int) -> GrpcPeerClient:
        return GrpcPeerClient(
            node_id,
            address,
            port,
            own_id=self.node.node_id,
            auth=self.auth,
            call_timeout=self.rpc_timeout,
            on_lost_step=self._lost_step,
        )

    def _lost_step(self, origin: str, failure: StageFailure) -> None:
        """A step posted to a peer was refused, or its link broke right after: its origin
        re-plans, as when sending it failed (unless this node let go of the request already)."""
        if self.node.request_state(failure.request_id, failure.attempt) == RequestState.RELEASED:
            return  # it ended here (the link broke after its last steps): nothing is lost
        task = asyncio.get_running_loop().create_task(self._report_lost(origin, failure))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _report_lost(self, origin: str, failure: StageFailure) -> None:
        log.info("step lost", peer=failure.node_id, request=failure.request_id, reason=failure.reason)
        try:
            await self.node.client_for(origin).report_failure(failure)
        except PeerUnavailable:
            log.warning("origin unreachable; dropping request", request=failure.request_id)
            await self.node.release(failure.request_id, failure.attempt)

    def _forget(self, tracked: _Tracked, reason: str, *, quiet: bool = False) -> None:
        if self._tracked.get(tracked.node_id) is tracked:
            del self._tracked[tracked.node_id]
        if tracked.added and not quiet:
            self.node.remove_peer(tracked.node_id, reason)
        elif tracked.added:
            self.node.peers.pop(tracked.node_id, None)
        tracked.added = False
        # Closed a little later: the node may still send releases through it.
        task = asyncio.get_running_loop().create_task(self._close_later(tracked.client, 0 if quiet else 10))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    @staticmethod
    async def _close_later(client: GrpcPeerClient, delay: float) -> None:
        await asyncio.sleep(delay)
        await client.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            now = time.monotonic()
            for tracked in list(self._tracked.values()):
                if self.expire_unoffered and now - tracked.offered_at > self.timeout:
                    self._forget(tracked, f"no announcement for {self.timeout:.0f} s")
                    continue
                self._spawn_check(tracked)

    def _spawn_check(self, tracked: _Tracked) -> None:
        if tracked.checking:
            return
        tracked.checking = True
        task = asyncio.get_running_loop().create_task(self._check(tracked))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check(self, tracked: _Tracked) -> None:
        try:
            await tracked.client.health()
            info = await tracked.client.node_info()
        except PeerTimeout as exc:
            self._silent(tracked, str(exc))
            return
        except PeerUnavailable as exc:
            self._unreachable(tracked, str(exc))
            return
        finally:
            tracked.checking = False
        if self._tracked.get(tracked.node_id) is not tracked:
            return  # forgotten while we asked
        if info.node_id != tracked.node_id:
            self._unreachable(tracked, f"{tracked.address}:{tracked.port} answers as {info.node_id}")
            return
        tracked.healthy_at = time.monotonic()
        tracked.first_silent_at = None
        tracked.hard_failures = 0
        tracked.last_error = ""
        info = replace(
            info,
            address=tracked.address,
            port=tracked.port,
            capabilities=tracked.capabilities or info.capabilities,
        )
        if tracked.added and tracked.node_id in self.node.peers:
            self.node.update_peer_info(info)
        else:
            tracked.added = True
            self.node.add_peer(info, tracked.client)

    def _silent(self, tracked: _Tracked, error: str) -> None:
        now = time.monotonic()
        if tracked.first_silent_at is None:
            tracked.first_silent_at = now
        if tracked.added and now - tracked.first_silent_at >= self.timeout:
            self._drop(tracked, f"silent for {now - tracked.first_silent_at:.0f} s: {error}")

    def _unreachable(self, tracked: _Tracked, error: str) -> None:
        tracked.hard_failures += 1
        if error != tracked.last_error:
            tracked.last_error = error
            if is_handshake_failure(error) or (self.auth is None and "socket closed" in error.lower()):
                self._report_stranger(tracked)
            else:
                log.debug("peer check failed", peer=tracked.node_id, error=error)
        if tracked.added and tracked.hard_failures >= HARD_FAILURES_TO_DROP:
            self._drop(tracked, error)

    def _report_stranger(self, tracked: _Tracked) -> None:
        """A failed TLS handshake: the peer holds another cluster key, or none. Said once."""
        where = (tracked.node_id, tracked.address)
        if where in self._strangers:
            return
        if len(self._strangers) > 1000:
            self._strangers.clear()
        self._strangers.add(where)
        if self.auth is None:
            log.warning(
                f"node {tracked.node_id} at {tracked.address}:{tracked.port} closes plaintext connections: "
                "it probably uses a cluster key and this node runs --insecure; run this node with "
                "--join TOKEN (`exo token` there prints it)",
                peer=tracked.node_id,
            )
        else:
            log.warning(
                f"node {tracked.node_id} at {tracked.address}:{tracked.port} has another cluster key "
                "(or none); run it with --join TOKEN (`exo token` here prints it)",
                peer=tracked.node_id,
                cluster_key=self.auth.fingerprint,
            )

    def _drop(self, tracked: _Tracked, reason: str) -> None:
        """Out of the node's peers; still tracked, so it comes back when it answers again."""
        tracked.added = False
        self.node.remove_peer(tracked.node_id, reason)
