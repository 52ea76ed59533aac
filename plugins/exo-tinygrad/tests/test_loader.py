"""Loader: shard-aware reading, GGUF's q/k row order, and clear errors for bad files."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from exo_tinygrad import loader, quant
from exo_tinygrad.engine import TinygradEngine

from exo_core import EngineError, Shard, StageInput


def llamacpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k permutation (Hugging Face rotate-half -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("heads", [1, 3, 9])
def test_unpermute_undoes_llamacpp_permutation(heads):
    rng = np.random.default_rng(heads)
    hf = rng.standard_normal((heads * 64, 32)).astype(np.float32)
    assert np.array_equal(loader._unpermute_rows(llamacpp_permute(hf, heads), heads), hf)
    # quantised weights move row by row, their scales and offsets with them
    rows = np.arange(heads * 64.0)[:, None]
    u = quant.Unpacked(
        llamacpp_permute(hf, heads).astype(np.int8),
        llamacpp_permute(rows, heads),
        llamacpp_permute(-rows, heads),
        32,
        8,
    )
    back = loader._unpermute_rows(u, heads)
    assert np.array_equal(back.q, hf.astype(np.int8))
    assert np.array_equal(back.scale, rows) and np.array_equal(back.offset, -rows)


def test_shard_reads_only_its_layers(gguf_file):
    middle = loader.load_shard(gguf_file, Shard("m", 10, 12, 30))
    layers = {int(n.split(".")[1]) for n in middle.tensors if n.startswith("blk.")}
    assert layers == {10, 11, 12}
    assert not any(n.startswith(("token_embd", "output")) for n in middle.tensors)
    assert middle.embed is None
    first = loader.load_shard(gguf_file, Shard("m", 0, 0, 30))
    assert first.embed is not None and "token_embd.weight" not in first.tensors  # looked up on the host
    last = loader.load_shard(gguf_file, Shard("m", 29, 29, 30))
    assert "token_embd.weight" in last.tensors  # tied head
    assert last.config.tied_embeddings


def test_embedding_rows_match_reference_dequantizer(gguf_file, gguf_reader):
    weights = loader.load_shard(gguf_file, Shard("m", 0, 0, 30))
    embd = next(t for t in gguf_reader.tensors if t.name == "token_embd.weight")
    ids = np.array([0, 1, 4649, 49151])
    expected = gguf.quants.dequantize(embd.data[ids], embd.tensor_type)
    np.testing.assert_allclose(weights.embed(ids), expected, rtol=1e-6)


def test_max_context_caps_the_model(gguf_file):
    assert loader.load_shard(gguf_file, Shard("m", 0, 0, 30)).config.max_context == 8192
    assert loader.load_shard(gguf_file, Shard("m", 0, 0, 30), max_context=300).config.max_context == 300


# ---- bad input: the error names the file and the reason --------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(EngineError, match=r"nope\.gguf.*no such file"):
        loader.load_shard(missing, Shard("m", 0, 0, 1))


def test_missing_file_through_the_engine(tmp_path, tiny_card):
    card = tiny_card(tmp_path / "absent.gguf")
    with pytest.raises(EngineError, match=r"absent\.gguf"):
        asyncio.run(TinygradEngine().load(Shard.whole(card.id, card.n_layers), card))


@pytest.mark.parametrize("keep", [0.5, 0.002])
def test_truncated_gguf(tmp_path, gguf_file, keep):
    cut = tmp_path / "cut.gguf"
    data = gguf_file.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(EngineError, match=r"cut\.gguf: not a complete GGUF file"):
        loader.load_shard(cut, Shard("m", 0, 29, 30))


def test_not_a_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"hello, this is not a model" * 10)
    with pytest.raises(EngineError, match=r"junk\.gguf.*no GGUF magic"):
        loader.load_shard(junk, Shard("m", 0, 0, 1))


def test_unsupported_quantisation(tmp_path, tiny_gguf):
    path = tiny_gguf(tmp_path / "q2k.gguf", q_type=int(gguf.GGMLQuantizationType.Q2_K))
    with pytest.raises(EngineError, match=r"q2k\.gguf: tensor blk\.0\.attn_q\.weight is stored as Q2_K"):
        loader.load_shard(path, Shard("m", 0, 1, 2))


def test_not_llama_family(tmp_path, tiny_gguf):
    path = tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(EngineError, match=r"gpt2\.gguf: architecture 'gpt2' is not Llama-family"):
        loader.load_shard(path, Shard("m", 0, 1, 2))


def test_layer_count_mismatch(tmp_path, tiny_gguf):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(EngineError, match=r"tiny\.gguf: the file has 2 layers"):
        loader.load_shard(path, Shard("m", 0, 3, 4))


def test_safetensors_errors(tmp_path):
    with pytest.raises(EngineError, match=r"no config\.json"):
        loader.load_shard(tmp_path, Shard("m", 0, 0, 1))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma"}))
    with pytest.raises(EngineError, match=r"config\.json: model_type 'gemma' is not Llama-family"):
        loader.load_shard(tmp_path, Shard("m", 0, 0, 1))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(EngineError, match=r"no model\.safetensors"):
        loader.load_shard(tmp_path, Shard("m", 0, 0, 1))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(EngineError, match=r"model\.safetensors: not a complete safetensors file"):
        loader.load_shard(tmp_path, Shard("m", 0, 0, 1))


# ---- the tiny model runs, and its context limit is enforced --------------------------------


def test_tiny_model_context_limit(tmp_path, tiny_gguf, tiny_card, tiny_dims, load_engine):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    card = tiny_card(path)
    engine = load_engine(card, max_context=40)
    shard = Shard.whole(card.id, card.n_layers)

    async def run():
        out = await engine.forward(shard, StageInput("a", tokens=np.arange(30)))
        assert out.logits.shape == (tiny_dims["vocab"],) and np.isfinite(out.logits).all()
        with pytest.raises(EngineError, match="needs 41 positions; the context of this shard is 40"):
            await engine.forward(shard, StageInput("a", tokens=np.arange(11), start_pos=30))
        with pytest.raises(EngineError, match="token id out of range"):
            await engine.forward(shard, StageInput("b", tokens=np.array([tiny_dims["vocab"]])))
        await engine.close()

    asyncio.run(run())


def test_copy_of_file_is_read_the_same(tmp_path, gguf_file):
    """The loader reads by path (memory-mapped); a copy elsewhere loads identically."""
    copy = tmp_path / "copy.gguf"
    shutil.copy(gguf_file, copy)
    a = loader.load_shard(gguf_file, Shard("m", 29, 29, 30)).tensors["blk.29.ffn_down.weight"]
    b = loader.load_shard(Path(copy), Shard("m", 29, 29, 30)).tensors["blk.29.ffn_down.weight"]
    assert np.array_equal(a.q, b.q) and np.array_equal(a.scale, b.scale)


def test_replay_matches_tinyjit(tmp_path, tiny_gguf, tiny_card, load_engine, monkeypatch):
    """Captured graphs replayed by exo_tinygrad.replay give what TinyJit itself gives."""
    card = tiny_card(tiny_gguf(tmp_path / "tiny.gguf"))
    shard = Shard.whole(card.id, card.n_layers)

    async def decode(engine) -> list[np.ndarray]:
        out = [(await engine.forward(shard, StageInput("r", tokens=np.arange(20)))).logits]
        for step in range(4):
            items = [StageInput("r", tokens=np.array([step + 3]), start_pos=20 + step)]
            out.append((await engine.forward_batch(shard, items))[0].logits)
        graphs = [*engine._runner._jits.prefill.values(), *engine._runner._jits.decode.values()]
        replayed.append(all(g.replay is not None for g in graphs))
        await engine.close()
        return out

    replayed: list[bool] = []

    fast_engine = load_engine(card)
    fast = asyncio.run(decode(fast_engine))
    monkeypatch.setenv("EXO_TINYGRAD_REPLAY", "0")
    slow = asyncio.run(decode(load_engine(card)))
    assert replayed == [True, False]
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a, b)
