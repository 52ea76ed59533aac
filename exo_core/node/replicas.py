"""Whole-request replicas: pick the one with the shortest expected time, watch their health, and
continue an answer cut mid-stream on another one.

Two levels use the same `Balancer`. The origin balances a request over the nodes that serve its
model whole (and the layer-sharded ring, when there is one, as one more candidate); a node
whose text engine fronts several servers balances over them with a `ReplicaSet`. A replica's
expected time for one more request is `(queue depth + 1) x (its first-token time + a typical
answer / its measured decode speed)`: a board that decodes at half the speed gets a new request
only once the other has twice its queue. Unmeasured replicas count as fast as the best measured
one, so each is tried early.

A stream cut mid-answer (`ReplicaUnavailable`) is asked of another replica from the start, and
the text the caller already has is skipped (`ReplaySkip`): the caller's stream goes on with no
gap and no repeat. That needs the same answer twice (greedy, or a seed the server honours); a
different answer is an error, not a garbled stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import structlog

from exo_core.engine import ReplicaUnavailable, TextDelta, TextEngine, TextGeneration
from exo_core.errors import EngineError

log = structlog.get_logger("exo.replicas")

EWMA = 0.3  # weight of the newest measurement
TYPICAL_TOKENS = 128.0  # answer length assumed before any was measured


@dataclass
class ReplicaStats:
    """What a balancer knows of one replica."""

    inflight: int = 0
    decode_tps: float | None = None  # tokens/s of one request once it streams (EWMA)
    first_s: float | None = None  # time to first text, queueing included (EWMA)
    served: int = 0
    failures: int = 0
    down_reason: str | None = None  # None: in rotation

    @property
    def up(self) -> bool:
        return self.down_reason is None


@dataclass
class Run:
    """One request on one replica, measured for the balancer."""

    balancer: Balancer
    key: str
    started: float = field(default_factory=time.perf_counter)
    first_at: float | None = None
    pieces: int = 0
    tokens: int | None = None
    closed: bool = False

    def saw(self, delta: TextDelta) -> None:
        if delta.text:
            if self.first_at is None:
                self.first_at = time.perf_counter()
            self.pieces += 1
        if delta.completion_tokens is not None:
            self.tokens = delta.completion_tokens

    def close(self, ok: bool) -> None:
        if not self.closed:
            self.closed = True
            self.balancer._finished(self, ok)


class Balancer:
    """Shortest expected time over named replicas (node ids, or a node's servers)."""

    def __init__(self) -> None:
        self.stats: dict[str, ReplicaStats] = {}
        self._typical_tokens = TYPICAL_TOKENS

    def of(self, key: str) -> ReplicaStats:
        stats = self.stats.get(key)
        if stats is None:
            stats = self.stats[key] = ReplicaStats()
        return stats

    def expected_s(self, key: str, reported_depth: int = 0, servers: int = 1) -> float:
        """Seconds until one more request on `key` would be answered, as far as is known.

        `servers`: how many requests `key` runs side by side (a node fronting two upstreams is
        two queues): its depth counts per server."""
        stats = self.of(key)
        measured = [s.decode_tps for s in self.stats.values() if s.decode_tps]
        tps = stats.decode_tps or (max(measured) if measured else 1.0)
        firsts = [s.first_s for s in self.stats.values() if s.first_s is not None]
        first = stats.first_s if stats.first_s is not None else (min(firsts) if firsts else 0.0)
        depth = max(stats.inflight, reported_depth)
        return (depth // max(servers, 1) + 1) * (first + self._typical_tokens / tps)

    def pick(
        self,
        keys: Sequence[str],
        reported_depth: Callable[[str], int] | None = None,
        servers: Callable[[str], int] | None = None,
    ) -> str | None:
        """The replica in rotation with the shortest expected time (ties: fewer in flight per
        server, then order)."""
        up = [k for k in keys if self.of(k).up]
        if not up:
            return None
        depth = reported_depth or (lambda _k: 0)
        width = servers or (lambda _k: 1)
        order = {k: i for i, k in enumerate(up)}
        return min(
            up,
            key=lambda k: (
                self.expected_s(k, depth(k), width(k)),
                self.of(k).inflight / max(width(k), 1),
                order[k],
            ),
        )

    def run(self, key: str) -> Run:
        self.of(key).inflight += 1
        return Run(self, key)

    def _finished(self, run: Run, ok: bool) -> None:
        stats = self.of(run.key)
        stats.inflight -= 1
        if not ok:
            stats.failures += 1
            return
        stats.served += 1
        now = time.perf_counter()
        if run.first_at is None:
            return
        stats.first_s = _ewma(stats.first_s, run.first_at - run.started)
        tokens = run.tokens if run.tokens is not None else run.pieces
        decode_s = now - run.first_at
        if tokens > 1 and decode_s > 0.005:
            stats.decode_tps = _ewma(stats.decode_tps, (tokens - 1) / decode_s)
        self._typical_tokens = _ewma(self._typical_tokens, float(max(tokens, 1)))

    def mark_down(self, key: str, reason: str) -> None:
        stats = self.of(key)
        if stats.up:
            log.warning("replica out of rotation", replica=key, reason=reason)
        stats.down_reason = reason or "unavailable"

    def mark_up(self, key: str) -> None:
        stats = self.of(key)
        if not stats.up:
            log.info("replica back in rotation", replica=key)
        stats.down_reason = None


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new


def diverged_error() -> EngineError:
    return EngineError(
        "a replayed request was answered differently from the first time, so the answer cannot "
        "continue where it stopped (use temperature 0, or a seed the server honours, for answers "
        "that survive losing a server)"
    )


class ReplaySkip:
    """Drops the text the caller already has from the start of a replayed answer."""

    def __init__(self, delivered: str) -> None:
        self.delivered = delivered
        self.matched = 0

    @property
    def skipping(self) -> bool:
        return self.matched < len(self.delivered)

    def feed(self, text: str) -> str:
        """What of `text` is new; raises when the answer is not the one delivered before."""
        if not self.skipping:
            return text
        want = self.delivered[self.matched :]
        n = min(len(want), len(text))
        if text[:n] != want[:n]:
            raise diverged_error()
        self.matched += n
        return text[n:]

    def finish(self) -> None:
        if self.skipping:
            raise diverged_error()


class ReplicaSet:
    """A node's text engine and the servers it fronts: balanced, health-checked, failed over."""

    def __init__(self, engine: TextEngine, *, health_interval: float = 2.0) -> None:
        self.engine = engine
        self.health_interval = health_interval
        self.balancer = Balancer()
        self._health: asyncio.Task[None] | None = None

    @property
    def inflight(self) -> int:
        return sum(s.inflight for s in self.balancer.stats.values())

    async def start(self) -> None:
        if self._health is None:
            self._health = asyncio.create_task(self._watch(), name="exo-replica-health")

    async def stop(self) -> None:
        task, self._health = self._health, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def check(self, key: str) -> bool:
        """Health-check one replica now: in rotation when it answers, out when it does not."""
        try:
            await self.engine.check_replica(key)
        except Exception as exc:  # any failure of a check means "not now"
            self.balancer.mark_down(key, str(exc) or type(exc).__name__)
            return False
        self.balancer.mark_up(key)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.gather(*(self.check(k) for k in self.engine.replicas()))
            await asyncio.sleep(self.health_interval)

    async def generate(self, request: TextGeneration, delivered: str = "") -> AsyncGenerator[TextDelta]:
        """The answer, after the `delivered` text; on to another replica when one is lost."""
        tried: set[str] = set()
        reasons: list[str] = []
        while True:
            candidates = [k for k in self.engine.replicas(request.model) if k not in tried]
            key = self.balancer.pick(candidates)
            if key is None and candidates:
                # Every one left is out of rotation: check them now rather than wait for the
                # next round (a board back up takes this request; one still down fails fast).
                await asyncio.gather(*(self.check(k) for k in candidates))
                key = self.balancer.pick(candidates)
            if key is None:
                down = [f"{k}: {self.balancer.of(k).down_reason}" for k in candidates]
                raise ReplicaUnavailable(
                    f"no {self.engine.name} server can take the request: " + "; ".join(reasons + down)
                )
            tried.add(key)
            run = self.balancer.run(key)
            skip = ReplaySkip(delivered)
            lost = False
            stream = cast(AsyncGenerator[TextDelta], self.engine.generate(request, key))
            try:
                async with contextlib.aclosing(stream):
                    async for delta in stream:
                        run.saw(delta)
                        text = skip.feed(delta.text)
                        delivered += text
                        if delta.finish_reason is not None:
                            skip.finish()
                        if (
                            text
                            or delta.finish_reason is not None
                            or delta.completion_tokens is not None
                            or delta.tool_calls
                        ):
                            yield TextDelta(
                                text,
                                delta.finish_reason,
                                delta.prompt_tokens,
                                delta.completion_tokens,
                                delta.tool_calls,
                            )
                        if delta.finish_reason is not None:
                            return
                skip.finish()
                yield TextDelta("", "stop")
                return
            except ReplicaUnavailable as exc:
                lost = True
                reasons.append(f"{key}: {exc}")
                self.balancer.mark_down(key, str(exc))
                log.warning(
                    "replica lost; continuing on another",
                    replica=key,
                    request=request.request_id,
                    delivered=len(delivered),
                    error=str(exc),
                )
            finally:
                run.close(not lost)
