"""Model cards for any repo on the Hugging Face hub, from the model's own metadata.

Ids are spelled as Ollama spells them:

- `hf.co/ORG/REPO`: a safetensors repo (config.json + *.safetensors); for a repo holding only
  GGUF files, its Q4_K_M file (else its only one), as Ollama picks;
- `hf.co/ORG/REPO:FILE.gguf`: that GGUF file;
- `hf.co/ORG/REPO:Q4_K_M`: the GGUF file whose name carries that quantisation tag.

`huggingface.co/` works as the prefix too. Layers, context and architecture come from the GGUF
header (fetched alone, by range requests) or from config.json; an architecture the engines do
not run is refused then, before any weights download. The card's id is the id as given.
"""

from __future__ import annotations

import re
from pathlib import Path

from exo_core.models.cards import ModelCard
from exo_core.models.checkpoint.config import LlamaConfig, read_hf_config
from exo_core.models.checkpoint.errors import CheckpointError
from exo_core.models.checkpoint.gguf import read_gguf
from exo_core.models.download import DownloadError, explain, fetch_gguf, hub_endpoint, hub_offline
from exo_core.models.files import ModelFilesError, local_snapshot_any, models_dir

PREFIXES = ("https://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/")
DEFAULT_QUANT = "Q4_K_M"
_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


def is_hub_id(model_id: str) -> bool:
    return model_id.lower().startswith(PREFIXES)


def parse_hub_id(model_id: str) -> tuple[str, str | None]:
    """(ORG/REPO, the part after ':' or None)."""
    rest = model_id
    for prefix in PREFIXES:
        if rest.lower().startswith(prefix):
            rest = rest[len(prefix) :]
            break
    repo, sep, selector = rest.partition(":")
    repo = repo.strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ModelFilesError(f"{model_id!r}: a hub model is hf.co/ORG/REPO[:FILE.gguf|:QUANT]")
    if sep and not selector:
        raise ModelFilesError(
            f"{model_id!r}: nothing after ':' (a .gguf file name or a tag like {DEFAULT_QUANT})"
        )
    return repo, selector or None


def pick_gguf(repo: str, files: list[str], selector: str | None, *, only_file_wins: bool = True) -> str:
    """The GGUF file an id names: by file name, by quantisation tag, or the default one (the
    Q4_K_M file, else a repo's only GGUF when `only_file_wins`)."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if selector and selector.lower().endswith(".gguf"):
        if selector in files:
            return selector
        raise ModelFilesError(f"{repo} has no file {selector} (its GGUF files: {', '.join(ggufs) or 'none'})")
    tag = selector or DEFAULT_QUANT
    pattern = re.compile(rf"(^|[-._/]){re.escape(tag)}([-._]|$)", re.IGNORECASE)
    matches = [f for f in ggufs if pattern.search(f.rsplit("/", 1)[-1].removesuffix(".gguf") + ".")]
    if not matches and selector is None and only_file_wins and len(ggufs) == 1:
        matches = ggufs
    whole = [f for f in matches if not _SPLIT.search(f)]
    if not whole and matches:
        raise ModelFilesError(
            f"{repo}: {matches[0]} is split into several files, which exo does not read yet"
        )
    if not whole:
        raise ModelFilesError(
            f"{repo} has no GGUF file tagged {tag} (its GGUF files: {', '.join(ggufs) or 'none'})"
        )
    if len(whole) > 1:
        raise ModelFilesError(
            f"{repo}: several files match {tag}: {', '.join(whole)}; name one with :FILE.gguf"
        )
    return whole[0]


def card_from_hub(model_id: str) -> ModelCard:
    """A card for a hub id, from the model's metadata (header or config.json only)."""
    repo, selector = parse_hub_id(model_id)
    if selector and selector.lower().endswith(".gguf"):
        return _gguf_card(model_id, repo, selector)  # from the header on disk when it is here
    local = _local_repo_files(repo)
    if local:  # what is on this node answers first (the hub is asked only for what is not)
        try:  # (a repo's only GGUF on this node is not necessarily the repo's only one)
            return _card_from_files(model_id, repo, selector, local, only_file_wins=False)
        except ModelFilesError:
            pass
    return _card_from_files(model_id, repo, selector, _repo_files(repo))


def _card_from_files(
    model_id: str, repo: str, selector: str | None, files: list[str], *, only_file_wins: bool = True
) -> ModelCard:
    if selector is None and "config.json" in files and any(f.endswith(".safetensors") for f in files):
        return _safetensors_card(model_id, repo)
    if not any(f.lower().endswith(".gguf") for f in files):
        raise ModelFilesError(f"{repo} has neither safetensors weights with a config.json nor GGUF files")
    return _gguf_card(model_id, repo, pick_gguf(repo, files, selector, only_file_wins=only_file_wins))


def _repo_files(repo: str) -> list[str]:
    """The repo's file names: from the hub; offline, or when the hub cannot be reached (not when
    it refuses), those of the repo on this node."""
    local = _local_repo_files(repo)
    if hub_offline():
        if local:
            return local
        raise DownloadError(f"HF_HUB_OFFLINE is set and nothing of {repo} is on this node")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return list(HfApi(endpoint=hub_endpoint()).list_repo_files(repo))
    except Exception as exc:
        if local and not isinstance(exc, HfHubHTTPError):
            return local
        raise DownloadError(explain(repo, None, exc)) from exc


def _local_repo_files(repo: str) -> list[str]:
    """Names of the repo's files on this node: its GGUFs (whole or partial), or its snapshot."""
    from exo_core.models.files import _gguf_candidates, local_snapshot

    folder = repo.replace("/", "--")
    names = {
        path.name
        for base in {candidate.parent for candidate in _gguf_candidates(repo, "x.gguf")}
        if base.name == folder and base.is_dir()
        for path in base.glob("*.gguf")
    }
    snapshot = local_snapshot(repo)
    if snapshot is not None:
        names |= {p.name for p in snapshot.iterdir() if p.is_file()}
    return sorted(names)


def _gguf_card(model_id: str, repo: str, filename: str) -> ModelCard:
    path = fetch_gguf(repo, filename, None, header_only=True, model_id=model_id)
    return card_from_gguf_header(model_id, repo, filename, path)


def card_from_gguf_header(model_id: str, repo: str, filename: str, path: Path) -> ModelCard:
    """A card for a hub GGUF whose header is at `path` (the whole file or a partial one)."""
    try:
        gguf = read_gguf(path, string_arrays=False)
        config = LlamaConfig.from_gguf(gguf)  # refuses other architectures, before any weights
    except CheckpointError as exc:
        raise ModelFilesError(f"{model_id}: {exc}") from exc
    name = str(gguf.metadata.get("general.name") or f"{repo} ({filename})")
    return ModelCard(
        model_id,
        name,
        config.n_layers,
        {"gguf": f"{repo}:{filename}"},
        context_length=config.max_context,
    )


def _safetensors_card(model_id: str, repo: str) -> ModelCard:
    from huggingface_hub import hf_hub_download

    local = local_snapshot_any(repo)
    if local is not None and (local / "config.json").is_file():
        directory = local
    else:
        try:
            config_file = hf_hub_download(
                repo, "config.json", cache_dir=models_dir() / "hub", endpoint=hub_endpoint()
            )
        except Exception as exc:
            raise DownloadError(explain(repo, "config.json", exc)) from exc
        directory = Path(config_file).parent
    try:
        config = LlamaConfig.from_hf(read_hf_config(directory), source=f"{repo}/config.json")
    except CheckpointError as exc:
        raise ModelFilesError(f"{model_id}: {exc}") from exc
    return ModelCard(
        model_id,
        repo,
        config.n_layers,
        {"safetensors": repo},
        context_length=config.max_context,
    )
