"""Shard: a contiguous, inclusive range of a model's layers held by one stage."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Layers start_layer..end_layer (inclusive) of a model with n_layers layers."""

    model_id: str
    start_layer: int
    end_layer: int
    n_layers: int

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if not 0 <= self.start_layer <= self.end_layer < self.n_layers:
            raise ValueError(f"invalid shard {self.start_layer}..{self.end_layer} of {self.n_layers} layers")

    @classmethod
    def whole(cls, model_id: str, n_layers: int) -> Shard:
        """The shard that holds every layer."""
        return cls(model_id, 0, n_layers - 1, n_layers)

    @property
    def is_first(self) -> bool:
        """Owns the embedding (takes token ids)."""
        return self.start_layer == 0

    @property
    def is_last(self) -> bool:
        """Owns the final norm and output head (returns logits)."""
        return self.end_layer == self.n_layers - 1

    @property
    def is_whole(self) -> bool:
        return self.is_first and self.is_last

    @property
    def layer_count(self) -> int:
        return self.end_layer - self.start_layer + 1

    @property
    def layers(self) -> range:
        return range(self.start_layer, self.end_layer + 1)

    def overlaps(self, other: Shard) -> bool:
        return (
            self.model_id == other.model_id
            and self.start_layer <= other.end_layer
            and other.start_layer <= self.end_layer
        )

    def __str__(self) -> str:
        return f"{self.model_id}[{self.start_layer}-{self.end_layer}/{self.n_layers}]"

    def to_dict(self) -> dict[str, int | str]:
        return {
            "model_id": self.model_id,
            "start_layer": self.start_layer,
            "end_layer": self.end_layer,
            "n_layers": self.n_layers,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Shard:
        return cls(
            str(data["model_id"]),
            int(data["start_layer"]),
            int(data["end_layer"]),
            int(data["n_layers"]),
        )
