"""The built-in dummy engine: deterministic answers without weights, for tests and demos.

It answers every prompt with the same text (`DUMMY_ANSWER`, tokenized with the model's own
tokenizer), one token per step, after an optional per-token delay (`--dummy-delay-ms`).
It shards like a real engine: hidden states carry the token ids from stage to stage, so the
node, the API and the networking can be tested end to end. Its logits put the most weight on
the next answer token and some on the few after it, so temperature sampling varies and seeds
matter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import click
import numpy as np

from exo_core.engine import InferenceEngine, StageInput, StageOutput
from exo_core.hookspecs import hookimpl
from exo_core.models.cards import ModelCard
from exo_core.models.shard import Shard

DUMMY_ANSWER = "Hello from the exo dummy engine. This is a deterministic answer."
HIDDEN_SIZE = 8


class DummyEngine(InferenceEngine):
    """Deterministic tokens; per-token delay configurable."""

    name = "dummy"
    supports_sharding = True
    source_kinds = ("gguf", "safetensors", "mlx", "rkllm")
    cli_options = (
        click.Option(
            ["--dummy-delay-ms"],
            type=float,
            default=0.0,
            show_default=True,
            help="Dummy engine: milliseconds of pretend compute per step of the whole model.",
        ),
    )

    @classmethod
    def default_priority(cls) -> int:
        return 0  # only when no real engine is installed

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.delay_s = float(self.options.get("dummy_delay_ms") or 0.0) / 1000.0
        self.shard: Shard | None = None
        self.answer: list[int] = []
        self.eos: int = 0
        self.vocab_size = 0
        self.caches: dict[str, list[int]] = {}

    async def load(self, shard: Shard, model: ModelCard) -> None:
        if shard == self.shard:
            return
        from exo_core.models.tokenizer import load_tokenizer

        tokenizer = await asyncio.to_thread(load_tokenizer, model)
        self.answer = tokenizer.encode(DUMMY_ANSWER)
        self.eos = min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else 0
        self.vocab_size = tokenizer.vocab_size
        self.shard = shard

    async def forward_batch(self, shard: Shard, items: Sequence[StageInput]) -> list[StageOutput]:
        if self.delay_s:
            # One "weight read" for the whole batch; a shard pays its share of the model's layers,
            # so a pipeline costs what one node does (as a real engine's compute would).
            await asyncio.sleep(self.delay_s * shard.layer_count / shard.n_layers)
        return [self._one(shard, item) for item in items]

    def _one(self, shard: Shard, item: StageInput) -> StageOutput:
        if item.tokens is not None:
            ids = [int(t) for t in item.tokens]
        elif item.hidden is not None:
            ids = [round(float(v)) for v in item.hidden[:, 0]]
        else:
            raise ValueError("dummy engine: a step needs tokens or hidden states")
        history = self.caches.setdefault(item.request_id, [])
        history.extend(ids)
        if not shard.is_last:
            hidden = np.zeros((len(ids), HIDDEN_SIZE), dtype=np.float32)
            hidden[:, 0] = ids
            hidden[:, 1] = np.arange(len(history) - len(ids), len(history))
            return StageOutput(hidden=hidden)
        return StageOutput(logits=self._logits(history))

    def _logits(self, history: list[int]) -> np.ndarray:
        done = _answer_progress(history, self.answer)
        logits = np.full(self.vocab_size, -30.0, dtype=np.float32)
        upcoming = [*self.answer[done:], self.eos][:4]
        for rank, token in enumerate(upcoming):
            logits[token] = max(logits[token], 4.0 - 1.5 * rank)
        return logits

    async def release(self, request_id: str) -> None:
        self.caches.pop(request_id, None)

    @property
    def loaded_shards(self) -> tuple[Shard, ...]:
        return (self.shard,) if self.shard is not None else ()

    def cached_requests(self) -> int:
        return len(self.caches)


def _answer_progress(history: list[int], answer: list[int]) -> int:
    """How many answer tokens end the history (the longest suffix that is a prefix of the answer)."""
    for k in range(min(len(answer), len(history)), 0, -1):
        if history[-k:] == answer[:k]:
            return k
    return 0


@hookimpl
def register_engines(register):
    register(DummyEngine)
