"""The built-in dummy engine: deterministic answers without weights, for tests and demos.

It answers every prompt with the same text (`DUMMY_ANSWER`, tokenized with the model's own
tokenizer), one token per step, after an optional per-token delay (`--dummy-delay-ms`).
It shards like a real engine: hidden states carry the token ids from stage to stage, so the
node, the API and the networking can be tested end to end. Its logits put the most weight on
the next answer token and some on the few after it, so temperature sampling varies and seeds
matter.

Like a real engine it holds several shards side by side (each request's cache belongs to the
shard it was made on) and refuses a step whose `start_pos` is not where the request's cache
is, so the default tests see lost state. `--dummy-hang-after N` makes every forward after the
N-th wait forever while the node stays up: a stage that answers health but makes no progress.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import click
import numpy as np

from exo_core.engine import EngineError, EngineThread, InferenceEngine, StageInput, StageOutput
from exo_core.errors import ErrorCode
from exo_core.hookspecs import hookimpl
from exo_core.models.cards import ModelCard
from exo_core.models.shard import Shard

DUMMY_ANSWER = "Hello from the exo dummy engine. This is a deterministic answer."
HIDDEN_SIZE = 8


@dataclass
class _Model:
    """What the dummy engine knows of a model: its answer in token ids, its end token, its vocabulary."""

    answer: list[int]
    eos: int
    vocab_size: int


@dataclass
class _Cache:
    """One request's history on one shard."""

    shard: Shard
    history: list[int] = field(default_factory=list)


class DummyEngine(InferenceEngine):
    """Deterministic tokens; per-token delay configurable."""

    name = "dummy"
    supports_sharding = True
    source_kinds = ("gguf", "safetensors", "mlx", "rkllm")
    downloads_weights = False  # it reads only the tokenizer: planning it a shard downloads nothing
    cli_options = (
        click.Option(
            ["--dummy-delay-ms"],
            type=float,
            default=0.0,
            show_default=True,
            help="Dummy engine: milliseconds of pretend compute per step of the whole model.",
        ),
        click.Option(
            ["--dummy-blocking"],
            is_flag=True,
            help="Dummy engine: spend the delay blocking a worker thread (as real compute does), "
            "not in an asyncio sleep.",
        ),
        click.Option(
            ["--dummy-hang-after"],
            type=int,
            default=None,
            help="Dummy engine (fault testing): every forward after this many never returns.",
        ),
    )

    @classmethod
    def default_priority(cls) -> int:
        return 0  # only when no real engine is installed

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.delay_s = float(self.options.get("dummy_delay_ms") or 0.0) / 1000.0
        self.blocking = bool(self.options.get("dummy_blocking"))
        hang_after = self.options.get("dummy_hang_after")
        self.hang_after: int | None = int(hang_after) if hang_after is not None else None
        self.forwards = 0
        self.shards: dict[Shard, _Model] = {}
        self.caches: dict[str, _Cache] = {}

    async def load(self, shard: Shard, model: ModelCard) -> None:
        """Hold `shard` next to the shards already held (their requests' caches stay)."""
        if shard in self.shards:
            return
        same_model = next((m for s, m in self.shards.items() if s.model_id == shard.model_id), None)
        if same_model is None:
            from exo_core.models.tokenizer import load_tokenizer

            tokenizer = await asyncio.to_thread(load_tokenizer, model)
            eos = min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else 0
            same_model = _Model(tokenizer.encode(DUMMY_ANSWER), eos, tokenizer.vocab_size)
        self.shards[shard] = same_model

    def check_step(self, shard: Shard, item: StageInput) -> None:
        """Refuse a step this engine cannot run, before it changes anything."""
        if shard not in self.shards:
            raise EngineError(f"dummy engine: shard {shard} is not loaded")
        if item.tokens is not None:
            if item.tokens.ndim != 1 or item.tokens.dtype.kind not in "iu":
                raise EngineError(
                    f"dummy engine: token ids must be a 1-D integer array, got {item.tokens.dtype} "
                    f"{tuple(item.tokens.shape)}"
                )
        elif item.hidden is not None:
            if item.hidden.ndim != 2 or item.hidden.shape[1] != HIDDEN_SIZE or item.hidden.dtype.kind != "f":
                raise EngineError(
                    f"dummy engine: hidden states must be float [T, {HIDDEN_SIZE}], got "
                    f"{item.hidden.dtype} {tuple(item.hidden.shape)}"
                )
        else:
            raise EngineError("dummy engine: a step needs tokens or hidden states")
        if item.length == 0:
            raise EngineError(f"dummy engine: request {item.request_id}: a step needs at least one position")
        cache = self.caches.get(item.request_id)
        if cache is not None and cache.shard != shard:
            raise EngineError(
                f"dummy engine: request {item.request_id} has its cache on shard {cache.shard}, not {shard}"
            )
        held = len(cache.history) if cache is not None else 0
        if item.start_pos != held:
            raise EngineError(
                f"dummy engine: request {item.request_id} starts at position {item.start_pos}, "
                f"but its cache holds {held} positions",
                code=ErrorCode.POSITION_MISMATCH,
            )

    async def forward_batch(self, shard: Shard, items: Sequence[StageInput]) -> list[StageOutput]:
        for item in items:  # all checked before any cache changes
            self.check_step(shard, item)
        if len({item.request_id for item in items}) != len(items):
            raise EngineError("dummy engine: a batch holds two steps of the same request")
        self.forwards += 1
        if self.hang_after is not None and self.forwards > self.hang_after:
            await asyncio.Event().wait()  # hung: never returns, the node stays up
        if self.delay_s:
            # One "weight read" for the whole batch; a shard pays its share of the model's layers,
            # so a pipeline costs what one node does (as a real engine's compute would).
            delay = self.delay_s * shard.layer_count / shard.n_layers
            if self.blocking:  # the event loop learns of the end from another thread, as with a real engine
                await EngineThread.shared("dummy").run(time.sleep, delay)
            else:
                await asyncio.sleep(delay)
        return [self._one(shard, item) for item in items]

    def _one(self, shard: Shard, item: StageInput) -> StageOutput:
        if item.tokens is not None:
            ids = [int(t) for t in item.tokens]
        else:
            assert item.hidden is not None
            ids = [round(float(v)) for v in item.hidden[:, 0]]
        history = self.caches.setdefault(item.request_id, _Cache(shard)).history
        history.extend(ids)
        if not shard.is_last:
            hidden = np.zeros((len(ids), HIDDEN_SIZE), dtype=np.float32)
            hidden[:, 0] = ids
            hidden[:, 1] = np.arange(len(history) - len(ids), len(history))
            return StageOutput(hidden=hidden)
        return StageOutput(logits=self._logits(self.shards[shard], history))

    def _logits(self, model: _Model, history: list[int]) -> np.ndarray:
        done = _answer_progress(history, model.answer)
        logits = np.full(model.vocab_size, -30.0, dtype=np.float32)
        upcoming = [*model.answer[done:], model.eos][:4]
        for rank, token in enumerate(upcoming):
            logits[token] = max(logits[token], 4.0 - 1.5 * rank)
        return logits

    async def release(self, request_id: str) -> None:
        self.caches.pop(request_id, None)

    @property
    def loaded_shards(self) -> tuple[Shard, ...]:
        return tuple(self.shards)

    def cached_requests(self) -> int:
        return len(self.caches)

    reuses_prefixes = True

    async def copy_prefix(self, source_id: str, target_id: str, length: int) -> None:
        source = self.caches.get(source_id)
        if source is None:
            raise EngineError(f"dummy engine: no cache {source_id} to reuse")
        if len(source.history) < length:
            raise EngineError(
                f"dummy engine: {source_id} holds {len(source.history)} positions, not {length}"
            )
        self.caches[target_id] = _Cache(source.shard, source.history[:length])

    def cache_nbytes(self, request_id: str) -> int:
        cache = self.caches.get(request_id)
        return 8 * len(cache.history) if cache is not None else 0


def _answer_progress(history: list[int], answer: list[int]) -> int:
    """How many answer tokens end the history (the longest suffix that is a prefix of the answer)."""
    for k in range(min(len(answer), len(history)), 0, -1):
        if history[-k:] == answer[:k]:
            return k
    return 0


@hookimpl
def register_engines(register):
    register(DummyEngine)
