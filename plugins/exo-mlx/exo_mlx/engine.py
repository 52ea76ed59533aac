"""The exo engine on MLX: the shards its requests use, a KV cache per request, compute on one thread.

Several shards are held side by side, each with its own requests' caches (a request planned
before a peer joined keeps its cache while new requests run on the new range; two models are
served at once); a shard no request uses is freed only when another needs the memory. Shards
of the same file share the parts they have in common (`model.SharedParts`): loading 0-29
next to 0-14 adds only layers 15-29 and the head. Every
step is checked before it runs (`check_step`: position, width, dtype, length, and room for its
cache), so a bad step fails with an `EngineError` naming what is wrong and changes nothing.

mlx is imported only inside the worker thread (and by `available()`), never when the plugin
is imported, so `exo plugins` stays light. All MLX work runs on a single dedicated thread:
the asyncio loop stays free while a step computes, and MLX's streams are per thread, so
arrays made at load time stay usable by every later step.

Hidden states leave and enter this engine as float32 numpy arrays [T, hidden]; see the
README for why float32 is the wire type.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import platform
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import numpy as np

from exo_core import EngineError, ErrorCode, InferenceEngine, ModelCard, Shard, StageInput, StageOutput

if TYPE_CHECKING:
    from exo_mlx.model import KVCache, ShardModel, SharedParts


class _Held:
    """One loaded shard: its model, its requests' caches, its context limit, where it came from."""

    def __init__(self, shard: Shard, model: ShardModel, limit: int, source: str) -> None:
        self.shard, self.model, self.limit, self.source = shard, model, limit, source
        self.caches: dict[str, KVCache] = {}


T = TypeVar("T")

# Source kinds in the order this engine prefers them when several are on the node:
# mlx-community repos are already in MLX's quantised layout; GGUF Q4_0/Q4_1/Q8_0 load
# quantised too; dense safetensors take the most memory.
SOURCE_PREFERENCE = ("mlx", "gguf", "safetensors")
# Memory left free when a cache grows; below this the request fails instead of swapping.
MEMORY_HEADROOM = 256 << 20


@functools.cache
def mlx_status() -> tuple[bool, str]:
    """Whether MLX is installed (cheap: finds the package, imports nothing; cached)."""
    if importlib.util.find_spec("mlx") is None:
        hint = "pip install mlx" if sys.platform == "darwin" else "pip install 'mlx[cpu]'"
        return False, f"mlx is not installed ({hint})"
    return True, ""


@functools.cache
def mlx_runs() -> tuple[bool, str]:
    """Whether MLX imports and computes here (checked once, when the engine first loads)."""
    ok, reason = mlx_status()
    if not ok:
        return ok, reason
    try:
        import mlx.core as mx

        mx.eval(mx.array([1.0]) + 1)
    except Exception as exc:  # a missing backend library, an unsupported CPU, ...
        return False, f"mlx is installed but does not run here: {type(exc).__name__}: {exc}"
    return True, ""


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


class MLXEngine(InferenceEngine):
    """Llama-family models on MLX: any contiguous layer range, GGUF or safetensors weights."""

    name = "mlx"
    supports_sharding = True
    source_kinds = ("gguf", "safetensors", "mlx")
    cli_options = (
        click.Option(
            ["--mlx-dtype"],
            type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
            default="auto",
            show_default=True,
            help="MLX engine: activation dtype (auto: float16 on a GPU, float32 on the CPU).",
        ),
    )

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return mlx_status()

    @classmethod
    def default_priority(cls) -> int:
        # The default on Apple silicon; on Linux MLX runs only its slow CPU build, so the
        # tinygrad engine stays the default there.
        return 90 if is_apple_silicon() else 5

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exo-mlx")
        self._held: dict[Shard, _Held] = {}  # every shard held, oldest first
        self._parts: SharedParts | None = None  # their weights, each part once (worker thread)
        self._waiting: set[str] = set()  # requests whose step is queued for the worker
        self._waiting_lock = threading.Lock()
        self.source: str | None = None  # where the loaded weights came from

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # ---- loading ------------------------------------------------------------------------

    async def load(self, shard: Shard, model: ModelCard) -> None:
        """Hold `shard` next to the shards held already (their requests keep their caches)."""
        if shard in self._held:
            return
        ok, reason = mlx_runs()
        if not ok:
            raise EngineError(f"mlx engine: {reason}")
        await self._run(self._load, shard, model)

    def _load(self, shard: Shard, card: ModelCard) -> None:
        import mlx.core as mx

        from exo_mlx import loader

        if shard.n_layers != card.n_layers or shard.model_id != card.id:
            raise EngineError(
                f"shard {shard} does not belong to model card {card.id} ({card.n_layers} layers)"
            )
        if shard in self._held:
            return
        kind, path = self._find_source(card, shard)
        self._make_room(path, shard)
        dtype = self._dtype()
        if self._parts is None:
            from exo_mlx.model import SharedParts

            self._parts = SharedParts()
        if kind == "gguf":
            model = loader.load_gguf(path, shard, dtype, self._parts)
        else:
            model = loader.load_safetensors(path, shard, dtype, self._parts)
        mx.clear_cache()  # the buffers of the file's other tensors
        limits = [int(x) for x in (self.options.get("max_context"),) if x]
        limit = limits[0] if limits else model.config.max_context or card.context_length or 4096
        self._held[shard] = _Held(shard, model, limit, str(path))
        self.source = str(path)

    def _make_room(self, path: Path, shard: Shard) -> None:
        """Free shards no request uses, oldest first, while memory for `shard`'s weights is short
        (a shard with a live request always stays)."""
        import mlx.core as mx
        import psutil

        files = [path] if path.is_file() else list(path.glob("*.safetensors"))
        need = sum(f.stat().st_size for f in files) * shard.layer_count // shard.n_layers
        for held in list(self._held.values()):
            if psutil.virtual_memory().available - need >= MEMORY_HEADROOM:
                return
            if not held.caches:
                self._drop_held(held.shard)
                mx.clear_cache()

    def _drop_held(self, shard: Shard) -> None:
        held = self._held.pop(shard, None)
        if held is not None and self._parts is not None:
            self._parts.drop(held.model.shared_keys)

    async def unload(self, shard: Shard) -> None:
        """Free `shard` (its weights go once no other shard shares them). A shard whose
        requests still hold caches stays: release them first."""
        held = self._held.get(shard)
        if held is None:
            return
        if held.caches:
            raise EngineError(f"mlx engine: shard {shard} still holds {len(held.caches)} requests' caches")

        def drop() -> None:
            import mlx.core as mx

            self._drop_held(shard)
            mx.clear_cache()

        await self._run(drop)

    def weight_bytes(self) -> int:
        """Bytes of weights held, a part shared by several shards counted once."""
        return self._parts.nbytes() if self._parts is not None else 0

    @property
    def _model(self) -> ShardModel | None:
        """The shard loaded last (tests look at its arrays)."""
        return next(reversed(self._held.values())).model if self._held else None

    def _dtype(self):
        import mlx.core as mx

        wanted = self.options.get("mlx_dtype") or "auto"
        if wanted == "auto":
            return mx.float32 if mx.default_device() == mx.cpu else mx.float16
        return getattr(mx, wanted)

    def _find_source(self, card: ModelCard, shard: Shard) -> tuple[str, Path]:
        """The card's source to load: one already on this node, else one downloaded now."""
        from exo_core import ModelFilesError, shard_checkpoint

        try:
            return shard_checkpoint(card, shard, SOURCE_PREFERENCE)
        except ModelFilesError as exc:
            raise EngineError(f"mlx engine: {exc}") from exc

    def context_length(self) -> int | None:
        return min((h.limit for h in list(self._held.values())), default=None)

    @property
    def loaded_shards(self) -> tuple[Shard, ...]:
        return tuple(self._held)

    # ---- compute ------------------------------------------------------------------------

    def _held_for(self, shard: Shard) -> _Held:
        held = self._held.get(shard)
        if held is None:
            loaded = ", ".join(str(s) for s in self._held) or "none"
            raise EngineError(f"mlx engine: shard {shard} is not loaded (loaded: {loaded})")
        return held

    def check_step(self, shard: Shard, item: StageInput) -> None:
        """Refuse a step that cannot run as it is, before anything changes."""
        held = self._held_for(shard)
        rid, dim = item.request_id, held.model.config.dim
        if shard.is_first:
            if item.tokens is None:
                raise EngineError(f"mlx engine: stage {shard} is the first stage and takes token ids")
            if item.tokens.ndim != 1 or item.tokens.dtype.kind not in "iu":
                raise EngineError(
                    f"mlx engine: request {rid}: token ids must be a 1-D integer array, got "
                    f"{item.tokens.dtype} {tuple(item.tokens.shape)}"
                )
        else:
            h = item.hidden
            if h is None or h.ndim != 2 or h.shape[1] != dim or h.dtype.kind != "f":
                got = "none" if h is None else f"{h.dtype} {tuple(h.shape)}"
                raise EngineError(f"mlx engine: stage {shard} takes hidden states [T, {dim}], got {got}")
        if item.length == 0:
            raise EngineError("mlx engine: a step needs at least one token or hidden state")
        cache = held.caches.get(rid)
        at = cache.offset if cache is not None else 0
        if item.start_pos != at:
            raise EngineError(
                f"mlx engine: request {rid}: the step starts at position {item.start_pos}, but its "
                f"cache on {shard} holds {at} positions"
            )
        if at + item.length > held.limit:
            raise EngineError(
                f"request {rid} would hold {at + item.length} positions; this node "
                f"keeps at most {held.limit} per request (--max-context)"
            )
        if cache is not None:
            self._check_memory(held, cache, at + item.length)

    async def forward_batch(self, shard: Shard, items: Sequence[StageInput]) -> list[StageOutput]:
        held = self._held_for(shard)
        if len({item.request_id for item in items}) != len(items):
            raise EngineError("mlx engine: a batch holds two steps of the same request")
        for item in items:  # all of them before any cache changes
            self.check_step(shard, item)
        ids = [item.request_id for item in items]
        with self._waiting_lock:
            self._waiting.update(ids)
        try:
            return await self._run(self._forward_batch, held, list(items))
        finally:
            with self._waiting_lock:
                self._waiting.difference_update(ids)

    def queued(self, request_id: str) -> bool:
        """True while the request's step waits for the worker thread (behind other steps)."""
        return request_id in self._waiting

    def _forward_batch(self, held: _Held, items: list[StageInput]) -> list[StageOutput]:
        with self._waiting_lock:
            self._waiting.difference_update(item.request_id for item in items)
        outputs: dict[int, StageOutput] = {}
        # Single-token steps of different requests share one pass (one read of the weights);
        # prompts, and a request that appears twice, run on their own.
        decode, seen = [], set()
        for i, item in enumerate(items):
            if item.length == 1 and item.request_id not in seen:
                decode.append(i)
                seen.add(item.request_id)
        if len(decode) > 1:
            for i, out in zip(decode, self._run_pass(held, [items[i] for i in decode]), strict=True):
                outputs[i] = out
        for i, item in enumerate(items):
            if i not in outputs:
                outputs[i] = self._run_pass(held, [item])[0]
        return [outputs[i] for i in range(len(items))]

    def _run_pass(self, held: _Held, items: list[StageInput]) -> list[StageOutput]:
        import mlx.core as mx

        model, shard = held.model, held.shard
        length = items[0].length
        if length == 0:
            raise EngineError("mlx engine: a step needs at least one token or hidden state")
        if shard.is_first:
            if any(it.tokens is None for it in items):
                raise EngineError(f"mlx engine: stage {shard} is the first stage and takes token ids")
            inputs = mx.array(np.stack([np.asarray(it.tokens, dtype=np.int32) for it in items]))
        else:
            hidden = [it.hidden for it in items]
            if any(h is None or h.ndim != 2 or h.shape[1] != model.config.dim for h in hidden):
                raise EngineError(f"mlx engine: stage {shard} takes hidden states [T, {model.config.dim}]")
            inputs = mx.array(np.stack([np.asarray(h, dtype=np.float32) for h in hidden]))
        caches = [self._cache_for(held, it.request_id, length) for it in items]
        result = model(inputs, caches)
        mx.eval(result, *(a for c in caches for a in (*c.keys, *c.values) if a is not None))
        out = np.array(result.astype(mx.float32), copy=True)
        if shard.is_last:
            return [StageOutput(logits=row) for row in out]
        return [StageOutput(hidden=h) for h in out]

    def _cache_for(self, held: _Held, request_id: str, new_positions: int) -> KVCache:
        model, limit = held.model, held.limit
        cache = held.caches.get(request_id)
        if cache is None:
            cache = held.caches[request_id] = model.new_cache(limit)
        if cache.offset + new_positions > limit:
            raise EngineError(
                f"request {request_id} would hold {cache.offset + new_positions} positions; this node "
                f"keeps at most {limit} per request (--max-context)"
            )
        self._check_memory(held, cache, cache.offset + new_positions)
        return cache

    def _check_memory(self, held: _Held, cache: KVCache, positions: int) -> None:
        """Fail the request, rather than swap, when its cache must grow and memory is short."""
        import psutil

        first = cache.keys[0] if cache.keys else None
        if first is not None and positions <= first.shape[2]:
            return  # fits in what is allocated
        model = held.model
        c = model.config
        capacity = -(-positions // cache.step) * cache.step
        need = 2 * len(model.blocks) * c.n_kv_heads * c.head_dim * model.dtype.size * capacity
        if need > psutil.virtual_memory().available - MEMORY_HEADROOM:
            raise EngineError(
                f"not enough free memory for a KV cache of {positions} positions "
                f"({need >> 20} MB); finish or cancel other requests, or lower --max-context",
                code=ErrorCode.OUT_OF_MEMORY,
            )

    # ---- freeing ------------------------------------------------------------------------

    async def release(self, request_id: str) -> None:
        await self._run(self._release, request_id)

    def _release(self, request_id: str) -> None:
        freed = [h for h in self._held.values() if h.caches.pop(request_id, None) is not None]
        if freed and not any(h.caches for h in self._held.values()):
            import mlx.core as mx

            mx.clear_cache()  # give the freed cache buffers back to the system

    def cached_requests(self) -> int:
        """Requests holding a cache here, on every shard held (for tests and metrics)."""
        return sum(len(h.caches) for h in list(self._held.values()))

    async def close(self) -> None:
        def drop() -> None:
            self._held.clear()
            self._parts = None

        await self._run(drop)
        self._worker.shutdown(wait=False)
