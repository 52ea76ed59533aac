"""The prefix cache across requests: finished requests' KV caches kept on every stage for reuse.

A chat's next turn renders the whole conversation again, so its prompt begins with the tokens
of the previous turn's prompt and answer. The origin remembers, per plan, the token sequence
each finished request left in the stages' caches (`PrefixIndex`); a new request on the same plan
whose prompt shares a long enough beginning with one of them starts its first step at that
position with `reuse_from` naming the old cache. Every stage then starts the new cache with
the old one's first positions (`InferenceEngine.copy_prefix`) and computes only the rest, so
the prefill of a tenth turn costs one turn, not ten, on every node.

Stages keep finished caches (`KeptCaches`) in LRU order within a memory budget. A stage may
evict a cache the origin still lists; the step that wanted it then fails like a lost cache and
the origin runs that request again without reuse (and forgets the entry).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from exo_core.engine import InferenceEngine
from exo_core.node.partitioning import PlanStage

log = structlog.get_logger("exo.node")

# Reusing fewer positions than this saves less than the bookkeeping costs.
MIN_REUSE = 16
MAX_INDEXED = 256  # finished requests the origin remembers


def _default_budget() -> int:
    """EXO_PREFIX_CACHE_MB, else the smaller of 1 GiB and an eighth of the machine's memory."""
    configured = os.environ.get("EXO_PREFIX_CACHE_MB")
    if configured is not None:
        return max(int(configured), 0) * 2**20
    import psutil

    return min(2**30, psutil.virtual_memory().total // 8)


DEFAULT_BUDGET_BYTES = _default_budget()
MAX_KEPT = 128
REFUSED_S = 60.0  # after a stage lacked a prefix, its plan is not indexed for this long  # caches a stage keeps, whatever their size


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two sequences share."""
    n = min(a.shape[0], b.shape[0])
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


@dataclass
class _Entry:
    plan: tuple[PlanStage, ...]
    tokens: np.ndarray  # int64: the positions the stages hold, in order


class PrefixIndex:
    """The origin's list of finished requests whose caches the stages keep (LRU)."""

    def __init__(self, max_entries: int = MAX_INDEXED, min_reuse: int = MIN_REUSE) -> None:
        self.max_entries = max_entries
        self.min_reuse = min_reuse
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # plan -> (until when it is not indexed, how often a stage lacked a prefix)
        self._refused: dict[tuple[PlanStage, ...], tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, cache_key: str, plan: tuple[PlanStage, ...], tokens: Sequence[int]) -> None:
        refused = self._refused.get(plan)
        if refused is not None and time.monotonic() < refused[0]:
            return
        self._entries[cache_key] = _Entry(plan, np.asarray(tokens, dtype=np.int64))
        self._entries.move_to_end(cache_key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def refused(self, plan: tuple[PlanStage, ...]) -> None:
        """A stage of the plan did not hold a prefix it was sent (evicted, or an engine that keeps
        none): forget the plan's entries, and index none of it for a while (a minute, doubling
        each time up to an hour, so an engine that keeps nothing costs a rerun rarely)."""
        times = self._refused.get(plan, (0.0, 0))[1] + 1
        self._refused[plan] = (time.monotonic() + min(REFUSED_S * 2 ** (times - 1), 3600.0), times)
        for key in [k for k, e in self._entries.items() if e.plan == plan]:
            del self._entries[key]

    def find(self, plan: tuple[PlanStage, ...], prompt: np.ndarray) -> tuple[str, int]:
        """(cache key, positions to reuse) of the best kept prefix for a prompt on a plan, or ("", 0).

        At least one prompt position is always left to compute (its logits are the first token's).
        """
        best_key, best = "", 0
        for key, entry in self._entries.items():
            if entry.plan != plan:
                continue
            shared = min(common_prefix(entry.tokens, prompt), prompt.shape[0] - 1)
            if shared > best:
                best_key, best = key, shared
        if best < self.min_reuse:
            return "", 0
        self._entries.move_to_end(best_key)
        return best_key, best


class KeptCaches:
    """A stage's finished caches (engine request ids), kept in LRU order within a memory budget."""

    def __init__(self, engine: InferenceEngine, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.engine = engine
        self.budget_bytes = budget_bytes
        self._kept: OrderedDict[str, int] = OrderedDict()  # cache key -> bytes

    @property
    def enabled(self) -> bool:
        return self.engine.reuses_prefixes and self.budget_bytes > 0

    def __contains__(self, cache_key: str) -> bool:
        return cache_key in self._kept

    def __len__(self) -> int:
        return len(self._kept)

    async def keep(self, cache_key: str) -> None:
        """Keep a finished request's cache (instead of freeing it); evict the oldest beyond budget."""
        self._kept[cache_key] = self.engine.cache_nbytes(cache_key)
        self._kept.move_to_end(cache_key)
        total = sum(self._kept.values())
        while self._kept and (total > self.budget_bytes or len(self._kept) > MAX_KEPT):
            oldest, size = self._kept.popitem(last=False)
            total -= size
            await self.engine.release(oldest)

    def discard(self, cache_key: str) -> None:
        """Stop keeping a cache (its owner frees it)."""
        self._kept.pop(cache_key, None)

    async def start_from(self, source: str, target: str, length: int) -> bool:
        """Start `target`'s cache with `length` positions of a kept cache; False when not kept here."""
        if source not in self._kept:
            return False
        self._kept.move_to_end(source)
        try:
            await self.engine.copy_prefix(source, target, length)
        except Exception as exc:  # a cache shorter than asked (e.g. freed meanwhile): no reuse
            log.info("prefix not reusable", source=source, error=str(exc))
            self._kept.pop(source, None)
            await self.engine.release(source)
            await self.engine.release(target)
            return False
        return True

    async def clear(self) -> None:
        while self._kept:
            key, _ = self._kept.popitem(last=False)
            await self.engine.release(key)
