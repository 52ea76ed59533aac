"""Model cards: what a model is called, how many layers it has, and where each engine finds it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

EMBEDDED = "embedded"
DEFAULT_MODEL_ID = "smollm2-135m"

# Source kinds (keys of ModelCard.sources):
#   "gguf"        "embedded", an absolute path, or "org/repo:file.gguf" on the Hugging Face hub
#   "safetensors" a Hugging Face repo with config.json + *.safetensors (or a local directory)
#   "mlx"         an mlx-community repo (quantised safetensors in MLX's layout)
#   "rkllm"       the RKLLAMA model folder name on the board
SOURCE_KINDS = ("gguf", "safetensors", "mlx", "rkllm")


@dataclass(frozen=True)
class ModelCard:
    """A model exo can serve, with per-engine sources."""

    id: str
    name: str
    n_layers: int
    sources: Mapping[str, str] = field(default_factory=dict)
    # Where the tokenizer + chat template come from: a Hugging Face repo or local directory;
    # None means "from the GGUF file" (or the safetensors repo).
    tokenizer: str | None = None
    context_length: int | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ValueError(f"model card {self.id!r}: n_layers must be >= 1")
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))

    def merged_with(self, other: ModelCard) -> ModelCard:
        """This card plus the sources another plugin registered for the same id."""
        if other.n_layers != self.n_layers:
            raise ValueError(
                f"model card {self.id!r} registered twice with {self.n_layers} and {other.n_layers} layers"
            )
        return replace(
            self,
            sources={**self.sources, **other.sources},
            tokenizer=self.tokenizer or other.tokenizer,
            context_length=self.context_length or other.context_length,
            aliases=tuple(dict.fromkeys(self.aliases + other.aliases)),
        )

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "n_layers": self.n_layers,
            "sources": dict(self.sources),
            "tokenizer": self.tokenizer,
            "context_length": self.context_length,
        }


class UnknownModelError(LookupError):
    """Raised for a model id no card matches."""

    def __init__(self, model_id: str, known: list[str]) -> None:
        self.model_id = model_id
        self.known = known
        super().__init__(f"unknown model {model_id!r}; choose one of: {', '.join(sorted(known))}")


def find_card(cards: Mapping[str, ModelCard], model_id: str) -> ModelCard:
    """The card for an id or alias (case-insensitive)."""
    wanted = model_id.lower()
    for card in cards.values():
        if card.id.lower() == wanted or wanted in (a.lower() for a in card.aliases):
            return card
    raise UnknownModelError(model_id, list(cards))
