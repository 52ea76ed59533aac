"""Shard downloads on loopback: bytes and time for the whole GGUF vs one shard's byte ranges,
from the stand-in hub (HTTP) and from a peer (gRPC, exo.Files).

    .venv/bin/python bench/bench_downloads.py

The baseline is `huggingface_hub.hf_hub_download` of the whole file, what every node did before.
Loopback measures exo's own overhead (parsing, writing, the manifest), not a network.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import grpc

from exo_core.models.cards import ModelCard
from exo_core.models.download import set_peer_source
from exo_core.models.files import embedded_gguf_path, shard_checkpoint
from exo_core.models.shard import Shard
from exo_core.networking import file_transfer
from exo_core.testing.hub import StandInHub

FILE = "smol.gguf"
CARD = ModelCard("smol", "smol", 30, {"gguf": f"org/smol:{FILE}"})


def timed(label: str, run, rows: list) -> None:
    start = time.perf_counter()
    path, fetched = run()
    seconds = time.perf_counter() - start
    on_disk = path.stat().st_blocks * 512
    rows.append((label, fetched / 1e6, on_disk / 1e6, seconds, fetched / 1e6 / seconds))


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    repo = tmp / "repo"
    repo.mkdir()
    shutil.copyfile(embedded_gguf_path(), repo / FILE)
    rows: list = []
    with StandInHub() as hub:
        hub.add_repo("org/smol", repo)
        os.environ["HF_ENDPOINT"] = hub.url

        def whole_hf() -> tuple[Path, int]:
            from huggingface_hub import hf_hub_download

            os.environ["EXO_HOME"] = str(tmp / "hf-home")
            path = Path(hf_hub_download("org/smol", FILE, cache_dir=tmp / "hf-cache", endpoint=hub.url))
            return path, path.stat().st_size

        def ranges(home: str, shard: Shard) -> tuple[Path, int]:
            os.environ["EXO_HOME"] = str(tmp / home)
            hub.clear()
            _, path = shard_checkpoint(CARD, shard, ["gguf"])
            fetched = 0
            for r in hub.downloads(FILE):
                a, b = r.range.removeprefix("bytes=").split("-")
                fetched += int(b) - int(a) + 1
            return path, fetched

        timed("whole file, hf_hub_download (before)", whole_hf, rows)
        timed("whole file, byte ranges", lambda: ranges("all", Shard("smol", 0, 29, 30)), rows)
        timed("layers 0-14 of 30, byte ranges", lambda: ranges("first", Shard("smol", 0, 14, 30)), rows)
        timed("layers 10-19 of 30, byte ranges", lambda: ranges("middle", Shard("smol", 10, 19, 30)), rows)

        # a peer holding the whole file serves layers 15-29 over gRPC
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        box: dict = {}

        async def serve() -> None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((file_transfer.handler(),))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            box["server"], box["channel"] = server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")

        asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
        peer_home = tmp / "all"  # the peer: the home that holds the whole file now

        class PinnedHome:
            def __init__(self) -> None:
                self.peers = file_transfer.PeerFiles(lambda: {"peer": box["channel"]}, loop)

            def _with_home(self, fn):
                saved = os.environ["EXO_HOME"]
                os.environ["EXO_HOME"] = str(peer_home)
                try:
                    return fn()
                finally:
                    os.environ["EXO_HOME"] = saved

            def have(self, source):
                return self._with_home(lambda: self.peers.have(source))

            def read(self, node_id, source, start, end):
                saved = os.environ["EXO_HOME"]
                os.environ["EXO_HOME"] = str(peer_home)
                try:
                    yield from self.peers.read(node_id, source, start, end)
                finally:
                    os.environ["EXO_HOME"] = saved

        set_peer_source(PinnedHome())

        def from_peer() -> tuple[Path, int]:
            os.environ["EXO_HOME"] = str(tmp / "peer-fetch")
            hub.clear()
            _, path = shard_checkpoint(CARD, Shard("smol", 15, 29, 30), ["gguf"])
            assert not hub.downloads(FILE), "the hub was asked"
            import json

            from exo_core.models.download import manifest_path

            ranges = json.loads(manifest_path(path).read_text())["ranges"]
            return path, sum(b - a for a, b in ranges)

        timed("layers 15-29 of 30, from a peer (gRPC)", from_peer, rows)
        set_peer_source(None)
        asyncio.run_coroutine_threadsafe(box["server"].stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
    size = embedded_gguf_path().stat().st_size / 1e6
    print(f"embedded SmolLM2-135M Q4_1 GGUF, {size:.1f} MB, loopback\n")
    print(f"{'download':44} {'fetched MB':>10} {'on disk MB':>10} {'seconds':>8} {'MB/s':>7}")
    for label, fetched, disk, seconds, rate in rows:
        print(f"{label:44} {fetched:10.1f} {disk:10.1f} {seconds:8.2f} {rate:7.0f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
