"""Fetching only the safetensors files that hold a shard's tensors from the Hugging Face hub."""

from __future__ import annotations

import json
from pathlib import Path

from exo_core.models import files
from exo_core.models.shard import Shard


def download_shard_files(repo: str, shard: Shard) -> Path:
    """config.json, the tokenizer, and the weight files the shard needs; the snapshot directory.

    Honours HF_ENDPOINT; files go to EXO_HOME's hub cache, where `local_snapshot` finds them.
    """
    from huggingface_hub import hf_hub_download, list_repo_files

    from exo_mlx.loader import HF, _wanted_names

    cache = files.models_dir() / "hub"
    listing = set(list_repo_files(repo))
    config = Path(hf_hub_download(repo, "config.json", cache_dir=cache))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if extra in listing:
            hf_hub_download(repo, extra, cache_dir=cache)
    if "model.safetensors.index.json" in listing:
        index = json.loads(
            Path(hf_hub_download(repo, "model.safetensors.index.json", cache_dir=cache)).read_text()
        )
        weight_map: dict[str, str] = index["weight_map"]
        tied = "lm_head.weight" not in weight_map
        wanted = _wanted_names(shard, HF, tied=tied)
        needed = sorted({f for k, f in weight_map.items() if k.rsplit(".", 1)[0] in wanted})
    else:
        needed = sorted(f for f in listing if f.endswith(".safetensors"))
    for name in needed:
        hf_hub_download(repo, name, cache_dir=cache)
    return config.parent
