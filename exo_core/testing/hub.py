"""A stand-in Hugging Face hub on 127.0.0.1: the endpoints `huggingface_hub` and exo's downloads call.

It serves repos from local directories, speaking what the real hub says on the wire:

- `HEAD|GET /{repo}/resolve/{revision}/{file}`: the file, with `ETag` (the sha256 of
  weights files, as the hub gives for LFS files), `X-Repo-Commit`, `Content-Length`, and
  `Range: bytes=a-b` answered with `206` + `Content-Range`;
- `GET /api/models/{repo}/tree/{revision}`: the file listing (path, size, `lfs.oid`);
- `GET /api/models/{repo}[/revision/{revision}]`: repo info with `siblings` and `sha`;
- errors as the hub sends them: an unknown repo is `401` with `X-Error-Code: RepoNotFound`, a
  gated repo without its token `401` with `GatedRepo`, a missing file `404` with `EntryNotFound`.

Tests read `requests` (method, path, Range header) to assert what was fetched, and may cut a
file's next download short (`cut_after`) to test resuming. Point a process at it with
`HF_ENDPOINT=hub.url` (huggingface_hub reads it when imported, so set it before, or in a
child process's environment).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

COMMIT = "c0ffee" + "0" * 34
# Files the real hub keeps in LFS (their ETag is the content's sha256).
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass(frozen=True)
class HubRequest:
    """One request the hub answered."""

    method: str
    repo: str
    file: str  # "" for API calls
    range: str | None  # the Range header as sent
    status: int
    path: str = ""


class StandInHub:
    """A hub on 127.0.0.1 over local directories; `with StandInHub() as hub:` starts and stops it."""

    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.gated: dict[str, str] = {}  # repo -> the token it wants
        self.requests: list[HubRequest] = []
        self.cuts: dict[str, int] = {}  # file name -> bytes to send before dropping the connection
        self.tampered: set[str] = set()  # file names served with a byte flipped (ETag/listing unchanged)
        self._digests: dict[Path, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- set-up ------------------------------------------------------------------------------

    def add_repo(self, repo: str, directory: str | Path, *, token: str | None = None) -> None:
        """Serve `directory` as `repo`; with `token`, the repo is gated and needs that bearer token."""
        self.repos[repo] = Path(directory)
        if token:
            self.gated[repo] = token

    def tamper(self, file: str) -> None:
        """Serve `file` with its first byte flipped, while the ETag and listing still give the
        original's sha256: what a corrupted transfer looks like to a client."""
        self.tampered.add(file)

    def cut_after(self, file: str, nbytes: int) -> None:
        """The next GET of `file` with a longer body sends `nbytes` of it, then drops the connection."""
        self.cuts[file] = nbytes

    @property
    def url(self) -> str:
        assert self._server is not None, "start the hub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> StandInHub:
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> StandInHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what was asked ----------------------------------------------------------------------

    def downloads(self, file: str | None = None) -> list[HubRequest]:
        """The GETs of files (not HEADs, not API calls), optionally of one file name."""
        with self._lock:
            return [
                r for r in self.requests if r.method == "GET" and r.file and (file is None or r.file == file)
            ]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    # ---- content -----------------------------------------------------------------------------

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        cached = self._digests.get(path)
        if cached and cached[0] == stat.st_mtime:
            return cached[1]
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        self._digests[path] = (stat.st_mtime, digest.hexdigest())
        return digest.hexdigest()

    def etag(self, path: Path) -> str:
        if path.name.endswith(LFS_SUFFIXES):
            return self.sha256(path)
        return hashlib.sha1(b"blob %d\0" % path.stat().st_size + path.read_bytes()).hexdigest()

    def listing(self, repo: str) -> list[dict[str, Any]]:
        base = self.repos[repo]
        out = []
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            entry: dict[str, Any] = {
                "type": "file",
                "path": path.relative_to(base).as_posix(),
                "size": path.stat().st_size,
                "oid": hashlib.sha1(path.name.encode()).hexdigest(),
            }
            if path.name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": self.sha256(path), "size": path.stat().st_size, "pointerSize": 134}
            out.append(entry)
        return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: StandInHub) -> None:
        self.hub = hub
        super().__init__(("127.0.0.1", 0), _Handler)


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _record(self, repo: str, file: str, status: int) -> None:
        hub = self.server.hub
        with hub._lock:
            hub.requests.append(
                HubRequest(self.command, repo, file, self.headers.get("Range"), status, self.path)
            )

    def _answer(self, body: bool) -> None:
        hub = self.server.hub
        path = self.path.split("?")[0]
        found = [
            (k, m) for k, p in (("file", _RESOLVE), ("tree", _TREE), ("info", _INFO)) if (m := p.match(path))
        ]
        if not found:
            return self._error(404, "", "", f"not a hub endpoint: {path}", body)
        kind, match = found[0]
        repo = match["repo"]
        if repo not in hub.repos:
            return self._error(401, repo, "RepoNotFound", "Repository not found", body)
        wanted = hub.gated.get(repo)
        if wanted and self.headers.get("Authorization") != f"Bearer {wanted}":
            return self._error(401, repo, "GatedRepo", "Access to this model is restricted", body)
        if kind == "tree":
            return self._json(repo, hub.listing(repo), body)
        if kind == "info":
            siblings = [
                {"rfilename": e["path"], "size": e["size"], **({"lfs": e["lfs"]} if "lfs" in e else {})}
                for e in hub.listing(repo)
            ]
            return self._json(repo, {"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings}, body)
        file = hub.repos[repo] / match["file"]
        if not file.is_file():
            return self._error(404, repo, "EntryNotFound", f"{match['file']} does not exist", body)
        self._file(repo, file, body)

    def _file(self, repo: str, file: Path, body: bool) -> None:
        hub = self.server.hub
        size = file.stat().st_size
        headers = {
            "ETag": f'"{hub.etag(file)}"',
            "X-Repo-Commit": COMMIT,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        start, end, status = 0, size, 200
        asked = self.headers.get("Range")
        if asked:
            match = _RANGE.match(asked.strip())
            if not match or (not match[1] and not match[2]):
                return self._error(416, repo, "", f"bad range {asked}", body)
            if match[1]:
                start = int(match[1])
                end = min(int(match[2]) + 1, size) if match[2] else size
            else:
                start = max(size - int(match[2]), 0)
            if start >= size or start >= end:
                self._record(repo, file.name, 416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self._record(repo, file.name, status)
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(end - start)}.items():
            self.send_header(key, value)
        self.end_headers()
        if not body:
            return
        cut = hub.cuts.get(file.name) if self.command == "GET" else None
        if cut is not None and cut < end - start:
            del hub.cuts[file.name]
        else:
            cut = None
        limit = end - start if cut is None else cut
        with file.open("rb") as f:
            f.seek(start)
            left = limit
            while left > 0:
                at = f.tell()
                block = f.read(min(left, 1 << 16))
                if not block:
                    break
                if at == 0 and file.name in hub.tampered:
                    block = bytes([block[0] ^ 0xFF]) + block[1:]
                self.wfile.write(block)
                left -= len(block)
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the peer sees the body end early, as when a link drops

    def _json(self, repo: str, payload: Any, body: bool) -> None:
        data = json.dumps(payload).encode()
        self._record(repo, "", 200)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, repo: str, code: str, message: str, body: bool) -> None:
        data = json.dumps({"error": message}).encode()
        self._record(repo, "", status)
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


# ---- a model to serve -------------------------------------------------------------------------


def _write_safetensors(path: Path, names: list[str]) -> None:
    """A safetensors file of one-float tensors (what matters is which file holds which)."""
    header = {
        n: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, n in enumerate(names)
    }
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4 * len(names)))


LAYER_TENSORS = (
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def write_tiny_llama_safetensors(directory: Path) -> dict[str, list[str]]:
    """A two-layer Llama repo in three safetensors files with an index (the embedding and layer
    0; layer 1; the final norm and the head), config.json and tokenizer.json, for tests of
    which files a shard fetches (the tensors are placeholders, not a working model). Returns
    file name -> its tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1}
    config |= {"intermediate_size": 16, "num_hidden_layers": 2, "vocab_size": 16}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.json").write_text("{}")
    files = {
        "model-00001-of-00003.safetensors": [
            "model.embed_tokens.weight",
            *(f"model.layers.0.{m}.weight" for m in LAYER_TENSORS),
        ],
        "model-00002-of-00003.safetensors": [f"model.layers.1.{m}.weight" for m in LAYER_TENSORS],
        "model-00003-of-00003.safetensors": ["model.norm.weight", "lm_head.weight"],
    }
    for name, tensors in files.items():
        _write_safetensors(directory / name, tensors)
    weight_map = {t: name for name, tensors in files.items() for t in tensors}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return files
