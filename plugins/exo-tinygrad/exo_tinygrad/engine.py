"""The tinygrad engine: exo's InferenceEngine over a Llama-family shard.

Importing this module does not import tinygrad; `load` does, on the worker thread.
The engine holds every shard its requests use side by side, each a `ShardRunner` with its own
requests' KV caches (a request planned before a peer joined keeps its cache while new requests
run on the new range); a shard no request uses is freed only when another needs the memory.
Shards of the same file share the layers they have in common (model.py): loading 0-29 next to
0-14 reads and holds only layers 15-29 and the head more.
Steps are checked before they run (`check_step`): a step at another position than its
request's cache, of the wrong width or dtype, or whose cache cannot get memory is refused with
an `EngineError` that names what is wrong, and nothing changes.
All tinygrad work in the process runs on that one thread (a single-thread executor shared by
every engine instance: tinygrad keeps process-wide state, its compile cache connection among
it, that must stay on one thread), so the node's event loop keeps serving HTTP and gRPC while
a step computes.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import os
import platform
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from exo_core import (
    EngineError,
    ErrorCode,
    InferenceEngine,
    ModelCard,
    ModelFilesError,
    Shard,
    StageInput,
    StageOutput,
    exo_home,
    shard_checkpoint,
)

# Memory left free when weights load or a cache grows; below it the request is refused.
MEMORY_HEADROOM = 256 << 20

Progress = Callable[[str, float], None]  # (what, fraction done): as exo_core.engine.Progress


IDLE_S = 0.5  # background graph building waits for this long without steps
STEPS_FORGOTTEN_S = 300.0  # a request that has not stepped for this long is not mid-answer


class TinygradEngine(InferenceEngine):
    """Llama-family models (GGUF or safetensors) on tinygrad; CPU through clang by default."""

    name = "tinygrad"
    supports_sharding = True
    source_kinds = ("gguf", "safetensors")
    cli_options = (
        click.Option(
            ["--threads"],
            type=click.IntRange(min=1),
            default=None,
            help="tinygrad engine: CPU threads per kernel (default: the physical cores).",
        ),
        click.Option(
            ["--device"],
            default=None,
            help="tinygrad engine: the tinygrad device, e.g. CPU, CUDA, METAL, AMD, CL "
            "(default: $DEV, else the first GPU tinygrad finds, else CPU).",
        ),
    )

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self._runner: Any = None  # runner.ShardRunner, built on the worker thread
        self._loaded: tuple[Shard, str] | None = None  # the shard loaded last
        # every shard held, with its requests' caches; changed on the tinygrad thread only (the
        # event loop reads it, through list(...), which copies without letting that thread in)
        self._runners: dict[Shard, Any] = {}
        self.source: str | None = None
        self._active = 0  # forward_batch calls in flight
        self._last_step = 0.0  # when the last one ended (monotonic)
        # per request: when its last step ended and the gap before it (see `_mid_answer`)
        self._steps: dict[str, tuple[float, float]] = {}

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("tinygrad") is None:
            return False, "tinygrad is not installed (pip install exo-tinygrad)"
        device = os.environ.get("DEV", os.environ.get("DEVICE", "CPU")).split(":")[0].upper()
        compiler = os.environ.get("CC", "clang")
        if device in ("CPU", "CLANG") and shutil.which(compiler) is None:
            return (
                False,
                f"tinygrad's CPU backend needs a C compiler: {compiler} was not found (install clang)",
            )
        return True, ""

    @classmethod
    def default_priority(cls) -> int:
        # The default engine on Linux; on Apple silicon mlx (90) wins when it is installed.
        return 40 if platform.system() == "Darwin" else 50

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tinygrad_thread(), fn, *args)

    # ---- loading -------------------------------------------------------------------------

    async def load(self, shard: Shard, model: ModelCard) -> None:
        """Hold `shard` next to the shards held already (their requests keep their caches)."""
        if shard in self._runners:
            self._runner, self._loaded = self._runners[shard], (shard, model.id)
            return
        await self._call(self._load_sync, shard, model)

    def _load_sync(self, shard: Shard, model: ModelCard) -> None:
        if shard in self._runners:
            self._runner, self._loaded = self._runners[shard], (shard, model.id)
            return
        _configure_tinygrad(self.options)
        from exo_tinygrad.loader import load_shard
        from exo_tinygrad.runner import ShardRunner

        path = model_path(model, shard)
        self._make_room(path, shard)
        weights = load_shard(path, shard, self.options.get("max_context"))
        runner = ShardRunner(weights, shard, graph_dir(path, shard, weights.config.max_context))
        self._runners[shard] = self._runner = runner
        self._loaded = (shard, model.id)
        self.source = str(path)

    def _make_room(self, path: Path, shard: Shard) -> None:
        """Free shards no request uses, oldest first, while memory for `shard`'s weights is short
        (a shard with a live request always stays)."""
        import psutil

        from exo_core.checkpoint import file_identity
        from exo_tinygrad.model import held_layers

        missing = len(set(shard.layers) - held_layers(file_identity(path)))  # the rest is shared
        try:
            need = path.stat().st_size * missing // shard.n_layers if path.is_file() else 0
        except OSError:
            need = 0
        for held, runner in list(self._runners.items()):
            if psutil.virtual_memory().available - need >= MEMORY_HEADROOM:
                return
            if runner.cached_requests() == 0:
                self._unload_sync(held)

    async def unload(self, shard: Shard) -> None:
        """Free `shard` (its weights go once no other shard shares them). A shard whose
        requests still hold caches stays: release them first."""
        if shard in self._runners:
            await self._call(self._unload_sync, shard)

    def _unload_sync(self, shard: Shard) -> None:
        runner = self._runners.get(shard)
        if runner is None:
            return
        if runner.cached_requests():
            raise EngineError(f"shard {shard} still holds {runner.cached_requests()} requests' caches")
        del self._runners[shard]
        if self._runner is runner:
            self._runner = None
        if self._loaded is not None and self._loaded[0] == shard:
            self._loaded = None
        del runner
        gc.collect()  # the runner's graphs refer back to it: free its buffers now, on this thread

    async def prepare(self, shard: Shard, model: ModelCard, progress: Progress | None = None) -> None:
        """Load, then make every graph the engine will use ready (`ShardRunner.graph_plan`):
        saved under EXO_HOME by an earlier process, else captured now (seconds each, minutes
        for all on the first start) and saved there.

        The graphs of a first request (prefill and single decode at the smallest capacity)
        come first; the smallest capacity's graphs are kept in memory, the others are only
        built and saved when missing, and read back when first used. Each is one job on the
        worker thread, and after the first two a job waits until no request is mid-answer
        (`_mid_answer`), so running this in the background on a serving node never queues a
        live request behind more than one capture, nor lands a capture between two steps of an
        answer on a slow pipeline.
        """
        if progress is not None:
            progress("loading weights", 0.0)
        await self.load(shard, model)
        runner = self._runner
        plan = runner.graph_plan()
        for done, (kind, cap, batch) in enumerate(plan):
            if self._runners.get(shard) is not runner:
                return  # the shard was freed meanwhile
            if progress is not None:
                what = f"{kind} graph, capacity {cap}" + (f", batch {batch}" if kind == "decode" else "")
                progress(what, done / len(plan))
            first, keep = done < 2, cap == plan[0][1]
            if not keep and runner.has_graph(kind, cap, batch):
                continue  # on disk, read when first used
            while not first and (self._active or self._mid_answer(time.monotonic())):
                await asyncio.sleep(IDLE_S / 4)
            await self._call(runner.prepare, kind, cap, batch, keep)
        if progress is not None:
            progress("ready", 1.0)

    # ---- running -------------------------------------------------------------------------

    async def forward_batch(self, shard: Shard, items: Sequence[StageInput]) -> list[StageOutput]:
        runner = self._runner_for(shard)
        for item in items:  # all of them before any cache changes
            self.check_step(shard, item)
        self._active += 1
        try:
            return await self._call(self._forward_sync, runner, shard, list(items))
        finally:
            self._active -= 1
            self._last_step = now = time.monotonic()
            for item in items:
                last, _ = self._steps.get(item.request_id, (now, 0.0))
                self._steps[item.request_id] = (now, now - last)

    def _mid_answer(self, now: float) -> bool:
        """Whether a request may still be in the middle of its answer: a step ended less than
        `IDLE_S` ago, or less than four of its own gaps between steps (a pipeline of slow nodes
        steps a request every few seconds; a graph capture must not land between two steps).
        Requests that stopped stepping long ago are forgotten (their caches may be kept for reuse)."""
        live = False
        for request_id, (last, gap) in list(self._steps.items()):
            if now - last > STEPS_FORGOTTEN_S:
                del self._steps[request_id]
            elif now - last < max(IDLE_S, 4 * gap):
                live = True
        return live

    def _forward_sync(self, runner: Any, shard: Shard, items: list[StageInput]) -> list[StageOutput]:
        from exo_tinygrad.runner import Step

        steps = [Step(i.request_id, i.tokens, i.hidden) for i in items]
        outs = runner.run(steps)
        if shard.is_last:
            return [StageOutput(logits=out) for out in outs]
        return [StageOutput(hidden=out) for out in outs]

    def _runner_for(self, shard: Shard) -> Any:
        runner = self._runners.get(shard)
        if runner is None:
            held = ", ".join(str(s) for s in self._runners) or "none"
            raise EngineError(f"tinygrad engine: shard {shard} is not loaded (loaded: {held})")
        return runner

    def check_step(self, shard: Shard, item: StageInput) -> None:
        """Refuse a step that cannot run as it is, before anything changes (see the module docstring)."""
        runner = self._runner_for(shard)
        rid = item.request_id
        if item.tokens is not None:
            if item.tokens.ndim != 1 or item.tokens.dtype.kind not in "iu":
                raise EngineError(
                    f"request {rid}: token ids must be a 1-D integer array, got "
                    f"{item.tokens.dtype} {tuple(item.tokens.shape)}"
                )
            if runner.embed is None:
                raise EngineError(
                    f"request {rid}: shard {shard} does not start at layer 0: it takes hidden states"
                )
            vocab = runner.config.vocab_size
            if item.tokens.size and (item.tokens.min() < 0 or item.tokens.max() >= vocab):
                raise EngineError(f"request {rid}: token id out of range 0..{vocab - 1}")
        elif item.hidden is not None:
            dim = runner.config.dim
            if item.hidden.ndim != 2 or item.hidden.shape[1] != dim or item.hidden.dtype.kind != "f":
                raise EngineError(
                    f"request {rid}: hidden states must be float [T, {dim}], got "
                    f"{item.hidden.dtype} {tuple(item.hidden.shape)}"
                )
        else:
            raise EngineError(f"request {rid}: a step needs tokens or hidden states")
        if item.length == 0:
            raise EngineError(f"request {rid}: a step needs at least one position")
        cache = runner.requests.get(rid)
        held = cache.length if cache is not None else 0
        if item.start_pos != held:
            raise EngineError(
                f"request {rid}: the step starts at position {item.start_pos}, but its cache on "
                f"{shard} holds {held} positions"
            )
        end = held + item.length
        if end > runner.max_context:
            raise EngineError(
                f"request {rid} needs {end} positions; the context of this shard is "
                f"{runner.max_context} (model limit, capped by --max-context)"
            )
        if cache is None or cache.capacity < end + 32:
            self._admit(runner, rid, end)

    def _admit(self, runner: Any, request_id: str, positions: int) -> None:
        """Refuse a cache that would not fit in free memory (the node must not swap or be killed)."""
        import psutil

        need = runner.capacity_for(positions + 32) * runner.model.cache_bytes_per_position()
        if need > psutil.virtual_memory().available - MEMORY_HEADROOM:
            raise EngineError(
                f"request {request_id}: not enough free memory for a KV cache of {positions} positions "
                f"({need >> 20} MB); finish or cancel other requests, or lower --max-context",
                code=ErrorCode.OUT_OF_MEMORY,
            )

    async def release(self, request_id: str) -> None:
        self._steps.pop(request_id, None)
        for runner in [r for r in list(self._runners.values()) if request_id in r.requests]:
            await self._call(runner.release, request_id)

    reuses_prefixes = True  # the prefix cache: a kept request's first positions start a new one

    async def copy_prefix(self, source_id: str, target_id: str, length: int) -> None:
        runner = next((r for r in list(self._runners.values()) if source_id in r.requests), None)
        if runner is None:
            raise EngineError(f"no cache {source_id} to reuse")
        await self._call(runner.copy_prefix, source_id, target_id, length)

    def cache_nbytes(self, request_id: str) -> int:
        return sum(r.request_bytes(request_id) for r in list(self._runners.values()))

    async def close(self) -> None:
        await self._call(self._drop)

    def _drop(self) -> None:  # on the worker thread, where tinygrad frees the buffers
        self._runners.clear()
        self._runner = None
        self._loaded = None
        gc.collect()

    # ---- introspection (tests, /metrics) ---------------------------------------------------

    @property
    def loaded_shards(self) -> tuple[Shard, ...]:
        return tuple(self._runners)

    @property
    def loaded_shard(self) -> Shard | None:
        return self._loaded[0] if self._loaded else None

    def context_length(self) -> int | None:
        return self._runner.max_context if self._runner is not None else None

    def cached_requests(self) -> int:
        """How many requests hold a KV cache, on every shard held."""
        return sum(r.cached_requests() for r in list(self._runners.values()))

    def cache_bytes(self) -> int:
        return sum(r.cache_bytes() for r in list(self._runners.values()))

    def weight_bytes(self) -> int:
        """Bytes of weights held, a layer shared by several shards counted once."""
        parts = {id(p): p for r in list(self._runners.values()) for p in r.model.weight_parts()}
        return sum(p.nbytes for p in parts.values())


def model_path(model: ModelCard, shard: Shard) -> Path:
    """The model's files for `shard` on this node: its GGUF (whole, or holding the shard's byte
    ranges) or its safetensors directory; failing both, only what the shard needs is downloaded
    into EXO_HOME (exo_core's `shard_checkpoint`)."""
    try:
        return shard_checkpoint(model, shard, ("gguf", "safetensors"))[1]
    except ModelFilesError as exc:
        raise EngineError(str(exc)) from exc


def graph_dir(path: Path, shard: Shard, max_context: int) -> Path | None:
    """Where this shard's captured graphs are kept (None when that cache is off)."""
    from tinygrad import Device

    from exo_tinygrad import graphs

    if not graphs.enabled():
        return None
    try:
        stat = path.stat()
        identity = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    except OSError:
        return None
    key = graphs.cache_key(
        model=identity,
        shard=[shard.start_layer, shard.end_layer, shard.n_layers],
        max_context=max_context,
        device=Device.DEFAULT,
    )
    directory = exo_home() / "cache" / "tinygrad" / "graphs" / key
    try:
        graphs.prune(directory)
    except OSError:
        return None  # an unwritable EXO_HOME: capture in every process, as before
    return directory


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def tinygrad_thread() -> ThreadPoolExecutor:
    """The process's one tinygrad thread (tests submit their own tinygrad work here too)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exo-tinygrad")
        return _executor


_configured = False


def _configure_tinygrad(options: dict[str, Any] | None = None) -> None:
    """Settings tinygrad reads when it is first imported (an explicit environment wins; the
    first engine of the process decides for all)."""
    global _configured
    if _configured:
        return
    from exo_tinygrad.device import choose_device, is_cpu, physical_cores

    options = options or {}
    # choose before tinygrad is imported, so it never probes every backend itself
    os.environ["DEV"] = device = choose_device(options.get("device"), os.environ)
    if is_cpu(device):
        # kernels split into THREAD parts; exo_tinygrad.executor runs the parts in parallel
        if options.get("threads"):
            os.environ["NUM_CPU_THREADS"] = str(options["threads"])
        os.environ.setdefault("NUM_CPU_THREADS", str(physical_cores()))
        os.environ.setdefault("THREADS", "1" if int(os.environ["NUM_CPU_THREADS"]) > 1 else "0")
    # Compile in-process: the process pool can hang pickling deep kernel graphs.
    os.environ.setdefault("PARALLEL", "0")
    _configured = True
