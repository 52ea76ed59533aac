"""Pipelined prefill over real gRPC between nodes in one process: a long prompt goes from the
origin to stage 0 and crosses each hop in chunks of at most STEP_SLICE positions, in order, and
the answer is the one-node answer."""

import asyncio
import contextlib
import time

import pytest

from exo_core.engines.dummy import DUMMY_ANSWER
from exo_core.node.generate import TextRequest
from exo_core.node.stage import STEP_SLICE
from exo_core.runtime import NodeConfig, Runtime
from exo_core.testing.cluster import Cluster, NodeSpec, free_ports, write_peers_file

pytestmark = pytest.mark.timeout(90)


@contextlib.asynccontextmanager
async def cluster(tmp_path, ids):
    ports = free_ports(len(ids))
    specs = [
        NodeSpec(nid, port, 0, memory=2000 - i) for i, (nid, port) in enumerate(zip(ids, ports, strict=True))
    ]
    path = write_peers_file(tmp_path / "peers.json", specs)
    started = []
    try:
        for spec in specs:
            rt = Runtime(
                NodeConfig(
                    engine="dummy",
                    node_id=spec.node_id,
                    node_host="127.0.0.1",
                    node_port=spec.node_port,
                    discovery="manual",
                    discovery_config_path=str(path),
                    frontends=(),
                )
            )
            await rt.start()
            started.append(rt)
        deadline = time.monotonic() + 30
        while any(len(rt.node.peers) < len(ids) - 1 for rt in started):
            assert time.monotonic() < deadline, "the nodes did not find each other"
            await asyncio.sleep(0.05)
        yield {rt.node.node_id: rt for rt in started}
    finally:
        for rt in started:
            await rt.stop()


def record_steps(rt):
    """The (stage, start_pos, length, more) of every step the node receives, in arrival order."""
    seen = []
    receive = rt.node.receive_step

    async def recording(msg):
        seen.append((msg.stage_index, msg.start_pos, msg.length, msg.more))
        await receive(msg)

    rt.node.receive_step = recording
    return seen


async def answer(rt, text):
    request = TextRequest(model=rt.default_model, messages=[{"role": "user", "content": text}])
    prepared = rt.generator.prepare(request)
    return len(prepared.prompt_tokens), "".join([c.text async for c in rt.generator.stream(prepared)])


async def test_a_long_prompt_crosses_each_hop_in_ordered_chunks(tmp_path):
    async with cluster(tmp_path, ["a", "b", "c"]) as rts:
        assert [s.node_id for s in rts["a"].node.make_plan(rts["a"].default_model)] == ["a", "b", "c"]
        seen_a, seen_b, seen_c = record_steps(rts["a"]), record_steps(rts["b"]), record_steps(rts["c"])
        prompt_len, text = await answer(rts["a"], "word " * 1500)
        assert text == DUMMY_ANSWER
        assert prompt_len > 4 * STEP_SLICE
        for seen, stage in ((seen_a, 0), (seen_b, 1), (seen_c, 2)):
            prefill = [s for s in seen if s[0] == stage and s[1] < prompt_len]
            assert max(length for _, _, length, _ in prefill) <= STEP_SLICE  # never the whole prompt
            # in order, without gaps, and only the last chunk of the prompt says no more follow
            starts = [start for _, start, _, _ in prefill]
            assert starts == sorted(starts) and starts[0] == 0
            assert sum(length for _, _, length, _ in prefill) == prompt_len
            assert [more for *_, more in prefill] == [True] * (len(prefill) - 1) + [False]
        # decode steps afterwards are single positions
        assert all(length == 1 for stage, start, length, _ in seen_b if start >= prompt_len)


def test_a_6000_token_prompt_over_three_processes(tmp_path):
    """Three `exo` processes: the prompt crosses two hops in chunks and the answer is the dummy's."""
    chat = [{"role": "user", "content": " ".join(f"w{i % 89}" for i in range(2060))}]
    with Cluster.manual(["a", "b", "c"], tmp=tmp_path, memory=[3000, 2000, 1000]) as procs:
        status, reply = procs.post(
            "c", "/v1/chat/completions", {"model": "smollm2-135m", "messages": chat, "temperature": 0}
        )
        assert status == 200, reply
        assert 5500 <= reply["usage"]["prompt_tokens"] <= 8000, reply["usage"]
        assert reply["choices"][0]["message"]["content"] == DUMMY_ANSWER
