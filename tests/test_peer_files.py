"""Peers first: a node fetches a model's byte ranges from a peer that has them, before the hub."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import grpc
import pytest

from exo_core.models.cards import ModelCard
from exo_core.models.checkpoint.gguf import read_gguf
from exo_core.models.download import manifest_path, set_peer_source, shard_ranges, subtract
from exo_core.models.files import embedded_gguf_path, shard_checkpoint
from exo_core.models.progress import TRACKER
from exo_core.models.shard import Shard
from exo_core.networking import file_transfer
from exo_core.testing.cluster import Cluster
from exo_core.testing.hub import StandInHub, write_tiny_llama_safetensors

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE = f"org/smol-gguf:{FILE}"
CARD = ModelCard("smol-hub", "smol-hub", 30, {"gguf": SOURCE}, context_length=8192)
DEAD_HUB = "http://127.0.0.1:9"  # nothing listens on the discard port


class PeerServer:
    """A real gRPC server with the files service, on its own event loop in a thread; it serves
    what is in `home` (its EXO_HOME, set while it looks files up)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: grpc.aio.Server | None = None
        self.port = 0

    def start(self) -> None:
        async def go() -> None:
            self.server = grpc.aio.server()
            self.server.add_generic_rpc_handlers((file_transfer.handler(),))
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
            self.server = None

    def peers(self) -> file_transfer.PeerFiles:
        channel_box: dict[str, grpc.aio.Channel] = {}

        async def make() -> None:
            channel_box["a"] = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")

        asyncio.run_coroutine_threadsafe(make(), self.loop).result(10)
        return file_transfer.PeerFiles(lambda: dict(channel_box), self.loop)

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def seeded(tmp_path, monkeypatch):
    """EXO_HOME holds the whole file under its hub name (as a peer that downloaded it would)."""
    home = tmp_path / "home"
    folder = home / "models" / "org--smol-gguf"
    folder.mkdir(parents=True)
    os.symlink(embedded_gguf_path(), folder / FILE)
    monkeypatch.setenv("EXO_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", DEAD_HUB)
    server = PeerServer()
    server.start()
    yield server
    set_peer_source(None)
    server.close()


def test_files_service_refuses_what_it_does_not_hold(seeded):
    peers = seeded.peers()
    (held,) = peers.have(SOURCE)
    assert held.size == embedded_gguf_path().stat().st_size and held.ranges == [(0, held.size)]
    assert peers.have("org/other:x.gguf") == []
    assert peers.have("../../etc:passwd.gguf") == []
    assert b"".join(peers.read("a", SOURCE, 0, 4)) == b"GGUF"
    with pytest.raises(ConnectionError, match="NOT_FOUND"):
        list(peers.read("a", SOURCE, held.size - 2, held.size + 10))


def test_a_shard_comes_from_a_peer_when_the_hub_is_unreachable(seeded, tmp_path, monkeypatch):
    peers = seeded.peers()
    # this node: another EXO_HOME, nothing of the model; the peer looks files up in its own
    # home (the service runs in this process, so point it there while it answers)
    set_peer_source(_PinnedHome(peers, Path(os.environ["EXO_HOME"])))
    monkeypatch.setenv("EXO_HOME", str(tmp_path / "mine"))
    _, path = shard_checkpoint(CARD, Shard("smol-hub", 15, 29, 30), ["gguf"])
    assert manifest_path(path).exists()  # only the shard's ranges
    whole = read_gguf(embedded_gguf_path(), string_arrays=False)
    data, got = embedded_gguf_path().read_bytes(), path.read_bytes()
    for a, b in shard_ranges(whole, Shard("smol-hub", 15, 29, 30)):
        assert got[a:b] == data[a:b]
    entry = [d for d in TRACKER.snapshot() if d.repo == "org/smol-gguf" and d.layers == "15-29/30"][-1]
    assert entry.source == "peer:a" and entry.status == "done"


def test_a_safetensors_shard_comes_from_a_peer(seeded, tmp_path, monkeypatch):
    peer_home = Path(os.environ["EXO_HOME"])
    repo = peer_home / "models" / "org--tiny"
    write_tiny_llama_safetensors(repo)
    (repo / "notes.txt").write_text("not a model file")
    peers = _PinnedHome(seeded.peers(), peer_home)
    assert peers.have("org/tiny/notes.txt") == []  # only what a shard download takes is served
    assert peers.have("org/tiny/../org--tiny/config.json") == []
    set_peer_source(peers)
    monkeypatch.setenv("EXO_HOME", str(tmp_path / "mine"))  # the hub is unreachable (DEAD_HUB)
    card = ModelCard("tiny", "tiny", 2, {"safetensors": "org/tiny"})
    kind, path = shard_checkpoint(card, Shard("tiny", 1, 1, 2), ["safetensors"])
    assert kind == "safetensors" and path == tmp_path / "mine" / "models" / "org--tiny"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]
    for name in ("model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        assert (path / name).read_bytes() == (repo / name).read_bytes()
    entry = [d for d in TRACKER.snapshot() if d.file == "model-00003-of-00003.safetensors"][-1]
    assert entry.source == "peer:a" and entry.status == "done"


def test_a_peer_that_leaves_mid_transfer_hands_over_to_the_hub(seeded, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    os.symlink(embedded_gguf_path(), repo / FILE)
    with StandInHub() as hub:
        hub.add_repo("org/smol-gguf", repo)
        peers = _LeavingPeer(_PinnedHome(seeded.peers(), Path(os.environ["EXO_HOME"])), after=20_000_000)
        set_peer_source(peers)
        monkeypatch.setenv("EXO_HOME", str(tmp_path / "mine"))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        shard = Shard("smol-hub", 0, 14, 30)
        _, path = shard_checkpoint(CARD, shard, ["gguf"])
        whole = read_gguf(embedded_gguf_path(), string_arrays=False)
        needed = shard_ranges(whole, shard)
        from_hub = [
            (int(r.range[6:].split("-")[0]), int(r.range[6:].split("-")[1]) + 1) for r in hub.downloads(FILE)
        ]
        assert from_hub and peers.sent > 0
        # the hub was asked only for what the peer had not sent
        assert from_hub[0][0] >= 20_000_000 - (1 << 20)
        assert subtract(needed, from_hub) != []  # the peer's part was not fetched again
        data, got = embedded_gguf_path().read_bytes(), path.read_bytes()
        for a, b in needed:
            assert got[a:b] == data[a:b]


class _PinnedHome:
    """Peer files looked up in the peer's own EXO_HOME while this process's is another."""

    def __init__(self, peers: file_transfer.PeerFiles, home: Path) -> None:
        self.peers, self.home = peers, home

    def have(self, source):
        with _home(self.home):
            return self.peers.have(source)

    def read(self, node_id, source, start, end):
        with _home(self.home):
            yield from self.peers.read(node_id, source, start, end)


class _LeavingPeer:
    """A peer that goes away after sending `after` bytes (its stream ends in an error)."""

    def __init__(self, peers, after: int) -> None:
        self.peers, self.after, self.sent = peers, after, 0

    def have(self, source):
        return self.peers.have(source)

    def read(self, node_id, source, start, end):
        if self.sent >= self.after:
            raise ConnectionError("peer a left")
        for chunk in self.peers.read(node_id, source, start, end):
            room = self.after - self.sent
            if room <= 0:
                raise ConnectionError("peer a left")
            chunk = chunk[:room]
            self.sent += len(chunk)
            yield chunk


class _home:
    def __init__(self, home: Path) -> None:
        self.home = home

    def __enter__(self):
        self.saved = os.environ.get("EXO_HOME")
        os.environ["EXO_HOME"] = str(self.home)

    def __exit__(self, *exc):
        os.environ["EXO_HOME"] = self.saved or ""


CARDS_PLUGIN = """
from exo_core import ModelCard, hookimpl


@hookimpl
def register_models(register):
    register(ModelCard("smol-hub", "SmolLM2 from a hub repo", 30, {"gguf": "%s"}, context_length=8192))
"""


def write_cards_plugin(site: Path) -> None:
    """A plugin registering a card whose GGUF is on the hub (a dist-info on PYTHONPATH)."""
    (site / "exo_cards_fixture").mkdir(parents=True)
    (site / "exo_cards_fixture" / "__init__.py").write_text(CARDS_PLUGIN % SOURCE)
    info = site / "exo_cards_fixture-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: exo-cards-fixture\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[exo]\ncards_fixture = exo_cards_fixture\n")


@pytest.mark.heavy
def test_three_nodes_one_with_the_files_and_no_hub_answer_correctly(tmp_path):
    site, seed = tmp_path / "site", tmp_path / "seed"
    write_cards_plugin(site)
    (seed / "org--smol-gguf").mkdir(parents=True)
    os.symlink(embedded_gguf_path(), seed / "org--smol-gguf" / FILE)
    env = {"PYTHONPATH": str(site), "HF_ENDPOINT": DEAD_HUB, "EXO_DISABLE_PLUGINS": "mlx,rkllm"}
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    with Cluster.manual(
        ["a", "b", "c"],
        tmp=tmp_path / "cluster",
        engine="tinygrad",
        env=env,
        per_node_args={"a": ["--models-seed-dir", str(seed)]},
        timeout=300,
    ) as cluster:
        status, topo = cluster.get("a", "/v1/topology?model=smol-hub")
        assert status == 200 and len(topo["plan"]) == 3, topo
        answer = cluster.chat("a", messages, max_tokens=8, model="smol-hub")
        assert answer == cluster.chat("a", messages, max_tokens=8, model="smollm2-135m")
        for node_id in ("b", "c"):
            held = tmp_path / "cluster" / f"home-{node_id}" / "models" / "org--smol-gguf" / FILE
            manifest = json.loads(manifest_path(held).read_text())
            assert 0 < sum(b - a for a, b in manifest["ranges"]) < held.stat().st_size
            status, downloads = cluster.get(node_id, "/v1/downloads")
            assert status == 200
            assert [d["source"] for d in downloads["data"]] == ["peer:a"], downloads
        # node a's API shows the whole cluster's downloads
        _, everyone = cluster.get("a", "/v1/downloads")
        by_node = {n["node_id"]: n["data"] for n in everyone["nodes"]}
        assert set(by_node) == {"a", "b", "c"} and by_node["a"] == []
        assert all(d["source"] == "peer:a" and d["status"] == "done" for n in "bc" for d in by_node[n])


@pytest.mark.heavy
def test_two_nodes_fetch_only_their_ranges_from_the_hub_and_answer_like_the_whole_file(tmp_path):
    site, repo = tmp_path / "site", tmp_path / "repo"
    write_cards_plugin(site)
    repo.mkdir()
    os.symlink(embedded_gguf_path(), repo / FILE)
    whole = read_gguf(embedded_gguf_path(), string_arrays=False)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    with StandInHub() as hub:
        hub.add_repo("org/smol-gguf", repo)
        env = {"PYTHONPATH": str(site), "HF_ENDPOINT": hub.url, "EXO_DISABLE_PLUGINS": "mlx,rkllm"}
        with Cluster.manual(
            ["a", "b"], tmp=tmp_path / "cluster", engine="tinygrad", env=env, timeout=300
        ) as cluster:
            _, topo = cluster.get("a", "/v1/topology?model=smol-hub")
            shards = {s["node_id"]: Shard.from_dict(s["shard"]) for s in topo["plan"]}
            assert sorted(s.layer_count for s in shards.values()) == [15, 15]
            answer = cluster.chat("a", messages, max_tokens=8, model="smol-hub")
            assert answer == cluster.chat("a", messages, max_tokens=8, model="smollm2-135m")
            started = {n: cluster.get(n, "/v1/downloads")[1]["data"][-1]["started"] for n in shards}
            # downloads start when the plan names the nodes: b did not wait for its first step
            # (which comes after a has downloaded, loaded and run the prompt through its layers)
            assert abs(started["b"] - started["a"]) < 1.0, started
        needed = {n: shard_ranges(whole, s) for n, s in shards.items()}
        everything = [r for ranges in needed.values() for r in ranges]
        asked = [
            (int(r.range[6:].split("-")[0]), int(r.range[6:].split("-")[1]) + 1) for r in hub.downloads(FILE)
        ]
        # nothing outside the two shards' ranges was asked of the hub (bar the header's prefix)
        assert all(b <= 4 << 20 for _, b in subtract(asked, everything))
        for node_id, ranges in needed.items():
            held = tmp_path / "cluster" / f"home-{node_id}" / "models" / "org--smol-gguf" / FILE
            present = [tuple(r) for r in json.loads(manifest_path(held).read_text())["ranges"]]
            assert subtract(ranges, present) == []  # it has what its layers need
            assert all(b <= 4 << 20 for _, b in subtract(present, ranges))  # and nothing else
            assert held.stat().st_blocks * 512 < 0.8 * whole.file_size
