"""A stand-in Tailscale API (the v2 device and posture-attribute routes), for tests and demos.

    python -m exo_discovery_tailscale.fake_api --port 8088 --api-key KEY \
        --device dev-a=127.0.0.1 --device dev-b=127.0.0.1

It keeps devices and their attributes in memory, checks the bearer key, and answers like the
real API: `{"devices": [...]}`, `{"attributes": {...}}`, errors as `{"message": ...}`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

_ATTR_KEY = re.compile(r"custom:[A-Za-z0-9_]{1,50}")
_ATTR_VALUE = re.compile(r"[A-Za-z0-9_.]{0,50}")


class FakeTailscaleAPI:
    def __init__(self, api_key: str = "tskey-test", tailnet: str = "-") -> None:
        self.api_key = api_key
        self.tailnet = tailnet
        self.devices: dict[str, dict[str, Any]] = {}
        self.attributes: dict[str, dict[str, Any]] = {}
        self.fail_with: int | None = None  # answer every call with this status (fault injection)
        self.requests: list[tuple[str, str]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    def add_device(self, device_id: str, address: str, *, connected: bool = True, name: str = "") -> None:
        self.devices[device_id] = {
            "id": device_id,
            "nodeId": device_id,
            "name": name or f"{device_id}.tailnet.ts.net",
            "hostname": name or device_id,
            "addresses": [address, "fd7a:115c:a1e0::1"],
            "lastSeen": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "connectedToControl": connected,
        }
        self.attributes.setdefault(device_id, {})

    def remove_device(self, device_id: str) -> None:
        self.devices.pop(device_id, None)
        self.attributes.pop(device_id, None)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/api/v2/tailnet/{tailnet}/devices", self._devices)
        app.router.add_get("/api/v2/device/{device}/attributes", self._get_attributes)
        app.router.add_post("/api/v2/device/{device}/attributes/{key}", self._set_attribute)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        self.requests.append((request.method, request.path))
        if self.fail_with is not None:
            return web.json_response({"message": "injected failure"}, status=self.fail_with)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"message": "API token invalid"}, status=401)
        return await handler(request)

    async def _devices(self, request: web.Request) -> web.Response:
        if request.match_info["tailnet"] not in ("-", self.tailnet):
            return web.json_response({"message": "tailnet not found"}, status=404)
        return web.json_response({"devices": list(self.devices.values())})

    async def _get_attributes(self, request: web.Request) -> web.Response:
        device = request.match_info["device"]
        if device not in self.devices:
            return web.json_response({"message": "device not found"}, status=404)
        return web.json_response({"attributes": self.attributes[device]})

    async def _set_attribute(self, request: web.Request) -> web.Response:
        device, key = request.match_info["device"], request.match_info["key"]
        if device not in self.devices:
            return web.json_response({"message": "device not found"}, status=404)
        if not _ATTR_KEY.fullmatch(key):
            return web.json_response({"message": f"invalid attribute key {key!r}"}, status=400)
        body = await request.json()
        value = body.get("value") if isinstance(body, dict) else None
        if isinstance(value, str) and not _ATTR_VALUE.fullmatch(value):
            return web.json_response({"message": f"invalid attribute value {value!r}"}, status=400)
        if not isinstance(value, (str, int, float, bool)):
            return web.json_response({"message": "value must be a string, number or boolean"}, status=400)
        self.attributes[device][key] = value
        return web.json_response({})

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        self.url = f"http://{host}:{bound}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeTailscaleAPI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8088)
    parser.add_argument("--api-key", default="tskey-test")
    parser.add_argument("--device", action="append", default=[], metavar="ID=ADDRESS")
    args = parser.parse_args()
    fake = FakeTailscaleAPI(args.api_key)
    for spec in args.device:
        device_id, _, address = spec.partition("=")
        fake.add_device(device_id, address or "127.0.0.1")

    async def serve() -> None:
        url = await fake.start(args.host, args.port)
        print(f"fake Tailscale API on {url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
