"""The `exo` command line, run as a user runs it (a subprocess)."""

import json
import os
import subprocess
import sys

import pytest

from exo_core.engines.dummy import DUMMY_ANSWER

EXO = [sys.executable, "-m", "exo_core"]


def exo(*args, env=None, timeout=120):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*EXO, *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def test_plugins_json_lists_core_and_the_four_plugins():
    out = exo("plugins", "--json")
    assert out.returncode == 0, out.stderr
    records = {r["name"]: r for r in json.loads(out.stdout)}
    assert {"dummy", "tinygrad", "mlx", "rkllm", "tailscale"} <= set(records)
    assert all(r["error"] is None for r in records.values())


def test_plugins_table():
    out = exo("plugins")
    assert out.returncode == 0
    assert "tinygrad" in out.stdout and "register_engines" in out.stdout


def test_disable_plugins_env_omits_plugin():
    out = exo("plugins", "--json", env={"EXO_DISABLE_PLUGINS": "tinygrad"})
    names = {r["name"] for r in json.loads(out.stdout)}
    assert "tinygrad" not in names and "mlx" in names


def test_models_lists_cards_and_embedded_file():
    out = exo("models", "--json")
    assert out.returncode == 0, out.stderr
    cards = {c["id"]: c for c in json.loads(out.stdout)}
    assert cards["smollm2-135m"]["present"]["gguf"] is True
    assert cards["llama-3.2-1b"]["n_layers"] == 16


@pytest.mark.parametrize(
    "args,needle",
    [
        (["run", "--engine", "nope"], "unknown engine 'nope'; choose one of: "),
        (["--inference-engine", "nope"], "unknown engine 'nope'"),
        (["run", "no-such-model", "--engine", "dummy"], "unknown model 'no-such-model'; choose one of: "),
        (["--run-model", "no-such-model", "--engine", "dummy"], "unknown model 'no-such-model'"),
    ],
)
def test_unknown_engine_or_model_is_a_one_line_error(args, needle):
    out = exo(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert needle in lines[0]
    assert "Traceback" not in out.stderr


def test_prompt_prints_answer_and_exits():
    out = exo("run", "--engine", "dummy", "--prompt", "Hi")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == DUMMY_ANSWER


def test_old_flags_still_work():
    # What existing deployments type: plain `exo`, --inference-engine, --run-model, --disable-tui.
    out = exo(
        "--inference-engine",
        "dummy",
        "--run-model",
        "smollm2-135m",
        "--disable-tui",
        "--chatgpt-api-port",
        "0",
        "--node-id",
        "legacy",
        "--discovery-module",
        "udp",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == DUMMY_ANSWER


def test_json_logs():
    out = exo(
        "--log-format", "json", "run", "--engine", "dummy", "--prompt", "Hi", env={"EXO_LOG_LEVEL": "debug"}
    )
    assert out.returncode == 0, out.stderr
    log_lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert log_lines and all(json.loads(line)["event"] for line in log_lines)


def test_help_mentions_the_commands():
    out = exo("--help")
    assert out.returncode == 0
    for word in ("run", "plugins", "models"):
        assert word in out.stdout


@pytest.mark.parametrize("option", ["--node-port", "--link-port"])
def test_a_busy_peer_port_is_a_one_line_error(option, tmp_path):
    import socket

    from exo_core.testing.cluster import free_ports

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        peers = tmp_path / "peers.json"
        peers.write_text('{"peers": {}}')
        (api_port,) = free_ports(1)
        args = ["run", "--engine", "dummy", "--node-host", "127.0.0.1", option, str(port)]
        args += ["--api-port", str(api_port), "--discovery-module", "manual"]
        out = exo(*args, "--discovery-config-path", str(peers), env={"EXO_HOME": str(tmp_path)}, timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"127.0.0.1:{port}" in out.stderr and f"choose another {option}" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
