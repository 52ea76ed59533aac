"""A small client for the parts of the Tailscale API v2 that discovery uses."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from exo_core import DeviceCapabilities

DEFAULT_API_URL = "https://api.tailscale.com"
PREFIX = "custom:exo_"


class TailscaleAPIError(RuntimeError):
    """The Tailscale API refused or failed a call; the message carries its answer."""


@dataclass(frozen=True)
class Device:
    """A machine of the tailnet, as `GET /api/v2/tailnet/{tailnet}/devices` lists it."""

    id: str
    name: str
    addresses: tuple[str, ...]
    last_seen: datetime | None
    connected: bool | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Device:
        return cls(
            id=str(data.get("nodeId") or data.get("id") or ""),
            name=str(data.get("name") or data.get("hostname") or ""),
            addresses=tuple(str(a) for a in data.get("addresses") or ()),
            last_seen=_parse_time(data.get("lastSeen")),
            connected=data.get("connectedToControl"),
        )

    @property
    def ipv4(self) -> str | None:
        return next((a for a in self.addresses if ":" not in a), None)

    def seen_within(self, seconds: float) -> bool:
        if self.connected:
            return True
        if self.last_seen is None:
            return self.connected is None  # the API said nothing: give the health RPC a chance
        return (datetime.now(UTC) - self.last_seen).total_seconds() <= seconds


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True)
class ExoAttributes:
    """What a node publishes about itself in its device's posture attributes."""

    node_id: str
    port: int
    capabilities: DeviceCapabilities | None


def encode_node_id(node_id: str) -> str:
    """Attribute values allow letters, digits, '_' and '.'; node ids use '-' (UUIDs)."""
    if not re.fullmatch(r"[A-Za-z0-9-]{1,50}", node_id):
        raise ValueError(
            f"node id {node_id!r} cannot be published through Tailscale: use letters, digits "
            "and '-', at most 50 characters (the default UUID qualifies)"
        )
    return node_id.replace("-", "_")


def _sanitize(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", value)[:50]


def attributes_for(node_id: str, port: int, caps: DeviceCapabilities) -> dict[str, str | int]:
    """The attribute set exo writes (the names existing deployments use)."""
    return {
        f"{PREFIX}node_id": encode_node_id(node_id),
        f"{PREFIX}node_port": port,
        f"{PREFIX}device_capability_model": _sanitize(caps.model),
        f"{PREFIX}device_capability_chip": _sanitize(caps.chip),
        f"{PREFIX}device_capability_memory": str(caps.memory),
        f"{PREFIX}device_capability_flops_fp32": str(caps.flops.get("fp32", 0.0)),
        f"{PREFIX}device_capability_flops_fp16": str(caps.flops.get("fp16", 0.0)),
        f"{PREFIX}device_capability_flops_int8": str(caps.flops.get("int8", 0.0)),
    }


def parse_attributes(attrs: dict[str, Any]) -> ExoAttributes | None:
    """A node's published attributes, or None when the device runs no exo node (or garbage)."""
    raw_id, raw_port = attrs.get(f"{PREFIX}node_id"), attrs.get(f"{PREFIX}node_port")
    if not raw_id or raw_port is None:
        return None
    try:
        port = int(raw_port)
    except (TypeError, ValueError):
        return None
    if not 0 < port < 65536:
        return None
    caps = None
    if f"{PREFIX}device_capability_memory" in attrs:
        try:
            caps = DeviceCapabilities(
                model=str(attrs.get(f"{PREFIX}device_capability_model", "")).replace("_", " "),
                chip=str(attrs.get(f"{PREFIX}device_capability_chip", "")).replace("_", " "),
                memory=int(float(attrs[f"{PREFIX}device_capability_memory"])),
                flops={
                    k: float(attrs.get(f"{PREFIX}device_capability_flops_{k}", 0.0))
                    for k in ("fp32", "fp16", "int8")
                },
            )
        except (TypeError, ValueError):
            caps = None
    return ExoAttributes(str(raw_id).replace("_", "-"), port, caps)


class TailscaleAPI:
    """Bearer-key calls to the Tailscale API (or a server speaking it, at `base_url`)."""

    def __init__(self, api_key: str, tailnet: str = "-", base_url: str = DEFAULT_API_URL) -> None:
        self.tailnet = tailnet
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> TailscaleAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, json: Any = None) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=10)
            )
        url = f"{self.base_url}/api/v2{path}"
        try:
            async with self._session.request(method, url, json=json) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise TailscaleAPIError(f"{method} {url}: HTTP {resp.status}: {_message(text)}")
                if not text.strip():
                    return {}
                try:
                    return await resp.json(content_type=None)
                except ValueError:
                    raise TailscaleAPIError(f"{method} {url}: not JSON: {text[:200]!r}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TailscaleAPIError(f"{method} {url}: {exc or type(exc).__name__}") from exc

    async def devices(self) -> list[Device]:
        data = await self._call("GET", f"/tailnet/{self.tailnet}/devices")
        if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
            raise TailscaleAPIError('device list: expected {"devices": [...]}')
        return [Device.from_dict(d) for d in data["devices"] if isinstance(d, dict)]

    async def attributes(self, device_id: str) -> dict[str, Any]:
        data = await self._call("GET", f"/device/{device_id}/attributes")
        attrs = data.get("attributes") if isinstance(data, dict) else None
        return attrs if isinstance(attrs, dict) else {}

    async def set_attribute(self, device_id: str, key: str, value: str | int) -> None:
        await self._call("POST", f"/device/{device_id}/attributes/{key}", json={"value": value})


def _message(text: str) -> str:
    import json

    try:
        data = json.loads(text)
    except ValueError:
        return text[:200]
    return str(data.get("message") or data) if isinstance(data, dict) else text[:200]
