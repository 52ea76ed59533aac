"""A cluster of real `exo` processes on 127.0.0.1 (manual discovery, dummy engine): plans, replays,
concurrency and malformed peer messages (the cluster key: test_cluster_security.py).
"""

import concurrent.futures
import time

import grpc
import numpy as np
import pytest

from exo_core.engines.dummy import DUMMY_ANSWER
from exo_core.models.shard import Shard
from exo_core.networking import wire
from exo_core.networking.auth import ClusterAuth
from exo_core.networking.generated import node_service_pb2 as pb
from exo_core.networking.generated import node_service_pb2_grpc as pb_grpc
from exo_core.networking.keys import ClusterKey
from exo_core.node.messages import StepMessage
from exo_core.node.partitioning import PlanStage
from exo_core.node.sampling import SamplingParams
from exo_core.testing.cluster import Cluster, stream_text

CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def cluster3(tmp_module):
    with Cluster.manual(
        ["a", "b", "c"], tmp=tmp_module, memory=[2000, 1000, 1000], extra_args=["--dummy-delay-ms", "5"]
    ) as cluster:
        yield cluster


def _layers(topology):
    return {n["node_id"]: (n["shard"]["start_layer"], n["shard"]["end_layer"]) for n in topology["nodes"]}


def _wait_idle(cluster, timeout=5.0):
    """Every node holds no request caches (releases are sent in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        busy = {
            n["node_id"]: n["active_requests"]
            for n in cluster.get(next(iter(cluster.nodes)), "/v1/topology")[1]["nodes"]
            if n["active_requests"]
        }
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.1)


def test_topology_on_every_node_shows_all_nodes_and_layer_ranges(cluster3):
    for node_id in cluster3.nodes:
        status, topo = cluster3.get(node_id, "/v1/topology")
        assert status == 200
        assert topo["node_id"] == node_id
        assert _layers(topo) == {"a": (0, 14), "b": (15, 22), "c": (23, 29)}, topo
        assert [s["node_id"] for s in topo["plan"]] == ["a", "b", "c"]


def test_a_request_to_any_node_works(cluster3):
    for node_id in cluster3.nodes:
        assert cluster3.chat(node_id, CHAT) == DUMMY_ANSWER
    assert _wait_idle(cluster3) == {}  # every stage released its cache


def test_malformed_tensor_is_refused_and_the_node_keeps_serving(cluster3):
    spec = cluster3.nodes["b"].spec
    plan = (
        PlanStage("a", Shard("smollm2-135m", 0, 14, 30)),
        PlanStage("b", Shard("smollm2-135m", 15, 29, 30)),
    )
    step = StepMessage(
        "evil", 0, "a", plan, 1, SamplingParams(), 8, (), 0, hidden=np.zeros((2, 8), np.float32)
    )
    request = wire.step_to_pb(step)
    request.hidden.data = request.hidden.data[:10]  # 10 bytes for a [2, 8] float32 tensor
    auth = ClusterAuth(ClusterKey.from_token(cluster3.token), "test")  # a member may still send junk
    target = f"127.0.0.1:{spec.node_port}"
    with grpc.secure_channel(target, auth.channel_credentials(), auth.channel_options) as channel:
        stub = pb_grpc.NodeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.SendStep(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "bytes for shape [2, 8]" in info.value.details()
        request.hidden.data = b""
        request.hidden.dtype = "float64"
        with pytest.raises(grpc.RpcError) as info:
            stub.SendStep(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stub.Health(pb.HealthRequest(), timeout=5).node_id == "b"
    assert cluster3.chat("a", CHAT) == DUMMY_ANSWER
    assert cluster3.nodes["b"].alive()
    assert "refused peer message" in cluster3.nodes["b"].log()


def test_kill_a_middle_stage_mid_generation_and_the_stream_completes(cluster3):
    """kill -9 the middle stage after a few tokens: the origin re-plans without it and replays."""
    # the plan is a -> b -> c and the origin is a
    arrivals, events, killed_at = [], [], None
    for at, event in cluster3.stream_chat("a", CHAT, max_tokens=64):
        arrivals.append(at)
        events.append(event)
        if len(arrivals) == 4 and killed_at is None:
            cluster3.nodes["b"].kill()
            killed_at = time.monotonic()
    assert killed_at is not None
    assert stream_text(events) == DUMMY_ANSWER
    after = [t for t in arrivals if t > killed_at]
    stall = after[0] - killed_at if after else float("inf")
    print(f"\nstall after kill -9 of the middle stage: {stall * 1000:.0f} ms")
    assert stall < 3.0
    assert "stage failed; re-planning" in cluster3.nodes["a"].log()
    # discovery drops the dead node, and new requests plan around it
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        nodes = {n["node_id"] for n in cluster3.get("a", "/v1/topology")[1]["nodes"]}
        if nodes == {"a", "c"}:
            break
        time.sleep(0.2)
    assert nodes == {"a", "c"}
    assert cluster3.chat("c", CHAT) == DUMMY_ANSWER


@pytest.fixture(scope="module")
def cluster2(tmp_module):
    with Cluster.manual(["a", "b"], tmp=tmp_module / "two", extra_args=["--dummy-delay-ms", "20"]) as cluster:
        yield cluster


def test_four_concurrent_requests_over_a_two_node_pipeline(cluster2):
    _, topo = cluster2.get("a", "/v1/topology")
    assert _layers(topo) == {"a": (0, 14), "b": (15, 29)}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda node_id: cluster2.chat(node_id, CHAT), ["a", "b", "a", "b"]))
    assert texts == [DUMMY_ANSWER] * 4
    assert _wait_idle(cluster2) == {}


def test_stopping_a_stream_early_releases_every_stage(cluster2):
    stream = cluster2.stream_chat("a", CHAT, max_tokens=64)
    next(stream)
    next(stream)
    stream.close()  # the client goes away mid-generation
    assert _wait_idle(cluster2) == {}
    assert cluster2.chat("b", CHAT) == DUMMY_ANSWER
