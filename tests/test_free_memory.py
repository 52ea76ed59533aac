"""Nodes report the memory free now (plus what their engine holds), keep it current, and plans
and refusals are made with it; small changes do not move the plan."""

from __future__ import annotations

import json

import pytest
from core_helpers import wait_until

from exo_core.models.cards import EMBEDDED, ModelCard
from exo_core.models.memory import held_bytes, model_memory
from exo_core.models.shard import Shard
from exo_core.node.topology import (
    FREE_MEMORY_ENV,
    MEMORY_LIMIT_ENV,
    DeviceCapabilities,
    MemoryReporter,
    device_capabilities,
    free_memory_bytes,
    reported_memory,
)
from exo_core.testing.cluster import Cluster, NodeSpec, free_ports

MIB = 1 << 20
SMOL = ModelCard("smollm2-135m", "s", 30, {"gguf": EMBEDDED}, context_length=8192)


def test_free_memory_comes_from_the_stand_in_or_psutil(tmp_path, monkeypatch):
    import psutil

    monkeypatch.delenv(FREE_MEMORY_ENV, raising=False)
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    real = free_memory_bytes()
    assert 0 < real <= psutil.virtual_memory().total
    monkeypatch.setenv(FREE_MEMORY_ENV, "3GB")
    assert free_memory_bytes() == 3 * 10**9
    source = tmp_path / "free"
    source.write_text("1GiB")
    monkeypatch.setenv(FREE_MEMORY_ENV, str(source))
    assert device_capabilities().memory == 1024
    # what the engine holds counts as usable
    assert device_capabilities(held_bytes=512 * MIB).memory == 1536
    # --memory-limit replaces what the node reports
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "2GiB")
    assert device_capabilities(held_bytes=512 * MIB).memory == 2048


def test_held_bytes_are_the_shards_weights():
    memory = model_memory(SMOL)
    assert memory is not None
    first, second = Shard("smollm2-135m", 0, 14, 30), Shard("smollm2-135m", 15, 29, 30)
    cards = {SMOL.id: SMOL}
    assert held_bytes([first], cards) == memory.shard_bytes(first, 0)
    assert held_bytes([first, second], cards) == memory.shard_bytes(first, 0) + memory.shard_bytes(second, 0)
    assert held_bytes([Shard("unknown", 0, 1, 2)], cards) == 0


def test_small_changes_are_not_reported():
    assert reported_memory(10_000, 10_500) == 10_000  # 5 %: the plan stays
    assert reported_memory(10_000, 9_100) == 10_000
    assert reported_memory(10_000, 11_500) == 11_500  # 15 %: reported
    assert reported_memory(1_000, 1_200) == 1_000  # under 256 MiB: not worth a new plan
    assert reported_memory(1_000, 1_300) == 1_300
    assert reported_memory(0, 700) == 700


def test_the_reporter_follows_free_memory_and_leaves_set_capabilities_alone(tmp_path, monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    source = tmp_path / "free"
    source.write_text("4GiB")
    monkeypatch.setenv(FREE_MEMORY_ENV, str(source))
    box = [device_capabilities()]
    held = [0]
    reporter = MemoryReporter(lambda: box[0], lambda caps: box.__setitem__(0, caps), lambda: held[0])
    source.write_text("3.9GiB")
    assert not reporter.refresh() and box[0].memory == 4096
    source.write_text("2GiB")
    assert reporter.refresh() and box[0].memory == 2048
    # the engine loaded 2 GiB of weights: free memory fell, what the node offers did not
    source.write_text("0.1GiB")
    held[0] = 2 << 30
    assert not reporter.refresh() and box[0].memory == 2048
    box[0] = DeviceCapabilities(memory=1000)  # a peers file said what this node has
    source.write_text("8GiB")
    assert not reporter.refresh() and box[0].memory == 1000


def _peers_file(path, specs):
    """A manual peers file that says nothing of capabilities: each node reports its own."""
    peers = {s.node_id: {"address": s.host, "port": s.node_port} for s in specs}
    path.write_text(json.dumps({"peers": peers}))
    return path


def _args(spec, peers_file, *extra):
    return [
        "--engine",
        "dummy",
        "--node-id",
        spec.node_id,
        "--node-host",
        "127.0.0.1",
        "--node-port",
        str(spec.node_port),
        "--api-host",
        "127.0.0.1",
        "--api-port",
        str(spec.api_port),
        "--discovery-module",
        "manual",
        "--discovery-config-path",
        str(peers_file),
        "--wait-for-peers",
        "1",
        *extra,
    ]


def _topology(cluster, node_id):
    status, topo = cluster.get(node_id, "/v1/topology")
    assert status == 200, topo
    return topo


def _memory(topo):
    return {n["node_id"]: n["capabilities"]["memory"] for n in topo["nodes"]}


def _layers(topo):
    return {s["node_id"]: s["shard"]["end_layer"] - s["shard"]["start_layer"] + 1 for s in topo["plan"]}


@pytest.mark.timeout(240)
def test_two_nodes_plan_and_refuse_by_the_memory_they_report_free(tmp_path):
    ports = free_ports(4)
    a, b = NodeSpec("a", ports[0], ports[1]), NodeSpec("b", ports[2], ports[3])
    peers = _peers_file(tmp_path / "peers.json", [a, b])
    free_a, free_b = tmp_path / "free-a", tmp_path / "free-b"
    free_a.write_text("3GiB")
    free_b.write_text("1GiB")
    env = {"EXO_MEMORY_REFRESH_S": "0.2"}
    cluster = Cluster()
    try:
        cluster.add(a, _args(a, peers), tmp_path, {**env, FREE_MEMORY_ENV: str(free_a)})
        cluster.add(b, _args(b, peers), tmp_path, {**env, FREE_MEMORY_ENV: str(free_b)})
        cluster.wait_ready(120)
        assert wait_until(lambda: _memory(_topology(cluster, "a")) == {"a": 3072, "b": 1024}, 30)
        assert _layers(_topology(cluster, "a")) == {"a": 23, "b": 7}  # 3:1 by free memory

        # b's free memory grows: b reports it, a plans with it
        free_b.write_text("3GiB")
        assert wait_until(lambda: _memory(_topology(cluster, "a"))["b"] == 3072, 30)
        assert _layers(_topology(cluster, "a")) == {"a": 15, "b": 15}

        # a little less free on a: nothing moves
        free_a.write_text("2.9GiB")
        free_b.write_text("2.8GiB")
        wait_until(lambda: False, 2)  # several looks at free memory and peer checks
        assert _memory(_topology(cluster, "a")) == {"a": 3072, "b": 3072}

        # both nearly full: the embedded model with its 8192-token KV cache no longer fits
        free_a.write_text("100MiB")
        free_b.write_text("100MiB")
        assert wait_until(lambda: _memory(_topology(cluster, "b")) == {"a": 100, "b": 100}, 30)
        status, reply = cluster.post(
            "b",
            "/v1/chat/completions",
            {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert status == 503, reply
        message = reply["error"]["message"]
        assert "smollm2-135m needs 0.3 GB for a 8192-token context" in message
        assert "the cluster has 0.2 GB free; add a node or lower --max-context" in message

        # memory freed again: the same request is served, nothing left behind
        free_a.write_text("3GiB")
        free_b.write_text("3GiB")
        assert wait_until(lambda: _memory(_topology(cluster, "b")) == {"a": 3072, "b": 3072}, 30)
        text = cluster.chat("b", [{"role": "user", "content": "Hi"}], max_tokens=4)
        assert text
    finally:
        cluster.close()
