"""Real `exo` processes while the cluster changes: a peer joins while the real 135M model streams
an answer (the answer is the one-node answer; a new request gets the two-node plan and its own
answer), a stop during a long prefill ends the process within 2 s, and 1,000 requests in a row
leave no state and no memory behind.

The real engine is tinygrad when installed, else mlx (EXO_TEST_CLUSTER_ENGINE picks one).
"""

from __future__ import annotations

import concurrent.futures
import signal
import time
from pathlib import Path

import pytest
from core_helpers import real_cluster_engine

from exo_core.plugins import registry
from exo_core.testing.cluster import Cluster, stream_text

ENGINE = real_cluster_engine()
pytestmark = pytest.mark.timeout(600)
real_engine = pytest.mark.skipif(ENGINE is None, reason="no real engine (tinygrad or mlx) is installed")


@real_engine
def test_a_peer_joins_while_an_answer_streams(tmp_path, reference):
    story, colors = reference["greedy"][-1], reference["greedy"][1]
    with Cluster.manual(["a", "b"], tmp=tmp_path, engine=ENGINE, listed=["a"], timeout=300) as cluster:
        alone = cluster.chat("a", story["messages"], max_tokens=48)
        colors_alone = cluster.chat("a", colors["messages"], max_tokens=12)
        events, joined_at, second = [], None, None
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            for _, event in cluster.stream_chat("a", story["messages"], max_tokens=48):
                events.append(event)
                if len(events) == 4:  # a streams alone; b joins: new requests get a two-node plan
                    cluster.list_peers(["a", "b"])
                    cluster.wait_members("a", {"a", "b"})
                    joined_at = len(events)
                    second = pool.submit(cluster.chat, "a", colors["messages"], max_tokens=12)
            assert stream_text(events) == alone
            assert second is not None and second.result() == colors_alone
        _, topo = cluster.get("a", "/v1/topology")
        assert [s["node_id"] for s in topo["plan"]] == ["a", "b"]
        assert joined_at is not None and joined_at < len(events)  # the join happened mid-answer
        assert "stage failed" not in cluster.nodes["a"].log()


@real_engine
def test_a_stop_during_a_long_prefill_ends_the_process_within_2_s(tmp_path):
    prompt = [{"role": "user", "content": "Count the words. " + "alpha beta gamma delta " * 1200}]
    with Cluster.manual(["s"], tmp=tmp_path, engine=ENGINE, timeout=300) as cluster:
        node = cluster.nodes["s"]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                cluster.post, "s", "/v1/chat/completions", {"model": "smollm2-135m", "messages": prompt}, 60
            )
            time.sleep(3.0)  # tokenized and prefilling (minutes of work on this machine)
            assert not pending.done()
            started = time.monotonic()
            node.kill(signal.SIGTERM)
            assert node.proc is not None
            node.proc.wait(10)
            took = time.monotonic() - started
            with pytest.raises(OSError):  # the connection closed: no answer
                pending.result()
        print(f"\n{ENGINE}: stopped {took:.2f} s after SIGTERM during a prefill")
        assert took < 2.0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _own_active_requests(cluster: Cluster, node_id: str) -> int:
    _, topo = cluster.get(node_id, "/v1/topology")
    return next(n["active_requests"] for n in topo["nodes"] if n["self"])


def test_a_thousand_requests_in_a_row_leave_nothing_behind(tmp_path):
    """Two nodes (dummy engine): after 1,000 requests no stage holds one, and memory is flat."""
    chat = [{"role": "user", "content": "Hi"}]
    with Cluster.manual(["a", "b"], tmp=tmp_path, engine="dummy") as cluster:
        pids = {n: p.proc.pid for n, p in cluster.nodes.items() if p.proc is not None}
        for i in range(1000):
            if i == 200:  # warm: every pool and cache has its steady size
                before = {n: _rss_mb(pid) for n, pid in pids.items()}
            assert cluster.chat("ab"[i % 2], chat, max_tokens=2)
        after = {n: _rss_mb(pid) for n, pid in pids.items()}
        deadline = time.monotonic() + 10
        while any(_own_active_requests(cluster, n) for n in "ab") and time.monotonic() < deadline:
            time.sleep(0.1)  # the last releases travel in the background
        assert [_own_active_requests(cluster, n) for n in "ab"] == [0, 0]
        print(f"\nRSS MB after 200 and 1,000 requests: {before} -> {after}")
        for n in "ab":
            assert after[n] - before[n] < 20, (n, before[n], after[n])


@real_engine
async def test_two_model_cards_at_once_on_one_node(reference):
    """Two cards for the same GGUF, asked at once on one node: each answer is its answer alone."""
    import asyncio
    import dataclasses

    from exo_core.testing import chat, node

    card = registry().models["smollm2-135m"]
    copy = dataclasses.replace(card, id="smollm2-copy", name="SmolLM2 again", aliases=())
    chats = [(reference["greedy"][0]["messages"], card.id), (reference["greedy"][1]["messages"], copy.id)]
    async with node(ENGINE, models=[copy]) as runtime:
        alone = [(await chat(runtime, m, model=model_id, max_tokens=8)).text for m, model_id in chats]
        together = await asyncio.gather(
            *(chat(runtime, m, model=model_id, max_tokens=8) for m, model_id in [*chats, *chats])
        )
        assert [a.text for a in together] == alone * 2
        assert {s.model_id for s in runtime.node.engine.loaded_shards} == {card.id, copy.id}
