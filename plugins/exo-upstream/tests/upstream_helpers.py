"""Real upstreams for the tests: `python -m llama_cpp.server` serving the embedded GGUF.

llama-cpp-python builds llama.cpp from source when pip installs it (about 10 minutes on two
cores, once per machine; pip caches the wheel). Tests that need it skip, saying so, when it
cannot be imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from exo_core import embedded_gguf_path

HAVE_LLAMA = (
    importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("uvicorn") is not None
)
needs_llama = pytest.mark.skipif(
    not HAVE_LLAMA,
    reason="llama-cpp-python[server] is not installed (scripts/bootstrap.sh installs it; it builds "
    "llama.cpp from source, ~10 minutes once)",
)
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LlamaServer:
    url: str
    process: subprocess.Popen
    log: Path

    def requests(self) -> int:
        """Generation requests the server has started answering (uvicorn's access log)."""
        return self.log.read_text(errors="replace").count("POST /v1/chat/completions")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)


@contextlib.contextmanager
def llama_server(tmp: Path, *, threads: int = 1, alias: str = "smollm2-135m") -> Iterator[LlamaServer]:
    port = free_port()
    log = tmp / f"llama-{port}.log"
    args = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(embedded_gguf_path()),
        "--model_alias", alias,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048", "--n_threads", str(threads), "--n_threads_batch", str(threads),
        # By default a new request cuts the stream running (silently): queue them instead.
        "--interrupt_requests", "False",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "NO_PROXY": "*"}
        )
    server = LlamaServer(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {log.read_text(errors='replace')[-2000:]}")
            try:
                with _NO_PROXY.open(server.url + "/v1/models", timeout=2) as resp:
                    json.loads(resp.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
