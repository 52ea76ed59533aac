"""How much memory a shard of a model takes: weights per layer, KV cache for a context, activations.

Weights come from the file's own tensor sizes (a GGUF header, whole or partial file), or, for a
safetensors repo, from config.json and its dtype. The KV cache is 2 (keys and values) x kv
heads x head dim x `KV_BYTES` per layer per token of context; activations are one prefill chunk
of `PREFILL_CHUNK` tokens through the widest layer, in float32. Estimates, on the safe side,
used to refuse a plan that cannot fit before anything is downloaded.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from exo_core.models.cards import ModelCard
from exo_core.models.checkpoint.config import LlamaConfig, read_hf_config
from exo_core.models.checkpoint.gguf import GGUFFile, read_gguf
from exo_core.models.checkpoint.names import EMBEDDING, FINAL_NORM, HEAD, module_name
from exo_core.models.shard import Shard

KV_BYTES = 2  # float16 keys and values
PREFILL_CHUNK = 512
_HF_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class ModelMemory:
    """A model's memory needs, per layer and per stage role."""

    layer_bytes: tuple[int, ...]  # weights of each layer
    embedding_bytes: int  # the first stage's token embedding
    head_bytes: int  # the last stage's final norm and output head (the embedding when tied)
    kv_bytes_per_token: int  # per layer
    activation_bytes: int  # per stage
    context_length: int  # the model's own maximum

    @property
    def n_layers(self) -> int:
        return len(self.layer_bytes)

    def context(self, max_context: int | None) -> int:
        return min(max_context, self.context_length) if max_context else self.context_length

    def shard_bytes(self, shard: Shard, context: int) -> int:
        """Weights + KV cache for `context` tokens + activations of one stage."""
        need = sum(self.layer_bytes[shard.start_layer : shard.end_layer + 1])
        need += self.kv_bytes_per_token * context * shard.layer_count + self.activation_bytes
        if shard.is_first:
            need += self.embedding_bytes
        if shard.is_last:
            need += self.head_bytes
        return need

    def total_bytes(self, context: int) -> int:
        return self.shard_bytes(Shard.whole("m", self.n_layers), context)


LOOKUP_TTL_S = 2.0  # plans are made per request: finding a model's files is not redone each time
_looked_up: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[float, ModelMemory]] = {}


def model_memory(card: ModelCard) -> ModelMemory | None:
    """The card's memory needs from the files on this node (None when none are here yet: then
    it is looked for again at the next call, as the origin may have just fetched its header);
    a result found is looked up again at most every `LOOKUP_TTL_S`."""
    key = (card.id, tuple(sorted(card.sources.items())))
    now = time.monotonic()
    cached = _looked_up.get(key)
    if cached is not None and now - cached[0] < LOOKUP_TTL_S:
        return cached[1]
    found = _lookup(card)
    if found is not None:
        if len(_looked_up) > 256:
            _looked_up.clear()
        _looked_up[key] = (now, found)
    return found


def held_bytes(shards: Iterable[Shard], cards: Mapping[str, ModelCard]) -> int:
    """What an engine holding `shards` holds for them (weights and activations, no KV cache):
    memory a node counts as usable again for the same models. Shards of models whose files say
    nothing here count 0."""
    total = 0
    for shard in shards:
        card = cards.get(shard.model_id)
        memory = model_memory(card) if card is not None else None
        if memory is not None and memory.n_layers == shard.n_layers:
            total += memory.shard_bytes(shard, 0)
    return total


def _lookup(card: ModelCard) -> ModelMemory | None:
    from exo_core.models import files

    try:
        gguf = files.local_gguf_header(card)
    except (OSError, ValueError):
        gguf = None
    if gguf is not None:
        stat = gguf.stat()
        return _from_gguf_cached(gguf, stat.st_size, stat.st_mtime_ns)
    for kind in ("safetensors", "mlx"):
        source = card.sources.get(kind)
        directory = files.local_snapshot(source) if source else None
        if directory is not None:
            try:
                return _from_hf_config(directory)
            except Exception:  # a broken config: the engine's loader says what is wrong
                return None
    return None


@functools.lru_cache(maxsize=32)
def _from_gguf_cached(path: Path, size: int, mtime: int) -> ModelMemory | None:
    try:
        return from_gguf(read_gguf(path, string_arrays=False))
    except Exception:  # an unreadable header: nothing to plan with
        return None


def from_gguf(gguf: GGUFFile) -> ModelMemory:
    """From the tensor sizes in a GGUF header."""
    config = LlamaConfig.from_gguf(gguf)
    layers = [0] * config.n_layers
    embedding = head = 0
    for name, tensor in gguf.tensors.items():
        size = tensor.nbytes or 0
        if name.startswith("blk."):
            index = int(name.split(".")[1])
            if index < config.n_layers:
                layers[index] += size
        elif name.startswith(module_name(EMBEDDING) + "."):
            embedding += size
        elif name.startswith((module_name(HEAD) + ".", module_name(FINAL_NORM) + ".")):
            head += size
    if config.tied_embeddings:
        head += embedding
    return _with_runtime(config, tuple(layers), embedding, head)


def _from_hf_config(directory: Path) -> ModelMemory:
    raw = read_hf_config(directory)
    config = LlamaConfig.from_hf(raw, source=directory / "config.json")
    per = _HF_DTYPE_BYTES.get(str(raw.get("torch_dtype", "bfloat16")), 2)
    q_out, kv_out = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    layer = per * (2 * config.dim * q_out + 2 * config.dim * kv_out + 3 * config.dim * config.hidden_dim)
    layer += per * 2 * config.dim
    embedding = per * config.vocab_size * config.dim
    head = per * config.dim + (embedding if config.tied_embeddings else per * config.vocab_size * config.dim)
    return _with_runtime(config, (layer,) * config.n_layers, embedding, head)


def _with_runtime(config: LlamaConfig, layers: tuple[int, ...], embedding: int, head: int) -> ModelMemory:
    kv = 2 * config.n_kv_heads * config.head_dim * KV_BYTES
    activations = PREFILL_CHUNK * (4 * config.dim + 2 * config.hidden_dim) * 4
    return ModelMemory(layers, embedding, head, kv, activations, config.max_context)
