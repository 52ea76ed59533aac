"""Shared fixtures: the real embedded 135M model, loaded once per module, and tiny model files."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from exo_core import ModelCard, Shard, embedded_gguf_path
from exo_core.testing import model_card

# Test modules import each other's helpers by name (test_memory uses test_kernels'), and
# pytest's importlib mode puts nothing on sys.path.
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).parents[3]
REFERENCE = REPO / "tests" / "data" / "smollm2-135m-llamacpp.json"


@pytest.fixture(scope="session")
def reference() -> dict:
    """llama.cpp's tokenization and greedy answers for the embedded model."""
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def card() -> ModelCard:
    return model_card("smollm2-135m")


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    return embedded_gguf_path()


@pytest.fixture(scope="session")
def gguf_reader(gguf_file) -> gguf.GGUFReader:
    """The gguf package's reader of the embedded file (slow to open: shared)."""
    return gguf.GGUFReader(str(gguf_file))


def _load_engine(card: ModelCard, shard: Shard | None = None, **options):
    """A TinygradEngine with `shard` (default: the whole model) loaded."""
    from exo_tinygrad.engine import TinygradEngine

    engine = TinygradEngine({"max_context": None, **options})
    asyncio.run(engine.load(shard or Shard.whole(card.id, card.n_layers), card))
    return engine


@pytest.fixture(scope="session")
def engine(card):
    """The whole embedded model, shared by every test that only reads from it."""
    engine = _load_engine(card)
    yield engine
    asyncio.run(engine.close())


# ---- tiny model files ----------------------------------------------------------------------

TINY = {"dim": 64, "heads": 4, "kv_heads": 2, "hidden": 128, "layers": 2, "vocab": 96, "ctx": 640}


def _write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    q_type: int | None = None,
    seed: int = 0,
    biases: bool = False,
    tied: bool = True,
) -> Path:
    """A small random Llama-family GGUF: Q8_0 projections (Q4_0 and F16 for some, so formats
    mix inside q/k/v and gate/up), F32 norms, tied head unless `tied=False`, q/k/v biases when
    `biases`. `q_type` stores blk.0.attn_q.weight as raw bytes of another ggml type."""
    t = TINY
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(t["layers"])
    writer.add_context_length(t["ctx"])
    writer.add_embedding_length(t["dim"])
    writer.add_feed_forward_length(t["hidden"])
    writer.add_head_count(t["heads"])
    writer.add_head_count_kv(t["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(t["vocab"])
    hd = t["dim"] // t["heads"]

    def q8(name: str, rows: int, cols: int, kind=gguf.GGMLQuantizationType.Q8_0) -> None:
        values = (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)
        if kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, values.astype(np.float16))
            return
        writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)

    def norm(name: str) -> None:
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(t["dim"])).astype(np.float32))

    q8("token_embd.weight", t["vocab"], t["dim"])
    norm("output_norm.weight")
    if not tied:
        q8("output.weight", t["vocab"], t["dim"], gguf.GGMLQuantizationType.Q4_0)
    for i in range(t["layers"]):
        p = f"blk.{i}"
        norm(f"{p}.attn_norm.weight")
        norm(f"{p}.ffn_norm.weight")
        if biases:
            for name, rows in (
                ("attn_q", t["heads"] * hd),
                ("attn_k", t["kv_heads"] * hd),
                ("attn_v", t["kv_heads"] * hd),
            ):
                writer.add_tensor(f"{p}.{name}.bias", (0.1 * rng.standard_normal(rows)).astype(np.float32))
        if i == 0 and q_type is not None:
            per_block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(q_type)]
            raw = rng.integers(0, 256, (t["heads"] * hd, t["dim"] // per_block * nbytes), dtype=np.uint8)
            writer.add_tensor(f"{p}.attn_q.weight", raw, raw_dtype=gguf.GGMLQuantizationType(q_type))
        else:
            q8(f"{p}.attn_q.weight", t["heads"] * hd, t["dim"])
        q8(f"{p}.attn_k.weight", t["kv_heads"] * hd, t["dim"])
        q8(f"{p}.attn_v.weight", t["kv_heads"] * hd, t["dim"], gguf.GGMLQuantizationType.Q4_0)
        q8(f"{p}.attn_output.weight", t["dim"], t["heads"] * hd)
        q8(f"{p}.ffn_gate.weight", t["hidden"], t["dim"], gguf.GGMLQuantizationType.F16)
        q8(f"{p}.ffn_up.weight", t["hidden"], t["dim"])
        q8(f"{p}.ffn_down.weight", t["dim"], t["hidden"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_card(path: Path, kind: str = "gguf") -> ModelCard:
    return ModelCard("tiny", "tiny test model", TINY["layers"], {kind: str(path)})


@pytest.fixture(scope="session")
def load_engine():
    """Factory: load_engine(card, shard=None, **options) -> a loaded TinygradEngine."""
    return _load_engine


@pytest.fixture(scope="session")
def tiny_gguf():
    """Factory: tiny_gguf(path, arch="llama", q_type=None) -> path of a small random GGUF."""
    return _write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_card():
    """Factory: tiny_card(path, kind="gguf") -> a model card for a tiny model file."""
    return _tiny_card


@pytest.fixture(scope="session")
def tiny_dims() -> dict:
    return dict(TINY)
