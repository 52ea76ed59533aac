"""Captured graphs persist across processes (exo_tinygrad.graphs), `prepare` builds them
ahead, and the threaded C replay computes what the one-thread and TinyJit paths compute.

Each run is a fresh process on a tiny random model, as a new `exo` process would be."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exo_core import Shard, StageInput

WORKER = r"""
import asyncio, json, sys
import numpy as np
from exo_core import Shard, StageInput
from exo_core.models.cards import ModelCard
from exo_tinygrad.engine import TinygradEngine

path, layers, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
card = ModelCard("tiny", "tiny test model", layers, {"gguf": path})
shard = Shard.whole(card.id, card.n_layers)
engine = TinygradEngine({"max_context": None, "threads": threads})

async def run():
    await engine.load(shard, card)
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, 90, 45)]
    out = await engine.forward(shard, StageInput("r", tokens=np.asarray(tokens)))
    logits = [out.logits.tolist()]
    for pos in range(len(tokens), len(tokens) + 4):
        token = int(np.argmax(out.logits))
        out = await engine.forward(shard, StageInput("r", tokens=np.asarray([token]), start_pos=pos))
        logits.append(out.logits.tolist())
    runner = engine._runner
    graphs = {g.name: {"loaded": g.loaded, "replay": g.replay is not None}
              for g in [*runner._jits.prefill.values(), *runner._jits.decode.values()]}
    print(json.dumps({"logits": logits, "graphs": graphs}))

asyncio.run(run())
"""


def run_worker(model: Path, home: Path, threads: int = 1, **env: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(model), "2", str(threads)],
        capture_output=True,
        text=True,
        env={**os.environ, "EXO_HOME": str(home), **env},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_gguf) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("graphs") / "tiny.gguf", seed=5)


def test_second_process_reads_the_graphs_and_agrees(model, tmp_path):
    first = run_worker(model, tmp_path)
    assert first["graphs"] == {
        "prefill-256": {"loaded": False, "replay": True},
        "decode-256x1": {"loaded": False, "replay": True},
    }
    saved = sorted(p.name for p in (tmp_path / "cache" / "tinygrad" / "graphs").glob("*/*.pkl"))
    assert saved == ["decode-256x1.pkl", "prefill-256.pkl"]

    second = run_worker(model, tmp_path)
    assert all(g["loaded"] and g["replay"] for g in second["graphs"].values()), second["graphs"]
    np.testing.assert_array_equal(np.asarray(second["logits"]), np.asarray(first["logits"]))


def test_damaged_graph_file_is_captured_again(model, tmp_path):
    first = run_worker(model, tmp_path)
    (damaged,) = (tmp_path / "cache" / "tinygrad" / "graphs").glob("*/prefill-256.pkl")
    damaged.write_bytes(b"not a pickle")
    second = run_worker(model, tmp_path)
    assert second["graphs"]["prefill-256"]["loaded"] is False
    assert second["graphs"]["decode-256x1"]["loaded"] is True
    np.testing.assert_array_equal(np.asarray(second["logits"]), np.asarray(first["logits"]))
    assert damaged.read_bytes() != b"not a pickle"  # saved again


def test_threads_and_fallbacks_agree(model, tmp_path):
    """Two threads in the C pool, one thread, kernels called one by one from Python,
    tinygrad's own TinyJit, and the plain-ops fallback of devices other than CPU: the same
    logits (each with its own cache directory)."""
    one = np.asarray(run_worker(model, tmp_path / "one", threads=1)["logits"])
    runs = {
        "two threads": run_worker(model, tmp_path / "two", threads=2),
        "no pool": run_worker(model, tmp_path / "nopool", threads=2, EXO_TINYGRAD_POOL="0"),
        "tinyjit": run_worker(model, tmp_path / "jit", threads=2, EXO_TINYGRAD_REPLAY="0"),
        "plain": run_worker(model, tmp_path / "plain", threads=2, EXO_TINYGRAD_KERNELS="plain"),
    }
    for name, run in runs.items():
        np.testing.assert_allclose(np.asarray(run["logits"]), one, rtol=1e-4, atol=1e-4, err_msg=name)
    assert not any(g["replay"] for g in runs["tinyjit"]["graphs"].values())


def test_prepare_builds_the_plan_and_reports_progress(
    tmp_path, tiny_gguf, tiny_card, load_engine, monkeypatch
):
    monkeypatch.setenv("EXO_HOME", str(tmp_path / "home"))
    card = tiny_card(tiny_gguf(tmp_path / "tiny.gguf", seed=6))
    shard = Shard.whole(card.id, card.n_layers)
    from exo_tinygrad.engine import TinygradEngine

    engine = TinygradEngine({"max_context": 200})  # one cache capacity (256): a short plan
    reports: list[tuple[str, float]] = []

    async def run() -> np.ndarray:
        await engine.prepare(shard, card, lambda what, done: reports.append((what, done)))
        out = await engine.forward(shard, StageInput("r", tokens=np.arange(40)))
        await engine.close()
        return out.logits

    logits = asyncio.run(run())
    fractions = [done for _, done in reports]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and reports[-1] == ("ready", 1.0)
    saved = {p.stem for p in (tmp_path / "home" / "cache" / "tinygrad" / "graphs").glob("*/*.pkl")}
    assert saved == {"prefill-256", *(f"decode-256x{b}" for b in range(1, 9))}

    monkeypatch.setenv("EXO_TINYGRAD_GRAPH_CACHE", "0")
    reference = load_engine(card, max_context=200)  # captured on first use, not read

    async def again() -> np.ndarray:
        out = await reference.forward(shard, StageInput("r", tokens=np.arange(40)))
        await reference.close()
        return out.logits

    np.testing.assert_allclose(asyncio.run(again()), logits, rtol=1e-5, atol=1e-5)


def test_background_building_waits_while_a_request_is_mid_answer():
    """A capture (seconds) must not land between two steps of an answer: a request counts as
    mid-answer for IDLE_S after a step, or four of its own gaps on a slow pipeline; a released
    or long-silent request does not hold building back."""
    from exo_tinygrad import engine as engine_module
    from exo_tinygrad.engine import TinygradEngine

    engine = TinygradEngine({})
    now = 1000.0
    engine._steps = {"fast#0": (now - 1.0, 0.03)}  # 30 ms per token, silent for 1 s: done
    assert not engine._mid_answer(now)
    engine._steps["slow#0"] = (now - 1.0, 2.0)  # a token every 2 s on a slow ring: still answering
    assert engine._mid_answer(now)
    assert not engine._mid_answer(now + 9.0)  # four gaps without a step: done
    asyncio.run(engine.release("slow#0"))
    assert "slow#0" not in engine._steps and not engine._mid_answer(now)
    engine._steps["gone#0"] = (now - engine_module.STEPS_FORGOTTEN_S - 1, 500.0)
    assert not engine._mid_answer(now) and "gone#0" not in engine._steps
