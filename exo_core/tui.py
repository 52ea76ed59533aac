"""Terminal views: download progress bars (`exo models pull`), and the live view of `exo run`."""

from __future__ import annotations

import contextlib
import io
import itertools
from collections.abc import Iterator
from typing import Any

from exo_core.models.progress import TRACKER, Download


@contextlib.contextmanager
def download_bars(console: Any = None) -> Iterator[None]:
    """Rich progress bars on stderr for every download started inside the block."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
    )
    tasks: dict[tuple[str, str], Any] = {}

    def changed(entry: Download) -> None:
        key = (entry.repo, entry.file)
        if key not in tasks:
            layers = f" (layers {entry.layers})" if entry.layers else ""
            tasks[key] = progress.add_task(f"{entry.file}{layers}", total=entry.total)
        progress.update(tasks[key], completed=entry.done, total=entry.total)

    unsubscribe = TRACKER.subscribe(changed)
    try:
        with progress:
            yield
    finally:
        unsubscribe()


# ---- the live view of `exo run` ------------------------------------------------------------------

REFRESH_S = 0.5
LOG_LINES = 8


class _LogTail(io.StringIO):
    """A file-like sink for structlog while the live view owns the terminal: the last lines."""

    def __init__(self, keep: int = LOG_LINES) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.keep = keep
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *done, self._partial = self._partial.split("\n")
        self.lines = (self.lines + [line for line in done if line.strip()])[-self.keep :]
        return len(text)

    def flush(self) -> None:
        pass


def _gb(mb: int) -> str:
    return f"{mb / 1024:.1f} GB" if mb else "?"


def _bar(fraction: float, width: int = 20) -> str:
    filled = round(max(0.0, min(fraction, 1.0)) * width)
    return "█" * filled + "░" * (width - filled)


class _Rate:
    """Tokens per second from the API's completion-token counter, over the last refreshes."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []

    def update(self, now: float, total: float) -> float:
        self.samples = [*self.samples, (now, total)][-10:]
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def _completion_tokens(runtime: Any) -> float:
    from exo_core.api.app import STATE

    total = 0.0
    for frontend in runtime.frontends:
        app = getattr(frontend, "app", None)
        if app is None or STATE not in app:
            continue
        for metric in app[STATE].metrics.completion_tokens.collect():
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


def render(
    runtime: Any, tokens_per_second: float, logs: list[str], downloads: list[dict[str, Any]] | None = None
) -> Any:
    """One frame: the model, the nodes with their layers, memory and engine, requests, downloads."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from exo_core.node.partitioning import NoPlanError

    node = runtime.node
    card = runtime.default_model
    try:
        plan = node.make_plan(card)
        plan_error = None
    except NoPlanError as exc:
        plan, plan_error = (), str(exc)
    layers = {s.node_id: s.shard for s in plan}
    urls = [f.url for f in runtime.frontends if isinstance(getattr(f, "url", None), str)]
    title = Text.assemble(
        ("exo ", "bold"),
        f"node {node.node_id} · model ",
        (card.id, "bold cyan"),
        f" · {' '.join(urls) or 'no API'}",
    )
    nodes = Table("node", "engine", "chip", "free", "layers", "active", expand=True, box=None)
    for info in node.cluster():
        shard = layers.get(info.node_id)
        span = f"{shard.start_layer}-{shard.end_layer} of {shard.n_layers}" if shard else "-"
        name = f"{info.node_id} (this node)" if info.node_id == node.node_id else info.node_id
        nodes.add_row(
            name,
            info.engine or "?",
            info.capabilities.chip,
            _gb(info.capabilities.memory),
            span,
            str(info.active_requests),
        )
    parts: list[Any] = [title, nodes]
    if plan_error:
        parts.append(Text(plan_error, style="red"))
    parts.append(
        Text(f"requests in flight: {node.origin.active_requests} · {tokens_per_second:.1f} tokens/s")
    )
    if downloads is None:  # this node's only
        downloads = [{**d.to_dict(), "node_id": node.node_id} for d in TRACKER.snapshot()]
    shown = sorted(downloads, key=lambda d: d["started"])[-6:]
    if shown:
        table = Table("node", "download", "layers", "from", "progress", "", expand=True, box=None)
        for d in shown:
            done = f"{d['done'] / 1e6:.0f}/{d['total'] / 1e6:.0f} MB {d['status']}"
            table.add_row(
                d["node_id"], d["file"], d["layers"] or "all", d["source"], _bar(d["fraction"]), done
            )
        parts.append(table)
    if logs:
        parts.append(Text.from_ansi("\n".join(logs), style="dim"))
    return Group(*parts)


async def live_view(runtime: Any) -> None:
    """Redraw the view until cancelled; logs show as its last lines meanwhile."""
    import asyncio
    import sys
    import time

    import structlog
    from rich.console import Console
    from rich.live import Live

    from exo_core.networking.file_transfer import cluster_downloads

    tail = _LogTail()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=tail))
    rate = _Rate()
    downloads: list[dict[str, Any]] | None = None
    try:
        with Live(console=Console(), refresh_per_second=4, transient=False) as live:
            for frame in itertools.count():
                if frame % 4 == 0 and runtime.node.peers:  # the peers' downloads every 2 s
                    nodes = await cluster_downloads(runtime.node, timeout=1.0)
                    downloads = [{**d, "node_id": n["node_id"]} for n in nodes for d in n["data"]]
                elif not runtime.node.peers:
                    downloads = None
                speed = rate.update(time.monotonic(), _completion_tokens(runtime))
                live.update(render(runtime, speed, tail.lines, downloads))
                await asyncio.sleep(REFRESH_S)
    finally:
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
