"""The tinygrad engine: exo's InferenceEngine over a Llama-family shard.

Importing this module does not import tinygrad; `load` does, on the worker thread.
All tinygrad work in the process runs on that one thread (a single-thread executor shared by
every engine instance: tinygrad keeps process-wide state, its compile cache connection among
it, that must stay on one thread), so the node's event loop keeps serving HTTP and gRPC while
a step computes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import platform
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from exo_core.engine import EngineError, InferenceEngine, StageInput, StageOutput
from exo_core.models import files
from exo_core.models.cards import ModelCard
from exo_core.models.shard import Shard

Progress = Callable[[str, float], None]  # (what, fraction done): as exo_core.engine.Progress


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
        self._loaded: tuple[Shard, str] | None = None
        self.source: str | None = None

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
        if self._loaded == (shard, model.id):
            return
        await self._call(self._load_sync, shard, model)

    def _load_sync(self, shard: Shard, model: ModelCard) -> None:
        if self._loaded == (shard, model.id):
            return
        _configure_tinygrad(self.options)
        from exo_tinygrad.loader import load_shard
        from exo_tinygrad.runner import ShardRunner

        path = model_path(model, shard)
        self._runner = None  # free the old shard before reading the new one
        weights = load_shard(path, shard, self.options.get("max_context"))
        self._runner = ShardRunner(weights, shard, graph_dir(path, shard, weights.config.max_context))
        self._loaded = (shard, model.id)
        self.source = str(path)

    async def prepare(self, shard: Shard, model: ModelCard, progress: Progress | None = None) -> None:
        """Load, then make every graph the engine will use ready (see `ShardRunner.graph_plan`):
        read from EXO_HOME when an earlier process built them, else captured now and saved
        there. One graph per call on the worker thread, so steps of live requests run between."""
        if progress is not None:
            progress("loading weights", 0.0)
        await self.load(shard, model)
        runner = self._runner
        steps = runner.prepare_all(progress)
        while await self._call(next, steps, None) is not None:
            pass

    # ---- running -------------------------------------------------------------------------

    async def forward(self, shard: Shard, item: StageInput) -> StageOutput:
        return (await self.forward_batch(shard, [item]))[0]

    async def forward_batch(self, shard: Shard, items: Sequence[StageInput]) -> list[StageOutput]:
        if self._loaded is None or self._loaded[0] != shard:
            raise EngineError(f"tinygrad engine: shard {shard} is not loaded (loaded: {self.loaded_shard})")
        return await self._call(self._forward_sync, shard, list(items))

    def _forward_sync(self, shard: Shard, items: list[StageInput]) -> list[StageOutput]:
        from exo_tinygrad.runner import Step

        steps = [Step(i.request_id, i.tokens, i.hidden) for i in items]
        outs = self._runner.run(steps)
        if shard.is_last:
            return [StageOutput(logits=out) for out in outs]
        return [StageOutput(hidden=out) for out in outs]

    async def release(self, request_id: str) -> None:
        if self._runner is not None:
            await self._call(self._runner.release, request_id)

    async def close(self) -> None:
        await self._call(self._drop)

    def _drop(self) -> None:  # on the worker thread, where tinygrad frees the buffers
        self._runner = None
        self._loaded = None

    # ---- introspection (tests, /metrics) ---------------------------------------------------

    @property
    def loaded_shard(self) -> Shard | None:
        return self._loaded[0] if self._loaded else None

    def context_length(self) -> int | None:
        return self._runner.max_context if self._runner is not None else None

    def cached_requests(self) -> int:
        """How many requests hold a KV cache."""
        return self._runner.cached_requests() if self._runner is not None else 0

    def cache_bytes(self) -> int:
        return self._runner.cache_bytes() if self._runner is not None else 0

    def weight_bytes(self) -> int:
        return self._runner.model.weight_bytes() if self._runner is not None else 0


def model_path(model: ModelCard, shard: Shard) -> Path:
    """The model's files for `shard` on this node: its GGUF (whole, or holding the shard's byte
    ranges) or its safetensors directory; failing both, only what the shard needs is downloaded
    into EXO_HOME (exo_core's `shard_checkpoint`)."""
    try:
        return files.shard_checkpoint(model, shard, ("gguf", "safetensors"))[1]
    except files.ModelFilesError as exc:
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
    return files.exo_home() / "cache" / "tinygrad" / key


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
