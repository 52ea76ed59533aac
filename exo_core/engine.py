"""The engine interface: what an inference engine plugin implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from exo_core.models.shard import Shard
from exo_core.node.sampling import SamplingParams

if TYPE_CHECKING:
    import click

    from exo_core.models.cards import ModelCard


class EngineError(RuntimeError):
    """An engine failed in a way the user should hear about (bad file, server down, ...)."""


@dataclass
class StageInput:
    """One request's new positions for one stage.

    The first stage gets `tokens` (int64 ids of the positions not yet in the cache); later
    stages get `hidden` (float32 [T, hidden_size]) from the previous stage. Engines that work
    on text (`takes_messages`) also get the whole conversation on the request's first step.
    """

    request_id: str
    tokens: np.ndarray | None = None
    hidden: np.ndarray | None = None
    messages: list[dict[str, Any]] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # For engines that hand whole requests to a server: the request's token budget, and how
    # many of `tokens` an earlier attempt already generated (a replay after a failure).
    max_tokens: int | None = None
    replayed: int = 0

    @property
    def length(self) -> int:
        if self.tokens is not None:
            return int(self.tokens.shape[0])
        if self.hidden is not None:
            return int(self.hidden.shape[0])
        return 0


@dataclass
class StageOutput:
    """What a stage produced: hidden states for the next stage, or (last stage) logits or a token.

    `logits` are float32 [vocab] for the last new position; core samples from them. An engine
    that samples itself (a text engine) sets `token` instead.
    """

    hidden: np.ndarray | None = None
    logits: np.ndarray | None = None
    token: int | None = None


class InferenceEngine(ABC):
    """Owns one loaded shard at a time and a KV cache per request id."""

    name: ClassVar[str]
    supports_sharding: ClassVar[bool] = True
    takes_messages: ClassVar[bool] = False
    # Steps of different requests wait on separate things (e.g. a server's streams): the node
    # runs each as its own task instead of one batch, so a queued request never holds up a running one.
    concurrent_steps: ClassVar[bool] = False
    # Extra `exo run` options this engine reads (their values arrive in `options`).
    cli_options: ClassVar[Sequence[click.Option]] = ()

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options: dict[str, Any] = dict(options or {})

    # Source kinds of a model card (see exo_core.models.cards) this engine loads.
    source_kinds: ClassVar[tuple[str, ...]] = ("gguf", "safetensors")

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Cheap check that the engine can run here: (ok, reason when not)."""
        return True, ""

    @classmethod
    def default_priority(cls) -> int:
        """How strongly this engine wants to be the default on this machine (highest wins, <0 never)."""
        return 10

    @classmethod
    def can_serve(cls, model: ModelCard) -> bool:
        """Whether a model card names a source this engine loads."""
        return any(kind in model.sources for kind in cls.source_kinds)

    @abstractmethod
    async def load(self, shard: Shard, model: ModelCard) -> None:
        """Load weights for `shard`; idempotent for the same shard."""

    @abstractmethod
    async def forward(self, shard: Shard, item: StageInput) -> StageOutput:
        """Run the shard over the request's new positions, extending its cache."""

    async def forward_batch(self, shard: Shard, items: Sequence[StageInput]) -> list[StageOutput]:
        """Run several requests' steps; engines that can batch override this to read weights once."""
        return [await self.forward(shard, item) for item in items]

    @abstractmethod
    async def release(self, request_id: str) -> None:
        """Free the request's cache (no error when it holds none)."""

    def queued(self, request_id: str) -> bool:
        """True while the request waits its turn (healthy, but making no progress yet).

        The origin does not count time spent queued against `--step-timeout`; engines that
        serve requests one after another (a whole-model server) say so here.
        """
        return False

    def context_length(self) -> int | None:
        """Most positions one request may hold in the loaded model, when known."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to free by default
        """Free everything (called when the node stops)."""
