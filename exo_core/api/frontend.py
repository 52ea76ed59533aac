"""Registers the built-in OpenAI-compatible frontend and runs its HTTP server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from exo_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from aiohttp import web

    from exo_core.runtime import Runtime

log = structlog.get_logger("exo.api")


class OpenAIFrontend:
    """The OpenAI-compatible API and web chat page on `api_host:api_port` (port 0: any free port)."""

    name = "openai"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.app: web.Application | None = None
        self.runner: web.AppRunner | None = None
        self.host = runtime.config.api_host
        self.port: int | None = None  # the bound port, once started

    @property
    def url(self) -> str:
        """Where a client on this machine reaches the API."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        from aiohttp import web  # imported here so listing plugins stays cheap

        from exo_core.api.app import init

        self.app = init(self.runtime)
        # handler_cancellation: a client that disconnects cancels its handler, which stops its
        # generation and frees its caches at once instead of at the next write.
        self.runner = web.AppRunner(
            self.app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host or None, self.runtime.config.api_port)
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        log.info("API listening", url=self.url, chat=f"{self.url}/")
        if not _loopback(self.host) and not self.runtime.config.api_key:
            log.warning(
                f"the API listens on {self.host or 'every address'} without --api-key: anyone who "
                "can reach this machine can use it; set --api-key (or EXO_API_KEY)"
            )

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@hookimpl
def register_frontends(register: Any) -> None:
    register(OpenAIFrontend.name, OpenAIFrontend)
