"""exo_core.models.checkpoint against real files: the embedded GGUF, GGUFs and safetensors written here.

llama.cpp's `gguf` package (a test dependency) writes the small GGUFs and is the reference
the GGUF reader is compared with; safetensors files are written byte by byte from the format.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gguf
import numpy as np
import pytest

from exo_core.engine import EngineError
from exo_core.models.cards import ModelCard
from exo_core.models.checkpoint import (
    GGML_TYPES,
    GLOBAL_MODULES,
    HF,
    LAYER_MODULES,
    CheckpointError,
    GGUFFormatError,
    LlamaConfig,
    SafetensorsCheckpoint,
    llama3_rope_factors,
    module_name,
    read_gguf,
    read_hf_checkpoint,
    read_llama_config,
    read_safetensors_header,
    shard_modules,
    shard_tensors,
    to_gguf,
    to_hf,
)
from exo_core.models.files import ModelFilesError, embedded_gguf_path, shard_checkpoint
from exo_core.models.shard import Shard


@pytest.fixture(scope="module")
def embedded() -> Path:
    return embedded_gguf_path()


@pytest.fixture(scope="module")
def reference_reader(embedded) -> gguf.GGUFReader:
    return gguf.GGUFReader(str(embedded))


# ---- GGUF: the embedded model -----------------------------------------------------------------


def test_embedded_header(embedded):
    file = read_gguf(embedded)
    assert file.version == 3
    assert file.metadata["general.architecture"] == "llama"
    assert file.metadata["llama.block_count"] == 30
    assert len(file.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(file.tensors) == 2 + 30 * 9  # embedding, final norm, nine tensors a layer (tied head)
    embd = file.tensors["token_embd.weight"]
    assert embd.shape == (49152, 576) and embd.dims == (576, 49152) and embd.type_name == "Q8_0"
    assert file.tensors["blk.0.attn_q.weight"].type_name == "Q4_1"


def test_embedded_byte_ranges_tile_the_data(embedded):
    """Tensors lie after the aligned header, in order, without overlap, up to the file's end."""
    file = read_gguf(embedded, string_arrays=False)
    assert file.data_offset % file.alignment == 0
    ranges = sorted((t.offset, t.offset + t.nbytes) for t in file.tensors.values())
    assert ranges[0][0] == file.data_offset
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end <= start < end + file.alignment  # only alignment padding between tensors
    assert ranges[-1][1] <= file.file_size == embedded.stat().st_size < ranges[-1][1] + file.alignment


def test_embedded_matches_llamacpp_reader(embedded, reference_reader):
    file = read_gguf(embedded)
    expected = {
        t.name: (int(t.data_offset), int(t.tensor_type), int(t.n_bytes), tuple(int(d) for d in t.shape))
        for t in reference_reader.tensors
    }
    assert {t.name: (t.offset, t.ggml_type, t.nbytes, t.dims) for t in file.tensors.values()} == expected
    for key, field in reference_reader.fields.items():
        if not key.startswith("GGUF."):
            assert file.metadata[key] == field.contents(), key
    for t in reference_reader.tensors[:6]:  # mapped bytes are the tensor's bytes
        np.testing.assert_array_equal(file.tensor_array(t.name), t.data)


def test_without_string_arrays_only_those_are_left_out(embedded):
    full, light = read_gguf(embedded).metadata, read_gguf(embedded, string_arrays=False).metadata
    left_out = set(full) - set(light)
    assert "tokenizer.ggml.tokens" in left_out and "tokenizer.ggml.merges" in left_out
    assert all(isinstance(full[k], list) and isinstance(full[k][0], str) for k in left_out)
    assert {k: full[k] for k in light} == light


def test_embedded_config(embedded):
    config = read_llama_config(embedded)
    assert (config.arch, config.dim, config.n_layers, config.n_heads, config.n_kv_heads) == (
        "llama",
        576,
        30,
        9,
        3,
    )
    assert (config.head_dim, config.hidden_dim, config.vocab_size, config.max_context) == (
        64,
        1536,
        49152,
        8192,
    )
    assert config.rope_theta == 100000.0 and config.norm_eps == pytest.approx(1e-5)
    assert config.tied_embeddings and not config.qkv_bias and config.rope_freq_factors is None
    assert config.expected_shape("blk.3.attn_k.weight") == (192, 576)
    assert config.expected_shape("blk.3.rope_x") is None


# ---- GGUF: bad files --------------------------------------------------------------------------


def test_gguf_errors_name_the_file(tmp_path, embedded):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(CheckpointError, match=r"nope\.gguf: no such file"):
        read_gguf(missing)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"hello, this is not a model" * 10)
    with pytest.raises(GGUFFormatError, match=r"junk\.gguf: not a GGUF file \(no GGUF magic"):
        read_gguf(junk)
    data = embedded.read_bytes()
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:200_000])  # inside the vocabulary
    with pytest.raises(
        GGUFFormatError, match=r"head\.gguf: not a complete GGUF file \(the header is truncated"
    ):
        read_gguf(head, string_arrays=False)
    body = tmp_path / "body.gguf"
    body.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        GGUFFormatError, match=r"body\.gguf: not a complete GGUF file \(tensor .* ends past the end"
    ):
        read_gguf(body)
    v9 = tmp_path / "v9.gguf"
    v9.write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0))
    with pytest.raises(GGUFFormatError, match="version 9"):
        read_gguf(v9)
    assert issubclass(GGUFFormatError, EngineError)  # engines pass these straight to the user


# ---- GGUF: small files written by llama.cpp's writer ------------------------------------------

DIM, HEADS, KV_HEADS, HIDDEN, LAYERS, VOCAB = 64, 4, 2, 128, 2, 48


def write_gguf(
    path: Path, *, arch="llama", alignment=None, head=True, biases=False, meta=None, extra=None
) -> Path:
    """A small Llama-family GGUF of random F32/F16/Q8_0 tensors; `extra` adds tensors, `meta` keys."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(DIM)
    writer.add_feed_forward_length(HIDDEN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    for key, value in (meta or {}).items():
        writer.add_string(key, value) if isinstance(value, str) else writer.add_float32(key, value)
    q = gguf.GGMLQuantizationType.Q8_0
    shapes = {"token_embd.weight": (VOCAB, DIM), "output_norm.weight": (DIM,)}
    if head:
        shapes["output.weight"] = (VOCAB, DIM)
    hd = DIM // HEADS
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (DIM,),
            f"blk.{i}.ffn_norm.weight": (DIM,),
            f"blk.{i}.attn_q.weight": (HEADS * hd, DIM),
            f"blk.{i}.attn_k.weight": (KV_HEADS * hd, DIM),
            f"blk.{i}.attn_v.weight": (KV_HEADS * hd, DIM),
            f"blk.{i}.attn_output.weight": (DIM, HEADS * hd),
            f"blk.{i}.ffn_gate.weight": (HIDDEN, DIM),
            f"blk.{i}.ffn_up.weight": (HIDDEN, DIM),
            f"blk.{i}.ffn_down.weight": (DIM, HIDDEN),
        }
        if biases:
            shapes |= {
                f"blk.{i}.attn_{n}.bias": (r * hd,)
                for n, r in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS))
            }
    for name, shape in shapes.items():
        values = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 1:
            writer.add_tensor(name, values)
        elif name.endswith("ffn_gate.weight"):
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, q), raw_dtype=q)
    for name, values in (extra or {}).items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64, 256])
def test_small_gguf_tensors_round_trip(tmp_path, alignment):
    ints = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    path = write_gguf(tmp_path / "t.gguf", alignment=alignment, extra={"extra.ints": ints})
    file = read_gguf(path)
    assert file.alignment == (alignment or 32) and file.data_offset % file.alignment == 0
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        info = file.tensors[t.name]
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
        mine = file.tensor_array(t.name)
        np.testing.assert_array_equal(mine, t.data)
        if info.type_name == "Q8_0":  # block rows: whole blocks of the row's values
            assert mine.shape == (info.shape[0], info.shape[1] // 32 * 34)
            np.testing.assert_array_equal(
                gguf.quants.dequantize(mine, t.tensor_type), gguf.quants.dequantize(t.data, t.tensor_type)
            )
    np.testing.assert_array_equal(file.tensor_array("extra.ints"), ints)
    assert file.tensor_array("blk.0.ffn_gate.weight").dtype == np.float16
    assert not file.tensor_array("blk.0.attn_norm.weight").flags.writeable  # mapped read-only


def test_config_variants_from_gguf(tmp_path):
    plain = LlamaConfig.from_gguf(read_gguf(write_gguf(tmp_path / "plain.gguf")))
    assert not plain.tied_embeddings and not plain.qkv_bias and plain.norm_eps == pytest.approx(1e-6)
    qwen = LlamaConfig.from_gguf(
        read_gguf(write_gguf(tmp_path / "q.gguf", arch="qwen2", head=False, biases=True))
    )
    assert qwen.arch == "qwen2" and qwen.tied_embeddings and qwen.qkv_bias
    assert "blk.1.attn_v.bias" in shard_tensors(Shard("m", 1, 1, 2), tied=True, qkv_bias=True)
    linear = write_gguf(
        tmp_path / "lin.gguf", meta={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    )
    assert read_llama_config(linear).rope_position_scale == 0.25
    factors = np.linspace(1, 8, DIM // HEADS // 2).astype(np.float32)
    llama3 = write_gguf(tmp_path / "l3.gguf", extra={"rope_freqs.weight": factors})
    assert read_llama_config(llama3).rope_freq_factors == tuple(float(f) for f in factors)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "gpt2"}, r"bad\.gguf: architecture 'gpt2' is not Llama-family"),
        ({"meta": {"llama.rope.scaling.type": "yarn"}}, r"bad\.gguf: RoPE scaling 'yarn' is not supported"),
        (
            {"extra": {"rope_freqs.weight": np.ones(5, np.float32)}},
            r"bad\.gguf: rope_freqs\.weight is F32 \[5\]",
        ),
    ],
)
def test_config_refusals_from_gguf(tmp_path, kwargs, message):
    path = write_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(CheckpointError, match=message):
        read_llama_config(path)


def test_llama3_factors_match_llamacpp_converter():
    """convert_hf_to_gguf.py's rope_freqs for Llama 3.1 (LlamaModel.generate_extra_tensors)."""
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    theta, dim = 500000.0, 128
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen, high_wavelen = 8192 / 1.0, 8192 / 4.0
    expected = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            expected.append(1)
        elif wavelen > low_wavelen:
            expected.append(8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / 8.0 + smooth))
    np.testing.assert_allclose(llama3_rope_factors(theta, dim, scaling), expected, rtol=1e-5)


# ---- safetensors ------------------------------------------------------------------------------

ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32"}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The format by hand: u64 header length, JSON header (8-byte padded), then the data."""
    entries, data = {"__metadata__": {"format": "pt"}}, b""
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        entries[name] = {
            "dtype": ST_DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


HF_CONFIG = {
    "model_type": "llama",
    "hidden_size": DIM,
    "intermediate_size": HIDDEN,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "num_hidden_layers": LAYERS,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "vocab_size": VOCAB,
}


def hf_tensors(tied: bool = False) -> dict[str, np.ndarray]:
    """Random tensors under Hugging Face names, shaped as the config says."""
    rng = np.random.default_rng(1)
    config = LlamaConfig.from_hf(HF_CONFIG, source="test")
    modules = shard_modules(Shard.whole("m", LAYERS), tied=tied)
    out = {}
    for module in modules:
        shape = config.expected_shape(f"{module}.weight")
        assert shape is not None
        values = rng.standard_normal(shape)
        out[to_hf(f"{module}.weight")] = values.astype(np.float16 if "ffn" in module else np.float32)
    return out


def write_hf_dir(directory: Path, parts: int, *, tied: bool = False, config=None) -> dict[str, np.ndarray]:
    """config.json + the tensors in `parts` files (with an index when more than one)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or HF_CONFIG))
    tensors = hf_tensors(tied)
    if parts == 1:
        write_safetensors(directory / "model.safetensors", tensors)
        return tensors
    # layer-wise split, as transformers writes them: embedding + early layers first, head last
    names = list(tensors)
    files = [f"model-{i + 1:05d}-of-{parts:05d}.safetensors" for i in range(parts)]
    weight_map = {}
    for name in names:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        index = (
            0 if "embed" in name else parts - 1 if layer is None else min(layer * parts // LAYERS, parts - 1)
        )
        weight_map[name] = files[index]
    for file in files:
        write_safetensors(directory / file, {n: tensors[n] for n in names if weight_map[n] == file})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return tensors


def test_safetensors_single_file(tmp_path):
    tensors = write_hf_dir(tmp_path, 1)
    file = read_safetensors_header(tmp_path / "model.safetensors")
    assert file.metadata == {"format": "pt"} and set(file.tensors) == set(tensors)
    size = (tmp_path / "model.safetensors").stat().st_size
    ranges = sorted((t.start, t.end) for t in file.tensors.values())
    assert ranges[-1][1] == size and all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    for name, values in tensors.items():
        info = file.tensors[name]
        assert info.shape == values.shape and info.nbytes == values.nbytes
        np.testing.assert_array_equal(file.tensor_array(name), values)
    checkpoint = SafetensorsCheckpoint.open(tmp_path)
    assert set(checkpoint.weight_map.values()) == {"model.safetensors"}


def test_safetensors_sharded_with_index(tmp_path):
    tensors = write_hf_dir(tmp_path, 3)
    config, checkpoint, raw = read_hf_checkpoint(tmp_path)
    assert raw == HF_CONFIG and config.n_layers == LAYERS and not config.tied_embeddings
    assert len(set(checkpoint.weight_map.values())) == 3
    for name, values in tensors.items():
        np.testing.assert_array_equal(checkpoint.tensor_array(name), values)
        assert checkpoint.tensor(name).file.name == checkpoint.weight_map[name]
    first = shard_modules(Shard("m", 0, 0, LAYERS), tied=False, fmt=HF)
    last = shard_modules(Shard("m", 1, 1, LAYERS), tied=False, fmt=HF)
    assert checkpoint.files_for(first) == ["model-00001-of-00003.safetensors"]
    assert checkpoint.files_for(last) == [
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]


def test_hf_config_variants(tmp_path):
    tied = {**HF_CONFIG, "tie_word_embeddings": True}
    write_hf_dir(tmp_path / "tied", 1, tied=True, config=tied)
    assert read_llama_config(tmp_path / "tied").tied_embeddings
    # the head is tied when the checkpoint has none, whatever config.json says
    write_hf_dir(tmp_path / "headless", 1, tied=True)
    assert read_llama_config(tmp_path / "headless").tied_embeddings
    qwen = LlamaConfig.from_hf({**HF_CONFIG, "model_type": "qwen2"}, source="c")
    assert qwen.qkv_bias
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    llama3 = LlamaConfig.from_hf({**HF_CONFIG, "rope_scaling": scaling}, source="c")
    assert llama3.rope_freq_factors == llama3_rope_factors(10000.0, DIM // HEADS, scaling)
    linear = LlamaConfig.from_hf({**HF_CONFIG, "rope_scaling": {"type": "linear", "factor": 2.0}}, source="c")
    assert linear.rope_position_scale == 0.5


def test_gguf_and_hf_configs_agree(tmp_path):
    from_gguf = read_llama_config(write_gguf(tmp_path / "m.gguf"))
    write_hf_dir(tmp_path / "hf", 2)
    from_hf = read_llama_config(tmp_path / "hf")
    assert from_gguf.norm_eps == pytest.approx(from_hf.norm_eps)  # GGUF stores it as float32
    assert dataclasses.replace(from_gguf, norm_eps=from_hf.norm_eps) == from_hf


def test_safetensors_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        read_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIG, "model_type": "gemma"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'gemma' is not Llama-family"):
        read_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIG, "rope_scaling": {"type": "dynamic"}}))
    with pytest.raises(CheckpointError, match="RoPE scaling 'dynamic' is not supported"):
        LlamaConfig.from_hf(json.loads((tmp_path / "config.json").read_text()), source="c")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        read_hf_checkpoint(tmp_path)
    short = tmp_path / "model.safetensors"
    short.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a complete safetensors file"):
        read_safetensors_header(short)
    lying = tmp_path / "lying.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    lying.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(
        CheckpointError, match=r"lying\.safetensors: tensor w takes 8 bytes, but F32 \[4\] needs 16"
    ):
        read_safetensors_header(lying)
    write_hf_dir(tmp_path / "sharded", 2)
    (tmp_path / "sharded" / "model-00002-of-00002.safetensors").unlink()
    checkpoint = SafetensorsCheckpoint.open(tmp_path / "sharded")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: no such file \(listed in"):
        checkpoint.tensor("lm_head.weight")
    with pytest.raises(
        CheckpointError, match=r"a field is missing or malformed \(KeyError\('hidden_size'\)\)"
    ):
        LlamaConfig.from_hf({"model_type": "llama"}, source="c")


# ---- names ------------------------------------------------------------------------------------


def test_names_round_trip_every_tensor(embedded):
    for name in read_gguf(embedded, string_arrays=False).tensors:
        assert to_gguf(to_hf(name)) == name
    assert to_hf("blk.7.attn_q.bias") == "model.layers.7.self_attn.q_proj.bias"
    assert to_gguf("model.layers.7.mlp.down_proj.scales") == "blk.7.ffn_down.scales"
    assert to_gguf("model.rotary_emb.inv_freq") is None
    with pytest.raises(KeyError):
        to_hf("blk.x.attn_q.weight")
    assert module_name("output", fmt=HF) == "lm_head" and set(GLOBAL_MODULES) == {
        "token_embd",
        "output_norm",
        "output",
    }


def test_what_a_shard_needs():
    middle = shard_modules(Shard("m", 10, 12, 30), tied=True)
    assert len(middle) == 3 * len(LAYER_MODULES) and all(m.startswith("blk.1") for m in middle)
    first = shard_modules(Shard("m", 0, 1, 30), tied=True)
    assert first[-1] == "token_embd" and "output_norm" not in first
    assert shard_modules(Shard("m", 29, 29, 30), tied=True)[-2:] == ["output_norm", "token_embd"]
    assert shard_modules(Shard("m", 29, 29, 30), tied=False)[-2:] == ["output_norm", "output"]
    whole = shard_modules(Shard.whole("m", 2), tied=True)
    assert whole.count("token_embd") == 1
    assert (
        shard_tensors(Shard("m", 0, 0, 1), tied=False, fmt=HF)[0] == "model.layers.0.input_layernorm.weight"
    )


def test_every_ggml_type_the_reader_knows_has_llamacpp_sizes():
    assert {k: v[1:] for k, v in GGML_TYPES.items()} == {
        int(t): gguf.GGML_QUANT_SIZES[t] for t in gguf.GGMLQuantizationType if t in gguf.GGML_QUANT_SIZES
    }


# ---- finding and fetching a shard's files ----------------------------------------------------


class FakeHub(ThreadingHTTPServer):
    """The two Hugging Face hub endpoints huggingface_hub's downloads use, over a directory."""

    def __init__(self, repo: str, directory: Path) -> None:
        self.repo, self.directory, self.requested = repo, directory, []
        super().__init__(("127.0.0.1", 0), _HubHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    server: FakeHub
    COMMIT = "0" * 40

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        hub, path = self.server, self.path.split("?")[0]
        if path == f"/api/models/{hub.repo}/tree/main":
            files = sorted(p for p in hub.directory.iterdir() if p.is_file())
            payload = json.dumps(
                [
                    {"type": "file", "path": p.name, "size": p.stat().st_size, "oid": f"{i:040x}"}
                    for i, p in enumerate(files)
                ]
            ).encode()
            return self._send(200, payload, {"Content-Type": "application/json"}, body)
        prefix = f"/{hub.repo}/resolve/main/"
        file = hub.directory / path.removeprefix(prefix)
        if not path.startswith(prefix) or not file.is_file():
            return self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"}, body)
        if body:
            hub.requested.append(file.name)
        data = file.read_bytes()
        headers = {"X-Repo-Commit": self.COMMIT, "ETag": f'"{hash(data) & 0xFFFFFFFF:08x}-{len(data)}"'}
        self._send(200, data, headers, body)

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture
def hub(tmp_path):
    repo_dir = tmp_path / "repo"
    write_hf_dir(repo_dir, 3)
    (repo_dir / "tokenizer.json").write_text("{}")
    (repo_dir / "README.md").write_text("a model")
    server = FakeHub("org/tiny", repo_dir)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


FETCH = """
import json, sys
from exo_core.models.cards import ModelCard
from exo_core.models.files import shard_checkpoint
from exo_core.models.shard import Shard
card = ModelCard("tiny", "tiny", 2, {"safetensors": "org/tiny"})
kind, path = shard_checkpoint(card, Shard("tiny", int(sys.argv[1]), int(sys.argv[2]), 2), ["safetensors"])
print(json.dumps([kind, str(path)]))
"""


def fetch_shard(hub: FakeHub, home: Path, start: int, end: int) -> Path:
    """shard_checkpoint in a fresh process (huggingface_hub reads HF_ENDPOINT when imported)."""
    env = {
        "HF_ENDPOINT": hub.url,
        "EXO_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home / "hf"),
    }
    done = subprocess.run(
        [sys.executable, "-c", FETCH, str(start), str(end)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    kind, path = json.loads(done.stdout.strip().splitlines()[-1])
    assert kind == "safetensors"
    return Path(path)


def test_download_fetches_only_the_shards_files(hub, tmp_path):
    home = tmp_path / "home"
    first = fetch_shard(hub, home, 0, 0)
    weights = sorted(f for f in hub.requested if f.endswith(".safetensors"))
    assert weights == ["model-00001-of-00003.safetensors"]
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(hub.requested)
    assert "README.md" not in hub.requested
    assert (first / "config.json").is_file() and not (first / "model-00003-of-00003.safetensors").exists()
    hub.requested.clear()
    # the last stage needs the other two files; the cached snapshot has only the first
    last = fetch_shard(hub, home, 1, 1)
    assert last == first
    assert sorted(f for f in hub.requested if f.endswith(".safetensors")) == [
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    _, checkpoint, _ = read_hf_checkpoint(last)
    assert checkpoint.tensor("lm_head.weight").shape == (VOCAB, DIM)
    hub.requested.clear()
    assert fetch_shard(hub, home, 0, 1) == first  # everything is here now: nothing is fetched
    assert not [f for f in hub.requested if f.endswith(".safetensors")]


def test_shard_checkpoint_prefers_files_on_the_node(tmp_path, embedded):
    write_hf_dir(tmp_path / "st", 1)
    card = ModelCard("m", "m", 30, {"gguf": str(embedded), "safetensors": str(tmp_path / "st")})
    shard = Shard("m", 0, 29, 30)
    assert shard_checkpoint(card, shard, ["safetensors", "gguf"]) == ("safetensors", tmp_path / "st")
    assert shard_checkpoint(card, shard, ["gguf", "safetensors"]) == ("gguf", embedded)
    gone = ModelCard("m", "m", 30, {"gguf": str(tmp_path / "gone.gguf")})
    with pytest.raises(ModelFilesError, match=r"gone\.gguf does not exist"):
        shard_checkpoint(gone, shard, ["gguf"])
    with pytest.raises(ModelFilesError, match=r"has no mlx source \(it has: gguf"):
        shard_checkpoint(gone, shard, ["mlx"])
