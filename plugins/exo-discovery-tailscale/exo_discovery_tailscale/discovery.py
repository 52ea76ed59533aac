"""`tailscale` discovery: exo nodes find each other through the Tailscale API.

Each node writes its node id, gRPC port and capabilities into its own device's posture
attributes (`custom:exo_node_id`, `custom:exo_node_port`, `custom:exo_device_capability_*`,
the names existing deployments use), then polls the tailnet's device list and offers every
other device that publishes them, at its Tailscale IPv4 address, to the `PeerTracker` — which
counts it only once its health RPC answers. Devices that leave the list, stop publishing, or
are offline longer than `--discovery-timeout` are withdrawn.

With a cluster key (the default), the attributes also carry `custom:exo_seq` and
`custom:exo_sig`: an HMAC over every exo attribute, the device id they are published on and a
sequence number that only grows. Attributes copied onto another device, older ones, or ones
signed with another key are not offered (a stranger is logged once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import click
import structlog

from exo_core import ConfigError, Discovery, DiscoveryContext
from exo_discovery_tailscale.api import (
    DEFAULT_API_URL,
    PREFIX,
    TailscaleAPI,
    TailscaleAPIError,
    attributes_for,
    encode_node_id,
    parse_attributes,
)

SEQ = f"{PREFIX}seq"
SIG = f"{PREFIX}sig"
SIG_HEX = 32  # attribute values hold at most 50 characters


def signed_text(device_id: str, attrs: dict[str, Any]) -> str:
    """What the signature covers: the device id and every exo attribute but the signature."""
    body = {k: str(v) for k, v in attrs.items() if k.startswith(PREFIX) and k != SIG}
    return json.dumps({"device": device_id, **body}, sort_keys=True, separators=(",", ":"))


log = structlog.get_logger("exo.discovery.tailscale")


async def own_device_id() -> str:
    """This machine's Tailscale device id, from `tailscale status --json`."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "tailscale", "status", "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except FileNotFoundError:
        raise TailscaleAPIError(
            "the `tailscale` command is not installed; give --tailscale-device-id instead"
        ) from None
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise TailscaleAPIError(f"`tailscale status --json` failed: {err.decode().strip()}")
    try:
        return str(json.loads(out)["Self"]["ID"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TailscaleAPIError(f"`tailscale status --json` gave no Self.ID ({exc})") from None


class TailscaleDiscovery(Discovery):
    """Peers from the tailnet's device list and their exo posture attributes."""

    name = "tailscale"
    cli_options = (
        click.Option(
            ["--tailscale-api-key"],
            envvar="TAILSCALE_API_KEY",
            help="Tailscale discovery: an API access token (or TAILSCALE_API_KEY).",
        ),
        click.Option(
            ["--tailnet-name"],
            envvar="TAILSCALE_TAILNET",
            default="-",
            show_default=True,
            help="Tailscale discovery: the tailnet ('-' is the API key's own).",
        ),
        click.Option(
            ["--tailscale-api-url"],
            envvar="TAILSCALE_API_URL",
            default=DEFAULT_API_URL,
            show_default=True,
            help="Tailscale discovery: the API's base URL.",
        ),
        click.Option(
            ["--tailscale-device-id"],
            envvar="TAILSCALE_DEVICE_ID",
            help="Tailscale discovery: this machine's device id (default: from `tailscale status --json`).",
        ),
        click.Option(
            ["--tailscale-poll-interval"],
            type=float,
            default=5.0,
            show_default=True,
            help="Tailscale discovery: seconds between device list polls.",
        ),
    )

    def __init__(self, context: DiscoveryContext) -> None:
        super().__init__(context)
        opts = context.options
        api_key = opts.get("tailscale_api_key")
        if not api_key:
            raise ConfigError(
                "--discovery-module tailscale needs an API access token: --tailscale-api-key or "
                "TAILSCALE_API_KEY (create one in the Tailscale admin console, Settings > Keys)"
            )
        try:
            encode_node_id(context.node_id)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.api = TailscaleAPI(
            api_key, opts.get("tailnet_name") or "-", opts.get("tailscale_api_url") or DEFAULT_API_URL
        )
        self.device_id: str | None = opts.get("tailscale_device_id")
        self.interval = float(opts.get("tailscale_poll_interval") or 5.0)
        self.timeout = context.timeout
        self._task: asyncio.Task[None] | None = None
        self._published = False
        self._last_seq: dict[str, int] = {}
        self._strangers: set[tuple[str, str]] = set()

    async def start(self) -> None:
        try:
            if not self.device_id:
                self.device_id = await own_device_id()
            await self._publish()
        except TailscaleAPIError as exc:
            await self.api.close()
            raise ConfigError(f"tailscale discovery: {exc}") from None
        self._task = asyncio.create_task(self._poll_forever(), name="exo-tailscale-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.api.close()

    async def _publish(self) -> None:
        ctx = self.context
        assert self.device_id is not None
        capabilities = ctx.node_info().capabilities
        attrs: dict[str, str | int] = dict(attributes_for(ctx.node_id, ctx.port, capabilities))
        if ctx.auth is not None:  # written last, so a reader never pairs a new signature with old values
            attrs[SEQ] = str(ctx.auth.next_seq())
            attrs[SIG] = ctx.auth.mac(signed_text(self.device_id, attrs), SIG_HEX)
        for key, value in attrs.items():
            await self.api.set_attribute(self.device_id, key, value)
        log.info("published to tailscale", device=self.device_id, port=ctx.port)

    async def _poll_forever(self) -> None:
        failing = False
        while True:
            try:
                await self.poll_once()
                if failing:
                    log.info("tailscale API answers again")
                failing = False
            except TailscaleAPIError as exc:
                # Keep the peers we have; the tracker's health checks decide about them.
                if not failing:
                    log.warning("tailscale API failed; keeping current peers", error=str(exc))
                failing = True
            await asyncio.sleep(self.interval)

    async def poll_once(self) -> None:
        """One pass: list devices, read their exo attributes, offer and withdraw peers."""
        devices = await self.api.devices()
        seen: set[str] = set()
        for device in devices:
            if device.id == self.device_id or device.ipv4 is None:
                continue
            if not device.seen_within(self.timeout):
                continue
            raw = await self.api.attributes(device.id)
            attrs = parse_attributes(raw)
            if attrs is None or not self._genuine(device.id, device.ipv4, attrs.node_id, raw):
                continue
            seen.add(attrs.node_id)
            self.context.peers.offer(attrs.node_id, device.ipv4, attrs.port, capabilities=attrs.capabilities)
        for node_id in self.context.peers.known() - seen:
            self.context.peers.withdraw(node_id, "gone from the tailnet (or no longer running exo)")

    def _genuine(self, device_id: str, address: str, node_id: str, raw: dict[str, Any]) -> bool:
        """Signed with this cluster's key for this device, and not older than what we saw."""
        auth = self.context.auth
        if auth is None:
            return True
        if not auth.verify_mac(signed_text(device_id, raw), raw.get(SIG), SIG_HEX):
            what = "has another cluster key" if SIG in raw else "runs without a cluster key"
            self._stranger(node_id, address, f"{what}; run it with --join TOKEN (`exo token` here prints it)")
            return False
        try:
            seq = int(raw.get(SEQ, ""))
        except ValueError:
            return False
        if seq < self._last_seq.get(node_id, -1):
            self._stranger(node_id, address, "publishes older attributes than before (a copy?); ignored")
            return False
        self._last_seq[node_id] = seq
        return True

    def _stranger(self, node_id: str, address: str, what: str) -> None:
        if (node_id, address) not in self._strangers:
            self._strangers.add((node_id, address))
            log.warning(f"node {node_id} at {address} {what}", peer=node_id, source=address)
