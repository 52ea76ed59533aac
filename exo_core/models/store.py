"""What of a model is on this node's disk, how much, and removing it (`exo models`, `exo models rm`).

Only EXO_HOME is counted and removed from: seed directories (`--models-seed-dir`) and the
embedded wheel are the user's, and are listed as such but never deleted.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from exo_core.models.cards import EMBEDDED, ModelCard
from exo_core.models.files import local_gguf_header, local_snapshot, models_dir


@dataclass(frozen=True)
class OnDisk:
    """One source of a model on this node."""

    kind: str  # gguf | safetensors | mlx
    path: Path
    bytes: int  # bytes present (a partial GGUF: its ranges; a directory: its files)
    size: int  # the whole file's size (a GGUF); for a directory, what it holds
    complete: bool  # False for a GGUF holding only some shards' ranges
    removable: bool  # in EXO_HOME (not a seed directory or the embedded wheel)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "bytes": self.bytes,
            "size": self.size,
            "complete": self.complete,
            "removable": self.removable,
        }


def _inside(path: Path, base: Path) -> bool:
    try:
        path.resolve().relative_to(base.resolve())
    except (ValueError, OSError):
        return False
    return True


def _dir_bytes(directory: Path) -> int:
    total, seen = 0, set()
    for root, _, names in os.walk(directory):
        for name in names:
            target = Path(root, name).resolve()  # the hub cache links snapshots to blobs
            if target not in seen and target.is_file():
                seen.add(target)
                total += target.stat().st_size
    return total


def on_disk(card: ModelCard) -> list[OnDisk]:
    """The card's sources with files on this node."""
    from exo_core.models.download import partial_manifest

    found: list[OnDisk] = []
    home = models_dir()
    gguf = local_gguf_header(card)
    if gguf is not None:
        manifest = partial_manifest(gguf)
        size = gguf.stat().st_size
        removable = card.sources.get("gguf") != EMBEDDED and _inside(gguf, home)
        if manifest is None:
            found.append(OnDisk("gguf", gguf, size, size, True, removable))
        else:
            found.append(OnDisk("gguf", gguf, manifest.present_bytes, manifest.size, False, removable))
    for kind in ("safetensors", "mlx"):
        source = card.sources.get(kind)
        directory = local_snapshot(source) if source else None
        if directory is not None:
            held = _dir_bytes(directory)
            found.append(OnDisk(kind, directory, held, held, True, _inside(directory, home)))
    return found


def remove(card: ModelCard) -> list[Path]:
    """Delete the card's files from EXO_HOME; the paths removed."""
    from exo_core.models.download import manifest_path

    removed: list[Path] = []
    for entry in on_disk(card):
        if not entry.removable:
            continue
        if entry.kind == "gguf":
            for path in (
                entry.path,
                manifest_path(entry.path),
            ):
                if path.exists():
                    path.unlink()
                    removed.append(path)
            continue
        # a hub cache snapshot: the whole repo folder (models--org--repo) with its blobs
        repo_dir = next((p for p in entry.path.parents if p.name.startswith("models--")), entry.path)
        if _inside(repo_dir, models_dir()):
            shutil.rmtree(repo_dir)
            removed.append(repo_dir)
    return removed


def hub_cards_on_disk(known: list[ModelCard]) -> list[ModelCard]:
    """Cards for the hub GGUFs in EXO_HOME that no registered card names (`exo run hf.co/...`
    fetched them): id `hf.co/ORG/REPO:FILE.gguf`, from the header on disk."""
    from exo_core.models.download import MANIFEST_SUFFIX, Manifest, header_on_disk
    from exo_core.models.hub_cards import card_from_gguf_header

    named = {card.sources.get("gguf") for card in known}
    cards = []
    base = models_dir()
    if not base.is_dir():
        return []
    for path in sorted(base.glob("*--*/*.gguf")):
        org, _, name = path.parent.name.partition("--")
        repo = f"{org}/{name}"
        if f"{repo}:{path.name}" in named:
            continue
        manifest = Manifest.load(path.with_name(path.name + MANIFEST_SUFFIX))
        if manifest is not None and header_on_disk(path, manifest) is None:
            continue
        try:
            cards.append(card_from_gguf_header(f"hf.co/{repo}:{path.name}", repo, path.name, path))
        except Exception:  # another architecture, a broken header: not servable, not listed
            continue
    return cards


def local_hub_card(model_id: str) -> ModelCard:
    """A card naming what a hub id refers to among the files on this node, without asking the
    hub (for `exo models rm`): its GGUF by file name or tag, else its safetensors repo."""
    from exo_core.models.files import ModelFilesError
    from exo_core.models.hub_cards import parse_hub_id, pick_gguf

    repo, selector = parse_hub_id(model_id)
    folder = models_dir() / repo.replace("/", "--")
    local = sorted(p.name for p in folder.glob("*.gguf")) if folder.is_dir() else []
    if selector or local:
        try:
            return ModelCard(model_id, model_id, 1, {"gguf": f"{repo}:{pick_gguf(repo, local, selector)}"})
        except ModelFilesError:
            if selector:
                return ModelCard(model_id, model_id, 1, {"gguf": f"{repo}:{selector}"})
    return ModelCard(model_id, model_id, 1, {"safetensors": repo})
