"""Fixtures for the MLX engine's tests: the embedded 135M model and llama.cpp's answers for it.

Helpers reach the tests through the `kit` fixture (exo runs its tests with
--import-mode=importlib, where a test module cannot import conftest by name).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from exo_core import ModelCard, Shard, StageInput
from exo_core.testing import model_card

# The llama.cpp reference lives in the repository's core tests (copied from shared/reference).
REFERENCE = Path(__file__).parents[3] / "tests" / "data" / "smollm2-135m-llamacpp.json"
N_TOKENS = 8  # MLX's Linux CPU build decodes a few tokens per second: keep answers short


@pytest.fixture(autouse=True)
def _isolated_exo_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_HOME", str(tmp_path / "exo-home"))


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def card() -> ModelCard:
    return model_card("smollm2-135m")


def expected_answer(chat: dict, n: int = N_TOKENS) -> list[int]:
    """llama.cpp's first n completion tokens, with the EOS it stopped at when shorter."""
    ids = list(chat["completion_ids"][:n])
    return ids if len(ids) == n else [*ids, EOS]


def shard_of(card: ModelCard, start: int, end: int) -> Shard:
    return Shard(card.id, start, end, card.n_layers)


async def loaded_engine(card: ModelCard, start: int, end: int, **options):
    """An MLX engine with layers start..end loaded."""
    from exo_mlx.engine import MLXEngine

    engine = MLXEngine(options)
    await engine.load(shard_of(card, start, end), card)
    return engine


def load_engine(card: ModelCard, start: int, end: int, **options):
    """loaded_engine for module-scoped fixtures (outside any test's event loop)."""
    return asyncio.run(loaded_engine(card, start, end, **options))


EOS = 2  # <|im_end|> of SmolLM2


async def greedy(stages, prompt: list[int], n: int = N_TOKENS, request_id: str = "greedy") -> list[int]:
    """Greedy tokens through a chain of (engine, shard) stages; stops at EOS."""
    tokens: list[int] = []
    step_input = np.asarray(prompt, dtype=np.int64)
    start_pos = 0
    try:
        while len(tokens) < n:
            hidden = None
            for i, (engine, shard) in enumerate(stages):
                first = i == 0
                item = StageInput(
                    request_id,
                    tokens=step_input if first else None,
                    hidden=None if first else hidden,
                    start_pos=start_pos,
                )
                out = await engine.forward(shard, item)
                hidden = out.hidden
            token = int(np.argmax(out.logits))
            tokens.append(token)
            if token == EOS:
                break
            start_pos += len(step_input)
            step_input = np.asarray([token], dtype=np.int64)
    finally:
        for engine, _ in stages:
            await engine.release(request_id)
    return tokens


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    return SimpleNamespace(
        N_TOKENS=N_TOKENS,
        EOS=EOS,
        shard_of=shard_of,
        expected_answer=expected_answer,
        loaded_engine=loaded_engine,
        load_engine=load_engine,
        greedy=greedy,
    )
