"""Fetching a GGUF shard from the Hugging Face hub: the header and only the shard's byte ranges.

A node running layers 10-19 of a 40 GB GGUF needs its header (metadata, tensor infos) and the
tensors of those layers (plus the embedding on the first stage, the head on the last), a
fraction of the file. They are fetched with HTTP range requests into a *sparse* file of the
full size at the path the whole file would have, so engines memory-map it as they would the
whole file and never touch the holes. Beside it, `FILE.exo-ranges.json` (the manifest) lists
the byte ranges present, with the file's size and the hub's ETag and commit.

- A file with a manifest is partial: `files.local_gguf` never hands it out as a whole file.
- Ranges land in the manifest only after their bytes are written and flushed, so an
  interrupted download resumes with a Range request for what is missing, and a later shard
  that needs more layers fetches only the ranges still missing.
- When every byte is present the file's sha256 is checked against the hub's ETag (the hub
  gives the sha256 of LFS files), and only then is the manifest removed. A partial file's
  bytes are checked by size (each range's Content-Range and length); the hub publishes no
  per-range hashes.
- A file that changed upstream (another size or ETag) is started over.

`HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` are honoured through `huggingface_hub`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from exo_core.models.checkpoint.gguf import (
    GGUFFile,
    GGUFHeaderIncomplete,
    read_gguf_header_bytes,
)
from exo_core.models.checkpoint.names import ROPE_FREQS, module_name, module_of, shard_modules
from exo_core.models.paths import ModelFilesError, models_dir
from exo_core.models.progress import TRACKER, Download
from exo_core.models.shard import Shard

log = structlog.get_logger("exo.download")

MANIFEST_SUFFIX = ".exo-ranges.json"
HEADER_FIRST_FETCH = 1 << 20  # most headers are smaller; Llama 3's vocabulary takes ~8 MB
CHUNK = 1 << 20
SAVE_EVERY = 2.0  # seconds between manifest writes while bytes stream in

Range = tuple[int, int]  # half-open [start, end)


class DownloadError(ModelFilesError):
    """A download failed; the message says why and that running again continues it."""


@dataclass(frozen=True)
class Holding:
    """What one peer holds of a file: its size, the hub's ETag it was fetched with, its ranges."""

    node_id: str
    size: int
    etag: str | None
    ranges: list[Range]


class PeerSource(Protocol):
    """The cluster's peers as a source of file bytes (`exo_core.networking.file_transfer`)."""

    def have(self, source: str) -> list[Holding]: ...

    def read(self, node_id: str, source: str, start: int, end: int) -> Iterator[bytes]: ...


_peers: PeerSource | None = None


def set_peer_source(peers: PeerSource | None) -> None:
    """Fetch from these peers before the hub (set by the runtime while the node runs)."""
    global _peers
    _peers = peers


def peer_source() -> PeerSource | None:
    return _peers


def fetch_from_peers(source: str, dest: Path, *, model_id: str = "", repo: str = "") -> Path | None:
    """A whole file from the peers that hold it, into `dest` (written beside it, then renamed:
    never a half file under its name); None when no peer has it. A peer failing mid-file
    hands over to the next one, from the start of the file."""
    peers = _peers
    if peers is None:
        return None
    holders = [h for h in peers.have(source) if h.ranges == [(0, h.size)]]
    if not holders:
        return None
    with _locked(dest):  # one writer per file (a prefetch and an engine's load may both ask)
        if dest.is_file():
            return dest
        return _fetch_whole_from(peers, holders, source, dest, model_id, repo)


def _fetch_whole_from(
    peers: PeerSource, holders: list[Holding], source: str, dest: Path, model_id: str, repo: str
) -> Path:
    size = holders[0].size
    _check_space(dest.parent, size, dest.name)
    part = dest.with_name(dest.name + ".part")
    errors = []
    for holder in holders:
        entry = TRACKER.begin(model_id or source, repo, dest.name, size, source=f"peer:{holder.node_id}")
        try:
            with open(part, "wb") as f:
                for chunk in peers.read(holder.node_id, source, 0, size):
                    f.write(chunk)
                    TRACKER.advance(entry, len(chunk))
                f.flush()
                os.fsync(f.fileno())
            if part.stat().st_size != size:
                raise ConnectionError(f"got {part.stat().st_size} of {size} bytes")
        except Exception as exc:
            TRACKER.fail(entry, str(exc))
            errors.append(f"{holder.node_id}: {exc}")
            log.warning(
                "peer failed mid-file; trying the next", peer=holder.node_id, file=source, error=str(exc)
            )
            continue
        os.replace(part, dest)
        TRACKER.finish(entry)
        return dest
    part.unlink(missing_ok=True)
    raise DownloadError(f"no peer could send {source} ({'; '.join(errors)}); run again to retry")


# ---- the manifest -------------------------------------------------------------------------------


def manifest_path(file: Path) -> Path:
    return file.with_name(file.name + MANIFEST_SUFFIX)


def merge(ranges: Sequence[Range], gap: int = 0) -> list[Range]:
    """Sorted, non-overlapping ranges; ranges closer than `gap` bytes are joined."""
    out: list[list[int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def subtract(wanted: Sequence[Range], present: Sequence[Range]) -> list[Range]:
    """The parts of `wanted` not in `present`."""
    missing: list[Range] = []
    have = merge(present)
    for start, end in merge(wanted):
        pos = start
        for a, b in have:
            if b <= pos or a >= end:
                continue
            if a > pos:
                missing.append((pos, a))
            pos = max(pos, b)
            if pos >= end:
                break
        if pos < end:
            missing.append((pos, end))
    return missing


@dataclass
class Manifest:
    """The byte ranges of a partial file that are on disk, and which upstream file they are of."""

    size: int
    etag: str | None = None
    commit: str | None = None
    ranges: list[Range] = field(default_factory=list)

    def add(self, start: int, end: int) -> None:
        self.ranges = merge([*self.ranges, (start, end)])

    def missing(self, wanted: Sequence[Range]) -> list[Range]:
        return subtract(wanted, self.ranges)

    def covers(self, wanted: Sequence[Range]) -> bool:
        return not self.missing(wanted)

    @property
    def present_bytes(self) -> int:
        return sum(b - a for a, b in self.ranges)

    @property
    def complete(self) -> bool:
        return self.covers([(0, self.size)])

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                int(data["size"]),
                data.get("etag"),
                data.get("commit"),
                merge([(int(a), int(b)) for a, b in data["ranges"]]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable: treated as absent, and the file is fetched again

    def save(self, path: Path) -> None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        payload = {"size": self.size, "etag": self.etag, "commit": self.commit, "ranges": self.ranges}
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        os.replace(tmp, path)


def partial_manifest(file: Path) -> Manifest | None:
    """The manifest of a partial file (None for a whole file or none at all)."""
    return Manifest.load(manifest_path(file))


# ---- what a shard needs -------------------------------------------------------------------------


def shard_ranges(gguf: GGUFFile, shard: Shard) -> list[Range]:
    """The byte ranges a shard's tensors take in the file, header included, merged."""
    tied = f"{module_name('output')}.weight" not in gguf.tensors
    modules = set(shard_modules(shard, tied=tied))
    wanted: list[Range] = [(0, gguf.data_offset)]
    for name, tensor in gguf.tensors.items():
        if (module_of(name) in modules or name == ROPE_FREQS) and tensor.nbytes is not None:
            wanted.append((tensor.offset, tensor.offset + tensor.nbytes))
    # Tensors that follow each other are padded to the alignment; join across the padding only.
    return merge(wanted, gap=gguf.alignment)


def header_ranges(gguf: GGUFFile) -> list[Range]:
    """The header and the tensors a config is read from (Llama 3's RoPE factors)."""
    wanted: list[Range] = [(0, gguf.data_offset)]
    rope = gguf.tensors.get(ROPE_FREQS)
    if rope is not None and rope.nbytes is not None:
        wanted.append((rope.offset, rope.offset + rope.nbytes))
    return merge(wanted)


def _holds_header(file: Path) -> bool:
    manifest = partial_manifest(file)
    if manifest is None:
        return file.is_file()
    gguf = header_on_disk(file, manifest)
    return gguf is not None and manifest.covers(header_ranges(gguf))


def gguf_block_count(gguf: GGUFFile) -> int | None:
    arch = gguf.metadata.get("general.architecture")
    count = gguf.metadata.get(f"{arch}.block_count")
    return int(count) if count is not None else None


def holds_shard(file: Path, shard: Shard) -> bool:
    """Whether a local GGUF (whole, or partial with a manifest) has every byte the shard needs."""
    manifest = partial_manifest(file)
    if manifest is None:
        return file.is_file()
    gguf = header_on_disk(file, manifest)
    return gguf is not None and manifest.covers(shard_ranges(gguf, shard))


def header_on_disk(file: Path, manifest: Manifest) -> GGUFFile | None:
    """The header of a partial GGUF, parsed from the bytes present at its start (None when
    they stop inside the header)."""
    if not file.is_file() or file.stat().st_size != manifest.size:
        return None
    if not manifest.ranges or manifest.ranges[0][0] != 0:
        return None
    present = manifest.ranges[0][1]
    want = min(HEADER_FIRST_FETCH, present)
    with open(file, "rb") as f:
        while True:  # read no more of the file than the header takes
            f.seek(0)
            prefix = f.read(want)
            try:
                header = read_gguf_header_bytes(prefix, manifest.size, file)
            except GGUFHeaderIncomplete:
                if want >= present:
                    return None
                want = min(want * 4, present)
                continue
            except Exception:  # corrupt: fetched again
                return None
            header.path = file
            return header


# ---- the hub ------------------------------------------------------------------------------------


def hub_endpoint() -> str:
    """HF_ENDPOINT as it is now (huggingface_hub reads it once, when imported)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as it is now."""
    from huggingface_hub import constants

    raw = os.environ.get("HF_HUB_OFFLINE")
    if raw is None:
        return bool(constants.HF_HUB_OFFLINE)
    return raw.strip().lower() in ("1", "on", "yes", "true")


def explain(repo: str, filename: str | None, exc: BaseException) -> str:
    """A hub error as a sentence that says what to do."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = hub_endpoint()
    if isinstance(exc, GatedRepoError):
        return (
            f"{repo} is a gated repo: accept its terms on its page at {where}/{repo} and set HF_TOKEN "
            "to a token of that account"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return f"no repo {repo} on {where} (check the name; a private repo needs HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo}: no such revision"
    if isinstance(exc, EntryNotFoundError):
        return f"{repo} has no file {filename}"
    if isinstance(exc, HfHubHTTPError):
        return f"{where} refused {repo}/{filename or ''}: {exc}".replace("\n", " ")
    return f"could not reach {where} for {repo}/{filename or ''}: {type(exc).__name__}: {exc}; run again to resume"


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    filename: str
    url: str
    size: int
    etag: str | None
    commit: str | None


def remote_file(repo: str, filename: str, revision: str = "main") -> RemoteFile:
    """Size, ETag and commit of a file on the hub (a HEAD request)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo, filename, revision=revision, endpoint=hub_endpoint())
    try:
        meta = get_hf_file_metadata(url)
    except Exception as exc:
        raise DownloadError(explain(repo, filename, exc)) from exc
    if meta.size is None:
        raise DownloadError(f"{repo}/{filename}: the hub did not say the file's size")
    return RemoteFile(repo, filename, meta.location or url, int(meta.size), meta.etag, meta.commit_hash)


def iter_range(remote: RemoteFile, start: int, end: int) -> Iterator[bytes]:
    """The bytes [start, end) of a hub file, by one HTTP range request, in chunks."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = {**build_hf_headers(), "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
    with get_session().stream(
        "GET", remote.url, headers=headers, follow_redirects=True, timeout=30
    ) as response:
        hf_raise_for_status(response)
        if response.status_code == 206:
            answered = response.headers.get("Content-Range", "")
            match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", answered)
            if not match or int(match[1]) != start or int(match[2]) != end - 1:
                raise DownloadError(
                    f"{remote.repo}/{remote.filename}: asked for bytes {start}-{end - 1}, got {answered!r}"
                )
        elif response.status_code != 200 or start != 0:
            raise DownloadError(
                f"{remote.repo}/{remote.filename}: the server does not serve byte ranges "
                f"(status {response.status_code})"
            )
        left = end - start
        for chunk in response.iter_bytes(CHUNK):
            if len(chunk) > left:
                chunk = chunk[:left]
            yield chunk
            left -= len(chunk)
            if left <= 0:
                return
        if left > 0:
            raise ConnectionError(f"the connection closed {left} bytes before the range's end")


# ---- fetching -----------------------------------------------------------------------------------


RangeReader = Callable[[int, int], Iterator[bytes]]


@contextlib.contextmanager
def _locked(file: Path) -> Iterator[None]:
    """One downloader per file, across threads and processes."""
    file.parent.mkdir(parents=True, exist_ok=True)
    # Locks live apart from the model files (a repo directory holds only the repo's files).
    locks = models_dir() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(str(file.resolve()).encode()).hexdigest()
    with open(locks / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_space(directory: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise DownloadError(
            f"disk full: {what} needs {needed / 1e9:.2f} GB more, {directory} has {free / 1e9:.2f} GB free; "
            "free some space (`exo models rm MODEL`) and run again to resume"
        )


def fetch_ranges(
    dest: Path,
    manifest: Manifest,
    wanted: Sequence[Range],
    read: RangeReader,
    entry: Download | None = None,
) -> None:
    """Write the parts of `wanted` the manifest lacks into `dest`, recording each as it lands.

    The manifest is saved every couple of seconds and when this returns or raises, and only
    ever lists bytes already written and flushed.
    """
    mpath = manifest_path(dest)
    missing = manifest.missing(wanted)
    if not missing:
        return
    _check_space(dest.parent, sum(b - a for a, b in missing), dest.name)
    last_save = time.monotonic()
    with open(dest, "r+b") as f:

        def save() -> None:
            f.flush()
            os.fsync(f.fileno())
            manifest.save(mpath)

        try:
            for start, end in missing:
                pos = start
                for chunk in read(start, end):
                    f.seek(pos)
                    try:
                        f.write(chunk)
                    except OSError as exc:
                        raise DownloadError(
                            f"could not write {dest} ({exc.strerror}); free some space and run again to resume"
                        ) from exc
                    manifest.add(pos, pos + len(chunk))
                    pos += len(chunk)
                    if entry is not None:
                        TRACKER.advance(entry, len(chunk))
                    if time.monotonic() - last_save > SAVE_EVERY:
                        save()
                        last_save = time.monotonic()
                if pos != end:
                    raise ConnectionError(f"got {pos - start} of {end - start} bytes")
        finally:
            save()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_sha256(etag: str | None) -> bool:
    return bool(etag) and re.fullmatch(r"[0-9a-f]{64}", etag or "") is not None


def gguf_dest(repo: str, filename: str) -> Path:
    """Where a hub GGUF lives in EXO_HOME (whole, or sparse with its manifest)."""
    return models_dir() / repo.replace("/", "--") / filename


def fetch_gguf(
    repo: str,
    filename: str,
    shard: Shard | None,
    *,
    header_only: bool = False,
    model_id: str = "",
    revision: str = "main",
    reader: Callable[[RemoteFile], RangeReader] | None = None,
) -> Path:
    """The GGUF with (at least) the bytes `shard` needs; None = the whole file. Returns its path.

    `header_only` fetches only the header (and the small RoPE-factors tensor the config reads):
    what a model card needs, before any weights.

    Fetches the header, then only the shard's missing byte ranges, into a sparse file in EXO_HOME.
    Raises `DownloadError` with what to do (gated repo, unknown repo, disk full, link dropped).
    """
    dest = gguf_dest(repo, filename)
    mpath = manifest_path(dest)
    label = f"{repo}/{filename}"
    with _locked(dest):
        if dest.is_file() and not mpath.exists():
            return dest  # whole already
        if shard is not None and dest.is_file() and holds_shard(dest, shard):
            return dest
        if header_only and dest.is_file() and _holds_header(dest):
            return dest
        source = _Sources(repo, filename, revision)
        if reader is not None:
            source.reader = reader
        try:
            size, etag, commit = source.identity()
            manifest = Manifest.load(mpath)
            if (
                manifest is None
                or not dest.is_file()
                or manifest.size != size
                or (etag and manifest.etag and manifest.etag != etag)
            ):
                # New, or changed upstream: start from nothing (never reuse another version's bytes).
                manifest = Manifest(size, etag, commit)
                _check_space(dest.parent, 0, label)
                with open(dest, "wb") as f:
                    f.truncate(size)
                manifest.save(mpath)
            gguf = _fetch_header(dest, manifest, source.read, label)
            if header_only:
                fetch_ranges(dest, manifest, header_ranges(gguf), source.read)
                return dest
            if shard is not None:
                count = gguf_block_count(gguf)
                if count is not None and count != shard.n_layers:
                    raise DownloadError(
                        f"{label} has {count} layers, but the shard {shard} expects {shard.n_layers}"
                    )
            wanted = shard_ranges(gguf, shard) if shard is not None else [(0, size)]
            layers = f"{shard.start_layer}-{shard.end_layer}/{shard.n_layers}" if shard else ""
            entry = TRACKER.begin(
                model_id or label,
                repo,
                filename,
                sum(b - a for a, b in manifest.missing(wanted)),
                layers=layers,
                source=source.label(),
            )
            source.entry = entry
            try:
                fetch_ranges(dest, manifest, wanted, source.read, entry)
            except DownloadError as exc:
                TRACKER.fail(entry, str(exc))
                raise
            except Exception as exc:
                TRACKER.fail(entry, explain(repo, filename, exc))
                raise
            TRACKER.finish(entry)
        except DownloadError:
            raise
        except Exception as exc:
            raise DownloadError(explain(repo, filename, exc)) from exc
        if manifest.complete:
            _complete(dest, manifest, label)
        return dest


class _Sources:
    """Where a file's bytes come from: peers of the cluster that hold them first, the hub for
    the rest. A peer that fails mid-transfer is dropped and the range goes on from the next
    source at the byte where it stopped."""

    def __init__(self, repo: str, filename: str, revision: str) -> None:
        self.repo, self.filename, self.revision = repo, filename, revision
        self.name = f"{repo}:{filename}"
        self.holdings: list[Holding] = _peers.have(self.name) if _peers is not None else []
        self.failed: set[str] = set()
        self.remote: RemoteFile | None = None
        self.reader: Callable[[RemoteFile], RangeReader] | None = None
        self.entry: Download | None = None

    def identity(self) -> tuple[int, str | None, str | None]:
        """Size, ETag and commit: from the peers when they hold the file, else from the hub."""
        if self.holdings:
            first = max(self.holdings, key=lambda h: sum(b - a for a, b in h.ranges))
            self.holdings = [h for h in self.holdings if h.size == first.size]
            etag = first.etag or next((h.etag for h in self.holdings if h.etag), None)
            if etag:
                self.holdings = [h for h in self.holdings if h.etag in (None, etag)]
            return first.size, etag, None
        remote = self.hub()
        return remote.size, remote.etag, remote.commit

    def hub(self) -> RemoteFile:
        if self.remote is None:
            if hub_offline():
                raise DownloadError(
                    f"{self.repo}/{self.filename} is not on this node or its peers, and HF_HUB_OFFLINE is set"
                )
            self.remote = remote_file(self.repo, self.filename, self.revision)
        return self.remote

    def label(self) -> str:
        live = [h.node_id for h in self.holdings if h.node_id not in self.failed]
        return f"peer:{live[0]}" if live else "hub"

    def read(self, start: int, end: int) -> Iterator[bytes]:
        pos = start
        while pos < end:
            holder, stop = self._peer_at(pos, end)
            if holder is None:
                remote = self.hub()
                parts = self.reader(remote)(pos, stop) if self.reader else iter_range(remote, pos, stop)
            else:
                if self.entry is not None:
                    self.entry.source = f"peer:{holder}"
                assert _peers is not None
                parts = _peers.read(holder, self.name, pos, stop)
            try:
                for chunk in parts:
                    yield chunk
                    pos += len(chunk)
            except Exception as exc:
                if holder is None:
                    raise
                log.warning(
                    "peer failed mid-transfer; going on from the next source",
                    peer=holder,
                    at=pos,
                    error=str(exc),
                )
                self.failed.add(holder)
                continue
            if pos < stop:
                if holder is None:
                    raise ConnectionError(f"got {pos - start} of {end - start} bytes")
                self.failed.add(holder)

    def _peer_at(self, pos: int, end: int) -> tuple[str | None, int]:
        """A live peer holding byte `pos` and how far it holds it; else (None, where the next
        peer-held range begins)."""
        nearest = end
        for holding in self.holdings:
            if holding.node_id in self.failed:
                continue
            for a, b in holding.ranges:
                if a <= pos < b:
                    return holding.node_id, min(b, end)
                if pos < a < nearest:
                    nearest = a
        return None, nearest


def _fetch_header(dest: Path, manifest: Manifest, read: RangeReader, label: str) -> GGUFFile:
    """Fetch the file's start until the header parses; the header as parsed."""
    want = min(HEADER_FIRST_FETCH, manifest.size)
    while True:
        fetch_ranges(dest, manifest, [(0, want)], read)
        with open(dest, "rb") as f:
            prefix = f.read(want)
        try:
            header = read_gguf_header_bytes(prefix, manifest.size, label)
        except GGUFHeaderIncomplete:
            if want >= manifest.size:
                raise
            want = min(want * 4, manifest.size)
            continue
        header.path = dest
        return header


def _complete(dest: Path, manifest: Manifest, label: str) -> None:
    """Every byte is here: check the hash the hub gave, then the file is whole (no manifest)."""
    if _is_sha256(manifest.etag):
        actual = _sha256(dest)
        if actual != manifest.etag:
            dest.unlink(missing_ok=True)
            manifest_path(dest).unlink(missing_ok=True)
            raise DownloadError(
                f"{label}: the downloaded file's sha256 is {actual}, the hub says {manifest.etag}; "
                "it was removed, run again to download it afresh"
            )
    manifest_path(dest).unlink(missing_ok=True)
