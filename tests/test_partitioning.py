"""Partitioning is a pure function of the topology; plans for whole-model engines are single stages."""

import random

import pytest

from exo_core.engines.dummy import DummyEngine
from exo_core.models.cards import ModelCard
from exo_core.models.shard import Shard
from exo_core.node.messages import PeerUnavailable
from exo_core.node.node import Node
from exo_core.node.partitioning import NoPlanError, ring_memory_weighted
from exo_core.node.topology import DeviceCapabilities, NodeInfo
from exo_core.plugins import registry


def node(node_id, memory, **kw):
    return NodeInfo(node_id, capabilities=DeviceCapabilities(memory=memory), **kw)


def assert_valid(plan, n_layers):
    assert plan, "empty plan"
    start = 0
    for stage in plan:
        assert stage.shard.start_layer == start, "gap or overlap between stages"
        assert stage.shard.layer_count >= 1, "empty shard"
        assert stage.shard.n_layers == n_layers
        start = stage.shard.end_layer + 1
    assert start == n_layers, "layers dropped"
    assert len({s.node_id for s in plan}) == len(plan), "a node twice in one plan"


def test_layers_proportional_to_memory():
    plan = ring_memory_weighted([node("small", 1000), node("big", 3000)], "m", 32)
    assert [(s.node_id, s.shard.layer_count) for s in plan] == [("big", 24), ("small", 8)]
    assert_valid(plan, 32)


def test_order_is_memory_then_id_whatever_the_input_order():
    nodes = [node("c", 2000), node("a", 2000), node("b", 4000)]
    for _ in range(5):
        random.shuffle(nodes)
        plan = ring_memory_weighted(nodes, "m", 30)
        assert [s.node_id for s in plan] == ["b", "a", "c"]
        assert [s.shard.layer_count for s in plan] == [15, 8, 7]


def test_more_nodes_than_layers_gives_one_layer_each_to_the_largest():
    nodes = [node(f"n{i}", 1000 + i) for i in range(7)]
    plan = ring_memory_weighted(nodes, "m", 3)
    assert_valid(plan, 3)
    assert [s.node_id for s in plan] == ["n6", "n5", "n4"]


def test_tiny_node_still_gets_a_layer():
    plan = ring_memory_weighted([node("huge", 1_000_000), node("tiny", 1)], "m", 30)
    assert_valid(plan, 30)
    assert [s.shard.layer_count for s in plan] == [29, 1]


def test_unknown_memory_splits_evenly():
    plan = ring_memory_weighted([node("a", 0), node("b", 0), node("c", 0)], "m", 30)
    assert [s.shard.layer_count for s in plan] == [10, 10, 10]


@pytest.mark.parametrize("seed", range(40))
def test_random_topologies_never_make_empty_or_dropped_shards(seed):
    rng = random.Random(seed)
    n_layers = rng.randint(1, 80)
    nodes = [
        node(f"n{i}", rng.choice([0, 1, 512, 4096, 65536, rng.randint(1, 200_000)]))
        for i in range(rng.randint(1, 12))
    ]
    plan = ring_memory_weighted(nodes, "m", n_layers)
    assert_valid(plan, n_layers)
    assert len(plan) == min(len(nodes), n_layers)


def test_no_nodes_is_a_clear_error():
    with pytest.raises(NoPlanError, match="no node"):
        ring_memory_weighted([], "m", 30)


def test_registered_through_the_hook():
    assert registry().partitioners["ring-memory-weighted"] is ring_memory_weighted


# ---- Node.make_plan: whole-model engines and model filters ------------------------------------

CARD = ModelCard("m", "M", 30, {"gguf": "x"})


class _WholeModelEngine(DummyEngine):
    name = "whole"
    supports_sharding = False


class _NoClient:
    async def health(self):
        raise PeerUnavailable("not used")


def make_node(engine_cls=DummyEngine, memory=1000):
    return Node("self", engine_cls(), {"m": CARD}, capabilities=DeviceCapabilities(memory=memory))


def test_sharding_nodes_split_the_model():
    n = make_node()
    n.add_peer(node("peer", 1000, engine="dummy"), _NoClient())
    plan = n.make_plan(CARD)
    assert_valid(plan, 30)
    assert {s.node_id for s in plan} == {"self", "peer"}


def test_non_sharding_engines_only_ever_get_whole_models():
    n = make_node(_WholeModelEngine, memory=8000)
    n.add_peer(node("w1", 8000, engine="whole", supports_sharding=False), _NoClient())
    n.add_peer(node("w2", 8000, engine="whole", supports_sharding=False, active_requests=3), _NoClient())
    plan = n.make_plan(CARD)
    assert len(plan) == 1 and plan[0].shard == Shard.whole("m", 30)
    assert plan[0].node_id == "self"  # least loaded, and local on a tie
    n.origin.inflight["self"] = 2
    assert n.make_plan(CARD)[0].node_id == "w1"  # w2 reports more load


def test_whole_model_nodes_stay_out_of_sharded_plans():
    n = make_node()
    n.add_peer(node("whole", 64000, engine="whole", supports_sharding=False), _NoClient())
    n.add_peer(node("peer", 1000, engine="dummy"), _NoClient())
    plan = n.make_plan(CARD)
    assert "whole" not in {s.node_id for s in plan}
    assert_valid(plan, 30)


def test_nodes_that_do_not_serve_the_model_are_left_out():
    n = make_node()
    n.set_served_models(["other"])
    n.add_peer(node("peer", 1000, models=("m",)), _NoClient())
    assert [s.node_id for s in n.make_plan(CARD)] == ["peer"]
    with pytest.raises(NoPlanError, match="no node in the cluster can serve m"):
        n.make_plan(CARD, exclude={"peer"})
