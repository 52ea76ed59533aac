"""Peer discovery modules: what they get from the node and what they implement.

A discovery module finds candidate peers (an announcement on the LAN, a line in a file, a
device in a tailnet) and *offers* them to `context.peers`; core verifies each candidate over
the authenticated peer link before it counts, refreshes it, and drops it when it goes silent.
A module never sees the node or the runtime: only its `DiscoveryContext`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from exo_core.node.topology import DeviceCapabilities, NodeInfo

if TYPE_CHECKING:
    import click

__all__ = ["Discovery", "DiscoveryContext", "PeerSink"]


class PeerSink(Protocol):
    """Where a discovery module offers and withdraws candidate peers."""

    def offer(
        self,
        node_id: str,
        address: str,
        port: int,
        *,
        priority: int = 0,
        capabilities: DeviceCapabilities | None = None,
    ) -> None:
        """A candidate was seen or listed at `address:port` (higher `priority`: a better link)."""
        ...

    def withdraw(self, node_id: str, reason: str) -> None:
        """The candidate is gone (removed from a file, left the tailnet)."""
        ...

    def known(self) -> set[str]:
        """Node ids currently offered."""
        ...


@dataclass
class DiscoveryContext:
    """What a discovery module knows of its node, and where it offers peers."""

    node_id: str
    port: int  # this node's peer (gRPC) port, to announce
    peers: PeerSink
    node_info: Callable[[], NodeInfo]  # this node as it would announce itself now
    options: Mapping[str, Any] = field(default_factory=dict)  # the module's `exo run` options
    timeout: float = 30.0  # seconds before a silent candidate is dropped
    peers_file: Path | None = None  # --discovery-config-path
    # Signs and verifies announcements with the cluster key; None with --insecure. A module may
    # use `auth.mac(text, length)`, `auth.verify_mac(text, sig, length)` (HMAC-SHA256 in hex,
    # for what it publishes: sign its whole content, address included) and `auth.next_seq()`
    # (a number that only grows, across restarts too). (exo_core.networking.auth.ClusterAuth)
    auth: Any = None
    # A peers file may say what this node's capabilities are (so every node plans alike).
    set_own_capabilities: Callable[[DeviceCapabilities], None] = lambda caps: None


class Discovery(ABC):
    """A way of finding peers, registered by name through `register_discovery`."""

    name: ClassVar[str]
    # Extra `exo run` options this module reads (their values arrive in `context.options`).
    cli_options: ClassVar[Sequence[click.Option]] = ()
    # Candidates not offered again within `context.timeout` are dropped (announcement-based
    # modules); otherwise a candidate stays until withdrawn or silent.
    expires_unoffered: ClassVar[bool] = False

    def __init__(self, context: DiscoveryContext) -> None:
        self.context = context

    @abstractmethod
    async def start(self) -> None:
        """Start finding peers; raise `ConfigError` for settings that cannot work."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop; called once, also after a failed start."""
