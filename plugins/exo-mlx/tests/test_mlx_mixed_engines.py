"""Mixed engines: MLX and tinygrad each run half of the model and hand hidden states across.

Hidden states cross as float32 numpy [T, hidden], the engine-neutral wire type, so one half
on MLX and the other on tinygrad must give the one-node greedy answer (llama.cpp's).
"""

from __future__ import annotations

import asyncio

import pytest

from exo_core.testing import engine_class


def _engine(name):
    try:
        return engine_class(name)
    except LookupError:
        return None


def tinygrad_engine_class():
    cls = _engine("tinygrad")
    if cls is None:
        pytest.skip("the tinygrad engine is not registered (plugins/exo-tinygrad has no engine yet)")
    ok, reason = cls.available()
    if not ok:
        pytest.skip(f"the tinygrad engine cannot run here: {reason}")
    return cls


@pytest.fixture(scope="module")
def tinygrad_class():
    return tinygrad_engine_class()


def load_tinygrad(kit, cls, card, start: int, end: int):
    engine = cls({"max_context": None})

    async def load():
        await engine.load(kit.shard_of(card, start, end), card)

    asyncio.run(load())
    return engine


def test_half_on_mlx_half_on_tinygrad_gives_one_node_answer(kit, tinygrad_class, card, reference):
    """In one process: MLX runs layers 0-14, tinygrad 15-29, hidden states handed over as numpy."""
    first, second = kit.load_engine(card, 0, 14), load_tinygrad(kit, tinygrad_class, card, 15, 29)
    stages = [(first, kit.shard_of(card, 0, 14)), (second, kit.shard_of(card, 15, 29))]
    chat = reference["greedy"][0]
    try:
        assert asyncio.run(kit.greedy(stages, chat["prompt_ids"])) == kit.expected_answer(chat)
    finally:
        for engine, _ in stages:
            asyncio.run(engine.close())


def tinygrad_usable() -> bool:
    cls = _engine("tinygrad")
    return cls is not None and cls.available()[0]


def test_two_process_cluster_gives_one_node_answer(card, reference, tmp_path, kit):
    """Two `exo run` processes over gRPC: node a on mlx (layers 0-14), node b (15-29) on tinygrad.

    Without a usable tinygrad engine node b runs mlx too, so the cluster path of this engine is
    still exercised (the in-process mixed test above then says why it skipped).
    """
    second_engine = "tinygrad" if tinygrad_usable() else "mlx"
    from exo_core import load_tokenizer
    from exo_core.testing.cluster import Cluster

    chat = reference["greedy"][0]
    expected = [t for t in kit.expected_answer(chat) if t != kit.EOS]
    with Cluster.manual(
        ["a", "b"],
        tmp=tmp_path,
        engine="mlx",
        per_node_args={"b": ["--engine", second_engine]},
        timeout=180,
    ) as cluster:
        status, topology = cluster.get("a", "/v1/topology")
        assert status == 200
        layers = {
            n["node_id"]: (n["shard"]["start_layer"], n["shard"]["end_layer"]) for n in topology["nodes"]
        }
        assert layers == {"a": (0, 14), "b": (15, 29)}, topology
        engines = {node: cluster.get(node, "/healthcheck")[1]["engine"] for node in ("a", "b")}
        assert engines == {"a": "mlx", "b": second_engine}
        text = cluster.chat("a", chat["messages"], max_tokens=kit.N_TOKENS)
    assert text == load_tokenizer(card).decode(expected, skip_special=True)
