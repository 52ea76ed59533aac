"""The peer protocol's types: what nodes send each other, and what the origin hands its caller.

`networking/` turns these into protobuf messages and back; the node never sees gRPC.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import numpy as np

from exo_core.engine import TextDelta, TextGeneration
from exo_core.models.cards import ModelCard
from exo_core.node.partitioning import PlanStage
from exo_core.node.sampling import SamplingParams


class RequestState(StrEnum):
    """A node's stage of one attempt of a request, as its health RPC reports it."""

    UNKNOWN = "unknown"
    ACTIVE = "active"
    QUEUED = "queued"  # waiting its turn in the engine: healthy, not stuck
    RELEASED = "released"


@dataclass
class StepMessage:
    """One step of one request for one stage; carries the plan and what the last stage needs."""

    request_id: str
    attempt: int
    origin: str
    plan: tuple[PlanStage, ...]
    stage_index: int
    sampling: SamplingParams
    max_tokens: int
    eos_token_ids: tuple[int, ...]
    step: int  # tokens generated before this step
    start_pos: int = 0  # positions already in this request's caches (of this attempt)
    tokens: np.ndarray | None = None
    hidden: np.ndarray | None = None
    messages: list[dict[str, Any]] | None = None
    # Tokens generated before this attempt (a replay); the last stage seeds its history with them.
    replayed: tuple[int, ...] = ()
    # The token just sampled, riding along to stage 0 when stage 0 is the origin (saves an RPC).
    deliver: TokenMessage | None = None
    # An llguidance grammar the last stage's sampling must follow (first step of an attempt only).
    constraint: str | None = None
    # Prefix reuse: the first step of an attempt starts this request's cache with the first
    # `start_pos` positions of this finished request's cache (request_id#attempt), kept by every stage.
    reuse_from: str = ""
    # Pipelined prefill: this is a chunk of a long step and more of it follows (the last stage
    # caches it and samples nothing yet).
    more: bool = False
    # First step of an attempt, for a hub model (hf.co/...): its card, so a stage started without
    # the id takes its shard (the card is never made again from the hub on each node).
    card: ModelCard | None = None

    @property
    def stage(self) -> PlanStage:
        return self.plan[self.stage_index]

    @property
    def cache_key(self) -> str:
        return f"{self.request_id}#{self.attempt}"

    @property
    def length(self) -> int:
        """How many new positions this step adds."""
        if self.tokens is not None:
            return int(self.tokens.shape[0])
        if self.hidden is not None:
            return int(self.hidden.shape[0])
        return 0


@dataclass
class TokenMessage:
    """A sampled token (or a stage's error) on its way to the origin."""

    request_id: str
    attempt: int
    step: int
    token: int = -1
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | None
    error: str | None = None
    code: str | None = None  # with error: what kind it is (exo_core.errors.ErrorCode), None for any other


# How a stage's message says it lacks a request's cache at the position sent. The origin goes by
# the failure's code (ErrorCode.POSITION_MISMATCH), not by this text: for a request that reuses a
# prefix, the prefix was evicted (the origin reruns it from scratch on the same nodes); any other
# failure (a node gone) is re-planned around.
POSITION_MISMATCH = "expected position"


@dataclass
class StageFailure:
    """A stage of a request's plan is gone (an RPC failed, or discovery dropped it)."""

    request_id: str
    attempt: int
    node_id: str
    reason: str
    code: str | None = None  # what kind of failure (exo_core.errors.ErrorCode), None for any other


class PeerClient(Protocol):
    """How a node talks to another (gRPC in networking/, direct calls for itself).

    Every method raises `PeerUnavailable` when the peer cannot be reached in time.
    """

    async def send_step(self, msg: StepMessage) -> None: ...

    async def send_token(self, msg: TokenMessage) -> bool:
        """Deliver to the origin; False when the origin no longer runs that request attempt."""
        ...

    async def report_failure(self, failure: StageFailure) -> None: ...
    async def release(self, request_id: str, up_to_attempt: int, keep: bool = False) -> None:
        """Free the request's caches; `keep`: it finished, keep them for prefix reuse."""
        ...

    async def health(self, request_id: str = "", attempt: int = 0) -> RequestState:
        """Liveness; with a request, this node's `request_state` of that attempt."""
        ...

    def generate_text(self, request: TextGeneration, delivered: str = "") -> AsyncIterator[TextDelta]:
        """A whole request on the peer's text engine: its answer after `delivered`, as it streams.

        Raises `ReplicaUnavailable` (or `PeerUnavailable`) when the peer cannot finish it (the
        origin goes on elsewhere), `EngineError` for an error to show the user. Closing the
        iterator stops the generation on the peer.
        """
        ...


class PeerUnavailable(ConnectionError):
    """A peer could not be reached (raised by PeerClient implementations)."""


class PeerTimeout(PeerUnavailable):
    """A peer did not answer within the call's deadline (it may only be busy)."""


@dataclass
class GenerationRequest:
    """What the origin needs to run one generation."""

    model: ModelCard
    prompt_tokens: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    eos_token_ids: tuple[int, ...] = ()
    messages: list[dict[str, Any]] | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    constraint: str | None = None  # an llguidance grammar for the sampler (exo_core.node.constraints)


@dataclass
class GeneratedToken:
    token: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None
    cached_tokens: int = 0  # the first token says how many prompt positions came from the prefix cache


class GenerationError(RuntimeError):
    """A generation failed; the message is safe to show to the API client.

    `status` is the HTTP status for it (a server's refusal of the request keeps its 4xx).
    """

    def __init__(self, message: str, status: int = 500, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
