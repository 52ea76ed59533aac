"""A 6,000-token prompt through the real 135M model over three real `exo` processes gives the
answer one node gives: the prompt crosses each hop in chunks (pipelined prefill), each stage's
cache fills chunk by chunk, and the last stage samples only after the last chunk.

The engine is tinygrad when installed, else mlx (EXO_TEST_CLUSTER_ENGINE picks one); skipped
when neither can run here.
"""

import os

import pytest

from exo_core.plugins import registry
from exo_core.testing.cluster import Cluster


def _engine():
    wanted = os.environ.get("EXO_TEST_CLUSTER_ENGINE")
    engines = registry().engines
    for name in [wanted] if wanted else ["tinygrad", "mlx"]:
        if name in engines and engines[name].available()[0]:
            return name
    return None


ENGINE = _engine()
pytestmark = [
    pytest.mark.skipif(ENGINE is None, reason="no real engine (tinygrad or mlx) is installed"),
    pytest.mark.timeout(900),
]


def _long_chat(words: int) -> list[dict[str, str]]:
    facts = [
        f"Item {i} is {['red', 'green', 'blue', 'amber'][i % 4]} and weighs {i * 7 % 31} grams."
        for i in range(words // 9)
    ]
    question = "Which colour is item 3? Answer in one word."
    return [{"role": "user", "content": " ".join(facts) + "\n\n" + question}]


@pytest.mark.heavy  # minutes on a 2-core machine: the engine builds graphs for each cache size
def test_a_6000_token_prompt_over_three_nodes_gives_the_one_node_answer(tmp_path):
    chat = _long_chat(4300)  # about 6,000 tokens with the template
    with Cluster.manual(["a", "b", "c"], tmp=tmp_path, engine=ENGINE, listed=["a"], timeout=300) as cluster:
        status, reply = cluster.post(
            "a",
            "/v1/chat/completions",
            {"model": "smollm2-135m", "messages": chat, "max_tokens": 8, "temperature": 0},
            timeout=600,
        )
        assert status == 200, reply
        prompt_tokens = reply["usage"]["prompt_tokens"]
        assert 5500 <= prompt_tokens <= 8000, prompt_tokens
        one_node = reply["choices"][0]["message"]["content"]
        cluster.list_peers(["a", "b", "c"])
        for node_id in "abc":
            cluster.wait_members(node_id, {"a", "b", "c"})
        three_nodes = cluster.chat("c", chat, max_tokens=8, timeout=600)
        print(f"\n{ENGINE}: {prompt_tokens}-token prompt: 1 node {one_node!r}, 3 nodes {three_nodes!r}")
        assert three_nodes == one_node
