"""Warming: build what a shard's first requests need (compiled kernels, captured graphs) ahead of them.

The runtime warms the shard this node would hold of its default model when it starts (in the
background, while the node joins its cluster and serves), and every shard a plan names this
node for. Warming is `engine.prepare`; engines that have nothing to build just load. A shard is
warmed once at a time; a failure is logged and the request that needs the shard will say why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from exo_core.models.cards import ModelCard
from exo_core.models.shard import Shard

if TYPE_CHECKING:
    from exo_core.node.node import Node
    from exo_core.node.partitioning import PlanStage

log = structlog.get_logger("exo.warm")

LOG_EVERY_S = 5.0  # progress lines at most this often


class Warmer:
    """Runs `engine.prepare` in the background for the shards this node will run."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._tasks: dict[Shard, asyncio.Task[None]] = {}
        self.done: set[Shard] = set()
        self.progress: dict[Shard, tuple[str, float]] = {}  # what is being built, fraction done

    def shard(self, card: ModelCard, shard: Shard) -> asyncio.Task[None] | None:
        """Start warming `shard` unless it is warm or warming; the task, or None."""
        if shard in self.done or shard in self._tasks:
            return self._tasks.get(shard)
        task = asyncio.get_running_loop().create_task(self._warm(card, shard), name=f"exo-warm-{shard}")
        self._tasks[shard] = task
        task.add_done_callback(lambda _: self._tasks.pop(shard, None))
        return task

    def plan_made(self, card: ModelCard, plan: Sequence[PlanStage]) -> None:
        """A plan names this node: warm its shard of it."""
        for stage in plan:
            if stage.node_id == self.node.node_id:
                self.shard(card, stage.shard)

    async def _warm(self, card: ModelCard, shard: Shard) -> None:
        engine = self.node.engine
        started = time.monotonic()
        last_log = 0.0

        def progress(what: str, fraction: float) -> None:
            nonlocal last_log
            self.progress[shard] = (what, fraction)
            now = time.monotonic()
            if now - last_log >= LOG_EVERY_S:
                last_log = now
                log.info("warming", shard=str(shard), step=what, done=f"{100 * fraction:.0f}%")

        log.info("warming", shard=str(shard), engine=engine.name)
        try:
            await engine.prepare(shard, card, progress)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the first request on this shard will report it to its client
            log.warning("warming failed", shard=str(shard), error=str(exc) or type(exc).__name__)
            return
        finally:
            self.progress.pop(shard, None)
        self.done.add(shard)
        log.info("warm", shard=str(shard), seconds=round(time.monotonic() - started, 1))

    async def stop(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            try:
                await asyncio.wait_for(task, 1.0)
            except BaseException:  # cancelled, or an engine that does not stop at once
                pass
