"""Issue 15: nodes started without a hub id (hf.co/...) still hold layers of it. They announce
the hub formats their engine loads (NodeInfo.hub_formats); the origin plans over them, and the
card travels with the plan's first step, so a node that cannot reach the hub gets it too."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from core_helpers import until

from exo_core.engines.dummy import DummyEngine
from exo_core.models.files import embedded_gguf_path
from exo_core.models.shard import Shard
from exo_core.networking import wire
from exo_core.node.messages import StepMessage, TokenMessage
from exo_core.node.node import Node
from exo_core.node.origin import holds_layers_of
from exo_core.node.partitioning import PlanStage
from exo_core.node.sampling import SamplingParams
from exo_core.node.topology import NodeInfo
from exo_core.plugins import registry
from exo_core.testing.cluster import Cluster, NodeSpec, free_ports
from exo_core.testing.hub import StandInHub

EMBEDDED_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "hf.co/org/smol-gguf:Q4_1"
UNREACHABLE = "http://127.0.0.1:9"
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def hub(tmp_path):
    smol = tmp_path / "smol"
    smol.mkdir()
    os.symlink(embedded_gguf_path(), smol / EMBEDDED_NAME)
    with StandInHub() as server:
        server.add_repo("org/smol-gguf", smol)
        yield server


def hub_card():
    card = registry().models["smollm2-135m"]
    return dataclasses.replace(card, id=HUB_ID, sources={"gguf": "embedded"}, aliases=())


# ---- the pieces ------------------------------------------------------------------------------


def test_a_card_travels_on_the_wire_with_the_first_step():
    card = hub_card()
    plan = (PlanStage("s", Shard.whole(card.id, card.n_layers)),)
    msg = StepMessage("r", 0, "o", plan, 0, SamplingParams(), 4, (), 0, tokens=np.array([1]), card=card)
    back = wire.step_from_pb(wire.step_to_pb(msg))
    assert back.card is not None and back.card.to_dict() == card.to_dict()
    assert wire.step_from_pb(wire.step_to_pb(dataclasses.replace(msg, card=None))).card is None
    bad = wire.step_to_pb(msg)
    bad.card_json = '{"id": "x"}'
    with pytest.raises(wire.WireError, match="card_json"):
        wire.step_from_pb(bad)
    info = NodeInfo("n", models=("smollm2-135m",), hub_formats=("gguf",))
    assert wire.node_info_from_pb(wire.node_info_to_pb(info)).hub_formats == ("gguf",)
    assert NodeInfo.from_dict(info.to_dict()).hub_formats == ("gguf",)


def test_which_nodes_hold_layers_of_a_hub_model():
    card = hub_card()
    listing = NodeInfo("a", models=("smollm2-135m",))
    assert not holds_layers_of(listing, card)  # an older node, or one that takes no hub models
    assert holds_layers_of(dataclasses.replace(listing, hub_formats=("gguf", "safetensors")), card)
    assert not holds_layers_of(dataclasses.replace(listing, hub_formats=("safetensors",)), card)
    assert not holds_layers_of(  # a whole-request node serves only what its servers offer
        dataclasses.replace(listing, hub_formats=("gguf",), supports_sharding=False), card
    )
    assert holds_layers_of(NodeInfo("b"), card)  # lists nothing: takes any model
    local = dataclasses.replace(card, id="my-model")  # not a hub id: only nodes listing it
    assert not holds_layers_of(dataclasses.replace(listing, hub_formats=("gguf",)), local)


class _Origin:
    """The origin "o" as the stage sees it: what the stage sends it, recorded."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[TokenMessage]] = {}

    async def send_step(self, msg) -> None:
        raise AssertionError("no step goes to the origin in these plans")

    async def send_token(self, msg: TokenMessage) -> bool:
        self.tokens.setdefault(msg.request_id, []).append(msg)
        return True

    async def report_failure(self, failure) -> None:
        self.tokens.setdefault(failure.request_id, []).append(
            TokenMessage(failure.request_id, 0, 0, error=failure.error)
        )

    async def release(self, request_id, up_to_attempt, keep=False) -> None:
        return None

    async def health(self, request_id="", attempt=0):
        raise AssertionError("not used")


def _step(rid: str, model_id: str, card=None) -> StepMessage:
    plan = (PlanStage("s", Shard.whole(model_id, 30)),)
    return StepMessage(
        rid,
        0,
        "o",
        plan,
        0,
        SamplingParams(),
        3,
        (),
        0,
        tokens=np.array([1, 2, 3], dtype=np.int64),
        card=card,
    )


async def test_a_stage_takes_the_card_that_comes_with_the_step_and_says_when_none_came():
    node = Node("s", DummyEngine(), {"smollm2-135m": registry().models["smollm2-135m"]})
    assert node.info().hub_formats == ("gguf", "safetensors")
    origin = _Origin()
    node.add_peer(NodeInfo(node_id="o", address="127.0.0.1", port=1), origin)
    await node.start()
    try:
        # a model this node has no card for, and none came: the request fails, saying why
        await node.receive_step(_step("unknown", "hf.co/org/nothing:Q4_1"))
        await until(lambda: origin.tokens.get("unknown"))
        (error,) = origin.tokens["unknown"]
        assert error.error and "no model card for hf.co/org/nothing:Q4_1" in error.error
        assert "hf.co/org/nothing:Q4_1" not in node.models
        # the hub model's card with the step: registered under its id, and the shard runs
        await node.receive_step(_step("hub", HUB_ID, hub_card()))
        await until(lambda: len(origin.tokens.get("hub", [])) == 3)
        assert [t.error for t in origin.tokens["hub"]] == [None] * 3
        assert node.models[HUB_ID].sources == {"gguf": "embedded"}
        # nothing lost: the node's own model still answers
        await node.receive_step(_step("own", "smollm2-135m"))
        await until(lambda: len(origin.tokens.get("own", [])) == 3)
        assert [t.token for t in origin.tokens["own"]] == [t.token for t in origin.tokens["hub"]]
    finally:
        await node.stop()


# ---- real processes --------------------------------------------------------------------------


def start_cluster(
    tmp: Path, envs: dict[str, dict[str, str]], per_node_args=None, memory: int = 1000
) -> Cluster:
    """Like `Cluster.manual` with the dummy engine (each node offering `memory` MB), but each
    node with an environment of its own."""
    tmp.mkdir(parents=True, exist_ok=True)
    ids = list(envs)
    ports = free_ports(2 * len(ids))
    specs = [NodeSpec(nid, ports[2 * i], ports[2 * i + 1], memory=memory) for i, nid in enumerate(ids)]
    cluster = Cluster(specs={s.node_id: s for s in specs}, peers_file=tmp / "peers.json")
    cluster.list_peers(ids)
    for spec in specs:
        args = [
            "--engine", "dummy", "--node-id", spec.node_id,
            "--node-host", spec.host, "--node-port", str(spec.node_port),
            "--api-host", spec.host, "--api-port", str(spec.api_port),
            "--discovery-module", "manual", "--discovery-config-path", str(cluster.peers_file),
            "--wait-for-peers", str(len(ids) - 1),
            *((per_node_args or {}).get(spec.node_id, ())),
        ]  # fmt: skip
        home = tmp / f"home-{spec.node_id}"
        cluster.add(spec, args, tmp, {"HF_HOME": str(home / "hf"), **envs[spec.node_id]})
    return cluster


def plan_nodes(cluster: Cluster, node_id: str, model: str) -> list[str]:
    status, topo = cluster.get(node_id, f"/v1/topology?model={quote(model)}")
    assert status == 200, topo
    return [stage["node_id"] for stage in topo["plan"]]


@pytest.mark.timeout(300)
def test_nodes_started_without_a_hub_id_hold_its_layers(hub, tmp_path):
    # only node a reaches the hub; b and c never saw the id and cannot make its card themselves
    envs = {
        "a": {"HF_ENDPOINT": hub.url},
        "b": {"HF_ENDPOINT": UNREACHABLE},
        "c": {"HF_ENDPOINT": UNREACHABLE},
    }
    # 150 MB each: the model needs 0.3 GB for its 8192-token context (30 layers of 2.2 MB,
    # embedding and head of 30 MB each, activations, the KV cache): only the three together
    cluster = start_cluster(tmp_path / "three", envs, memory=150)
    try:
        cluster.wait_ready(120)
        answer = cluster.chat("a", HI, model=HUB_ID, max_tokens=8)
        assert sorted(set(plan_nodes(cluster, "a", HUB_ID))) == ["a", "b", "c"]

        for other in ("b", "c"):
            log = cluster.nodes[other].log()
            assert "model card from the origin" in log and HUB_ID in log, log[-3000:]
            # it came with the plan's prefetch, so the shard downloads before its first step
            assert "via=prefetch" in log, log[-3000:]
        assert cluster.chat("a", HI, model=HUB_ID, max_tokens=8) == answer  # again, cards kept
        # b now knows the card (it came with a's plan): asked on b, it answers the same, over all three
        assert cluster.chat("b", HI, model=HUB_ID, max_tokens=8) == answer
        assert sorted(set(plan_nodes(cluster, "b", HUB_ID))) == ["a", "b", "c"]
        status, models = cluster.get("c", "/v1/models")
        assert [sorted(m["nodes"]) for m in models["data"] if m["id"] == HUB_ID] == [["a", "b", "c"]], models
        # an id that no node knows and the hub does not have: a 404, and the cluster still answers
        status, reply = cluster.post(
            "a", "/v1/chat/completions", {"model": "hf.co/org/missing", "messages": HI}
        )
        assert status == 404 and "no repo org/missing" in reply["error"]["message"], reply
        assert cluster.chat("c", HI, max_tokens=4)
        assert cluster.chat("a", HI, model=HUB_ID, max_tokens=8) == answer
    finally:
        cluster.close()
    # one node started with the id answers the same; with 150 MB, alone, it cannot hold the model
    for name, memory in (("alone", 150), ("whole", 1000)):
        single = start_cluster(tmp_path / name, {"s": {"HF_ENDPOINT": hub.url}}, {"s": [HUB_ID]}, memory)
        try:
            single.wait_ready(120)
            if name == "alone":
                status, reply = single.post("s", "/v1/chat/completions", {"model": HUB_ID, "messages": HI})
                assert status == 503 and reply["error"]["code"] == "no_node_available", reply
            else:
                assert single.chat("s", HI, model=HUB_ID, max_tokens=8) == answer
        finally:
            single.close()


@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_the_real_model_over_three_plain_nodes_answers_like_its_builtin_card(hub, tmp_path):
    """The real engine: three nodes started plainly hold the hub model's layers (each reads its
    byte ranges from the hub or its peers) and answer as the same file under its built-in card."""
    from core_helpers import real_cluster_engine

    engine = real_cluster_engine()
    if engine is None:
        pytest.skip("no real engine (tinygrad or mlx) is installed")
    env = {"HF_ENDPOINT": hub.url, "EXO_WARM": "0"}
    with Cluster.manual(
        ["a", "b", "c"], tmp=tmp_path / "real", engine=engine, timeout=300, env=env
    ) as cluster:
        builtin = cluster.chat("a", HI, model="smollm2-135m", max_tokens=8)
        assert cluster.chat("b", HI, model=HUB_ID, max_tokens=8) == builtin
        assert sorted(set(plan_nodes(cluster, "b", HUB_ID))) == ["a", "b", "c"]
        assert "model card from the origin" in cluster.nodes["a"].log()
