"""The live terminal view of `exo run`: on a terminal by default, plain logs with --disable-tui or a pipe."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

from exo_core.testing.cluster import free_ports

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_terminal(*args: str, seconds: float = 20.0, until: str | None = None) -> str:
    """`exo run` with stdout on a pseudo-terminal; what it drew, without escape codes."""
    api_port, node_port = free_ports(2)
    main, child = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "LINES": "40", "TERM": "xterm-256color"}
    env["EXO_DISABLE_PLUGINS"] = "tinygrad,mlx,rkllm,upstream"
    command = [sys.executable, "-m", "exo_core", "run", "--engine", "dummy", "--node-id", "tui-node"]
    command += ["--api-host", "127.0.0.1", "--api-port", str(api_port), "--node-host", "127.0.0.1"]
    command += ["--node-port", str(node_port), "--discovery-module", "none", *args]
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=child,
        stderr=child,
        env=env,
        start_new_session=True,
    )
    os.close(child)
    out = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.2)
            if ready:
                try:
                    out += os.read(main, 65536)
                except OSError:
                    break
            if until and until in ANSI.sub("", out.decode(errors="replace")):
                time.sleep(1.0)  # a couple more frames
                with_frames = os.read(main, 65536) if select.select([main], [], [], 0.5)[0] else b""
                out += with_frames
                break
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(main)
    return ANSI.sub("", out.decode(errors="replace"))


def test_exo_run_on_a_terminal_shows_the_live_view():
    screen = run_on_terminal(until="requests in flight")
    assert "node tui-node" in screen and "smollm2-135m" in screen
    assert "tui-node (this node)" in screen and "0-29 of 30" in screen and "dummy" in screen
    assert "requests in flight: 0" in screen and "tokens/s" in screen


def test_disable_tui_gives_plain_logs():
    screen = run_on_terminal("--disable-tui", seconds=15, until="frontend started")
    assert "frontend started" in screen
    assert "requests in flight" not in screen


def test_not_a_terminal_gives_plain_logs():
    api_port, node_port = free_ports(2)
    command = [sys.executable, "-m", "exo_core", "run", "--engine", "dummy", "--discovery-module", "none"]
    command += ["--api-host", "127.0.0.1", "--api-port", str(api_port), "--node-port", str(node_port)]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "EXO_DISABLE_PLUGINS": "tinygrad,mlx,rkllm,upstream"},
        start_new_session=True,
    )
    out = b""
    deadline = time.monotonic() + 20
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline and b"frontend started" not in out:
        time.sleep(0.2)
        out += proc.stdout.read() or b""
    proc.send_signal(signal.SIGINT)
    proc.wait(20)
    out += proc.stdout.read() or b""
    text = out.decode(errors="replace")
    assert "frontend started" in text and "requests in flight" not in text
