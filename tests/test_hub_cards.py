"""Cards for any hub repo (hf.co/ORG/REPO[:FILE.gguf|:QUANT]) from the model's own metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from exo_core.models.files import ModelFilesError, embedded_gguf_path
from exo_core.models.hub_cards import card_from_hub, parse_hub_id, pick_gguf
from exo_core.testing.hub import StandInHub

EMBEDDED_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_gpt2_gguf(path):
    """A GGUF of an architecture exo's engines do not run, with 8 MB of weights after its header."""
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_tensor("token_embd.weight", np.zeros((2048, 1024), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    smol = tmp_path / "smol"
    smol.mkdir()
    os.symlink(embedded_gguf_path(), smol / EMBEDDED_NAME)
    os.symlink(embedded_gguf_path(), smol / "SmolLM2-135M-Instruct.Q8_0.gguf")
    other = tmp_path / "other"
    other.mkdir()
    write_gpt2_gguf(other / "gpt2.Q4_K_M.gguf")
    st = tmp_path / "st"
    st.mkdir()
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "vocab_size": 48,
        "max_position_embeddings": 2048,
    }
    (st / "config.json").write_text(json.dumps(config))
    (st / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    gpt2 = tmp_path / "gpt2-st"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    (gpt2 / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with StandInHub() as server:
        server.add_repo("org/smol-gguf", smol)
        server.add_repo("org/other", other)
        server.add_repo("org/tiny", st)
        server.add_repo("org/gpt2", gpt2)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield server


def test_parse_hub_ids():
    assert parse_hub_id("hf.co/org/repo") == ("org/repo", None)
    assert parse_hub_id("huggingface.co/org/repo:Q4_K_M") == ("org/repo", "Q4_K_M")
    assert parse_hub_id("https://hf.co/org/repo:a.gguf") == ("org/repo", "a.gguf")
    for bad in ("hf.co/repo", "hf.co/org/repo:", "hf.co//x"):
        with pytest.raises(ModelFilesError, match=r"hf\.co/ORG/REPO|nothing after"):
            parse_hub_id(bad)


def test_pick_gguf_by_file_tag_and_default():
    files = ["a-Q4_K_M.gguf", "a-Q8_0.gguf", "README.md", "b-Q6_K-00001-of-00002.gguf"]
    assert pick_gguf("o/r", files, None) == "a-Q4_K_M.gguf"
    assert pick_gguf("o/r", files, "q8_0") == "a-Q8_0.gguf"
    assert pick_gguf("o/r", files, "a-Q8_0.gguf") == "a-Q8_0.gguf"
    with pytest.raises(ModelFilesError, match="no GGUF file tagged Q5_K"):
        pick_gguf("o/r", files, "Q5_K")
    with pytest.raises(ModelFilesError, match="split into several files"):
        pick_gguf("o/r", files, "Q6_K")
    with pytest.raises(ModelFilesError, match=r"no file c\.gguf"):
        pick_gguf("o/r", files, "c.gguf")


def test_a_gguf_card_comes_from_the_header_alone(hub):
    card = card_from_hub("hf.co/org/smol-gguf:Q4_1")
    assert card.id == "hf.co/org/smol-gguf:Q4_1"
    assert card.n_layers == 30 and card.context_length == 8192
    assert card.sources == {"gguf": f"org/smol-gguf:{EMBEDDED_NAME}"}
    asked = [r.range for r in hub.downloads()]
    assert asked and all(int(r.split("-")[1]) < 4 << 20 for r in asked)  # the header, no weights
    by_file = card_from_hub(f"hf.co/org/smol-gguf:{EMBEDDED_NAME}")
    assert by_file.sources == card.sources
    with pytest.raises(ModelFilesError, match=r"no GGUF file tagged Q4_K_M"):
        card_from_hub("hf.co/org/smol-gguf")


def test_an_unsupported_architecture_is_refused_before_any_weights(hub):
    with pytest.raises(ModelFilesError, match="'gpt2' is not Llama-family"):
        card_from_hub("hf.co/org/other")
    size = 2048 * 1024 * 4
    fetched = sum(int(b) - int(a) + 1 for a, b in (r.range[6:].split("-") for r in hub.downloads()))
    assert fetched < size / 4
    with pytest.raises(ModelFilesError, match="'gpt2' is not Llama-family"):
        card_from_hub("hf.co/org/gpt2")
    assert not [r for r in hub.downloads() if r.file.endswith(".safetensors")]


def test_a_safetensors_card_comes_from_config_json(hub):
    card = card_from_hub("hf.co/org/tiny")
    assert (card.n_layers, card.context_length, dict(card.sources)) == (6, 2048, {"safetensors": "org/tiny"})
    assert [r.file for r in hub.downloads()] == ["config.json"]


def test_hub_errors(hub):
    with pytest.raises(ModelFilesError, match="no repo org/missing"):
        card_from_hub("hf.co/org/missing:Q4_K_M")


PROMPT = "What is the capital of France? Answer in one word."


def run_prompt(model: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "exo_core", "run", model, "--prompt", PROMPT, "--max-tokens", "6"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


@pytest.mark.heavy
def test_exo_run_a_hub_gguf_answers_like_the_embedded_model(hub, tmp_path):
    env = {"HF_ENDPOINT": hub.url, "EXO_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf")}
    assert run_prompt("hf.co/org/smol-gguf:Q4_1", env) == run_prompt("smollm2-135m", env)


def test_a_node_restarts_with_a_tag_id_without_the_hub(hub, monkeypatch):
    card = card_from_hub("hf.co/org/smol-gguf:Q4_1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # unreachable: what is on disk answers
    assert card_from_hub("hf.co/org/smol-gguf:Q4_1") == card
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert card_from_hub("hf.co/org/smol-gguf:Q4_1") == card
    with pytest.raises(ModelFilesError, match="HF_HUB_OFFLINE is set and nothing of org/other"):
        card_from_hub("hf.co/org/other:Q4_K_M")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(ModelFilesError, match="no repo org/nope"):  # a refusal is not papered over
        card_from_hub("hf.co/org/nope:Q4_1")


def _plan_nodes(cluster, node_id, model):
    from urllib.parse import quote

    status, topo = cluster.get(node_id, f"/v1/topology?model={quote(model)}")
    assert status == 200, topo
    return {stage["node_id"] for stage in topo["plan"]}


@pytest.mark.timeout(300)
def test_a_hub_id_works_on_any_node_of_the_cluster(hub, tmp_path):
    from exo_core.testing.cluster import Cluster

    served = "hf.co/org/smol-gguf:Q4_1"
    hi = [{"role": "user", "content": "Hi"}]
    with Cluster.manual(["a", "b"], tmp=tmp_path / "c", per_node_args={"a": [served]}) as cluster:
        # node a was started with the hub id; node b never saw it: asked on b, it answers
        # like a does, and b's plan uses a (b made the card from the hub under a's id)
        on_a = cluster.chat("a", hi, model=served, max_tokens=8)
        assert cluster.chat("b", hi, model=served, max_tokens=8) == on_a
        assert _plan_nodes(cluster, "b", served) == {"a", "b"}
        # another spelling of the same model is the same model
        assert cluster.chat("b", hi, model="huggingface.co/org/SMOL-gguf:q4_1", max_tokens=8) == on_a
        assert cluster.chat("a", hi, model="https://hf.co/org/smol-gguf:q4_1", max_tokens=8) == on_a
        # a hub model no node serves yet: b makes the card from the hub; a takes layers of it
        # too (its engine loads GGUF: the card comes with b's plan, see test_hub_peers.py)
        other = "hf.co/org/smol-gguf:Q8_0"
        assert cluster.chat("b", hi, model=other, max_tokens=8)
        assert _plan_nodes(cluster, "b", other) == {"a", "b"}
        status, models = cluster.get("b", "/v1/models")
        assert {served, other} <= {m["id"] for m in models["data"]}
        # the other endpoints that name a model take a hub id too (node a never saw `other`)
        status, shown = cluster.post("a", "/api/show", {"model": other})
        assert status == 200 and "completion" in shown["capabilities"], shown
        status, topo = cluster.get("a", "/v1/topology?model=" + other)
        assert status == 200, topo
        # an unknown repo, or a model exo does not run: a 404 that says why, and nothing lost
        for missing, why in (("hf.co/org/missing", "no repo org/missing"), ("hf.co/org/other", "gpt2")):
            status, reply = cluster.post("b", "/v1/chat/completions", {"model": missing, "messages": hi})
            assert status == 404, reply
            assert reply["error"]["code"] == "model_not_found" and why in reply["error"]["message"]
        assert cluster.chat("b", hi, max_tokens=4)
        assert cluster.chat("b", hi, model=served, max_tokens=8) == on_a
