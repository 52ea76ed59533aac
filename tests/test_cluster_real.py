"""The real 135M model over real `exo` processes: greedy answers on 2 and 3 nodes are the ones a
single node gives, for the reference chats; a stage killed mid-answer changes nothing but time.

The engine is tinygrad when installed, else mlx (EXO_TEST_CLUSTER_ENGINE picks one); the tests
skip when neither can run here. Three processes are started once and the shared peers file is
rewritten to make the cluster 1, 2, then 3 nodes.
"""

import concurrent.futures
import itertools
import time

import pytest
from core_helpers import real_cluster_engine

from exo_core.testing.cluster import Cluster, stream_text

STALL_BOUND_S = 3.0  # after kill -9 of a stage, before the next token (see the kill test)
ENGINE = real_cluster_engine()
pytestmark = [
    pytest.mark.skipif(ENGINE is None, reason="no real engine (tinygrad or mlx) is installed"),
    pytest.mark.timeout(600),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real-cluster")
    # EXO_WARM=0 here too: the root conftest sets it per test, after a module's fixtures start
    # their nodes, which would otherwise build every graph in the background (minutes of CPU
    # on a cold EXO_HOME, each capture holding the engine thread) while the tests run.
    with Cluster.manual(
        ["a", "b", "c"], tmp=tmp, engine=ENGINE, listed=["a"], timeout=300, env={"EXO_WARM": "0"}
    ) as c:
        yield c


MAX_TOKENS = 16  # enough to show a divergence; the kill test streams 64


def _tokens(chat):
    return min(len(chat["completion_ids"]), MAX_TOKENS)


@pytest.fixture(scope="module")
def single_node_answers(cluster, reference):
    """What one node answers (greedy) to each reference chat."""
    cluster.list_peers(["a"])
    cluster.wait_members("a", {"a"})
    answers = [cluster.chat("a", chat["messages"], max_tokens=_tokens(chat)) for chat in reference["greedy"]]
    for chat, answer in zip(reference["greedy"], answers, strict=True):
        print(f"\n{ENGINE} 1 node: {answer!r} (llama.cpp: {chat['completion_text']!r})")
    return answers


def _layer_ranges(cluster, node_id, expected, timeout=30.0):
    """The layer ranges node_id's /v1/topology shows, once they are `expected` (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        _, topo = cluster.get(node_id, "/v1/topology")
        ranges = {n["node_id"]: (n["shard"]["start_layer"], n["shard"]["end_layer"]) for n in topo["nodes"]}
        if ranges == expected or time.monotonic() > deadline:
            return ranges
        time.sleep(0.2)  # every node re-reads the peers file within a second or so


def test_two_nodes_answer_like_one(cluster, reference, single_node_answers):
    answers = single_node_answers
    cluster.list_peers(["a", "b"])
    cluster.wait_members("a", {"a", "b"})
    cluster.wait_members("b", {"a", "b"})
    for node_id in ("a", "b"):
        expected = {"a": (0, 14), "b": (15, 29)}
        assert _layer_ranges(cluster, node_id, expected) == expected
    for i, chat in enumerate(reference["greedy"]):
        node_id = "ab"[i % 2]  # a request to any node works
        assert cluster.chat(node_id, chat["messages"], max_tokens=_tokens(chat)) == answers[i]


@pytest.mark.heavy
def test_four_concurrent_requests_on_two_nodes(cluster, reference, single_node_answers):
    answers = single_node_answers
    cluster.list_peers(["a", "b"])
    cluster.wait_members("a", {"a", "b"})
    chats = [reference["greedy"][i % 2] for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(
            pool.map(
                lambda ic: cluster.chat("ab"[ic[0] % 2], ic[1]["messages"], max_tokens=_tokens(ic[1])),
                enumerate(chats),
            )
        )
    assert got == [answers[i % 2] for i in range(4)]


@pytest.mark.heavy
def test_three_nodes_answer_like_one(cluster, reference, single_node_answers):
    answers = single_node_answers
    cluster.list_peers(["a", "b", "c"])
    for node_id in "abc":
        cluster.wait_members(node_id, {"a", "b", "c"})
        expected = {"a": (0, 9), "b": (10, 19), "c": (20, 29)}
        assert _layer_ranges(cluster, node_id, expected) == expected
    for i, chat in enumerate(reference["greedy"]):
        assert cluster.chat("abc"[i], chat["messages"], max_tokens=_tokens(chat)) == answers[i]


@pytest.mark.heavy
def test_kill_a_stage_mid_answer_and_the_text_is_unchanged(cluster, reference):
    """kill -9 stage 2 of a 64-token greedy answer: the stream completes with the same text."""
    cluster.list_peers(["a"])
    cluster.wait_members("a", {"a"})
    story = cluster.chat("a", reference["greedy"][-1]["messages"], max_tokens=64)
    cluster.list_peers(["a", "b", "c"])
    cluster.wait_members("a", {"a", "b", "c"})
    arrivals, events, killed_at = [], [], None
    for at, event in cluster.stream_chat("a", reference["greedy"][-1]["messages"], max_tokens=64):
        events.append(event)
        arrivals.append(at)
        if len(arrivals) == 16 and killed_at is None:
            killed_at, killed_wall = time.monotonic(), time.time()
            cluster.nodes["b"].kill()
    assert stream_text(events) == story
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # The stall: the longest wait for a token from the kill on (the first token after it may have
    # been on its way already; the replay's comes later).
    after = [killed_at, *(t for t in arrivals if t > killed_at)]
    stall = max(b - a for a, b in itertools.pairwise(after))
    print(
        f"\n{ENGINE}: stall after kill -9 of stage 2: {stall:.2f} s (median gap "
        f"{sorted(gaps)[len(gaps) // 2]:.3f} s; killed at {killed_wall:.3f}, gaps after: "
        f"{[round(b - a, 3) for a, b in itertools.pairwise(after)][:8]})"
    )
    assert "stage failed; re-planning" in cluster.nodes["a"].log()
    # a answered alone before, so it holds every layer: the replay runs there without loading any.
    # The link reports b's reset stream within tens of ms; measured 0.12-0.20 s, also with two
    # busy loops on a 2-core machine. (A CI run saw 4.3 s, and runs hung, while every node built
    # its graphs in the background: the fixture now turns warming off, as for every other test.)
    assert stall < STALL_BOUND_S, f"stall after kill -9: {stall:.2f} s"
