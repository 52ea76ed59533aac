"""`manual` discovery: peers listed in a JSON file, re-read whenever it changes.

The file (the format existing deployments use; it may list this node itself)::

    {"peers": {"<node-id>": {"address": "<host>", "port": <grpc port>,
                             "device_capabilities": {"model": "...", "chip": "...",
                                                     "memory": <MB>,
                                                     "flops": {"fp32": x, "fp16": y, "int8": z}}}}}

Capabilities given in the file are what the partitioner uses for that node (this one
included), so every node sharing the file plans alike; without them a peer's own report counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from exo_core.discovery import Discovery, DiscoveryContext
from exo_core.errors import ConfigError
from exo_core.node.topology import DeviceCapabilities

log = structlog.get_logger("exo.discovery")

POLL_S = 1.0


class PeersFileError(ValueError):
    """The peers file cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class PeerEntry:
    node_id: str
    address: str
    port: int
    capabilities: DeviceCapabilities | None


def parse_peers_file(text: str, source: str = "peers file") -> dict[str, PeerEntry]:
    """The entries of a peers file, or PeersFileError naming the problem."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise PeersFileError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("peers"), dict):
        raise PeersFileError(
            f'{source} must be an object with a "peers" object: {{"peers": {{"<node-id>": ...}}}}'
        )
    entries: dict[str, PeerEntry] = {}
    for node_id, entry in data["peers"].items():
        where = f"{source}: peer {node_id!r}"
        if not isinstance(entry, dict):
            raise PeersFileError(f"{where} must be an object with address and port")
        address, port = entry.get("address"), entry.get("port")
        if not isinstance(address, str) or not address:
            raise PeersFileError(f'{where} needs an "address" (host name or IP)')
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise PeersFileError(f'{where} needs a "port" between 1 and 65535 (its --node-port)')
        caps = entry.get("device_capabilities")
        if caps is not None and not isinstance(caps, dict):
            raise PeersFileError(f'{where}: "device_capabilities" must be an object')
        try:
            capabilities = DeviceCapabilities.from_dict(caps) if caps else None
        except (TypeError, ValueError, AttributeError) as exc:
            raise PeersFileError(f"{where}: bad device_capabilities: {exc}") from None
        entries[str(node_id)] = PeerEntry(str(node_id), address, port, capabilities)
    return entries


def own_entry(path: str | os.PathLike[str], node_id: str) -> PeerEntry | None:
    """This node's entry in a peers file, if it lists itself (used to pick its port)."""
    try:
        return parse_peers_file(Path(path).read_text(encoding="utf-8"), str(path)).get(node_id)
    except (OSError, PeersFileError):
        return None


class ManualDiscovery(Discovery):
    """Peers from a JSON file; the file is polled and re-applied when it changes."""

    name = "manual"

    def __init__(self, context: DiscoveryContext) -> None:
        super().__init__(context)
        path = context.peers_file
        if not path:
            raise ConfigError(
                "--discovery-module manual needs --discovery-config-path FILE (a JSON peers file)"
            )
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"peers file {self.path} does not exist (--discovery-config-path)")
        self._stamp: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            self._apply(self._read())
        except PeersFileError as exc:
            raise ConfigError(str(exc)) from None
        self._task = asyncio.create_task(self._watch(), name="exo-manual-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _read(self) -> dict[str, PeerEntry]:
        stat = self.path.stat()
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return parse_peers_file(self.path.read_text(encoding="utf-8"), str(self.path))

    def _changed(self) -> bool:
        try:
            stat = self.path.stat()
        except OSError:
            return False
        return (stat.st_mtime_ns, stat.st_size) != self._stamp

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            if not self._changed():
                continue
            try:
                entries = self._read()
            except (OSError, PeersFileError) as exc:
                log.warning(
                    "peers file unusable; keeping the previous peers", path=str(self.path), error=str(exc)
                )
                continue
            log.info("peers file changed", path=str(self.path), peers=len(entries))
            self._apply(entries)

    def _apply(self, entries: dict[str, PeerEntry]) -> None:
        peers = self.context.peers
        own = entries.get(self.context.node_id)
        if own is not None and own.capabilities is not None:
            self.context.set_own_capabilities(own.capabilities)
        for node_id in peers.known() - set(entries):
            peers.withdraw(node_id, "removed from the peers file")
        for entry in entries.values():
            if entry.node_id == self.context.node_id:
                continue
            peers.offer(entry.node_id, entry.address, entry.port, capabilities=entry.capabilities)
