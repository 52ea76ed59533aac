"""Shard downloads from a stand-in Hugging Face hub: a GGUF's byte ranges into a sparse file.

The hub (`exo_core.testing.hub.StandInHub`) is a real HTTP server on 127.0.0.1 serving the
embedded SmolLM2 GGUF; exo fetches through huggingface_hub and plain range requests.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from exo_core.models.cards import ModelCard
from exo_core.models.checkpoint.gguf import read_gguf
from exo_core.models.download import DownloadError, manifest_path, merge, shard_ranges, subtract
from exo_core.models.files import (
    ModelFilesError,
    embedded_gguf_path,
    local_gguf,
    local_gguf_header,
    shard_checkpoint,
)
from exo_core.models.progress import TRACKER
from exo_core.models.shard import Shard
from exo_core.models.tokenizer import TokenizerError, load_tokenizer
from exo_core.testing.hub import StandInHub, write_tiny_llama_safetensors

REPO, FILE = "org/smol-gguf", "smol.gguf"
CARD = ModelCard("smol", "smol", 30, {"gguf": f"{REPO}:{FILE}"})
FIRST, SECOND = Shard("smol", 0, 14, 30), Shard("smol", 15, 29, 30)


@pytest.fixture(scope="module")
def original():
    return embedded_gguf_path()


@pytest.fixture
def hub(tmp_path, original, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copyfile(original, repo / FILE)
    (repo / "README.md").write_text("a model")
    with StandInHub() as server:
        server.add_repo(REPO, repo)
        server.add_repo("org/gated", repo, token="hf_secret")
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("EXO_HOME", str(tmp_path / "home"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        yield server


def ranges_asked(hub: StandInHub) -> list[tuple[int, int]]:
    out = []
    for request in hub.downloads(FILE):
        start, end = request.range.removeprefix("bytes=").split("-")
        out.append((int(start), int(end) + 1))
    return out


def test_range_arithmetic():
    assert merge([(5, 9), (0, 3), (3, 4), (20, 30)]) == [(0, 4), (5, 9), (20, 30)]
    assert merge([(0, 3), (5, 9)], gap=2) == [(0, 9)]
    assert subtract([(0, 10), (20, 30)], [(2, 4), (8, 25)]) == [(0, 2), (4, 8), (25, 30)]
    assert subtract([(0, 10)], [(0, 10)]) == []


def test_a_shard_fetches_only_its_byte_ranges(hub, original):
    kind, path = shard_checkpoint(CARD, FIRST, ["gguf"])
    assert kind == "gguf"
    whole = read_gguf(original, string_arrays=False)
    needed = shard_ranges(whole, FIRST)
    asked = merge(ranges_asked(hub))
    # the header is fetched by growing prefixes: whatever was asked beyond the shard's
    # ranges lies within the first 4 MiB
    assert subtract(needed, asked) == []
    assert all(end <= 4 << 20 for _, end in subtract(asked, needed))
    manifest = json.loads(manifest_path(path).read_text())
    assert subtract(needed, [tuple(r) for r in manifest["ranges"]]) == []
    assert manifest["size"] == whole.file_size == path.stat().st_size
    assert path.stat().st_blocks * 512 < 0.75 * whole.file_size  # sparse: the holes take no disk
    assert local_gguf(CARD) is None  # a partial file is never handed out as the whole file
    data, sparse = original.read_bytes(), path.read_bytes()
    for start, end in needed:
        assert sparse[start:end] == data[start:end]
    blk20 = whole.tensors["blk.20.ffn_up.weight"]
    assert sparse[blk20.offset : blk20.offset + blk20.nbytes].count(0) == blk20.nbytes  # not fetched
    # the tokenizer reads the partial file's header
    assert load_tokenizer(CARD).encode("Paris") == load_tokenizer(
        ModelCard("e", "e", 30, {"gguf": str(original)})
    ).encode("Paris")
    done = [d for d in TRACKER.snapshot() if d.repo == REPO and d.layers == "0-14/30"]
    assert done and done[-1].status == "done" and done[-1].done == done[-1].total

    # asked again: nothing is fetched; a later plan with more layers fetches only what is missing
    hub.clear()
    assert shard_checkpoint(CARD, FIRST, ["gguf"]) == ("gguf", path)
    assert hub.downloads(FILE) == []
    shard_checkpoint(CARD, Shard("smol", 0, 29, 30), ["gguf"])
    second = ranges_asked(hub)
    assert merge(second) == subtract([(0, whole.file_size)], needed)
    # every byte is here: the sha256 matched the hub's ETag and the manifest is gone
    assert not manifest_path(path).exists()
    assert local_gguf(CARD) == path
    assert path.read_bytes() == data


def test_an_interrupted_download_resumes_with_a_range_request(hub, original):
    whole = read_gguf(original, string_arrays=False)
    big = max(shard_ranges(whole, SECOND), key=lambda r: r[1] - r[0])
    hub.cut_after(FILE, 5_000_000)  # the first response longer than 5 MB stops there
    with pytest.raises(ModelFilesError, match="run again to resume"):
        shard_checkpoint(CARD, SECOND, ["gguf"])
    path = local_gguf_header(CARD)
    assert path is not None and local_gguf(CARD) is None
    manifest = json.loads(manifest_path(path).read_text())
    present = [tuple(r) for r in manifest["ranges"]]
    hub.clear()
    shard_checkpoint(CARD, SECOND, ["gguf"])
    resumed = ranges_asked(hub)
    cut_range = next(r for r in resumed if r[0] > 0 and r[0] < big[1] and r[1] >= big[0])
    # the first request after the drop starts where the bytes on disk stop, not at the range's start
    assert any(a <= cut_range[0] == b for a, b in present)
    assert cut_range[0] > big[0] or big[0] < 4 << 20
    assert subtract(resumed, present) == resumed  # nothing fetched twice
    data, sparse = original.read_bytes(), path.read_bytes()
    for start, end in shard_ranges(whole, SECOND):
        assert sparse[start:end] == data[start:end]


def test_hub_errors_say_what_to_do(hub, monkeypatch):
    unknown = ModelCard("x", "x", 30, {"gguf": f"org/nope:{FILE}"})
    with pytest.raises(ModelFilesError, match=r"no repo org/nope on http://127\.0\.0\.1:\d+"):
        shard_checkpoint(unknown, FIRST, ["gguf"])
    gated = ModelCard("g", "g", 30, {"gguf": f"org/gated:{FILE}"})
    with pytest.raises(ModelFilesError, match=r"gated repo: accept its terms .* set HF_TOKEN"):
        shard_checkpoint(gated, FIRST, ["gguf"])
    missing = ModelCard("m", "m", 30, {"gguf": f"{REPO}:other.gguf"})
    with pytest.raises(ModelFilesError, match=f"{REPO} has no file other.gguf"):
        shard_checkpoint(missing, FIRST, ["gguf"])
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert shard_checkpoint(gated, FIRST, ["gguf"])[0] == "gguf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.clear()
    with pytest.raises(ModelFilesError, match="HF_HUB_OFFLINE is set"):
        shard_checkpoint(CARD, FIRST, ["gguf"])
    assert hub.requests == []
    # what is on the node still serves offline
    assert shard_checkpoint(gated, FIRST, ["gguf"])[0] == "gguf"


def test_an_unreachable_hub_is_a_clear_error(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(DownloadError, match=r"could not reach http://127\.0\.0\.1:9"):
        shard_checkpoint(CARD, FIRST, ["gguf"])


def test_the_tokenizer_fetches_the_header_alone(hub, original):
    tokenizer = load_tokenizer(CARD)  # nothing on the node yet: the header is fetched, no weights
    assert tokenizer.encode("Paris") == load_tokenizer(
        ModelCard("e", "e", 30, {"gguf": str(original)})
    ).encode("Paris")
    assert ranges_asked(hub) and all(end <= 4 << 20 for _, end in ranges_asked(hub))
    unknown = ModelCard("y", "y", 30, {"gguf": f"org/nope:{FILE}"})
    with pytest.raises(TokenizerError, match=r"no tokenizer on this node, and .*no repo org/nope"):
        load_tokenizer(unknown)


def test_safetensors_files_are_tracked_and_checked_against_the_hubs_sha256(tmp_path, monkeypatch):
    repo = tmp_path / "st"
    write_tiny_llama_safetensors(repo)
    card = ModelCard("tiny", "tiny", 2, {"safetensors": "org/tiny"})
    with StandInHub() as server:
        server.add_repo("org/tiny", repo)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        server.tamper("model-00002-of-00003.safetensors")
        with pytest.raises(
            ModelFilesError, match=r"model-00002-of-00003\.safetensors has sha256 .* the hub lists"
        ):
            shard_checkpoint(card, Shard("tiny", 1, 1, 2), ["safetensors"])
        server.tampered.clear()
        kind, path = shard_checkpoint(card, Shard("tiny", 1, 1, 2), ["safetensors"])
    assert kind == "safetensors" and (path / "model-00002-of-00003.safetensors").is_file()
    tracked = {d.file: d for d in TRACKER.snapshot() if d.repo == "org/tiny"}
    size = (repo / "model-00003-of-00003.safetensors").stat().st_size
    assert tracked["model-00003-of-00003.safetensors"].status == "done"
    assert tracked["model-00003-of-00003.safetensors"].done == size


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB filesystem (tmpfs; needs root, else the test is skipped)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_refused_before_fetching_with_what_to_do(hub, small_disk, monkeypatch):
    monkeypatch.setenv("EXO_HOME", str(small_disk / "home"))
    with pytest.raises(
        ModelFilesError, match=r"disk full: smol\.gguf needs 0\.0\d GB more, .* has 0\.02 GB free"
    ):
        shard_checkpoint(CARD, FIRST, ["gguf"])
    path = small_disk / "home" / "models" / "org--smol-gguf" / FILE
    assert manifest_path(path).exists() and local_gguf(CARD) is None  # the header is kept, no whole file
    weights = [r for r in ranges_asked(hub) if r[1] > 4 << 20]
    assert weights == []  # nothing past the header was asked for
