"""The engine interface: what an inference engine plugin implements.

An engine runs shards (contiguous layer ranges) of models and keeps a KV cache per request
id. It holds every shard its live requests use, side by side (a node serves two models, or a
request planned before a peer joined next to one planned after), and never drops a live
request's cache to load another shard. The node calls it in this order: `prepare` or `load`
for a shard, then `check_step` and `forward_batch` with the steps waiting at that moment (one
request's new positions each), then `release` when a request ends. `close` when the node stops.

**Threading.** Every method is a coroutine called on the node's event loop, one
`forward_batch` at a time (unless `concurrent_steps`). Compute must not run on the loop: the
node keeps serving HTTP and gRPC while a step computes. Run it on a worker thread; most
libraries keep per-process state that wants one thread, so `EngineThread` gives an engine one
dedicated thread to submit work to (`await self.thread.run(fn, *args)`).

**Two kinds of engines**, declared by class attributes:

- Tensor engines (`works_on_text = False`, the default): the first stage gets token ids,
  later stages hidden states (float32 `[T, hidden]`); the last stage returns logits for the
  last new position and core samples from them.
- Text engines (`TextEngine`: the RK3588 bridge, any OpenAI-compatible upstream): whole-request
  engines that hand the conversation to a server and stream its text back. They exchange text,
  never token ids, and need no tokenizer on the node: core sends each request to one of their
  *replicas* (the servers they front), picked by shortest expected time, and continues a stream
  cut mid-answer on another replica (see `exo_core/node/replicas.py`). A `TextEngine` implements
  `generate(request, replica)` (text deltas, then a finish reason and the server's token counts)
  and, when it fronts servers that can go away, `check_replica`. Stop strings are applied by core
  on the text; a replay asks for the whole answer again and core skips what was delivered.

  (`works_on_text` tensor-path engines with `TextStageInput` remain for engines that want token
  ids and the conversation both.)
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from exo_core.errors import EngineError
from exo_core.models.shard import Shard
from exo_core.node.sampling import SamplingParams

if TYPE_CHECKING:
    import click

    from exo_core.models.cards import ModelCard

__all__ = [
    "EngineError",
    "EngineThread",
    "InferenceEngine",
    "Progress",
    "ReplicaUnavailable",
    "StageInput",
    "StageOutput",
    "TextDelta",
    "TextEngine",
    "TextGeneration",
    "TextStageInput",
    "ToolCall",
    "UpstreamError",
]

T = TypeVar("T")

# progress(what, fraction done in [0, 1]) while an engine prepares a shard.
Progress = Callable[[str, float], None]


@dataclass
class StageInput:
    """One request's new positions for one stage.

    The first stage gets `tokens` (int64 ids of the positions not yet in the cache); later
    stages get `hidden` (float32 [T, hidden_size]) from the previous stage. `start_pos` is how
    many positions the request's cache on this stage already holds: an engine whose cache for
    the request is at another position must raise `EngineError` naming both, never compute on.
    """

    request_id: str
    tokens: np.ndarray | None = None
    hidden: np.ndarray | None = None
    start_pos: int = 0

    @property
    def length(self) -> int:
        if self.tokens is not None:
            return int(self.tokens.shape[0])
        if self.hidden is not None:
            return int(self.hidden.shape[0])
        return 0


@dataclass
class TextStageInput(StageInput):
    """A step for a text engine: on a request's first step, the whole request.

    `tokens` are the prompt's ids followed by the `replayed` tokens an earlier attempt already
    delivered (a replay after a failure: the engine must continue after them).
    """

    messages: list[dict[str, Any]] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    replayed: int = 0


@dataclass
class StageOutput:
    """What a stage produced: hidden states for the next stage, or (last stage) logits or a token.

    `logits` are float32 [vocab] for the last new position; core samples from them. A text
    engine, which samples itself, sets `token` instead.
    """

    hidden: np.ndarray | None = None
    logits: np.ndarray | None = None
    token: int | None = None


class InferenceEngine(ABC):
    """Runs shards of models with a KV cache per request id (see the module docstring)."""

    name: ClassVar[str]
    # Can run any contiguous layer range (False: serves whole models only).
    supports_sharding: ClassVar[bool] = True
    # Works on text (TextStageInput in, StageOutput.token out) instead of tensors.
    works_on_text: ClassVar[bool] = False
    # Steps of different requests wait on separate things (e.g. a server's streams): the node
    # runs each as its own task instead of one batch, so a queued request never holds up a running one.
    concurrent_steps: ClassVar[bool] = False
    # Extra `exo run` options this engine reads (their values arrive in `options`).
    cli_options: ClassVar[Sequence[click.Option]] = ()
    # Source kinds of a model card (see ModelCard.sources) this engine loads.
    source_kinds: ClassVar[tuple[str, ...]] = ("gguf", "safetensors")

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options: dict[str, Any] = dict(options or {})

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Cheap check that the engine can run here: (ok, reason when not). Never imports heavy libraries."""
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
        """Make `shard` ready to run; idempotent for a shard already held."""

    async def prepare(self, shard: Shard, model: ModelCard, progress: Progress | None = None) -> None:
        """Build what the first requests on `shard` need, ahead of them (load, compile, capture).

        Called when a node starts or is planned a shard, and by `exo models warm`. The default
        only loads.
        """
        await self.load(shard, model)

    @abstractmethod
    async def forward_batch(self, shard: Shard, items: Sequence[StageInput]) -> list[StageOutput]:
        """Run each item's new positions through `shard` (loaded before), extending its cache.

        One output per item, in order. Engines that can batch read the weights once for all.
        """

    def check_step(self, shard: Shard, item: StageInput) -> None:  # noqa: B027 - optional hook
        """Raise `EngineError` for a step this engine cannot run (wrong width or dtype, no
        positions, a `start_pos` that is not where the request's cache is), changing nothing.

        The node checks every step before it joins a batch, so a malformed step fails only its
        own request. Cheap and synchronous: it reads what the engine holds, never computes.
        """

    async def forward(self, shard: Shard, item: StageInput) -> StageOutput:
        """One item through `forward_batch` (a convenience for tests and tools; the node batches)."""
        return (await self.forward_batch(shard, [item]))[0]

    @abstractmethod
    async def release(self, request_id: str) -> None:
        """Free the request's cache (no error when it holds none)."""

    @property
    def loaded_shards(self) -> tuple[Shard, ...]:
        """The shards whose weights this engine holds now."""
        return ()

    def cached_requests(self) -> int:
        """How many requests hold a cache in this engine now."""
        return 0

    # ---- optional: the prefix cache across requests (exo_core.node.prefix_cache) ------------

    # Implements copy_prefix and cache_nbytes: stages keep finished caches and later requests
    # that begin with the same tokens start from them.
    reuses_prefixes: ClassVar[bool] = False

    async def copy_prefix(self, source_id: str, target_id: str, length: int) -> None:
        """Start `target_id`'s cache (it has none) with the first `length` positions of `source_id`'s.

        `source_id` is left as it is. Raise `EngineError` when it holds fewer positions.
        """
        raise EngineError(f"the {self.name} engine does not reuse cached prefixes")

    def cache_nbytes(self, request_id: str) -> int:
        """Memory the request's cache holds now (what keeping it for reuse costs)."""
        return 0

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


class EngineThread:
    """One dedicated worker thread for an engine's compute (`await thread.run(fn, *args)`).

    Libraries such as tinygrad and MLX keep process-wide state that must stay on one thread;
    `EngineThread.shared(key)` gives every engine instance of a kind the same thread.
    """

    _shared: ClassVar[dict[str, EngineThread]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str = "exo-engine") -> None:
        self.name = name
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def shared(cls, key: str) -> EngineThread:
        """The process-wide thread for `key` (created on first use)."""
        with cls._lock:
            thread = cls._shared.get(key)
            if thread is None:
                thread = cls._shared[key] = cls(f"exo-{key}")
            return thread

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        return self._executor

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the thread and await its result.

        The thread hands the result straight to the loop (one `call_soon_threadsafe`), instead of
        through a `concurrent.futures.Future` chained to an asyncio one: a step crosses to the
        thread and back once per stage per token, and this is ~30% cheaper per crossing.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def work() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle, done, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, done, result, None)

        self.executor.submit(work)
        return await done

    def shutdown(self) -> None:
        """Stop the thread once its queued work is done (a later `run` starts a new one)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


def _settle(done: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    """On the loop: the thread's answer to `EngineThread.run` (dropped when the caller left)."""
    if done.done():
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(result)


# ---- whole-request engines that work on text ------------------------------------------------------


class ReplicaUnavailable(EngineError):
    """A replica (a server a text engine fronts) cannot be reached or cut the answer short.

    Core takes the replica out of rotation and continues the request on another one; only when
    none is left does the user see this message. Errors the server *answered* with (a 4xx, a
    500 page, garbage) are plain `EngineError`s: the user sees them at once.
    """


class UpstreamError(EngineError):
    """A server a text engine fronts refused or failed a request, and said so.

    `status` is the HTTP status the API client gets: the server's own 4xx (a request it cannot
    take: bad field, prompt too long), 502 for its 5xx and for answers that are not its protocol.
    """

    def __init__(self, message: str, status: int = 502, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class TextGeneration:
    """One whole request for a text engine: a chat (`messages`) or a plain completion (`prompt`).

    `extra` holds the OpenAI fields core does not interpret (`tools`, `response_format`, ...),
    for engines whose servers take them. `max_tokens` None means "as many as the server allows".
    """

    request_id: str
    model: ModelCard
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call a server answered with: its id, the function's name, and the
    arguments as the server wrote them (JSON text, passed on unparsed)."""

    id: str
    name: str
    arguments: str = ""


@dataclass
class TextDelta:
    """A piece of a text engine's answer. The last one has `finish_reason` ("stop", "length" or
    "tool_calls") and, when the server said, its token counts.

    `tool_calls` are whole calls (an engine assembles a server's streamed fragments); engines
    send them with the last delta, so a stream cut before its end never delivered any and a
    replay on another replica gives them once.
    """

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tool_calls: tuple[ToolCall, ...] = ()


class TextEngine(InferenceEngine):
    """A whole-request engine over one or more servers (its replicas), exchanging text.

    Subclasses implement `generate`; `replicas` names the servers (default: one), and
    `check_replica` says whether one is up (core health-checks every replica and brings back
    the ones that answer again). `discover_models` lets an engine add the cards of models its
    servers offer when the node starts. `load`, `forward_batch` and `release` belong to the
    tensor path and are not used.
    """

    works_on_text: ClassVar[bool] = True
    supports_sharding: ClassVar[bool] = False
    concurrent_steps: ClassVar[bool] = True

    def replicas(self, model: ModelCard | None = None) -> Sequence[str]:
        """Names of the servers this engine fronts (stable; shown in logs); with a model, the
        ones that serve it."""
        return ("default",)

    async def check_replica(self, replica: str) -> None:
        """Raise `ReplicaUnavailable` when the replica cannot serve now (default: always up)."""

    async def discover_models(self, known: Mapping[str, ModelCard]) -> Sequence[ModelCard]:
        """Cards of models found on the servers, added to (or replacing) the node's `known`
        cards when it starts."""
        return ()

    def serves(self, card: ModelCard) -> bool:
        """Whether this engine instance serves the model (default: the card names a source kind)."""
        return self.can_serve(card)

    @abstractmethod
    def generate(self, request: TextGeneration, replica: str) -> AsyncIterator[TextDelta]:
        """Stream the answer from one replica. Closing the iterator must end the generation on the
        server. Raise `ReplicaUnavailable` when the server cannot be reached or cuts the answer,
        `EngineError` (its message for the user) for anything else."""

    async def load(self, shard: Shard, model: ModelCard) -> None:
        return None

    async def forward_batch(self, shard: Shard, items: Sequence[StageInput]) -> list[StageOutput]:
        raise EngineError(f"{self.name} serves whole requests (TextEngine.generate), not steps")

    async def release(self, request_id: str) -> None:
        return None
