"""/v1/models while the peer table changes: every answer is a 200 and a consistent list.

The handler once walked the peer table from a worker thread while the event loop added and
removed peers ("dictionary changed size during iteration": a 500). Here a real node (dummy
engine, its HTTP API on loopback) serves /v1/models and /v1/models/{id} to a crowd of clients
while peers join and leave its table as fast as the event loop can go, thousands of them, and
the interpreter switches threads as often as it can (so a walk from a thread would be caught
mid-way).
"""

from __future__ import annotations

import asyncio
import logging
import sys

import aiohttp
import pytest
import structlog

from exo_core.node.topology import NodeInfo
from exo_core.testing import node
from exo_core.testing.inprocess import api_url

pytestmark = pytest.mark.timeout(120)

PEERS = 3000  # a table big enough that walking it takes longer than a thread switch
CLIENTS = 8
REQUESTS = 40  # per client


@pytest.fixture
def frequent_thread_switches():
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.fixture
def quiet_logs():
    """Thousands of "peer added" lines would drown the output (and slow the churn): warnings only."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        yield
    finally:
        structlog.configure(**saved)


async def test_models_stay_consistent_while_peers_join_and_leave(frequent_thread_switches, quiet_logs):
    async with node("dummy", api=True) as runtime:
        n = runtime.node
        own = n.client_for(n.node_id)  # a real client; the fake peers are never called
        default = runtime.default_model.id
        url = api_url(runtime)
        stop = asyncio.Event()
        churned = 0

        async def churn() -> None:
            """Peers join and leave: half the table at a time, every pass of the loop."""
            nonlocal churned
            i = 0
            while not stop.is_set():
                for k in range(PEERS // 2):
                    pid = f"peer-{(i + k) % PEERS}"
                    if pid in n.peers:
                        n.remove_peer(pid, "churn")
                    else:
                        n.add_peer(NodeInfo(pid, port=1000 + (i + k) % PEERS), own)
                    churned += 1
                    if k % 50 == 0:
                        await asyncio.sleep(0)  # let the API answer in between
                i += 7

        peer_ids = {f"peer-{k}" for k in range(PEERS)}

        def check(model: dict) -> None:
            nodes = model["nodes"]
            assert n.node_id in nodes, model
            assert set(nodes) <= peer_ids | {n.node_id}, model
            assert len(nodes) == len(set(nodes)), "a node listed twice"

        async def client(http: aiohttp.ClientSession) -> list[int]:
            statuses = []
            for r in range(REQUESTS):
                path = "/v1/models" if r % 2 == 0 else f"/v1/models/{default}"
                async with http.get(url + path) as resp:
                    statuses.append(resp.status)
                    body = await resp.json()
                if resp.status != 200:
                    continue
                if path == "/v1/models":
                    assert body["object"] == "list"
                    ids = [m["id"] for m in body["data"]]
                    assert ids[0] == default, ids
                    assert ids[1:] == sorted(ids[1:]), ids
                    for model in body["data"]:
                        check(model)
                else:
                    assert body["id"] == default
                    check(body)
            return statuses

        churner = asyncio.create_task(churn())
        try:
            async with aiohttp.ClientSession() as http:
                results = await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
        finally:
            stop.set()
            await churner
        statuses = [s for r in results for s in r]
        assert statuses == [200] * (CLIENTS * REQUESTS), sorted(set(statuses))
        assert churned > 2 * PEERS  # the table really changed under the requests
