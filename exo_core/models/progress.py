"""Download progress of this node: what is being fetched, from where, how far it got.

Downloads report here (`TRACKER`); the API's `GET /v1/downloads`, the terminal progress bars
and the live view read it. One process-wide tracker: a node downloads for every model it
serves, and each file has one entry, keyed by (repo, file).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass
class Download:
    """One file being fetched (for a GGUF: the byte ranges one shard needs)."""

    model: str
    repo: str
    file: str
    total: int  # bytes this download fetches (not the file's size when only ranges are fetched)
    done: int = 0
    status: str = "downloading"  # downloading | done | failed
    source: str = "hub"  # hub | peer:<node id>
    error: str | None = None
    layers: str = ""  # "0-14/30" when only a shard's ranges are fetched
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(self.done / self.total, 1.0)

    @property
    def speed(self) -> float:
        """Bytes per second since it started."""
        elapsed = max(self.updated - self.started, 1e-6)
        return self.done / elapsed

    def to_dict(self) -> dict:
        return {**asdict(self), "fraction": round(self.fraction, 4), "bytes_per_second": round(self.speed)}


Listener = Callable[[Download], None]


class DownloadTracker:
    """Every download this process started, newest state of each; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._downloads: dict[tuple[str, str], Download] = {}
        self._listeners: list[Listener] = []

    def begin(
        self, model: str, repo: str, file: str, total: int, *, source: str = "hub", layers: str = ""
    ) -> Download:
        with self._lock:
            entry = Download(model, repo, file, total, source=source, layers=layers)
            self._downloads[(repo, file)] = entry
        self._notify(entry)
        return entry

    def advance(self, entry: Download, nbytes: int) -> None:
        with self._lock:
            entry.done += nbytes
            entry.updated = time.time()
        self._notify(entry)

    def finish(self, entry: Download) -> None:
        with self._lock:
            entry.status, entry.updated = "done", time.time()
            entry.done = max(entry.done, entry.total)
        self._notify(entry)

    def fail(self, entry: Download, error: str) -> None:
        with self._lock:
            entry.status, entry.error, entry.updated = "failed", error, time.time()
        self._notify(entry)

    def snapshot(self) -> list[Download]:
        with self._lock:
            return sorted(self._downloads.values(), key=lambda d: d.started)

    def active(self) -> list[Download]:
        return [d for d in self.snapshot() if d.status == "downloading"]

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` on every change (from the downloading thread); returns an unsubscribe."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def _notify(self, entry: Download) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(entry)


TRACKER = DownloadTracker()


def tracking_tqdm(model: str, repo: str, file: str) -> type:
    """A tqdm class for `huggingface_hub` downloads that reports to `TRACKER` and draws nothing
    (the terminal views draw from the tracker)."""
    from tqdm.auto import tqdm

    class Tracked(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            total = int(kwargs.get("total") or 0)  # type: ignore[call-overload]
            initial = int(kwargs.get("initial") or 0)  # type: ignore[call-overload]
            self.entry = TRACKER.begin(model, repo, file, max(total - initial, 0))

        def update(self, n: float | None = 1) -> bool | None:
            TRACKER.advance(self.entry, int(n or 0))
            return super().update(n)

        def close(self) -> None:
            if self.entry.status == "downloading":
                if self.entry.done >= self.entry.total:
                    TRACKER.finish(self.entry)
                else:
                    TRACKER.fail(self.entry, "interrupted; run again to resume")
            super().close()

    return Tracked
