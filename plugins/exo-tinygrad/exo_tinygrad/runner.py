"""Running a loaded shard for many requests: KV caches, chunked prefill, batched decode, TinyJit.

Everything here runs on the engine's one worker thread (tinygrad is not thread-safe).

- Each request owns a KV cache (one tensor per layer) sized for `capacity` positions; the
  capacity starts small and doubles as the request grows, up to the model's context (capped
  by the `max_context` option), so idle requests do not hold a full context each.
- Prefill runs in chunks of `PREFILL_CHUNK` positions (the last one padded) under a TinyJit
  whose start position is a symbolic Variable, so prompts of any length reuse one compiled
  graph per cache capacity.
- Decode steps of several requests run as one call (up to 8 requests whose caches have the
  same capacity): the projections read the weights once for all of them. One TinyJit per
  (capacity, batch size), each position a Variable, so steady-state decoding never recompiles.
- Captured graphs are run by `replay.Replay` (one C call per kernel) when it can.
"""

from __future__ import annotations

import gc
import itertools
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tinygrad import Tensor, TinyJit, UOp
from tinygrad.nn.state import get_parameters

from exo_core import EngineError, Shard
from exo_tinygrad import kernels
from exo_tinygrad.buffers import host_view, write, zeros
from exo_tinygrad.graphs import GraphStore
from exo_tinygrad.loader import ShardWeights
from exo_tinygrad.model import ShardModel
from exo_tinygrad.replay import Replay

PREFILL_CHUNK = 32
MIN_CAPACITY = 256
MAX_DECODE_BATCH = 8
# scratch KV caches `prepare` may allocate at once to capture a batched decode graph
PREPARE_CACHE_BUDGET = 256 << 20


@dataclass
class Step:
    """One request's new positions: token ids (first stage) or hidden states [T, dim]."""

    request_id: str
    tokens: np.ndarray | None = None
    hidden: np.ndarray | None = None

    @property
    def length(self) -> int:
        return len(self.tokens) if self.tokens is not None else len(self.hidden)


@dataclass
class _Request:
    cache: list[Tensor]
    capacity: int
    length: int = 0  # positions in the cache


@dataclass
class _Jits:
    prefill: dict[int, _Graph] = field(default_factory=dict)  # by capacity
    decode: dict[tuple[int, int], _Graph] = field(default_factory=dict)  # by capacity, batch size


class _Graph:
    """A TinyJit'd step: read from the graph store when it holds it, else captured on its
    first call (the weights are realized already, so the usual un-jitted warm-up call would
    only cost another full schedule) and saved there; then replayed by `replay.Replay` when
    it can, by TinyJit otherwise."""

    def __init__(self, fn, store: GraphStore | None = None, name: str = "") -> None:
        self.jit = TinyJit(fn)
        self.jit.cnt = 1
        self.replay: Replay | None = None
        self.store, self.name = store, name
        self.loaded = False  # read from the store rather than captured
        captured = store.load(name) if store is not None else None
        if captured is not None:
            self.jit.captured, self.jit.cnt, self.loaded = captured, 2, True
            self.replay = Replay.build(self.jit, kernels.threads())

    @property
    def ready(self) -> bool:
        return self.jit.captured is not None

    def run(self, tensors: list[Tensor], var_vals: dict[str, int], *args) -> Tensor:
        """Run with `args` as the JIT takes them; `tensors` and `var_vals` are the same inputs
        in the JIT's order (its tensors, then those inside lists) for the replay's fast path."""
        if self.replay is not None:
            return self.replay.run(tensors, var_vals)
        return self(*args)

    def __call__(self, *args) -> Tensor:
        if self.replay is not None:
            return self.replay(*args)
        captured = self.jit.captured is not None
        out = self.jit(*args)
        if not captured and self.jit.captured is not None:
            forget_compile_memos()
            self.replay = Replay.build(self.jit, kernels.threads())
            if self.store is not None:
                try:
                    self.store.save(self.name, self.jit.captured)
                except (OSError, pickle.PicklingError, RecursionError):
                    pass  # an unwritable cache only costs the next process a capture
        return out


class ShardRunner:
    def __init__(self, weights: ShardWeights, shard: Shard, graph_dir: Path | None = None) -> None:
        self.shard = shard
        self.config = weights.config
        self.embed = weights.embed
        self.model = ShardModel(weights, shard.start_layer, shard.end_layer, shard.is_last)
        parameters = get_parameters(self.model)
        Tensor.realize(*parameters)
        self.store = GraphStore(graph_dir, parameters) if graph_dir is not None else None
        self.max_context = weights.config.max_context
        self.requests: dict[str, _Request] = {}
        self._jits = _Jits()
        self._variables: dict[tuple[str, int, int], UOp] = {}
        self._inputs: dict[tuple, list[Tensor]] = {}
        self._views: dict[int, tuple[Tensor, np.ndarray | None]] = {}

    # ---- requests ------------------------------------------------------------------------

    def release(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def cached_requests(self) -> int:
        return len(self.requests)

    def copy_prefix(self, source_id: str, target_id: str, length: int) -> None:
        """A new cache for `target_id` holding the first `length` positions of `source_id`'s."""
        source = self.requests.get(source_id)
        if source is None or source.length < length:
            held = source.length if source is not None else 0
            raise EngineError(f"request {source_id} holds {held} positions here, not {length}")
        capacity = self.capacity_for(length + PREFILL_CHUNK)
        cache = self.model.new_cache(capacity)
        for old, new in zip(source.cache, cache, strict=True):
            _copy_prefix(old, new, length)
        self.requests[target_id] = _Request(cache, capacity, length)

    def request_bytes(self, request_id: str) -> int:
        req = self.requests.get(request_id)
        return sum(t.nbytes() for t in req.cache) if req is not None else 0

    def cache_bytes(self) -> int:
        return sum(t.nbytes() for r in self.requests.values() for t in r.cache)

    def _reserve(self, step: Step) -> _Request:
        """The request's cache, grown to hold this step (plus a padded prefill chunk)."""
        req = self.requests.get(step.request_id)
        length = req.length if req is not None else 0
        end = length + step.length
        if end > self.max_context:
            raise EngineError(
                f"request {step.request_id} needs {end} positions; the context of this shard is "
                f"{self.max_context} (model limit, capped by --max-context)"
            )
        needed = end if step.length == 1 else length + _round_up(step.length, PREFILL_CHUNK)
        if req is not None and req.capacity >= needed:
            return req
        capacity = self.capacity_for(needed)
        cache = self.model.new_cache(capacity)
        if req is not None:  # the same positions, more room after them
            for old, new in zip(req.cache, cache, strict=True):
                _copy_positions(old, new, length)
        grown = _Request(cache, capacity, length)
        self.requests[step.request_id] = grown
        return grown

    def capacity_for(self, needed: int) -> int:
        """The cache capacity a request needing `needed` positions gets (a doubling ladder)."""
        capacity = MIN_CAPACITY
        while capacity < needed:
            capacity *= 2
        return min(capacity, self.max_capacity)

    @property
    def max_capacity(self) -> int:
        return _round_up(self.max_context, PREFILL_CHUNK) + PREFILL_CHUNK

    def capacities(self) -> list[int]:
        """Every capacity a request can get, smallest first."""
        caps = [self.capacity_for(1)]
        while caps[-1] < self.max_capacity:
            caps.append(self.capacity_for(caps[-1] + 1))
        return caps

    # ---- graphs --------------------------------------------------------------------------

    def _graph(self, kind: str, capacity: int, batch: int = 1) -> _Graph:
        graphs = self._jits.prefill if kind == "prefill" else self._jits.decode
        key = capacity if kind == "prefill" else (capacity, batch)
        graph = graphs.get(key)  # type: ignore[call-overload]
        if graph is None:
            fn = self._prefill_fn if kind == "prefill" else self._decode_fn
            graph = graphs[key] = _Graph(fn, self.store, self._name(kind, capacity, batch))  # type: ignore[index]
        return graph

    def graph_plan(self, cache_budget: int = PREPARE_CACHE_BUDGET) -> list[tuple[str, int, int]]:
        """The graphs `prepare` builds, in the order the first requests need them: (kind,
        capacity, batch). Decode batches whose scratch caches would pass `cache_budget` bytes
        are left to be captured on first use."""
        per_position = self.model.cache_bytes_per_position()
        plan: list[tuple[str, int, int]] = []
        for cap in self.capacities():
            plan.append(("prefill", cap, 1))
            plan += [
                ("decode", cap, b)
                for b in range(1, MAX_DECODE_BATCH + 1)
                if b == 1 or b * cap * per_position <= cache_budget
            ]
        return plan

    def prepare(self, kind: str, capacity: int, batch: int = 1, keep: bool = True) -> bool:
        """Make one graph ready: read it from the store, or capture it on scratch caches (and
        save it). Returns True when it had to be captured. `keep=False` drops a graph that
        was not in memory already once it is saved (it is read back when first used)."""
        graphs = self._jits.prefill if kind == "prefill" else self._jits.decode
        key = capacity if kind == "prefill" else (capacity, batch)
        held = key in graphs
        graph = self._graph(kind, capacity, batch)
        if graph.ready:
            return False
        ids = [f"\0prepare-{b}" for b in range(batch)]
        try:
            for rid in ids:
                self.requests[rid] = _Request(self.model.new_cache(capacity), capacity, 0)
            if kind == "prefill":
                self._prefill(Step(ids[0], hidden=np.zeros((2, self.config.dim), np.float32)))
            else:
                self._decode([Step(rid, hidden=np.zeros((1, self.config.dim), np.float32)) for rid in ids])
        finally:
            for rid in ids:
                self.requests.pop(rid, None)
        if not keep and not held and self.store is not None and self.store.has(graph.name):
            graphs.pop(key)  # type: ignore[arg-type]
            self._inputs.pop((kind, capacity, batch) if kind == "decode" else (kind, capacity), None)
        return True

    def has_graph(self, kind: str, capacity: int, batch: int = 1) -> bool:
        """Whether the graph is in memory or in the store."""
        graphs = self._jits.prefill if kind == "prefill" else self._jits.decode
        key = capacity if kind == "prefill" else (capacity, batch)
        if key in graphs:  # type: ignore[operator]
            return True
        return self.store is not None and self.store.has(self._name(kind, capacity, batch))

    @staticmethod
    def _name(kind: str, capacity: int, batch: int) -> str:
        return f"prefill-{capacity}" if kind == "prefill" else f"decode-{capacity}x{batch}"

    # ---- running -------------------------------------------------------------------------

    def run(self, steps: list[Step]) -> list[np.ndarray]:
        """Hidden states [T, dim] per step, or (last stage) logits [vocab] of its last position."""
        if len({s.request_id for s in steps}) != len(steps):
            raise EngineError("a batch holds two steps of the same request")
        results: dict[int, np.ndarray] = {}
        decode = [i for i, s in enumerate(steps) if s.length == 1]
        for i, s in enumerate(steps):
            if s.length == 0:
                raise EngineError(f"request {s.request_id}: a step needs at least one position")
            if s.length > 1:
                results[i] = self._prefill(s)
        # batch decode steps by cache capacity: one compiled graph per (capacity, batch size)
        reqs = {i: self._reserve(steps[i]) for i in decode}
        for _, same in itertools.groupby(
            sorted(decode, key=lambda i: reqs[i].capacity), key=lambda i: reqs[i].capacity
        ):
            group = list(same)
            while group:
                # one pass for up to 8 requests; the first batch of each size captures its graph
                # (seconds, once): cheaper than splitting a batch of 3 into 2 + 1 passes forever
                part, group = group[:MAX_DECODE_BATCH], group[MAX_DECODE_BATCH:]
                for i, out in zip(part, self._decode([steps[i] for i in part]), strict=True):
                    results[i] = out
        return [results[i] for i in range(len(steps))]

    def _input(self, step: Step) -> np.ndarray:
        if step.tokens is not None:
            if self.embed is None:
                raise EngineError(f"shard {self.shard} does not start at layer 0: it takes hidden states")
            return self.embed(step.tokens)
        if step.hidden is None:
            raise EngineError(f"request {step.request_id}: a step needs tokens or hidden states")
        hidden = np.asarray(step.hidden, dtype=np.float32)
        if hidden.ndim != 2 or hidden.shape[1] != self.config.dim:
            raise EngineError(
                f"request {step.request_id}: hidden states have shape {hidden.shape}, "
                f"expected [T, {self.config.dim}]"
            )
        return hidden

    def _staging(self, key: tuple, *arrays: np.ndarray) -> list[Tensor]:
        """JIT input tensors holding `arrays`, reused call after call: the values are written
        straight into their buffers (a fresh Tensor per step costs a schedule each)."""
        tensors = self._inputs.get(key)
        if tensors is None:
            tensors = [zeros(a.shape) for a in arrays]
            self._inputs[key] = tensors
        for t, a in zip(tensors, arrays, strict=True):
            host = self._host(t)
            if host is not None:
                host[...] = a
            else:
                write(
                    t.uop.buffer, memoryview(np.ascontiguousarray(a, np.float32).reshape(-1).view(np.uint8))
                )
        return tensors

    def _host(self, t: Tensor) -> np.ndarray | None:
        """`host_view(t)`, kept for the tensors used every step (staging inputs, outputs)."""
        held = self._views.get(id(t))
        if held is None or held[0] is not t:
            held = self._views[id(t)] = (t, host_view(t))
        return held[1]

    def _read(self, t: Tensor) -> np.ndarray:
        view = self._host(t)
        return view.copy() if view is not None else _read(t)

    def _variable(self, name: str, low: int, high: int) -> UOp:
        key = (name, low, high)
        if key not in self._variables:
            self._variables[key] = UOp.variable(name, low, high)
        return self._variables[key]

    def _prefill(self, step: Step) -> np.ndarray:
        x = self._input(step)
        req = self._reserve(step)
        C, cap = PREFILL_CHUNK, req.capacity
        jit = self._graph("prefill", cap)
        pos_var = self._variable("pos", 0, cap - C)
        last_var = self._variable("last", 0, C - 1)
        hidden_out = []
        out = None
        for start in range(0, len(x), C):
            chunk = x[start : start + C]
            n = len(chunk)
            padded = np.zeros((1, C, self.config.dim), np.float32)
            padded[0, :n] = chunk
            (x_in,) = self._staging(("prefill", cap), padded)
            bound = {"pos": req.length, "last": n - 1}
            args = (x_in, req.cache, pos_var.bind(req.length), last_var.bind(n - 1))
            out = self._read(jit.run([x_in, *req.cache], bound, *args))
            req.length += n
            if not self.shard.is_last:
                hidden_out.append(out[0, :n])
        if self.shard.is_last:
            return out[0]
        return np.concatenate(hidden_out)

    def _prefill_fn(self, x: Tensor, cache: list[Tensor], pos: UOp, last: UOp) -> Tensor:
        return self.model(x, [cache], [pos], last).realize()

    def _decode(self, steps: list[Step]) -> list[np.ndarray]:
        reqs = [self.requests[s.request_id] for s in steps]
        cap = reqs[0].capacity  # run() groups decode steps by capacity
        jit = self._graph("decode", cap, len(reqs))
        x = np.stack([self._input(s) for s in steps])  # [B, 1, dim]
        positions = [self._variable(f"pos{b}", 0, cap - 1).bind(r.length) for b, r in enumerate(reqs)]
        # the JIT finds tensors in a flat list only: all layers of request 0, then request 1, ...
        flat = [t for r in reqs for t in r.cache]
        (x_in,) = self._staging(("decode", cap, len(reqs)), x)
        bound = {f"pos{b}": r.length for b, r in enumerate(reqs)}
        out = self._read(jit.run([x_in, *flat], bound, x_in, flat, *positions))
        for r in reqs:
            r.length += 1
        return [out[b] for b in range(len(steps))]

    def _decode_fn(self, x: Tensor, flat: list[Tensor], *positions: UOp) -> Tensor:
        layers = len(self.model.blocks)
        caches = [flat[b * layers : (b + 1) * layers] for b in range(len(positions))]
        return self.model(x, caches, list(positions)).realize()


def forget_compile_memos() -> None:
    """Drop tinygrad's process-wide memos of schedules and lowered kernels. They only speed up
    scheduling the same graph again, which a captured graph never does, and each holds whole
    UOp graphs: after capturing a few dozen graphs they were 1.5 GB of Python objects that
    every full garbage collection walked (decode slowed several times)."""
    from tinygrad.codegen import to_program_cache
    from tinygrad.schedule import schedule_cache

    to_program_cache.clear()
    schedule_cache.clear()
    gc.collect()


def _read(t: Tensor) -> np.ndarray:
    """A copy of a realized float32 tensor's contents (straight from its buffer)."""
    view = host_view(t)
    if view is None:
        return t.numpy()
    return view.copy()


def _copy_positions(old: Tensor, new: Tensor, length: int) -> None:
    """new[:, :length] = old[:, :length] for [2, capacity, kv, hd] caches."""
    src, dst = host_view(old), host_view(new)
    if src is not None and dst is not None:
        dst[:, :length] = src[:, :length]
        return
    grow = ((0, 0), (0, new.shape[1] - old.shape[1]), (0, 0), (0, 0))
    write(new.uop.buffer, memoryview(old.pad(grow).contiguous().realize().numpy().reshape(-1).view(np.uint8)))


def _copy_prefix(old: Tensor, new: Tensor, length: int) -> None:
    """new[:, :length] = old[:, :length] for [2, capacity, kv, hd] caches of any capacities."""
    src, dst = host_view(old), host_view(new)
    if src is not None and dst is not None:
        dst[:, :length] = src[:, :length]
        return
    part = old[:, :length].pad(((0, 0), (0, new.shape[1] - length), (0, 0), (0, 0)))
    write(new.uop.buffer, memoryview(part.contiguous().realize().numpy().reshape(-1).view(np.uint8)))


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
