"""Partitioning: which node holds which layers. Strategies are pure functions of the topology."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from exo_core.models.cards import ModelCard
from exo_core.models.memory import ModelMemory, model_memory
from exo_core.models.shard import Shard
from exo_core.node.topology import NodeInfo


@dataclass(frozen=True)
class PlanStage:
    """One stage of a plan: a node and the layers it runs for this request."""

    node_id: str
    shard: Shard

    def to_dict(self) -> dict:
        return {"node_id": self.node_id, "shard": self.shard.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> PlanStage:
        return cls(str(data["node_id"]), Shard.from_dict(data["shard"]))


class NoPlanError(RuntimeError):
    """No node can serve the model right now."""


# A partitioning strategy: (nodes that can serve the model, model id, layer count) -> the
# ordered stages of a plan, covering every layer once. A pure function of its arguments.
Partitioner = Callable[[Sequence[NodeInfo], str, int], list[PlanStage]]


def ring_memory_weighted(nodes: Sequence[NodeInfo], model_id: str, n_layers: int) -> list[PlanStage]:
    """Layers split over nodes in proportion to memory (largest first, then by id).

    Every node gets at least one layer while layers remain; no empty shards, no dropped
    layers. Nodes beyond the layer count are left out.
    """
    if not nodes:
        raise NoPlanError(f"no node can serve {model_id}")
    ordered = sorted(nodes, key=lambda n: (-n.capabilities.memory, n.node_id))[:n_layers]
    weights = [max(n.capabilities.memory, 0) for n in ordered]
    total = sum(weights)
    if total <= 0:
        weights, total = [1] * len(ordered), len(ordered)
    # Cumulative rounding (half up, in integers) keeps the sum exact and gives a tied layer to
    # the larger node; then make sure every node has a layer.
    bounds = [(2 * n_layers * sum(weights[: i + 1]) + total) // (2 * total) for i in range(len(ordered))]
    counts = [b - a for a, b in zip([0, *bounds[:-1]], bounds, strict=True)]
    for i, count in enumerate(counts):
        if count == 0:
            donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] = 1
    plan, start = [], 0
    for node, count in zip(ordered, counts, strict=True):
        plan.append(PlanStage(node.node_id, Shard(model_id, start, start + count - 1, n_layers)))
        start += count
    return plan


GB = 1e9
MB = 1 << 20  # DeviceCapabilities.memory is in MiB


class DoesNotFitError(NoPlanError):
    """The model, with the KV cache of the context asked for, needs more memory than the nodes have."""


def fit_memory(
    plan: Sequence[PlanStage], nodes: Sequence[NodeInfo], memory: ModelMemory, context: int
) -> list[PlanStage]:
    """A plan whose every stage fits its node's memory: weights of its layers, the KV cache for
    `context` tokens and activations (`ModelMemory.shard_bytes`).

    `plan` (from the partitioning strategy) is kept when every stage fits. Otherwise the layers
    are split again over the same nodes in proportion to their memory, weighing each layer by
    what it costs; when even that does not fit, `DoesNotFitError` gives the numbers. Nodes
    that report no memory (0) are taken at their word: nothing is checked.
    """
    by_id = {n.node_id: n for n in nodes}
    used = [by_id[s.node_id] for s in plan if s.node_id in by_id]
    if not plan or len(used) != len(plan) or any(n.capabilities.memory <= 0 for n in used):
        return list(plan)
    capacity = {n.node_id: n.capabilities.memory * MB for n in nodes if n.capabilities.memory > 0}
    need = memory.total_bytes(context)
    free = sum(capacity.values())
    if need + memory.activation_bytes * (len(capacity) - 1) > free:
        raise DoesNotFitError(
            f"{plan[0].shard.model_id} needs {need / GB:.1f} GB for a {context}-token context, "
            f"the cluster has {free / GB:.1f} GB free; add a node or lower --max-context"
        )
    if all(memory.shard_bytes(s.shard, context) <= capacity[s.node_id] for s in plan):
        return list(plan)
    order = [n.node_id for n in sorted(nodes, key=lambda n: (-capacity.get(n.node_id, 0), n.node_id))]
    replanned = _split_by_cost([i for i in order if i in capacity], capacity, memory, context, plan[0].shard)
    for stage in replanned:
        stage_need = memory.shard_bytes(stage.shard, context)
        if stage_need > capacity[stage.node_id]:
            raise DoesNotFitError(
                f"{stage.shard} needs {stage_need / GB:.1f} GB on node {stage.node_id}, which has "
                f"{capacity[stage.node_id] / GB:.1f} GB free; add a node or lower --max-context"
            )
    return replanned


def _split_by_cost(
    order: list[str], capacity: dict[str, int], memory: ModelMemory, context: int, like: Shard
) -> list[PlanStage]:
    """Contiguous layers per node, each node's share of the cost in proportion to its memory;
    a node too small for even one more layer passes the rest on."""
    n_layers = like.n_layers
    plan: list[PlanStage] = []
    start = 0
    for i, node_id in enumerate(order):
        if start >= n_layers:
            break
        last_node = i == len(order) - 1
        end = start
        # take layers while the stage still fits (the last node takes what is left)
        while end + 1 < n_layers:
            trial = Shard(like.model_id, start, end + 1, n_layers)
            if not last_node and memory.shard_bytes(trial, context) > capacity[node_id]:
                break
            if not last_node and _share_reached(order[i:], capacity, memory, context, trial):
                break
            end += 1
        plan.append(
            PlanStage(node_id, Shard(like.model_id, start, end if not last_node else n_layers - 1, n_layers))
        )
        start = plan[-1].shard.end_layer + 1
    if start < n_layers:  # ran out of nodes: the last stage takes the rest (and is refused above)
        last = plan[-1]
        plan[-1] = PlanStage(
            last.node_id, Shard(like.model_id, last.shard.start_layer, n_layers - 1, n_layers)
        )
    return plan


def _share_reached(
    rest: list[str], capacity: dict[str, int], memory: ModelMemory, context: int, trial: Shard
) -> bool:
    """Whether the stage `trial` took more than this node's share of what is left to place."""
    left = Shard(trial.model_id, trial.start_layer, trial.n_layers - 1, trial.n_layers)
    share = capacity[rest[0]] / sum(capacity[n] for n in rest)
    return memory.shard_bytes(trial, context) > share * memory.shard_bytes(left, context) * 1.0001


def plan_within_memory(
    card: ModelCard, plan: Sequence[PlanStage], nodes: Sequence[NodeInfo], max_context: int | None
) -> list[PlanStage]:
    """`fit_memory` with the card's needs from its files on this node (`plan` as it is when
    none are here yet) and the context the requests may use (`--max-context`, else the model's)."""
    memory = model_memory(card)
    if memory is None or memory.n_layers != card.n_layers:
        return list(plan)
    return fit_memory(plan, nodes, memory, memory.context(max_context or card.context_length))
