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

import itertools
from dataclasses import dataclass, field

import numpy as np
from tinygrad import Tensor, TinyJit, UOp, dtypes
from tinygrad.nn.state import get_parameters

from exo_core.engine import EngineError
from exo_core.models.shard import Shard
from exo_tinygrad.loader import ShardWeights
from exo_tinygrad.model import ShardModel
from exo_tinygrad.replay import Replay

PREFILL_CHUNK = 32
MIN_CAPACITY = 256
MAX_DECODE_BATCH = 8


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
    """A TinyJit'd step: captured on its first call (the weights are realized already, so the
    usual un-jitted warm-up call would only cost another full schedule), then replayed by
    `replay.Replay` when it can, by TinyJit otherwise."""

    def __init__(self, fn) -> None:
        self.jit = TinyJit(fn)
        self.jit.cnt = 1
        self.replay: Replay | None = None
        self._built = False

    def __call__(self, *args) -> Tensor:
        if self.replay is not None:
            return self.replay(*args)
        out = self.jit(*args)
        if not self._built and self.jit.captured is not None:
            self._built = True
            self.replay = Replay.build(self.jit)
        return out


class ShardRunner:
    def __init__(self, weights: ShardWeights, shard: Shard) -> None:
        self.shard = shard
        self.config = weights.config
        self.embed = weights.embed
        self.model = ShardModel(weights, shard.start_layer, shard.end_layer, shard.is_last)
        Tensor.realize(*get_parameters(self.model))
        self.max_context = weights.config.max_context
        self.requests: dict[str, _Request] = {}
        self._jits = _Jits()
        self._variables: dict[tuple[str, int, int], UOp] = {}
        self._inputs: dict[tuple, list[Tensor]] = {}

    # ---- requests ------------------------------------------------------------------------

    def release(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def cached_requests(self) -> int:
        return len(self.requests)

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
        capacity = MIN_CAPACITY
        while capacity < needed:
            capacity *= 2
        capacity = min(capacity, _round_up(self.max_context, PREFILL_CHUNK) + PREFILL_CHUNK)
        if req is None:
            cache = self.model.new_cache(capacity)
        else:  # the same positions, more room after them
            grow = ((0, 0), (0, capacity - req.capacity), (0, 0), (0, 0))
            cache = [old.pad(grow).contiguous() for old in req.cache]
        Tensor.realize(*cache)
        grown = _Request(cache, capacity, length)
        self.requests[step.request_id] = grown
        return grown

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
            tensors = [Tensor.zeros(*a.shape, dtype=dtypes.float32).contiguous().realize() for a in arrays]
            self._inputs[key] = tensors
        for t, a in zip(tensors, arrays, strict=True):
            host = np.frombuffer(t.uop.buffer.as_memoryview(force_zero_copy=True), dtype=np.float32)
            host[:] = a.reshape(-1)
        return tensors

    def _variable(self, name: str, low: int, high: int) -> UOp:
        key = (name, low, high)
        if key not in self._variables:
            self._variables[key] = UOp.variable(name, low, high)
        return self._variables[key]

    def _prefill(self, step: Step) -> np.ndarray:
        x = self._input(step)
        req = self._reserve(step)
        C, cap = PREFILL_CHUNK, req.capacity
        jit = self._jits.prefill.get(cap)
        if jit is None:
            jit = self._jits.prefill[cap] = _Graph(self._prefill_fn)
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
            out = _read(jit(x_in, req.cache, pos_var.bind(req.length), last_var.bind(n - 1)))
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
        jit = self._jits.decode.get((cap, len(reqs)))
        if jit is None:
            jit = self._jits.decode[(cap, len(reqs))] = _Graph(self._decode_fn)
        x = np.stack([self._input(s) for s in steps])  # [B, 1, dim]
        positions = [self._variable(f"pos{b}", 0, cap - 1).bind(r.length) for b, r in enumerate(reqs)]
        # the JIT finds tensors in a flat list only: all layers of request 0, then request 1, ...
        flat = [t for r in reqs for t in r.cache]
        (x_in,) = self._staging(("decode", cap, len(reqs)), x)
        out = _read(jit(x_in, flat, *positions))
        for r in reqs:
            r.length += 1
        return [out[b] for b in range(len(steps))]

    def _decode_fn(self, x: Tensor, flat: list[Tensor], *positions: UOp) -> Tensor:
        layers = len(self.model.blocks)
        caches = [flat[b * layers : (b + 1) * layers] for b in range(len(positions))]
        return self.model(x, caches, list(positions)).realize()


def _read(t: Tensor) -> np.ndarray:
    """A copy of a realized float32 tensor's contents (straight from its buffer)."""
    view = np.frombuffer(t.uop.buffer.as_memoryview(force_zero_copy=True), dtype=np.float32)
    return view.reshape(t.shape).copy()


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
