"""Tailscale discovery against a stand-in Tailscale API on 127.0.0.1, with real exo nodes
talking gRPC: nodes publish themselves, find each other, answer together, and drop peers
that leave the tailnet. The API's failures are clear errors or survived."""

import asyncio
import contextlib
import time

import pytest
from exo_discovery_tailscale.api import TailscaleAPI, TailscaleAPIError, parse_attributes
from exo_discovery_tailscale.fake_api import FakeTailscaleAPI

from exo_core import ConfigError, NodeConfig, Runtime
from exo_core.testing import DUMMY_ANSWER, chat
from exo_core.testing.cluster import free_ports

pytestmark = pytest.mark.timeout(60)
KEY = "tskey-test"


async def until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.05)


def config(fake, node_id, port, cluster_secret=None, **extra):
    options = {
        "tailscale_api_key": KEY,
        "tailscale_api_url": fake.url,
        "tailscale_device_id": f"dev-{node_id}",
        "tailscale_poll_interval": 0.2,
        "timeout": 5.0,
        **extra,
    }
    return NodeConfig(
        engine="dummy",
        node_id=node_id,
        node_host="127.0.0.1",
        node_port=port,
        discovery="tailscale",
        discovery_options=options,
        frontends=(),
        cluster_secret=cluster_secret,
    )


@contextlib.asynccontextmanager
async def tailnet(ids):
    async with FakeTailscaleAPI(KEY) as fake:
        for nid in ids:
            fake.add_device(f"dev-{nid}", "127.0.0.1")
        started = []
        try:
            for nid, port in zip(ids, free_ports(len(ids)), strict=True):
                rt = Runtime(config(fake, nid, port))
                await rt.start()
                started.append(rt)
            yield fake, dict(zip(ids, started, strict=True))
        finally:
            for rt in started:
                await rt.stop()


async def test_nodes_publish_and_find_each_other_and_answer_together():
    async with tailnet(["node-a", "node-b"]) as (fake, rts):
        published = parse_attributes(fake.attributes["dev-node-a"])
        assert published.node_id == "node-a"
        assert published.port == rts["node-a"].node.port
        assert published.capabilities.memory == rts["node-a"].node.capabilities.memory
        await until(lambda: all(len(rt.node.peers) == 1 for rt in rts.values()))
        assert set(rts["node-a"].node.peers) == {"node-b"}
        a = rts["node-a"]
        plan = a.node.make_plan(a.default_model)
        assert {stage.node_id for stage in plan} == {"node-a", "node-b"}
        answer = await chat(a, [{"role": "user", "content": "Hi"}], model=a.default_model.id)
        assert answer.text == DUMMY_ANSWER


async def test_a_device_that_leaves_the_tailnet_is_dropped():
    async with tailnet(["node-a", "node-b"]) as (fake, rts):
        await until(lambda: "node-b" in rts["node-a"].node.peers)
        fake.remove_device("dev-node-b")
        await until(lambda: "node-b" not in rts["node-a"].node.peers)


async def test_devices_without_exo_or_offline_are_ignored():
    async with tailnet(["node-a"]) as (fake, rts):
        fake.add_device("laptop", "127.0.0.1")  # runs no exo node: no attributes
        fake.add_device("old", "127.0.0.1", connected=False)
        fake.devices["old"]["lastSeen"] = "2020-01-01T00:00:00Z"
        fake.attributes["old"] = {"custom:exo_node_id": "old", "custom:exo_node_port": 1}
        await asyncio.sleep(0.6)
        assert rts["node-a"].node.peers == {}
        paths = [p for _, p in fake.requests]
        assert "/api/v2/device/old/attributes" not in paths  # offline for years: not even asked


async def test_api_outage_keeps_the_peers_it_has():
    async with tailnet(["node-a", "node-b"]) as (fake, rts):
        await until(lambda: "node-b" in rts["node-a"].node.peers)
        fake.fail_with = 500
        await asyncio.sleep(0.6)
        assert "node-b" in rts["node-a"].node.peers
        fake.fail_with = None


async def test_missing_or_wrong_key_is_a_clear_config_error():
    async with FakeTailscaleAPI(KEY) as fake:
        fake.add_device("dev-x", "127.0.0.1")
        (port,) = free_ports(1)
        rt = Runtime(config(fake, "x", port, tailscale_api_key=None))
        with pytest.raises(ConfigError, match="TAILSCALE_API_KEY"):
            await rt.start()
        await rt.stop()
        rt = Runtime(config(fake, "x", port, tailscale_api_key="wrong"))
        with pytest.raises(ConfigError, match="HTTP 401: API token invalid"):
            await rt.start()
        await rt.stop()


async def test_node_ids_that_cannot_be_published_are_refused():
    async with FakeTailscaleAPI(KEY) as fake:
        (port,) = free_ports(1)
        rt = Runtime(config(fake, "has space", port))
        with pytest.raises(ConfigError, match="cannot be published"):
            await rt.start()
        await rt.stop()


async def test_client_reports_garbage_answers():
    async with FakeTailscaleAPI(KEY) as fake:
        api = TailscaleAPI(KEY, base_url=fake.url + "/nowhere")
        with pytest.raises(TailscaleAPIError, match="HTTP 404"):
            await api.devices()
        await api.close()


def test_attribute_parsing_rejects_junk():
    assert parse_attributes({}) is None
    assert parse_attributes({"custom:exo_node_id": "a", "custom:exo_node_port": "nope"}) is None
    assert parse_attributes({"custom:exo_node_id": "a", "custom:exo_node_port": 70000}) is None
    parsed = parse_attributes({"custom:exo_node_id": "a_b", "custom:exo_node_port": "5000"})
    assert (parsed.node_id, parsed.port, parsed.capabilities) == ("a-b", 5000, None)


async def test_attributes_are_signed_and_copies_or_strangers_are_not_offered():
    async with tailnet(["node-a", "node-b"]) as (fake, rts):
        await until(lambda: "node-b" in rts["node-a"].node.peers)
        published = fake.attributes["dev-node-b"]
        assert len(published["custom:exo_sig"]) == 32 and int(published["custom:exo_seq"]) > 0
        # b's attributes copied onto another device (another address): not offered
        fake.add_device("dev-evil", "127.0.0.2")
        fake.attributes["dev-evil"] = dict(published)
        # a node of another cluster on the tailnet: its signature does not verify
        (port,) = free_ports(1)
        fake.add_device("dev-node-c", "127.0.0.1")
        other = Runtime(config(fake, "node-c", port, cluster_secret="another cluster"))
        await other.start()
        try:
            await until(lambda: ("node-b", "127.0.0.2") in rts["node-a"].discovery._strangers)
            await until(lambda: ("node-c", "127.0.0.1") in rts["node-a"].discovery._strangers)
            await asyncio.sleep(0.5)
            assert rts["node-a"].peer_tracker._tracked["node-b"].address == "127.0.0.1"
            assert "node-c" not in rts["node-a"].peer_tracker.known()
            assert set(rts["node-a"].node.peers) == {"node-b"}
        finally:
            await other.stop()
