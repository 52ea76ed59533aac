"""The quantised matmul kernels agree with numpy on the reference dequantizer's weights."""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest
from exo_tinygrad import quant
from exo_tinygrad.engine import _configure_tinygrad, tinygrad_thread


def on_tinygrad_thread(fn):
    """Run a test body on the engine's tinygrad thread (tinygrad's state lives there)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return tinygrad_thread().submit(fn, *args, **kwargs).result()

    return wrapper


def tg():
    """tinygrad's Tensor and our kernels module, imported on the tinygrad thread."""
    _configure_tinygrad()
    from exo_tinygrad import kernels
    from tinygrad import Tensor

    return Tensor, kernels


T = gguf.GGMLQuantizationType


def random_weight(qtype: T, rows: int, cols: int, seed: int) -> tuple[quant.Unpacked, np.ndarray]:
    """Random blocks (finite scales), unpacked, and the gguf package's dequantisation of them."""
    rng = np.random.default_rng(seed)
    per_block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // per_block, nbytes), dtype=np.uint8)
    scale_at = {T.Q6_K: [208], T.Q8_0: [0], T.Q4_0: [0], T.Q5_0: [0]}.get(qtype, [0, 2])
    for at in scale_at:
        raw[..., at : at + 2] = (
            rng.uniform(-0.05, 0.05, raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
        )
    raw = raw.reshape(rows, -1)
    return quant.unpack(raw, int(qtype), rows, cols), gguf.quants.dequantize(raw, qtype).reshape(rows, cols)


@pytest.mark.parametrize(
    ("qtype", "rows", "cols", "n"),
    [
        (T.Q4_1, 64, 256, 1),
        (T.Q4_0, 50, 64, 3),  # rows not a multiple of the kernel's row group: padded
        (T.Q4_K, 32, 256, 4),
        (T.Q8_0, 40, 96, 1),
        (T.Q6_K, 24, 256, 2),
        (T.Q5_K, 16, 256, 32),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
@on_tinygrad_thread
def test_matmul_matches_numpy(qtype, rows, cols, n):
    Tensor, kernels = tg()
    unpacked, weight = random_weight(qtype, rows, cols, seed=rows)
    np.testing.assert_allclose(unpacked.dequantize(), weight, rtol=1e-6)
    x = np.random.default_rng(n).standard_normal((n, cols)).astype(np.float32)
    y = kernels.matmul(Tensor(x), kernels.pack(unpacked)).numpy()
    expected = x @ weight.T
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("n", [1, 2], ids=["decode-fused-norm", "prefill-norm-first"])
@on_tinygrad_thread
def test_fused_norm_and_residual(n):
    Tensor, kernels = tg()
    unpacked, weight = random_weight(T.Q4_1, 32, 128, seed=5)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 128)).astype(np.float32)
    norm = rng.standard_normal(128).astype(np.float32)
    residual = rng.standard_normal((n, 32)).astype(np.float32)
    y = kernels.matmul(
        Tensor(x), kernels.pack(unpacked), norm=(Tensor(norm), 1e-5), residual=Tensor(residual)
    )
    normed = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * norm
    expected = normed @ weight.T + residual
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@on_tinygrad_thread
def test_fused_swiglu():
    Tensor, kernels = tg()
    unpacked, weight = random_weight(T.Q8_0, 16, 64, seed=6)
    gate_up = np.random.default_rng(1).standard_normal((3, 128)).astype(np.float32)
    y = kernels.matmul(Tensor(gate_up), kernels.pack(unpacked), swiglu=True).numpy()
    gate, up = gate_up[:, :64], gate_up[:, 64:]
    expected = (gate / (1 + np.exp(-gate)) * up) @ weight.T
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize(
    ("qtype", "rows", "cols", "n", "fusion"),
    [
        (T.Q4_1, 48, 256, 3, "norm+residual"),
        (T.Q8_0, 40, 96, 1, "swiglu"),
        (T.Q6_K, 24, 256, 2, ""),
    ],
    ids=["q4_1-norm-residual", "q8_0-swiglu", "q6_k"],
)
@on_tinygrad_thread
def test_plain_fallback_matches_kernel(monkeypatch, qtype, rows, cols, n, fusion):
    """The plain-ops matmul used on devices the UOp kernels do not suit (GPUs), on CPU."""
    Tensor, kernels = tg()
    packed = kernels.pack(random_weight(qtype, rows, cols, seed=7)[0])
    rng = np.random.default_rng(2)
    width = cols * (2 if fusion == "swiglu" else 1)
    x = Tensor(rng.standard_normal((n, width)).astype(np.float32))
    kwargs = {"swiglu": fusion == "swiglu"}
    if "norm" in fusion:
        kwargs["norm"] = (Tensor(rng.standard_normal(cols).astype(np.float32)), 1e-5)
        kwargs["residual"] = Tensor(rng.standard_normal((n, rows)).astype(np.float32))
    expected = kernels.matmul(x, packed, **kwargs).numpy()
    monkeypatch.setenv("EXO_TINYGRAD_KERNELS", "plain")
    assert not kernels.custom_kernels("CPU")
    y = kernels.matmul(x, packed, **kwargs).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
