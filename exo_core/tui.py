"""Terminal views: download progress bars (`exo models pull`), and the live view of `exo run`."""

from __future__ import annotations

import contextlib
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
