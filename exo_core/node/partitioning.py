"""Partitioning: which node holds which layers. Strategies are pure functions of the topology."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
