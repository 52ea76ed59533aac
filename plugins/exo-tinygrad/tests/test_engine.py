"""The engine on the real embedded SmolLM2-135M (Q4_1 GGUF), on CPU.

Loaded engines are shared (session/module fixtures): loading and the first TinyJit capture
of each graph cost seconds, the steps after that milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from exo_tinygrad import loader

from exo_core import ModelCard, Shard, StageInput
from exo_core.checkpoint import read_gguf, to_hf
from exo_core.testing import engine_checks

EOS = 2


@pytest.fixture(scope="module")
def halves(card, load_engine):
    """Layers 0-14 and 15-29 on two engines."""
    first = load_engine(card, Shard(card.id, 0, 14, 30))
    second = load_engine(card, Shard(card.id, 15, 29, 30))
    yield first, second
    for e in (first, second):
        asyncio.run(e.close())


@pytest.fixture(scope="module")
def prompts(reference) -> list[list[int]]:
    return [case["prompt_ids"] for case in reference["greedy"]]


async def test_reference_chats_match_llamacpp(engine, card, reference):
    """Greedy answers equal llama.cpp's first 8 completion tokens; France's says Paris."""
    from exo_core import load_tokenizer

    stages = [(engine, Shard.whole(card.id, card.n_layers))]
    answers = []
    for case in reference["greedy"]:
        expected = case["completion_ids"][:8]
        run = await engine_checks.greedy(stages, case["prompt_ids"], 8, "reference")
        assert run.tokens[: len(expected)] == expected, case["messages"]
        answers.append(run.tokens)
    france = answers[0]
    text = load_tokenizer(card).decode(france[: france.index(EOS)] if EOS in france else france)
    assert "Paris" in text, text


async def test_interleaved_requests_equal_each_alone(engine, card, prompts):
    await engine_checks.check_interleaved_equals_alone(engine, card, prompts[:2], steps=4)


async def test_batched_decode_equals_unbatched(engine, card, prompts):
    await engine_checks.check_batch_equals_single(engine, card, prompts, steps=4)


async def test_release_frees_the_cache(engine, card, prompts):
    await engine_checks.check_release_frees_cache(engine, card, prompts[1])
    assert engine.cached_requests() == 0


async def test_two_half_shards_chained_equal_the_whole_model(engine, halves, card, prompts):
    first, second = halves
    await engine_checks.check_shards_chain(engine, first, second, card, prompts[0], split=15, steps=4)


def test_half_shard_holds_only_its_layers(halves, gguf_file):
    """Weight memory of layers 0-14 is about what those layers take in the file (quantised)."""
    first, second = halves
    in_file = sum(
        t.nbytes
        for t in read_gguf(gguf_file, string_arrays=False).tensors.values()
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) < 15
    )
    assert 0.9 * in_file < first.weight_bytes() < 1.25 * in_file, (first.weight_bytes(), in_file)
    # the second half holds the same layers' worth plus the head (the tied embedding)
    assert second.weight_bytes() > first.weight_bytes() + 25e6


async def test_event_loop_keeps_running_during_a_step(engine, card, prompts):
    """Compute runs on the engine's worker thread, not on the event loop."""
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    start = time.perf_counter()
    shard = Shard.whole(card.id, card.n_layers)
    await engine.forward(shard, StageInput("loop-check", tokens=np.asarray(prompts[0] * 3)))
    elapsed = time.perf_counter() - start
    task.cancel()
    await engine.release("loop-check")
    assert ticks >= min(3, int(elapsed / 0.005) // 4), (ticks, elapsed)


# ---- safetensors written from the GGUF -------------------------------------------------------


def hf_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """GGUF's q/k row order back to Hugging Face's (the inverse of llama.cpp's permute)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    offsets, at = {}, 0
    for name, t in tensors.items():
        offsets[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [at, at + t.nbytes]}
        at += t.nbytes
    header = json.dumps(offsets).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t, dtype=np.float32).tobytes())


@pytest.fixture(scope="module")
def safetensors_dirs(tmp_path_factory, gguf_file, gguf_reader):
    """The embedded model as float32 safetensors + config.json: one file, and split in two."""
    meta = read_gguf(gguf_file, string_arrays=False).metadata
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tensors = {}
    for t in gguf_reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if ".attn_q." in t.name:
            values = hf_rows(values, heads)
        elif ".attn_k." in t.name:
            values = hf_rows(values, kv_heads)
        tensors[to_hf(t.name)] = values
    config = {
        "model_type": "llama",
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta["llama.rope.freq_base"],
        "max_position_embeddings": meta["llama.context_length"],
        "vocab_size": meta["llama.vocab_size"],
        "tie_word_embeddings": True,
    }
    single = tmp_path_factory.mktemp("safetensors-single")
    (single / "config.json").write_text(json.dumps(config))
    write_safetensors(single / "model.safetensors", tensors)
    split = tmp_path_factory.mktemp("safetensors-split")
    (split / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in parts.items():
        write_safetensors(split / file, {n: tensors[n] for n in part})
        weight_map.update(dict.fromkeys(part, file))
    (split / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return single, split


def test_sharded_safetensors_read_like_a_single_file(safetensors_dirs):
    single, split = safetensors_dirs
    shard = Shard("m", 28, 29, 30)
    a, b = loader.load_shard(single, shard), loader.load_shard(split, shard)
    assert a.config == b.config
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert np.array_equal(a.tensors[name], b.tensors[name]), name


async def test_safetensors_give_the_same_logits_as_the_gguf(
    engine, card, safetensors_dirs, prompts, load_engine
):
    single, _ = safetensors_dirs
    st_card = ModelCard(card.id, "SmolLM2 safetensors", card.n_layers, {"safetensors": str(single)})
    st_engine = await asyncio.to_thread(load_engine, st_card)
    try:
        shard = Shard.whole(card.id, card.n_layers)
        from_gguf = await engine_checks.greedy([(engine, shard)], prompts[1], 2, "gguf")
        from_st = await engine_checks.greedy([(st_engine, shard)], prompts[1], 2, "safetensors")
        assert from_st.tokens == from_gguf.tokens
        for a, b in zip(from_gguf.logits, from_st.logits, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=2e-3 * np.abs(a).max())
    finally:
        await st_engine.close()
