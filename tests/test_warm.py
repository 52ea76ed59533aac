"""Warming: a node builds what its shard's first requests need ahead of them (engine.prepare)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import ClassVar

from exo_core import NodeConfig, Runtime, Shard
from exo_core.engines.dummy import DummyEngine


class RecordingEngine(DummyEngine):
    name = "recording"
    prepared: ClassVar[list[Shard]] = []

    async def prepare(self, shard, model, progress=None):
        if progress is not None:
            progress("graphs", 0.5)
        type(self).prepared.append(shard)
        await self.load(shard, model)


async def until(condition, timeout=10.0):
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_a_node_warms_its_shard_at_start_and_each_shard_a_plan_names(monkeypatch):
    from exo_core.plugins import registry

    reg = registry()
    monkeypatch.setitem(reg.engines, "recording", RecordingEngine)
    RecordingEngine.prepared = []
    async with Runtime(NodeConfig(engine="recording", discovery="none", frontends=(), warm=True), reg) as rt:
        card = rt.default_model
        whole = Shard.whole(card.id, card.n_layers)
        await until(lambda: whole in rt.warmer.done)
        assert RecordingEngine.prepared == [whole]
        # A plan naming this node for another range warms that range too, once.
        half = Shard(card.id, 0, card.n_layers // 2 - 1, card.n_layers)
        plan = (type(rt.node.make_plan(card)[0])(rt.node.node_id, half),)
        rt.node.origin.on_plan(card, plan)
        rt.node.origin.on_plan(card, plan)
        await until(lambda: half in rt.warmer.done)
        assert RecordingEngine.prepared == [whole, half]


async def test_warming_is_off_when_asked(monkeypatch):
    from exo_core.plugins import registry

    reg = registry()
    monkeypatch.setitem(reg.engines, "recording", RecordingEngine)
    RecordingEngine.prepared = []
    async with Runtime(NodeConfig(engine="recording", discovery="none", frontends=()), reg) as rt:
        assert rt.config.warm is False  # EXO_WARM=0 in the test environment
        assert rt.warmer is None
    assert RecordingEngine.prepared == []


def exo_models_warm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`exo models warm ARGS...` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "exo_core", "models", "warm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_exo_models_warm_builds_and_says_so():
    out = exo_models_warm("smollm2-135m", "--engine", "dummy", "--layers", "0-14", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "smollm2-135m layers 0-14: warm for dummy" in out.stdout


def test_exo_models_warm_refuses_bad_layers_and_unknown_models():
    bad = exo_models_warm("smollm2-135m", "--engine", "dummy", "--layers", "x")
    assert bad.returncode == 2 and "--layers 'x'" in bad.stderr
    unknown = exo_models_warm("no-such-model", "--engine", "dummy")
    assert unknown.returncode == 2 and "no-such-model" in unknown.stderr
