"""Three `exo run --engine rkllm` processes, each with its own stand-in board, found through a
manual peers file: six concurrent requests are all answered, two on each board."""

from __future__ import annotations

import contextlib
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from exo_rkllm.fake_server import fake_answer, in_subprocess

from exo_core.testing.cluster import Cluster


def fake_state(url: str) -> dict:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        url + "/_fake/state", timeout=10
    ) as r:
        return json.loads(r.read())


def test_three_rkllm_nodes_share_six_concurrent_requests(tmp_path):
    with contextlib.ExitStack() as stack:
        urls = [
            stack.enter_context(
                in_subprocess("--dialect", dialect, "--tokens-per-second", "100", "--first-token-ms", "50")
            )
            for dialect in ("fork", "upstream", "fork")
        ]
        nodes = ["a", "b", "c"]
        cluster = stack.enter_context(
            Cluster.manual(
                nodes,
                tmp=tmp_path,
                engine="rkllm",
                per_node_args={n: ["--rkllm-server", u] for n, u in zip(nodes, urls, strict=True)},
            )
        )
        questions = [[{"role": "user", "content": f"question {i} — ça va ?"}] for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda q: cluster.chat("a", q), questions))
        states = [fake_state(u) for u in urls]
    for question, answer in zip(questions, answers, strict=True):
        assert answer == fake_answer(question)
    assert [s["generations"] for s in states] == [2, 2, 2], cluster.logs()
    assert all(s["max_concurrent"] == 1 for s in states)
