"""`udp` discovery: announcements broadcast on each interface's subnet, every couple of seconds.

Each node sends a small JSON announcement (id, gRPC port, capabilities, the interface kind
and its priority) to the directed broadcast address of every usable interface, computed from
the interface's real netmask. A node hearing one offers the sender to the `PeerTracker`,
which counts it as a peer only once its health RPC answers; a peer heard on a better
interface (Thunderbolt/Ethernet over Wi-Fi over VPN/container) keeps that address. Peers not
heard for `--discovery-timeout` seconds are dropped. With a cluster key (the default), an
announcement is HMAC-signed over its whole content, including the address it is sent from and
a sequence number: unsigned, wrongly signed, replayed (from another address, or not newer)
and malformed packets are counted in `dropped` and dropped; a stranger is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import time
from typing import Any

import structlog

from exo_core.discovery import Discovery, DiscoveryContext
from exo_core.errors import ConfigError
from exo_core.networking.interfaces import Interface, ranked_interfaces

log = structlog.get_logger("exo.discovery")

ANNOUNCE_TYPE = "exo-discovery"
ANNOUNCE_VERSION = 1
MAX_DATAGRAM = 8192


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, discovery: UDPDiscovery) -> None:
        self.discovery = discovery

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.discovery.on_datagram(data, str(addr[0]))

    def error_received(self, exc: Exception) -> None:
        log.debug("udp discovery receive error", error=str(exc))


class UDPDiscovery(Discovery):
    """Broadcast announcements on the LAN; peers verified over gRPC before they count."""

    name = "udp"
    expires_unoffered = True

    def __init__(self, context: DiscoveryContext) -> None:
        super().__init__(context)
        opts = context.options
        self.port = int(opts.get("broadcast_port") or 5678)
        self.interval = float(opts.get("broadcast_interval") or 2.0)
        self.timeout = context.timeout
        self.kinds = tuple(opts.get("interface_type_filter") or ()) or None
        try:
            ranked_interfaces(self.kinds)
        except ValueError as exc:
            raise ConfigError(f"--interface-type-filter: {exc}") from None
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._interfaces: list[Interface] = []
        self._refused_log: dict[str, float] = {}
        self._strangers: set[tuple[str, str]] = set()
        self.dropped: dict[str, int] = {}  # packets dropped, by reason (malformed, replayed, ...)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # several nodes on one host
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        try:
            sock.bind(("", self.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen for UDP discovery on port {self.port} ({exc}); "
                "choose another --broadcast-port or --discovery-module manual"
            ) from None
        sock.setblocking(False)
        transport, _ = await loop.create_datagram_endpoint(lambda: _Receiver(self), sock=sock)
        self._transport = transport
        self._task = asyncio.create_task(self._announce_forever(), name="exo-udp-announce")
        log.info(
            "udp discovery started",
            port=self.port,
            interfaces=[i.name for i in ranked_interfaces(self.kinds)],
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._transport is not None:
            self._transport.close()

    # ---- sending -------------------------------------------------------------------------------

    def announcement(self, iface: Interface) -> bytes:
        message: dict[str, Any] = {
            "type": ANNOUNCE_TYPE,
            "version": ANNOUNCE_VERSION,
            "node_id": self.context.node_id,
            "grpc_port": self.context.port,
            "device_capabilities": self.context.node_info().capabilities.to_dict(),
            "interface_name": iface.name,
            "interface_type": iface.kind,
            "priority": iface.priority,
            "ts": time.time(),
        }
        auth = self.context.auth
        if auth is not None:
            message = auth.sign_announcement(message, iface.address)
        return json.dumps(message, separators=(",", ":")).encode("utf-8")

    async def _announce_forever(self) -> None:
        while True:
            try:
                self._interfaces = ranked_interfaces(self.kinds)
                for iface in self._interfaces:
                    self._send(iface)
            except Exception as exc:  # an interface going away must not stop discovery
                log.debug("udp announce failed", error=str(exc))
            await asyncio.sleep(self.interval)

    def _send(self, iface: Interface) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            try:
                sock.bind((iface.address, 0))  # leave through this interface, with its address
                sock.sendto(self.announcement(iface), (iface.broadcast, self.port))
            except OSError as exc:
                log.debug("udp announce failed", interface=iface.name, error=str(exc))

    # ---- receiving -----------------------------------------------------------------------------

    def on_datagram(self, data: bytes, source: str) -> None:
        """Offer the sender of a genuine announcement; anything else is counted and dropped."""
        try:
            reason = self._receive(data, source)
        except Exception as exc:  # a hostile packet must never stop the receiver
            reason = f"malformed ({type(exc).__name__})"
        if reason is not None:
            key = reason.split(":")[0].split(" (")[0]
            self.dropped[key] = self.dropped.get(key, 0) + 1

    def _receive(self, data: bytes, source: str) -> str | None:
        """None when the announcement was offered (or is our own); else why it was dropped."""
        if len(data) > MAX_DATAGRAM:
            return "malformed"
        try:
            message = json.loads(data)
        except ValueError:
            return "malformed"
        if not isinstance(message, dict) or message.get("type") != ANNOUNCE_TYPE:
            return "malformed"
        if message.get("node_id") == self.context.node_id:
            return None
        local = self._local_interface_for(source)
        if local is None:
            return "filtered"  # heard on an interface the filter leaves out
        auth = self.context.auth
        if auth is not None:
            reason = auth.check_announcement(message, source)
            if reason == "duplicate":
                return reason
            if reason is not None:
                self._log_refusal(source, message.get("node_id"), reason)
                return reason
        elif "sig" in message:
            self._log_stranger(
                source,
                message.get("node_id"),
                "uses a cluster key and this node runs --insecure; run this node with --join TOKEN",
            )
            return "signed"
        try:
            node_id = str(message["node_id"])
            port = int(message["grpc_port"])
            priority = min(int(message.get("priority", 0)), local.priority)
        except (KeyError, TypeError, ValueError):
            return "malformed"
        if not node_id or not 0 < port < 65536:
            return "malformed"
        # Capabilities are taken from the peer's NodeInfo once it is verified.
        self.context.peers.offer(node_id, source, port, priority=priority)
        return None

    def _local_interface_for(self, source: str) -> Interface | None:
        """Our interface whose subnet holds the sender (None: not on an interface we use)."""
        try:
            addr = ipaddress.IPv4Address(source)
        except ValueError:
            return None
        interfaces = self._interfaces or ranked_interfaces(self.kinds)
        for iface in interfaces:
            if addr in ipaddress.IPv4Network(f"{iface.address}/{iface.netmask}", strict=False):
                return iface
        return None

    def _log_refusal(self, source: str, claimed: Any, reason: str) -> None:
        if reason.startswith(("signed with another", "unsigned")):
            what = "has another cluster key" if reason.startswith("signed") else "runs without a cluster key"
            self._log_stranger(
                source, claimed, f"{what}; run it with --join TOKEN (`exo token` here prints it)"
            )
            return
        now = time.monotonic()  # replays and stale copies: at most a line per source a minute
        if now - self._refused_log.get(source, -1e9) < 60:
            return
        if len(self._refused_log) > 1000:
            self._refused_log.clear()
        self._refused_log[source] = now
        log.warning("refused discovery announcement", source=source, claimed_node=str(claimed), reason=reason)

    def _log_stranger(self, source: str, claimed: Any, what: str) -> None:
        """Once per stranger (node id and address), however often it announces."""
        where = (str(claimed)[:64], source)
        if where in self._strangers:
            return
        if len(self._strangers) > 1000:
            self._strangers.clear()
        self._strangers.add(where)
        log.warning(f"node {where[0]} at {source} {what}", peer=where[0], source=source)
