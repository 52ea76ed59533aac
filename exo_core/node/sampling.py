"""Sampling the next token from logits, done once in core so every engine samples alike."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int | None = None  # None: no logprobs; 0..20: that many alternatives

    def to_dict(self) -> dict:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "top_logprobs": self.top_logprobs,
        }

    @classmethod
    def from_dict(cls, data: dict) -> SamplingParams:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Sampled:
    """A chosen token, with its log-probability and the top alternatives when asked for."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def sample(
    logits: np.ndarray,
    params: SamplingParams,
    generated: Sequence[int] = (),
    step: int = 0,
    allowed: np.ndarray | None = None,
) -> Sampled:
    """Pick the next token (among `allowed`, a bool mask over the vocabulary, when given).

    The random stream depends only on (seed, step), so a request replayed on another node
    after a failure samples the same tokens. Logprobs are those of the distribution sampled
    from: a grammar's mask (constrained decoding) applies before them.
    """
    x = np.asarray(logits, dtype=np.float32).reshape(-1).copy()
    if allowed is not None:
        n = min(allowed.shape[0], x.shape[0])
        if not allowed[:n].any():
            raise ValueError("the grammar allows no token of this model's vocabulary")
        x[:n][~allowed[:n]] = -np.inf
        x[n:] = -np.inf  # rows past the tokenizer's vocabulary (padding) are never text
    if generated and (params.presence_penalty or params.frequency_penalty):
        ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
        ids_ok = ids < x.shape[0]
        ids, counts = ids[ids_ok], counts[ids_ok]
        x[ids] -= params.presence_penalty + params.frequency_penalty * counts.astype(np.float32)
    logprobs = None
    if params.top_logprobs is not None:
        logprobs = _log_softmax(x)
    if params.temperature <= 0.0:
        token = int(np.argmax(x))
    else:
        token = _sample_random(x, params, step)
    if logprobs is None:
        return Sampled(token)
    top: tuple[tuple[int, float], ...] = ()
    if params.top_logprobs:
        k = min(params.top_logprobs, x.shape[0])
        idx = np.argpartition(-logprobs, k - 1)[:k]
        idx = idx[np.argsort(-logprobs[idx], kind="stable")]
        top = tuple((int(i), float(logprobs[i])) for i in idx)
    return Sampled(token, float(logprobs[token]), top)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x)
    return x - m - np.log(np.sum(np.exp(x - m)))


def _sample_random(x: np.ndarray, params: SamplingParams, step: int) -> int:
    scaled = x / np.float32(params.temperature)
    order = np.argsort(-scaled, kind="stable")
    if params.top_k and params.top_k > 0:
        order = order[: params.top_k]
    vals = scaled[order]
    probs = np.exp(vals - vals[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, step])
    return int(order[rng.choice(len(order), p=probs)])
