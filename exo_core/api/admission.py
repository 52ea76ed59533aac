"""Admission of generation requests: at most `--max-concurrent-requests` run at once.

More wait in a line as long as the limit (first come, first served) for up to `WAIT_S`; a
request that finds the line full, or waits longer, gets a 503 with `Retry-After`, so a burst
of clients neither piles unbounded work onto the cluster nor hangs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from exo_core.api.protocol import APIError

# The routes that start a generation (OpenAI's and Ollama's).
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"})
WAIT_S = 30.0
RETRY_AFTER_S = 1


class Busy(APIError):
    """503: the node runs as many requests as it may and its line is full."""

    retry_after = RETRY_AFTER_S


class Admission:
    """A limit on generations running at once, with a bounded line in front of it."""

    def __init__(self, limit: int, line: int | None = None, wait_s: float = WAIT_S) -> None:
        if limit < 1:
            raise ValueError("--max-concurrent-requests must be at least 1")
        self.limit = limit
        self.line = limit if line is None else line
        self.wait_s = wait_s
        self.waiting = 0
        self._slots = asyncio.Semaphore(limit)

    @property
    def running(self) -> int:
        return self.limit - self._slots._value

    async def acquire(self) -> None:
        if self._slots.locked() and self.waiting >= self.line:
            raise self._busy(f"{self.waiting} more wait")
        self.waiting += 1
        try:
            async with asyncio.timeout(self.wait_s):
                await self._slots.acquire()
        except TimeoutError:
            raise self._busy(f"this one waited {self.wait_s:.0f} s") from None
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self._slots.release()

    def _busy(self, why: str) -> Busy:
        return Busy(
            503,
            f"This node is already running {self.limit} requests (--max-concurrent-requests) and "
            f"{why}; try again in a moment",
            type="server_error",
            code="too_many_requests",
        )


def middleware(admission: Admission) -> Any:
    """An aiohttp middleware holding a slot for each generation request while it runs."""

    @web.middleware
    async def admission_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "POST" or request.path not in GENERATION_PATHS:
            return await handler(request)
        await admission.acquire()
        try:
            return await handler(request)
        finally:
            admission.release()

    return admission_middleware
