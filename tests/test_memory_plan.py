"""Memory planning: weights per layer from the file, the KV cache of the context, refusals with numbers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from exo_core.models.cards import EMBEDDED, ModelCard
from exo_core.models.checkpoint.gguf import read_gguf
from exo_core.models.files import embedded_gguf_path
from exo_core.models.memory import KV_BYTES, ModelMemory, from_gguf, model_memory
from exo_core.models.shard import Shard
from exo_core.node.partitioning import (
    DoesNotFitError,
    PlanStage,
    fit_memory,
    plan_within_memory,
    ring_memory_weighted,
)
from exo_core.node.topology import DeviceCapabilities, NodeInfo, parse_memory

GB = 10**9
MIB = 1 << 20


def node(node_id: str, memory_bytes: float) -> NodeInfo:
    return NodeInfo(node_id, capabilities=DeviceCapabilities(memory=int(memory_bytes // MIB)))


def test_embedded_model_memory_comes_from_its_tensors():
    gguf = read_gguf(embedded_gguf_path(), string_arrays=False)
    memory = from_gguf(gguf)
    assert memory.n_layers == 30 and memory.context_length == 8192
    data = sum(t.nbytes for t in gguf.tensors.values())
    # tied head: the embedding counts on the last stage too
    assert sum(memory.layer_bytes) + memory.head_bytes == data
    assert memory.kv_bytes_per_token == 2 * 3 * 64 * KV_BYTES
    card = ModelCard("smollm2-135m", "s", 30, {"gguf": EMBEDDED}, context_length=8192)
    assert model_memory(card) == memory
    assert model_memory(ModelCard("x", "x", 30, {"gguf": "org/none:x.gguf"})) is None


def seventy_b() -> ModelMemory:
    # Llama 3.1 70B at Q4_K_M: ~0.5 GB a layer, 8 KV heads of 128
    return ModelMemory(
        layer_bytes=(500_000_000,) * 80,
        embedding_bytes=600_000_000,
        head_bytes=800_000_000,
        kv_bytes_per_token=2 * 8 * 128 * KV_BYTES,
        activation_bytes=50_000_000,
        context_length=131072,
    )


def test_a_model_that_does_not_fit_is_refused_with_the_numbers():
    memory = seventy_b()
    nodes = [node("a", 16 * GB), node("b", 12 * GB), node("c", 8 * GB)]
    plan = ring_memory_weighted(nodes, "llama-3.1-70b", 80)
    with pytest.raises(DoesNotFitError) as refused:
        fit_memory(plan, nodes, memory, 131072)
    message = str(refused.value)
    assert memory.total_bytes(131072) == 41_450_000_000 + 80 * 4096 * 131072  # weights + KV cache
    assert "needs 84.4 GB for a 131072-token context, the cluster has 36.0 GB free" in message
    assert "add a node or lower --max-context" in message
    # the weights alone (41.4 GB) do not fit either, whatever the context
    with pytest.raises(DoesNotFitError, match=r"needs 41\.8 GB for a 1024-token context"):
        fit_memory(plan, nodes, memory, 1024)
    bigger = [*nodes, node("d", 24 * GB)]
    fitted = fit_memory(ring_memory_weighted(bigger, "llama-3.1-70b", 80), bigger, memory, 4096)
    assert [s.shard.layer_count for s in fitted] and sum(s.shard.layer_count for s in fitted) == 80


def test_a_plan_whose_stage_overflows_is_split_by_cost():
    # ten 100 MiB layers, a 400 MiB embedding, a 900 MiB head: both ends weigh more than the middle
    memory = ModelMemory((100 * MIB,) * 10, 400 * MIB, 900 * MIB, 0, 0, 16)
    nodes = [node("a", 1300 * MIB), node("b", 1300 * MIB)]
    plan = ring_memory_weighted(nodes, "m", 10)
    assert [s.shard.layer_count for s in plan] == [5, 5]  # by memory alone; b would need 1400 MiB
    fitted = fit_memory(plan, nodes, memory, 16)
    assert [(s.node_id, s.shard.start_layer, s.shard.end_layer) for s in fitted] == [("a", 0, 6), ("b", 7, 9)]
    assert all(memory.shard_bytes(s.shard, 16) <= 1300 * MIB for s in fitted)
    lopsided = [node("a", 2000 * MIB), node("b", 700 * MIB)]
    with pytest.raises(DoesNotFitError, match=r"m\[.*\] needs .* GB on node b, which has 0\.7 GB free"):
        fit_memory(ring_memory_weighted(lopsided, "m", 10), lopsided, memory, 16)


def test_nodes_that_report_no_memory_are_not_checked():
    plan = [PlanStage("a", Shard("m", 0, 79, 80))]
    assert fit_memory(plan, [node("a", 0)], seventy_b(), 131072) == plan


def test_max_context_decides_whether_the_embedded_model_fits():
    card = ModelCard("smollm2-135m", "s", 30, {"gguf": EMBEDDED}, context_length=8192)
    small = [node("a", 200 * MIB)]
    plan = ring_memory_weighted(small, card.id, 30)
    with pytest.raises(DoesNotFitError, match=r"for a 8192-token context"):
        plan_within_memory(card, plan, small, None)
    assert plan_within_memory(card, plan, small, 1024) == plan


def test_memory_sizes_parse():
    assert parse_memory("16GB") == 16 * GB
    assert parse_memory("16 GiB") == 16 << 30
    assert parse_memory("800MB") == 800 * 10**6
    for bad in ("lots", "-1GB", "16 parsecs"):
        with pytest.raises(ValueError, match="like 16GB"):
            parse_memory(bad)


def test_memory_limit_option_refuses_nonsense():
    done = subprocess.run(
        [sys.executable, "-m", "exo_core", "run", "--memory-limit", "lots", "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "EXO_DISABLE_PLUGINS": "tinygrad,mlx,rkllm"},
    )
    assert done.returncode == 2
    assert "--memory-limit: memory size 'lots'" in done.stderr
