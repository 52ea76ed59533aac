"""A node with its API on a background event loop, for tests and benchmarks that use blocking clients."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import urllib.parse
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from exo_core.api.frontend import OpenAIFrontend
from exo_core.plugins import Registry
from exo_core.runtime import NodeConfig, Runtime

T = TypeVar("T")


class BackgroundNode:
    """`with BackgroundNode(config) as node:` starts a Runtime in a thread; `node.url` is its API.

    The runtime lives on its own loop, as it would in `exo run`, so the official (blocking)
    `openai` client, a browser, or a second event loop in the caller can talk to it.
    """

    def __init__(
        self, config: NodeConfig, *, start_timeout: float = 60.0, registry: Registry | None = None
    ) -> None:
        self.config = config
        self.registry = registry  # None: the loaded plugins' registrations
        self.start_timeout = start_timeout
        self.runtime: Runtime | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    @property
    def frontend(self) -> OpenAIFrontend:
        assert self.runtime is not None
        return next(f for f in self.runtime.frontends if isinstance(f, OpenAIFrontend))

    @property
    def url(self) -> str:
        return self.frontend.url

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        """Run a coroutine on the node's loop and wait for its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> BackgroundNode:
        self._thread = threading.Thread(target=self._main, name="exo-background-node", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            raise TimeoutError(f"the node did not start within {self.start_timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.runtime = Runtime(self.config, self.registry)
            await self.runtime.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            if self.runtime is not None:
                await self.runtime.stop()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.runtime.stop()

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)

    def __enter__(self) -> BackgroundNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


def connect(url: str, timeout: float = 30.0) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)


def request(
    method: str,
    url: str,
    *,
    json_body: Any = None,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Reply:
    """One blocking HTTP request with the standard library (no client dependency)."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    sent = dict(headers or {})
    if json_body is not None:
        content = json.dumps(json_body).encode()
        sent.setdefault("Content-Type", "application/json")
    conn = connect(url, timeout)
    try:
        conn.request(method, path, body=content, headers=sent)
        response = conn.getresponse()
        return Reply(response.status, {k: v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()
