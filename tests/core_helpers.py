"""Helpers shared by exo-core's test modules (import by name: tests/conftest.py puts this directory
on sys.path)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import uuid
from typing import Any

from exo_core.plugins import registry
from exo_core.runtime import NodeConfig, Runtime
from exo_core.testing.cluster import NodeSpec, free_ports, write_peers_file


def api_node_config(node_id: str, **overrides: Any) -> NodeConfig:
    """A lone node on 127.0.0.1 (dummy engine, no discovery) with its API on a free port."""
    settings: dict[str, Any] = dict(
        engine="dummy",
        api_host="127.0.0.1",
        api_port=0,
        node_host="127.0.0.1",
        discovery="none",
        node_id=node_id,
    )
    settings.update(overrides)
    return NodeConfig(**settings)


def real_cluster_engine() -> str | None:
    """The real engine the cluster tests run: EXO_TEST_CLUSTER_ENGINE, else tinygrad, else mlx;
    None when none of them can run here."""
    wanted = os.environ.get("EXO_TEST_CLUSTER_ENGINE")
    engines = registry().engines
    for name in [wanted] if wanted else ["tinygrad", "mlx"]:
        if name in engines and engines[name].available()[0]:
            return name
    return None


@contextlib.asynccontextmanager
async def manual_runtimes(tmp_path, ids, *, listed=None, delay_ms=0.0, timeout=5.0, reg=None, **config):
    """Started runtimes for `ids` (dummy engine, in this process, real gRPC on 127.0.0.1); the peers
    file lists `listed` (default: all of them). Yields (runtimes by id, specs by id, peers file)."""
    ports = free_ports(len(ids))
    specs = {nid: NodeSpec(nid, port, 0) for nid, port in zip(ids, ports, strict=True)}
    path = write_peers_file(tmp_path / "peers.json", [specs[n] for n in (listed or ids)])
    started = []
    try:
        for nid in ids:
            rt = Runtime(
                NodeConfig(
                    engine="dummy",
                    engine_options={"dummy_delay_ms": delay_ms},
                    node_id=nid,
                    node_host="127.0.0.1",
                    node_port=specs[nid].node_port,
                    discovery="manual",
                    discovery_config_path=str(path),
                    discovery_options={"timeout": timeout},
                    frontends=(),
                    **config,
                ),
                reg,
            )
            await rt.start()
            started.append(rt)
        yield dict(zip(ids, started, strict=True)), specs, path
    finally:
        for rt in started:
            await rt.stop()


async def until(predicate, timeout=10.0):
    """Wait until `predicate()` holds; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.05)


def wait_until(predicate, timeout: float = 20.0) -> bool:
    """Poll `predicate()` (blocking) until it holds: False when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def udp_args(spec: NodeSpec, *extra: str) -> list[str]:
    """`exo` arguments for a dummy-engine node that finds its peers by UDP discovery."""
    return [
        "--engine",
        "dummy",
        "--node-id",
        spec.node_id,
        "--node-port",
        str(spec.node_port),
        "--api-port",
        str(spec.api_port),
        "--discovery-module",
        "udp",
        *extra,
    ]


@contextlib.contextmanager
def web_page(playwright, chromium: str, args: list[str], url: str):
    """The web page at `url` in a headless chromium; on leaving, no JavaScript error was raised."""
    browser = playwright.chromium.launch(executable_path=chromium, args=args)
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    yield page
    browser.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def can_make_namespaces() -> bool:
    """Whether this process may create network namespaces (root and `ip netns`)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"exo-probe-{uuid.uuid4().hex[:6]}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False).returncode == 0
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return ok
